"""Generation: the key/value cache reproduces full recomputation, sampling is seeded and
filtered as configured, and `--mode=generate` continues prompts from a workdir."""

import dataclasses
import functools
import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import main_in_process

from gptjax import generate, kv_cache, workdirs
from gptjax.errors import UserError
from gptjax.generate import Generator, Sampling
from gptjax.kv_cache import init_cache
from gptjax.model import GPT, ModelConfig

from conftest import tiny_config

CFG = ModelConfig(vocab_size=50, n_ctx=24, n_layer=2, n_head=2, d_model=32, d_mlp=64, dropout=0.0)


@pytest.fixture(scope="module")
def params():
    return GPT(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnums=2)
def _full(params, tokens_BxC, cfg):
    return GPT(cfg).apply({"params": params}, tokens_BxC)


def full_logits(params, rows, cfg=CFG):
    """Next-token logits of each row's last token, recomputing the whole prefix (padded
    to n_ctx, which a causal model ignores, so that one compilation serves every step)."""
    tokens = np.zeros((len(rows), CFG.n_ctx), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits = _full(params, tokens, cfg)
    return [logits[i, len(r) - 1] for i, r in enumerate(rows)]


# bfloat16: the same computation in another order (cached keys and values), so equal
# within bfloat16's rounding, not float32's.
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("bfloat16", 1e-2)])
def test_cached_decoding_equals_full_recomputation_at_every_step(params, dtype, atol):
    # Full float32 matmuls on a GPU too, where XLA's default is TF32 (3e-5 apart there).
    with jax.default_matmul_precision("highest"):
        _check_cached_decoding(params, dataclasses.replace(CFG, dtype=dtype), atol)


