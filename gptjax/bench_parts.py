"""The benchmark's measurements besides the train step: the input pipeline (tokenize,
pack, batch), generation with the key/value cache against its memory-bandwidth bound
(and the PyTorch peers under --vs-torch), and how long a checkpoint save blocks the loop.
Each returns its keys of `bench_report.KEYS`."""

import dataclasses
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint
from gptjax import tokenizer as tokenizer_lib
from gptjax.bench_torch import TorchReference
from gptjax.data.pipeline import PackedWindows, tokenize_books, train_iterator
from gptjax.errors import UserError
from gptjax.generate import Generator, Sampling
from gptjax.measure import read_bytes_per_s, take_turns
from gptjax.model import ModelConfig, unstack_layers

if TYPE_CHECKING:
    from gptjax.bench_step import Settings, TrainStep


def synthetic_books(num_chars: int, num_books: int = 8, seed: int = 0) -> list[str]:
    """Made-up English-like books: Zipf-distributed words of 2-9 letters, 12 to a line."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 10, 5000)]
    p = 1.0 / np.arange(1, len(words) + 1)
    drawn = [words[i] for i in rng.choice(len(words), num_chars // 6, p=p / p.sum())]
    lines = [" ".join(drawn[i : i + 12]).capitalize() + "." for i in range(0, len(drawn), 12)]
    return ["\n".join(part) + "\n" for part in np.array_split(lines, num_books)]


# Batches the batching figure is timed over at least, in one epoch. Each epoch costs
# grain about 20 ms (here) besides its batches, nothing against a corpus's thousands of
# batches but most of an epoch of a few: 64 x 512 windows of 300,000 characters (2
# batches an epoch) drew 2.5M tokens/s, of 6M characters (47) 21M.
MIN_BATCHES = 32


@dataclasses.dataclass
class PipelineText:
    """The pipeline benchmark's books and the tokenizer learned on them (untimed), made
    before anything compiles, so that flags that cannot make them fail at once."""

    books: list
    tokenizer: tokenizer_lib.SentencePieceTokenizer

    @classmethod
    def make(cls, settings: "Settings") -> "PipelineText":
        books = synthetic_books(settings.text_chars)
        try:
            tokenizer = tokenizer_lib.train_sentencepiece(books, settings.tokenizer_vocab, 20_000)
        except UserError as e:  # its advice names the config's vocabulary, not these flags
            fix = (
                "raise --tokenizer-vocab: the text has more distinct characters"
                if "smaller than required_chars" in str(e)
                else "raise --text-chars or lower --tokenizer-vocab"
            )
            raise UserError(
                f"--text-chars={settings.text_chars} --tokenizer-vocab="
                f"{settings.tokenizer_vocab}: no tokenizer can be learned ({e}); {fix}"
            ) from None
        return cls(books, tokenizer)


def bench_pipeline(config, settings: "Settings", text: PipelineText | None = None) -> dict:
    """Tokens per second through the pipeline of `lm_data` / `pipeline`: tokenize the
    books (of `text`, made here if not given), then pack the ids into windows and draw
    shuffled batches, timed from the second batch (starting the iterator is once a run)
    to the end of an epoch of at least MIN_BATCHES batches; a shorter text's ids are
    repeated to make one. Serially, the two stages give `pipeline_tokens_per_s`; a run
    tokenizes its corpus once and caches the ids, so its steps wait only on the
    batches."""
    text = text or PipelineText.make(settings)
    books, tokenizer = text.books, text.tokenizer
    batch_size, n_ctx = config.train.batch_size, config.model.n_ctx
    start = time.perf_counter()
    tokens = tokenize_books(books, tokenizer)
    tokenize_s = time.perf_counter() - start
    if tokens.size < 2:
        raise UserError(f"--text-chars={settings.text_chars} makes no tokens to predict")
    stream = np.tile(tokens, -(-(MIN_BATCHES * batch_size * n_ctx + 1) // tokens.size))
    windows = PackedWindows(stream, n_ctx, tokenizer.pad_id)
    batches = train_iterator(windows, batch_size, seed=0)
    next(batches)
    num_batches = len(windows) // batch_size - 1  # the rest of the epoch
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    batch_s = time.perf_counter() - start
    tokenize_rate = tokens.size / tokenize_s
    batch_rate = num_batches * batch_size * n_ctx / batch_s
    return {
        "pipeline_tokens": int(tokens.size),
        "tokenize_tokens_per_s": tokenize_rate,
        "batch_tokens_per_s": batch_rate,
        "pipeline_tokens_per_s": 1.0 / (1.0 / tokenize_rate + 1.0 / batch_rate),
    }


def decode_bytes_per_token(model_cfg: ModelConfig, params, cache_positions: float):
    """(parameter bytes, key/value cache bytes) read per generated token: every
    parameter but the position rows not used, and each layer's keys and values over the
    `cache_positions` positions it attends over (`GPT.decode` reads the whole cache,
    masked, and the generator sizes the cache: `Generator.mean_span`)."""
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    unused = (model_cfg.n_ctx - 1) * params["positions_embed"]["embedding"][0].nbytes
    itemsize = jnp.dtype(model_cfg.dtype).itemsize
    kv_bytes = 2 * model_cfg.n_layer * cache_positions * model_cfg.d_model * itemsize
    return param_bytes - unused, round(kv_bytes)


def bench_checkpoint(state, saves: int) -> dict:
    """Seconds until `checkpoint.save` returns (the loop's wait) and until the
    background write is done, each the median of `saves` saves of the train state."""
    blocking, total = [], []
    with tempfile.TemporaryDirectory() as workdir:
        mngr = checkpoint.manager(workdir, keep=1)
        for i in range(saves):
            step_state = state.replace(step=state.step + 1 + i)
            jax.block_until_ready(step_state)
            start = time.perf_counter()
            checkpoint.save(mngr, step_state, {"next_index": i}, force=True)
            blocking.append(time.perf_counter() - start)
            mngr.wait_until_finished()
            total.append(time.perf_counter() - start)
        checkpoint.finish(mngr)
    return {
        "checkpoint_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
        "checkpoint_blocking_s": statistics.median(blocking),
        "checkpoint_total_s": statistics.median(total),
    }


def bench_generate(step: "TrainStep", settings: "Settings", torch_ref: TorchReference | None):
    """Greedy generation with the key/value cache (batch 1), in turns with the torch
    models under --vs-torch; each figure the median of `generate_repeats` calls."""
    cfg = step.model_cfg
    params = step.state.params
    params = unstack_layers(params) if "h" in params else params
    prompt_len = min(settings.prompt_tokens, cfg.n_ctx // 2)
    new = min(settings.new_tokens, cfg.n_ctx - prompt_len)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, prompt_len).tolist()
    generator = Generator(cfg, params, cfg.vocab_size)
    sampling = Sampling(max_new_tokens=new, temperature=0.0)

    def ours():
        (row,) = generator.generate([prompt], sampling)
        assert len(row) == new, len(row)

    runners = {"gptjax": ours} | (torch_ref.generators(prompt, new) if torch_ref else {})
    for fn in runners.values():
        fn()  # compilation, caches
    times = take_turns(runners, settings.generate_repeats, 1, lead=False)
    rate = {name: new / statistics.median(t) for name, t in times.items()}
    cache_positions = generator.mean_span(prompt_len, new)
    param_bytes, kv_bytes = decode_bytes_per_token(cfg, params, cache_positions)
    bandwidth_bytes = settings.bandwidth_mb * 2**20
    bandwidth = read_bytes_per_s(bandwidth_bytes)
    r = {
        "generate_prompt_tokens": prompt_len,
        "generate_new_tokens": new,
        "generate_s": statistics.median(times["gptjax"]),
        "generate_tokens_per_s": rate["gptjax"],
        "generate_param_bytes_per_token": param_bytes,
        "generate_cache_positions": cache_positions,
        "generate_kv_bytes_per_token": kv_bytes,
        "generate_bandwidth_bytes_per_s": (param_bytes + kv_bytes) * rate["gptjax"],
        "bandwidth_array_bytes": bandwidth_bytes,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "generate_bandwidth_fraction": (param_bytes + kv_bytes) * rate["gptjax"] / bandwidth,
    }
    if torch_ref:
        r["torch_gpt2_generate_tokens_per_s"] = rate["gpt2"]
        r["torch_openai_generate_tokens_per_s"] = rate["openai"]
        r["generate_speedup_vs_gpt2"] = rate["gptjax"] / rate["gpt2"]
        r["generate_speedup_vs_openai"] = rate["gptjax"] / rate["openai"]
    return r
