"""Sampling text from a trained GPT: batched prompts, a key/value cache, a jitted loop.

    python -m gptjax.main --config=configs/gpt1.py --workdir=RUN --mode=generate \
        --config.generate.prompt="It was a dark and stormy night"

The prompts go through the model once, filling each layer's key/value cache; each new
token then costs one position's worth of work (`GPT.decode`), never a pass over the whole
prefix. Tokens are drawn on the device in jitted chunks of `chunk` steps; between chunks
the host checks stop strings, so a long sample stops soon after its stop string and the
loop never waits on the device per token. Rows stop at the context length (n_ctx), after
`max_new_tokens`, at an end-of-document token (where the tokenizer has one) or a stop
string. Logits are restricted to the ordinary vocabulary: the fine-tuning specials are
never drawn.
"""

import dataclasses
import json
import logging
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.kv_cache import init_cache, resize, span_for
from gptjax.model import GPT, ModelConfig, unstack_layers
from gptjax.run_config import saved_config


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (`config.generate`)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy (the most likely token)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set holding this much probability; 1: all
    seed: int = 0

    def check(self):
        if self.max_new_tokens <= 0:
            raise UserError(f"generate.max_new_tokens={self.max_new_tokens} must be positive")
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError(
                "generate.temperature and generate.top_k must be >= 0 and generate.top_p in "
                f"(0, 1] (got {self.temperature}, {self.top_k}, {self.top_p})"
            )
        if not 0 <= self.seed < 2**32:  # what a PRNG key holds
            raise UserError(f"generate.seed is {self.seed}; it must be in [0, 2**32)")


def filter_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus): excluded tokens get -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    # The largest logit subtracted first: divided by a tiny temperature, the logits
    # themselves overflow to +-inf (and inf - inf is NaN in the softmax); their
    # differences from the largest only go to -inf.
    logits_BxV = (logits_BxV - logits_BxV.max(-1, keepdims=True)) / sampling.temperature
    if 0 < sampling.top_k < logits_BxV.shape[-1]:  # k of at least the vocabulary keeps all
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # A token is kept while the probability before it is below top_p (the first
        # always is); the threshold is the smallest kept logit.
        kept_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampling.top_p
        threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), -1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def choose(
    logits_BxV: jax.Array, key: jax.Array, sampling: Sampling, rows_B: jax.Array | None = None
) -> jax.Array:
    """The next token of each row [B]. Row i draws with `key` folded with its number
    `rows_B[i]` (by default i; a batch of later prompts numbers them on), so its sample
    does not depend on how many rows there are, how they are batched or what the others
    hold."""
    if np.float32(sampling.temperature) == 0:  # (also one under float32's smallest)
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered_BxV = filter_logits(logits_BxV, sampling)
    if rows_B is None:
        rows_B = jnp.arange(len(filtered_BxV))
    keys_B = jax.vmap(lambda row: jax.random.fold_in(key, row))(rows_B)
    return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)