def _check_cached_decoding(params, cfg, atol):
    rows = [[3, 7, 1, 4, 9], [2, 8]]  # different lengths, right-padded in one batch
    tokens = np.zeros((2, 5), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = jnp.array([len(r) for r in rows])
    decode = jax.jit(lambda p, t, c: GPT(cfg).apply({"params": p}, t, c, method=GPT.decode))
    logits, caches = decode(params, tokens, init_cache(cfg, 2))
    caches = [{**c, "pos": lengths} for c in caches]
    last = logits[jnp.arange(2), lengths - 1]
    for _ in range(CFG.n_ctx - 5):
        expected = full_logits(params, rows, cfg)
        np.testing.assert_allclose(last, np.stack(expected), atol=atol, rtol=1e-5)
        nxt = np.asarray(jnp.argmax(last, -1))
        rows = [r + [int(t)] for r, t in zip(rows, nxt, strict=True)]
        logits, caches = decode(params, jnp.asarray(nxt)[:, None], caches)
        last = logits[:, 0]


@pytest.mark.parametrize("loop", [True, False])  # CPUs' per-row loop; the scatter elsewhere
@pytest.mark.parametrize("axis", [1, 2])
def test_write_rows_puts_each_rows_entries_at_its_position(loop, axis):
    batch, n_head, length = 3, 2, 2
    shape = (batch * n_head, 5, 7)
    cache = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    new_shape = list(shape)
    new_shape[axis] = length
    new = -1.0 - jnp.arange(np.prod(new_shape), dtype=jnp.float32).reshape(new_shape)
    pos = jnp.array([0, 3, 2])
    out = np.asarray(
        jax.jit(kv_cache.write_rows, static_argnums=(3, 4))(cache, new, pos, axis, loop)
    )
    expected = np.array(cache)
    for row in range(batch):
        for h in range(row * n_head, (row + 1) * n_head):
            index = [h, slice(None), slice(None)]
            index[axis] = slice(int(pos[row]), int(pos[row]) + length)
            expected[tuple(index)] = np.asarray(new)[h]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_never_copies_a_whole_cache(params, batch):
    """Each token writes its keys and values into the caches in place: the compiled
    decoding loop holds no copy the size of a layer's cache (XLA on CPUs made one per
    layer and token when the cache was [B, C, H, K] and written by a vmapped update)."""
    gen = Generator(CFG, params, vocab_size=CFG.vocab_size, chunk=4)
    sampling = Sampling(max_new_tokens=4, temperature=0.0)
    tokens, lengths = np.ones((batch, 8), np.int32), np.array([8, 3][:batch], np.int32)
    key = jax.random.PRNGKey(0)
    rows = np.arange(batch, dtype=np.int32)
    token_B, caches = gen._prefill(params, tokens, lengths, rows, key, sampling=sampling)
    hlo = gen._steps.lower(params, caches, token_B, rows, key, sampling=sampling)
    cache_size = caches[0]["k"].size
    copies = [
        line
        for line in hlo.compile().as_text().splitlines()
        if (m := re.search(r"%copy\S* = f32\[([\d,]+)\]", line))
        and math.prod(map(int, m.group(1).split(","))) == cache_size
    ]
    assert caches[0]["k"].size == batch * CFG.n_ctx * CFG.d_model
    assert not copies, copies[:2]


def test_decoding_reads_the_embedding_unpadded(params):
    """A model trained with train.lm_head_pad_to decodes with the embedding as it is:
    a padded copy of it in the decoding loop would be another read of the LM head's
    parameters at every token."""
    gen = Generator(dataclasses.replace(CFG, lm_head_pad_to=128), params, CFG.vocab_size)
    sampling = Sampling(max_new_tokens=4, temperature=0.0)
    key = jax.random.PRNGKey(0)
    tokens, lengths = np.ones((1, 8), np.int32), np.array([8], np.int32)
    rows = np.arange(1, dtype=np.int32)
    token_B, caches = gen._prefill(params, tokens, lengths, rows, key, sampling=sampling)
    hlo = gen._steps.lower(params, caches, token_B, rows, key, sampling=sampling).as_text()
    assert f"tensor<128x{CFG.d_model}xf32>" not in hlo
    assert f"tensor<{CFG.vocab_size}x{CFG.d_model}xf32>" in hlo


@pytest.mark.parametrize("min_span", [4, CFG.n_ctx])  # a cache that grows; one of n_ctx
def test_greedy_generation_is_the_argmax_path_and_deterministic(params, min_span):
    gen = Generator(CFG, params, vocab_size=CFG.vocab_size, chunk=4, min_span=min_span)
    prompts = [[5, 6, 7], [1]]
    greedy = Sampling(max_new_tokens=18, temperature=0.0)
    out = gen.generate(prompts, greedy)
    assert out == gen.generate(prompts, greedy)
    for prompt, new in zip(prompts, out, strict=True):
        row = list(prompt)
        for _ in range(18):
            row.append(int(jnp.argmax(full_logits(params, [row])[0])))
        assert new == row[len(prompt) :]
    # The prompts fill a cache of 16 positions (padded to 16 tokens); the fourth chunk
    # reaches position 3 + 4 x 4 = 19, past it: the cache grew once, each length compiled.
    assert gen._steps._cache_size() == (2 if min_span < 16 else 1)


def test_the_cache_holds_the_smallest_doubling_that_fits():
    assert [kv_cache.span_for(n, 512, 128) for n in (1, 128, 129, 300, 512, 600)] == [
        *(128, 128, 256, 512, 512, 512)
    ]
    assert [kv_cache.span_for(n, 24, 4) for n in (3, 5, 16, 17)] == [4, 8, 16, 24]
    assert kv_cache.span_for(1, 24, 128) == 24  # never past the context


def test_mean_span_follows_the_cache_generate_uses(params):
    gen = Generator(CFG, params, vocab_size=CFG.vocab_size, chunk=4, min_span=4)
    # Prompt 3 tokens, padded to 16: the cache starts at 16 positions; chunks 1-5 reach
    # 7, 11, 15, 19 and 23 positions: 16, 16, 16, 24, 24.
    assert gen.mean_span(3, 20) == (16 * 3 + 24 * 2) / 5
    assert Generator(CFG, params, CFG.vocab_size, chunk=4).mean_span(3, 20) == CFG.n_ctx
    assert gen.mean_span(3, 1) == 0.0  # the prompt's pass only: no token decoded after


def test_rows_stop_at_the_context_length_and_at_stop_ids(params):
    gen = Generator(CFG, params, vocab_size=CFG.vocab_size, chunk=4)
    long_prompt = list(range(1, 21))  # 20 of 24 positions: room for 4 new tokens
    greedy = Sampling(max_new_tokens=10**12, temperature=0.0)  # past int32 too
    short, near_full = gen.generate([[1, 2], long_prompt], greedy)
    assert len(near_full) == CFG.n_ctx - 20 and len(short) == CFG.n_ctx - 2
    stop = short[3]
    [cut] = gen.generate([[1, 2]], greedy, stop_ids=(stop,))
    assert cut == short[: short.index(stop)]
    with pytest.raises(Exception, match="no room"):
        gen.generate([list(range(24))], greedy)


def test_sampling_is_seeded_and_never_draws_outside_the_vocabulary(params):
    gen = Generator(CFG, params, vocab_size=7, chunk=8)  # rows 7.. are like the specials
    prompts = [[1, 2, 3]] * 4
    hot = Sampling(max_new_tokens=16, temperature=5.0, seed=1)
    a, b = gen.generate(prompts, hot), gen.generate(prompts, hot)
    assert a == b
    assert a != gen.generate(prompts, Sampling(max_new_tokens=16, temperature=5.0, seed=2))
    assert {t for row in a for t in row} <= set(range(7))
    assert len({tuple(row) for row in a}) > 1  # rows draw independently
    # A prompt's sample depends on its place in the list, not on the prompts after it,
    # nor on the batch it is decoded in.
    [alone] = gen.generate([[4, 5]], hot)
    assert gen.generate([[4, 5], [1, 2, 3, 4, 5, 6]], hot)[0] == alone
    two = gen.generate([[4, 5], [1, 2, 3, 4, 5, 6]], hot)
    assert gen.generate([[1, 2, 3, 4, 5, 6]], hot, first_row=1) == two[1:]
    assert gen.generate([[1, 2, 3, 4, 5, 6]], hot) != two[1:]  # (row 0 draws otherwise)


def test_a_new_seed_or_length_does_not_compile_again(params):
    gen = Generator(CFG, params, vocab_size=CFG.vocab_size, chunk=4)
    for seed, n in ((0, 5), (1, 5), (2, 9)):
        gen.generate([[1, 2, 3]], Sampling(max_new_tokens=n, temperature=1.0, seed=seed))
    assert gen._prefill._cache_size() == 1 and gen._steps._cache_size() == 1


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(generate.filter_logits(logits, s)))[0].tolist()  # noqa: E731
    assert kept(Sampling(top_k=2)) == [True, True, False, False, False]
    # 0.5 + 0.2 = 0.7 < 0.8, so the smallest set reaching 0.8 also holds 0.15.
    assert kept(Sampling(top_p=0.8)) == [True, True, True, False, False]
    assert kept(Sampling(top_p=0.5)) == [True, False, False, False, False]
    assert kept(Sampling(top_k=3, top_p=0.6)) == [True, True, False, False, False]
    assert kept(Sampling(top_k=5)) == kept(Sampling(top_k=500)) == [True] * 5  # k >= vocab


def test_a_tiny_temperature_draws_the_most_likely_token():
    """Logits / 1e-30 overflow to inf (inf - inf: NaN); their gaps to the largest do not."""
    logits = jnp.array([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    chosen = generate.choose(logits, jax.random.PRNGKey(0), Sampling(temperature=1e-30))
    assert chosen.tolist() == [1, 0]
    # One below float32's smallest number is 0 there: greedy, not a division by zero.
    for sampling in (Sampling(temperature=1e-46), Sampling(temperature=1e-50, top_p=0.5)):
        assert generate.choose(logits, jax.random.PRNGKey(0), sampling).tolist() == [1, 0]


class _Replay:
    """A generator stand-in that continues every prompt with the same ids."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, prompts, sampling, stop_ids=(), is_done=None, first_row=0):
        return [list(self.ids) for _ in prompts]


def test_a_continuation_keeps_the_space_before_its_first_word():
    from gptjax import tokenizer as tokenizer_lib

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "A brown dog, a quick fox."] * 20
    tok = tokenizer_lib.train_sentencepiece(texts, 60, 1000)
    [ids] = tok.encode_texts(["The quick brown fox"])
    [prompt] = tok.encode_texts(["The quick"])
    assert ids[: len(prompt)] == prompt
    replay = _Replay(ids[len(prompt) :])
    [text] = generate.generate_text(replay, tok, ["The quick"], Sampling(temperature=0.0))
    assert text == " brown fox"  # decoded alone, the new ids read "brown fox"
    [cut] = generate.generate_text(replay, tok, ["The quick"], Sampling(), (" fox",))
    assert cut == " brown"
    # Several stop strings: cut at the first that occurs, whichever is listed first.
    [cut] = generate.generate_text(replay, tok, ["The quick"], Sampling(), (" fox", "own"))
    assert cut == " br"


def test_sentencepiece_generation_stops_at_the_end_of_a_document():
    """SentencePiece's </s> ends a continuation (the next tokens would start another
    document); GPT-1's BPE, whose end of a text is its newline, stops at nothing."""
    from gptjax import tokenizer as tokenizer_lib

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "A brown dog, a quick fox."] * 20
    tok = tokenizer_lib.train_sentencepiece(texts, 60, 1000)
    asked = []

    class Recorder(_Replay):
        def generate(self, prompts, sampling, stop_ids=(), is_done=None, first_row=0):
            asked.append(tuple(stop_ids))
            return super().generate(prompts, sampling, stop_ids, is_done, first_row)

    generate.generate_text(Recorder([5]), tok, ["The quick"], Sampling(temperature=0.0))
    assert asked == [(tok.eos_id,)]
    bpe_like = types.SimpleNamespace(
        eos_id=7,
        newline_id=7,
        encode_texts=lambda texts: [[1] for _ in texts],
        decode=lambda ids: " ".join(map(str, ids)),
    )
    generate.generate_text(Recorder([5]), bpe_like, ["x"], Sampling(temperature=0.0))
    assert asked[-1] == ()