class Generator:
    """A GPT's parameters ready to sample from. `vocab_size` is the ordinary vocabulary
    (the logits of any rows after it, the fine-tuning specials, are never drawn).

    Tokens are drawn `chunk` at a time. The key/value caches hold only as many
    positions as the rows have reached, at least `min_span`, doubling as they advance
    (`kv_cache.span_for`; n_ctx for a cache as long as the context from the start): each
    token reads the cache it attends over, and at `gpt1`'s shape the whole 512-position
    cache made a 32 + 128-token generation on a CPU 1.12x slower. Each length compiles
    the decoding loop once."""

    def __init__(
        self, cfg: ModelConfig, params, vocab_size: int, chunk: int = 16, min_span: int = 128
    ):
        # Decoding reads each parameter once a token: a padded copy of the LM head's
        # embedding (train.lm_head_pad_to, for training's matmuls) would only add to it.
        cfg = dataclasses.replace(cfg, dropout=0.0, lm_head_pad_to=1)
        self.cfg, self.vocab_size, self.chunk, self.min_span = cfg, vocab_size, chunk, min_span
        self.model = GPT(cfg)
        self.params = params
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampling", "span"))
        self._steps = jax.jit(self._steps_fn, static_argnames="sampling", donate_argnums=1)
        self._resize = jax.jit(resize, static_argnums=1)

    def padded(self, longest: int) -> int:
        """The prompts' length once padded: a multiple of 16 tokens, so that similar
        prompts share one compilation."""
        return min(self.cfg.n_ctx, -(-longest // 16) * 16)

    def span(self, longest: int, chunk_index: int = 0) -> int:
        """The cache length the `chunk_index`-th chunk (0: the prompts, padded) needs,
        for rows whose longest prompt has `longest` tokens: each chunk writes `chunk`
        positions past where the rows are. The cache never shrinks (`generate`)."""
        if chunk_index == 0:
            return span_for(self.padded(longest), self.cfg.n_ctx, self.min_span)
        reach = longest + chunk_index * self.chunk
        return span_for(reach, self.cfg.n_ctx, self.min_span)

    def mean_span(self, prompt_tokens: int, new_tokens: int) -> float:
        """The cache positions each token decoded after the first attends over, on
        average, for one prompt of `prompt_tokens` continued by `new_tokens` tokens."""
        chunks = -(-(new_tokens - 1) // self.chunk)
        spans = [self.span(prompt_tokens, 0)]
        for i in range(1, chunks + 1):
            spans.append(max(spans[-1], self.span(prompt_tokens, i)))
        return sum(spans[1:]) / chunks if chunks else 0.0

    def _prefill_fn(self, params, tokens_BxP, lengths_B, rows_B, key, sampling, span=None):
        caches = init_cache(self.cfg, tokens_BxP.shape[0], span)
        logits_BxPxV, caches = self.model.apply(
            {"params": params}, tokens_BxP, caches, method=GPT.decode
        )
        # Rows are right-padded: each continues after its own last prompt token, and
        # the cache entries past it are overwritten as it goes (and masked until then).
        last_BxV = logits_BxPxV[jnp.arange(tokens_BxP.shape[0]), lengths_B - 1]
        caches = [{**c, "pos": lengths_B} for c in caches]
        return choose(last_BxV[:, : self.vocab_size], key, sampling, rows_B), caches

    def _steps_fn(self, params, caches, token_B, rows_B, key, sampling):
        """`chunk` more tokens for every row: [B, chunk]."""

        def step(carry, step_key):
            caches, token_B = carry
            logits_Bx1xV, caches = self.model.apply(
                {"params": params}, token_B[:, None], caches, method=GPT.decode
            )
            token_B = choose(logits_Bx1xV[:, 0, : self.vocab_size], step_key, sampling, rows_B)
            return (caches, token_B), token_B

        (caches, token_B), tokens_TxB = jax.lax.scan(
            step, (caches, token_B), jax.random.split(key, self.chunk)
        )
        return caches, token_B, tokens_TxB.T

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        stop_ids: tuple[int, ...] = (),
        is_done=None,
        first_row: int = 0,
    ) -> list[list[int]]:
        """The new tokens of each prompt (at most `max_new_tokens`, and no more than
        fit in n_ctx), each cut before the first of `stop_ids`. `is_done(row, tokens)`,
        checked on the host after every chunk, ends a row early (stop strings). The
        prompts are rows `first_row`, ... of the whole run's (each draws as that row
        does whichever batch it is in)."""
        sampling.check()
        # The jitted code reads only how tokens are chosen: a new seed or length must not
        # compile it again.
        static = dataclasses.replace(sampling, seed=0, max_new_tokens=1)
        n_ctx = self.cfg.n_ctx
        if not prompts or any(not p for p in prompts):
            raise UserError("every prompt needs at least one token")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.max() >= n_ctx:
            raise UserError(
                f"a prompt of {lengths.max()} tokens leaves no room in the {n_ctx}-token "
                "context; shorten it"
            )
        tokens = np.zeros((len(prompts), self.padded(int(lengths.max()))), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        # At most n_ctx first: a huge max_new_tokens would overflow the int32 lengths.
        budget = np.minimum(min(sampling.max_new_tokens, n_ctx), n_ctx - lengths)
        key = jax.random.PRNGKey(sampling.seed)
        rows = np.arange(first_row, first_row + len(prompts), dtype=np.int32)
        token_B, caches = self._prefill(
            self.params,
            tokens,
            lengths,
            rows,
            jax.random.fold_in(key, 0),
            sampling=static,
            span=self.span(int(lengths.max())),
        )
        out = [[t] for t in np.asarray(token_B).tolist()]
        done = self._finished(out, budget, stop_ids, is_done)
        chunk_index = 1
        while not done.all():
            # The rows still drawing write up to `chunk` positions past where they are; a
            # finished row's writes past the end land on its own last positions, unread.
            span = self.span(int(lengths[~done].max()), chunk_index)
            if span > caches[0]["k"].shape[-1]:
                caches = self._resize(caches, span)
            caches, token_B, new_BxT = self._steps(
                self.params,
                caches,
                token_B,
                rows,
                jax.random.fold_in(key, chunk_index),
                sampling=static,
            )
            chunk_index += 1
            for i, row in enumerate(np.asarray(new_BxT).tolist()):
                if not done[i]:
                    out[i].extend(row)
            done = self._finished(out, budget, stop_ids, is_done) | done
        return [self._cut(row, n, stop_ids) for row, n in zip(out, budget, strict=True)]

    @staticmethod
    def _finished(out, budget, stop_ids, is_done) -> np.ndarray:
        return np.array(
            [
                len(row) >= n
                or any(t in stop_ids for t in row)
                or (is_done is not None and is_done(i, row))
                for i, (row, n) in enumerate(zip(out, budget, strict=True))
            ]
        )

    @staticmethod
    def _cut(row: list[int], budget: int, stop_ids) -> list[int]:
        row = row[:budget]
        for i, t in enumerate(row):
            if t in stop_ids:
                return row[:i]
        return row


def stop_strings(setting: str) -> tuple[str, ...]:
    """`generate.stop` as its strings: separated by commas, `\\,` for a comma within
    one and `\\n` for a line break (a shell passes both as typed inside quotes)."""
    parts = re.split(r"(?<!\\),", setting)
    return tuple(p.replace("\\,", ",").replace("\\n", "\n") for p in parts if p)


def generate_text(
    generator: Generator,
    tokenizer,
    prompts: list[str],
    sampling: Sampling,
    stop: tuple[str, ...] = (),
    first_row: int = 0,
) -> list[str]:
    """Continuations of text prompts, each cut before its first stop string (the
    prompts are rows `first_row`, ... of the run's: `Generator.generate`).

    A continuation is the text the new tokens add to the prompt's, decoded together:
    decoded alone, a first token's leading space (SentencePiece's `▁`, or the word end
    GPT-1's BPE marks on the prompt's last token) would be lost.
    """
    stop = tuple(s for s in stop if s)
    stop_ids = ()
    if getattr(tokenizer, "eos_id", None) not in (None, tokenizer.newline_id):
        stop_ids = (tokenizer.eos_id,)  # the end of a document (SentencePiece's </s>)
    prompt_ids = tokenizer.encode_texts(prompts)
    prefixes = {i: tokenizer.decode(p) for i, p in enumerate(prompt_ids)}

    def continuation(i, tokens):
        whole = tokenizer.decode(prompt_ids[i] + tokens)
        if whole.startswith(prefixes[i]):
            return whole[len(prefixes[i]) :]
        return tokenizer.decode(tokens)  # a tokenizer whose text does not split there

    def is_done(i, tokens):
        return any(s in continuation(i, tokens) for s in stop)

    ids = generator.generate(
        prompt_ids, sampling, stop_ids, is_done if stop else None, first_row=first_row
    )
    texts = []
    for i, row in enumerate(ids):
        text = continuation(i, row)
        cuts = [text.index(s) for s in stop if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts


def load(workdir: str, step: int | None = None, tokenizer=None) -> tuple[Generator, object]:
    """The generator and tokenizer (`tokenizer`, if given, else the workdir's) of a
    workdir (pretrained, converted or fine-tuned: its GPT), from its latest checkpoint or
    `step`."""
    model = saved_config(workdir, "--workdir")["model"]
    tokenizer = tokenizer or tokenizer_lib.load_dir(workdir)
    params = checkpoint.read_params(workdir, step)
    params = params.get("transformer", params)  # a fine-tuned model's GPT
    if "h" in params:  # trained with train.scan_layers
        params = unstack_layers(params)
    rows = params["tokens_embed"]["embedding"].shape[0]
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"the tokenizer in {workdir} has {tokenizer.vocab_size} ids but the model's "
            f"embedding only {rows} rows: it is not the tokenizer the model was trained with; "
            "restore that one"
        )
    cfg = ModelConfig(**{**{k: model[k] for k in ModelConfig.architecture()}, "vocab_size": rows})
    which = step if step is not None else checkpoint.latest_step(workdir)
    logging.info("loaded checkpoint %s of %s (%s)", which, workdir, describe(cfg))
    return Generator(cfg, params, tokenizer.vocab_size), tokenizer


def describe(cfg: ModelConfig) -> str:
    return f"{cfg.n_layer} layers, width {cfg.d_model}, context {cfg.n_ctx}"


def check_prompts(prompts: list[str], where: list[str], tokenizer, n_ctx: int):
    """UserError naming every prompt (by `where`) that encodes to no token, or to too many
    to leave room for one new token in the context: before the checkpoint is read, so a
    long prompts file does not fail after hours of generation."""
    lengths = [len(ids) for ids in tokenizer.encode_texts(prompts)]
    empty = [w for w, n in zip(where, lengths, strict=True) if n == 0]
    long = [f"{w} ({n} tokens)" for w, n in zip(where, lengths, strict=True) if n >= n_ctx]
    for bad, problem, fix in (
        (empty, "encode to no token", "remove them"),
        (long, f"fill the {n_ctx}-token context (no room to continue)", "shorten them"),
    ):
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise UserError(f"prompts that {problem}: {'; '.join(bad[:3])}{more}; {fix}")


def run(config, workdir: str):
    """`--mode=generate`: prints a continuation of each prompt of `config.generate`."""
    g = config.generate
    prompts, where = ([g.prompt], ["generate.prompt"]) if g.prompt else ([], [])
    if g.prompts_file:
        try:
            # utf-8-sig: a byte-order mark (Notepad writes one) is not part of a prompt.
            with open(g.prompts_file, encoding="utf-8-sig") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        prompts.append(line.rstrip("\n"))
                        where.append(f"line {number} of {g.prompts_file}")
        except OSError as e:
            raise UserError(f"cannot read generate.prompts_file: {e}") from None
        except UnicodeDecodeError as e:
            raise UserError(
                f"generate.prompts_file {g.prompts_file} is not UTF-8 text ({e.reason} at byte "
                f"{e.start}); save it as UTF-8"
            ) from None
    if not prompts:
        raise UserError(
            "nothing to continue: set --config.generate.prompt=TEXT or "
            "--config.generate.prompts_file=PATH (one prompt per line)"
        )
    sampling = Sampling(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        seed=g.seed,
    )
    sampling.check()  # before the checkpoint is read
    batch_size = g.get("batch_size", 32)  # (a config from before the setting: 32)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"generate.batch_size={batch_size} must be a whole number, 1 or more")
    tokenizer = tokenizer_lib.load_dir(workdir)
    check_prompts(prompts, where, tokenizer, saved_config(workdir, "--workdir")["model"]["n_ctx"])
    generator, tokenizer = load(workdir, g.step, tokenizer)
    stop = stop_strings(g.stop)
    # In batches of `generate.batch_size` prompts, each printed when done: a batch's
    # key/value cache grows with its prompts (7 MB a prompt at GPT-1's size, float32).
    # A prompt draws the same tokens whatever batch it is in.
    texts = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        done = generate_text(generator, tokenizer, batch, sampling, stop, first_row=first)
        for prompt, text in zip(batch, done, strict=True):
            print(json.dumps({"prompt": prompt, "continuation": text}, ensure_ascii=False))
        sys.stdout.flush()
        texts += done
        if len(prompts) > batch_size:
            logging.info("generated %d of %d prompts", len(texts), len(prompts))
    return texts