def test_generate_mode_continues_prompts_from_a_workdir(pretrained, capsys, tmp_path):
    run = pretrained / "run"
    flags = ["--mode=generate", "--config.generate.temperature=0"]
    flags += ["--config.generate.max_new_tokens=6"]
    status, _ = main_in_process(run, *flags, "--config.generate.prompt=The king")
    assert status == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    row = json.loads(line)
    gen, tok = generate.load(str(run))
    [expected] = generate.generate_text(gen, tok, ["The king"], Sampling(6, temperature=0.0))
    assert row == {"prompt": "The king", "continuation": expected} and expected
    # A stop string cuts the continuation before it.
    stop = expected.strip()[1:3]
    [cut] = generate.generate_text(gen, tok, ["The king"], Sampling(6, temperature=0.0), (stop,))
    assert cut == expected[: expected.index(stop)]
    # A prompts file with Windows line ends (text mode reads "\r\n" as "\n"), or a
    # byte-order mark (Notepad's UTF-8): the same prompt.
    prompts = tmp_path / "prompts.txt"
    for content in (b"The king\r\n", b"\xef\xbb\xbfThe king\n"):
        prompts.write_bytes(content)
        status, _ = main_in_process(run, *flags, f"--config.generate.prompts_file={prompts}")
        assert status == 0
        [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert json.loads(line) == {"prompt": "The king", "continuation": expected}
    status, last = main_in_process(run, "--mode=generate", capsys=capsys)
    assert status == 2 and "generate.prompt" in last, last
    # Prompts in batches of 2, printed as each is done: the same samples as in one batch.
    prompts.write_text("The king\nA lord\nThe queen is\n")
    sampled = ["--mode=generate", "--config.generate.max_new_tokens=6"]
    outputs = []
    for batch in (32, 2):
        status, _ = main_in_process(
            run,
            *sampled,
            f"--config.generate.prompts_file={prompts}",
            f"--config.generate.batch_size={batch}",
        )
        assert status == 0
        outputs.append([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")])
    assert len(outputs[0]) == 3 and outputs[0] == outputs[1]


def test_prompts_that_leave_no_room_are_named_before_the_checkpoint_is_read(
    pretrained, capsys, tmp_path, monkeypatch
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\n\nA lord\n" + "the king " * 200 + "\nThe queen\n")
    read = []
    monkeypatch.setattr(generate.checkpoint, "read_params", lambda *a: read.append(a))
    status, last = main_in_process(
        pretrained / "run",
        "--mode=generate",
        f"--config.generate.prompts_file={prompts}",
        capsys=capsys,
    )
    assert status == 2 and f"line 4 of {prompts} (" in last and "context" in last, last
    assert "line 1 " not in last and "line 5 " not in last and not read


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--config.generate.temperature=nan", "generate.temperature"),
        ("--config.generate.seed=-1", "generate.seed is -1; it must be in [0, 2**32)"),
        ("--config.generate.prompts_file=PROMPTS", "is not UTF-8 text (invalid continuation"),
        ("--config.generate.batch_size=0", "generate.batch_size=0 must be a whole number"),
    ],
)
def test_bad_generation_settings_are_one_line_errors(pretrained, capsys, tmp_path, flag, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")  # Latin-1
    status, last = main_in_process(
        pretrained / "run",
        "--mode=generate",
        "--config.generate.prompt=The king",
        flag.replace("PROMPTS", str(prompts)),
        capsys=capsys,
    )
    assert status == 2 and words in last, last


@pytest.mark.parametrize("content", ['{"model": {"vocab', "[1]", "{}"])
def test_a_damaged_config_file_is_named(tmp_path, content):
    """Generation, fine-tuning's init_from and a resume read a run's config.json."""
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(UserError, match=r"config.json is (unreadable|not a gptjax run's config)"):
        generate.load(str(tmp_path))
    with pytest.raises(UserError, match="delete it to resume without checking"):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True)


def test_a_hugging_face_directory_is_told_to_be_converted(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "openai-gpt", "n_embd": 768}')
    with pytest.raises(UserError, match="is a Hugging Face model directory.*convert it first"):
        generate.load(str(tmp_path))


@pytest.mark.parametrize(
    "setting, strings",
    [
        ("", ()),
        ("END,\\n", ("END", "\n")),
        ("\\,", (",",)),  # a comma, escaped
        ("x\\,y,,z", ("x,y", "z")),
    ],
)
def test_stop_strings_split_at_unescaped_commas(setting, strings):
    assert generate.stop_strings(setting) == strings
