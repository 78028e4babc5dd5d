"""The benchmark and the estimator on a tiny configuration (no speed is asserted)."""

import importlib.util
import json
import logging
import pathlib
import types

import jax
import ml_collections
import numpy as np
import pytest

from gptjax import bench, bench_parts, bench_report, bench_step, estimate, measure, sharding, train
from gptjax.data import pipeline
from gptjax.errors import UserError
from gptjax.model import ModelConfig, flops_per_token

from conftest import ROOT, gpt1_config

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
ON_CPU = jax.default_backend() == "cpu"


# A --versus variant whose step fails when it runs, as one that runs out of memory would.
FAILING = "train.seed=7"
VARIANT_STEP = bench.variant_step
MATMUL = bench.matmul_flops_per_s
MATMUL_LIBRARIES = []  # the libraries the fixture's run measured its matmul peak with


def _recorded_matmul(n, **kwargs):
    MATMUL_LIBRARIES.append(kwargs.get("libraries"))
    return MATMUL(n, **kwargs)


def _failing_variant_step(spec, config, warmup):
    step = VARIANT_STEP(spec, config, 0)
    if spec == (FAILING,):

        def out_of_memory(state, batch):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nwhile running the step")

        step.compiled = out_of_memory
    for _ in range(warmup):
        step()
    return step


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One benchmark of `--config=tiny` through the command's entry point, with a
    variant of twice the batch (--versus) and one that fails, a profile, and --vs-torch
    where transformers is installed, as read back from its --json file."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--config=tiny", f"--json={path}", "--versus=train.batch_size=8"]
    argv += [f"--profile={path.parent / 'profile'}"]
    argv += [f"--versus={FAILING}"] + ["--vs-torch"] * HAS_TORCH
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "variant_step", _failing_variant_step)
        patch.setattr(bench, "matmul_flops_per_s", _recorded_matmul)
        returned = bench.main(argv)
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_every_documented_key_is_written_and_measured(result):
    assert list(result) == list(bench_report.KEYS)
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert [k for k in bench_report.KEYS + bench_report.VERSUS_KEYS if f"`{k}`" not in docs] == []
    assert [list(v) for v in result["versus"]] == [list(bench_report.VERSUS_KEYS)] * 2
    # device_peak_bytes: accelerators only; the torch keys: --vs-torch only.
    unmeasured = {"device_peak_bytes"} if ON_CPU else set()
    unmeasured |= set() if HAS_TORCH else set(bench_report.TORCH_KEYS)
    assert {k for k, v in result.items() if v is None} == unmeasured


def test_figures_follow_from_their_definitions(result):
    r = result
    d, t, f, v = r["d_model"], r["n_ctx"], 4 * r["d_model"], r["vocab_size"]
    # Embeddings, then per layer: QKV, attention output, 2 LayerNorms, MLP in and out.
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + 4 * d + (d * f + f) + (f * d + d)
    assert r["num_params"] == v * d + t * d + r["n_layer"] * per_layer
    assert r["flops_per_token"] == 6 * r["num_params"] + 12 * r["n_layer"] * d * t
    assert len(r["step_times_s"]) == r["timed_steps"]
    assert r["train_tokens_per_s"] == pytest.approx(r["batch_size"] * t / r["step_time_s"])
    assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / r["peak_flops_per_s"])
    if ON_CPU:  # the peak is the matmul measured in the same run
        assert r["peak_flops_per_s"] == r["matmul_flops_per_s"]
    # The second compilation is read back from the persistent cache.
    assert 0 < r["compile_cached_s"] < r["compile_cold_s"]
    xla = [r[f"xla_{k}_bytes"] for k in ("argument", "output", "alias", "temp")]
    assert min(xla) > 0 and r["xla_peak_bytes"] == xla[0] + xla[1] - xla[2] + xla[3]
    # The state is donated: parameters and both Adam moments are aliased in place.
    assert r["xla_alias_bytes"] >= 3 * 4 * r["num_params"]
    assert r["peak_rss_bytes"] > r["xla_peak_bytes"]
    # Only the commands keep freed memory (at their start); this process does not.
    assert r["host_memory_kept"] is False and r["page_faults_per_step"] >= 0
    pipeline = r["pipeline_tokens_per_s"]
    assert r["pipeline_ratio"] == pytest.approx(pipeline / r["train_tokens_per_s"])
    assert (r["generate_prompt_tokens"], r["generate_new_tokens"]) == (8, 8)
    assert r["generate_param_bytes_per_token"] == 4 * (r["num_params"] - (t - 1) * d)
    # The tiny config's cache: min(128, n_ctx) = n_ctx positions from the start.
    assert r["generate_cache_positions"] == t
    assert r["generate_kv_bytes_per_token"] == 2 * r["n_layer"] * t * d * 4
    read = r["generate_param_bytes_per_token"] + r["generate_kv_bytes_per_token"]
    assert r["generate_bandwidth_bytes_per_s"] == pytest.approx(read * r["generate_tokens_per_s"])
    assert r["bandwidth_array_bytes"] == 4 * 2**20 and r["memory_bandwidth_bytes_per_s"] > 0
    bandwidth = r["generate_bandwidth_bytes_per_s"] / r["memory_bandwidth_bytes_per_s"]
    assert r["generate_bandwidth_fraction"] == pytest.approx(bandwidth)
    assert r["checkpoint_bytes"] > 3 * 4 * r["num_params"]
    assert 0 < r["checkpoint_blocking_s"] <= r["checkpoint_total_s"]


def test_vs_torch_times_the_same_steps(result):
    pytest.importorskip("transformers")
    r = result
    assert len(r["torch_step_times_s"]) == r["timed_steps"]
    assert r["torch_threads"] == r["threads"]
    assert r["train_speedup_vs_torch"] == pytest.approx(r["torch_step_time_s"] / r["step_time_s"])
    assert len(r["train_speedup_by_round"]) == bench_step.TINY_SETTINGS.rounds
    assert r["generate_speedup_vs_gpt2"] == pytest.approx(
        r["generate_tokens_per_s"] / r["torch_gpt2_generate_tokens_per_s"]
    )


def test_versus_times_a_variant_in_the_same_turns(result):
    """The variant ran with its overrides (twice the batch: twice the tokens a step and
    a larger compiled step) and its ratios follow from the times."""
    r, v = result, result["versus"][0]
    assert v["overrides"] == ["train.batch_size=8"] and r["batch_size"] == 4
    assert v["error"] is None
    assert len(v["step_times_s"]) == r["timed_steps"]
    assert v["train_tokens_per_s"] == pytest.approx(8 * r["n_ctx"] / v["step_time_s"])
    assert v["speedup"] == pytest.approx(v["train_tokens_per_s"] / r["train_tokens_per_s"])
    assert v["mfu"] == pytest.approx(r["mfu"] * v["speedup"])
    assert len(v["speedup_by_round"]) == bench_step.TINY_SETTINGS.rounds
    assert v["xla_peak_bytes"] > r["xla_peak_bytes"]


def test_a_variant_that_fails_is_reported_and_the_rest_measured(result):
    """The failing variant's entry says why and holds no figures; the baseline, the
    other variant and every later part were still measured (the key test above)."""
    failed = result["versus"][1]
    assert failed["overrides"] == [FAILING]
    assert (
        failed["error"] == "RuntimeError: RESOURCE_EXHAUSTED: out of memory\nwhile running the step"
    )
    assert {k for k, v in failed.items() if v is None} == set(bench_report.VERSUS_KEYS) - {
        "overrides",
        "error",
    }
    line = bench_report.report(result).splitlines()[-1 - 2 * HAS_TORCH]
    assert line.endswith(f"{FAILING}: failed: RuntimeError: RESOURCE_EXHAUSTED: out of memory")


def test_the_steps_figures_are_reported_before_the_rest_is_measured(result):
    """What `run` logs once the steps are timed: the same rows as the final table's,
    from a result whose input pipeline, generation and checkpoint are not measured."""
    later = [
        k for k in bench_report.KEYS if k.split("_")[0] in ("pipeline", "generate", "checkpoint")
    ]
    later += ["bandwidth_array_bytes", "memory_bandwidth_bytes_per_s", "batch_tokens_per_s"]
    later += ["tokenize_tokens_per_s", "torch_gpt2_generate_tokens_per_s"]

    def rows(text):  # name: value, without the alignment
        return dict(map(str.strip, line.split("  ", 1)) for line in text.splitlines())

    partial = rows(bench_report.report(result | dict.fromkeys(later), train_only=True))
    full = rows(bench_report.report(result))
    assert "train step" in partial and "versus (2)" in partial
    assert not {"input pipeline", "generation", "checkpoint", "vs torch: generation"} & set(partial)
    assert partial.items() < full.items()


@pytest.mark.parametrize(
    "versus, message",
    [
        ("train.nope=1", "--versus train.nope=1: no such config key 'train.nope'"),
        ("dropout", "--versus='dropout': give SECTION.KEY=VALUE overrides, comma-separated"),
        ("train.attention_blocks=0", "train.attention_blocks=0 must be a whole number"),
        ("train.batch_size=3,train.microbatches=2", "train.batch_size=3"),  # does not split
        ("mesh.tensor=3", "mesh"),  # no mesh of these devices
    ],
)
def test_a_bad_variant_is_one_line_before_anything_runs(versus, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", f"--versus={versus}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_the_profile_is_written_and_its_operations_summed(result):
    r = result
    traces = list(pathlib.Path(r["profile_dir"]).glob("**/*.trace.json.gz"))
    assert len(traces) == 1 and r["profile_steps"] == bench_step.TINY_SETTINGS.profile_steps
    # Operation time: at most the traced steps' wall time on each of the cores.
    assert 0 < r["profile_op_s_per_step"] <= r["profile_wall_s_per_step"] * r["threads"]
    kept = [o["s_per_step"] for o in r["profile_ops"]]
    assert kept == sorted(kept, reverse=True) and sum(kept) <= r["profile_op_s_per_step"]
    assert f"most: {r['profile_ops'][0]['op']} " in bench_report.report(r)


@pytest.mark.parametrize("where", ["trace", "trace/sub"])
def test_a_profile_directory_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "trace").write_text("kept")
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", f"--profile={tmp_path / where}"])
    assert e.value.code == 2 and (tmp_path / "trace").read_text() == "kept"
    assert capsys.readouterr().err.startswith("error: --profile=")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--json={tmp}/nowhere/out.json"], "--json={tmp}/nowhere/out.json: its directory does"),
        (["--json={tmp}"], "--json={tmp} is a directory"),
        (["--json=gs://b/r.json"], "--json=gs://b/r.json is a URL"),  # was a directory gs:
        (["--profile=gs://b/trace"], "--profile=gs://b/trace is a URL"),
        (["--peak-tflops=-1"], "--peak-tflops=-1.0: it must be a positive number"),
        (["--peak-tflops=0"], "--peak-tflops=0.0: it must be a positive number"),
        (["--peak-tflops=nan"], "--peak-tflops=nan: it must be a positive number"),
        (["--peak-tflops=inf"], "--peak-tflops=inf: it must be a positive number"),
        (
            ["--config={root}/configs/demo_finetune.py"],
            "--config={root}/configs/demo_finetune.py fine-tunes",
        ),
    ],
)
def test_bad_outputs_and_peaks_are_one_line_before_anything_runs(
    flags, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", *(f.format(tmp=tmp_path, root=ROOT) for f in flags)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message.format(tmp=tmp_path, root=ROOT)}")


def test_the_torch_peer_is_refused_off_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", "--vs-torch"])
    assert e.value.code == 2
    assert "--vs-torch times PyTorch on the CPU, against gptjax on gpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, missing, message",
    [
        ([], "torch", "--vs-torch needs torch, not installed: pip install -e '.[bench]'"),
        (["--set=train.compute_dtype=bfloat16"], None, "train.compute_dtype='bfloat16': set"),
        (["--set=train.microbatches=2"], None, "train.microbatches=2: set train.microbatches=1"),
        (["--set=train.remat=full"], None, "train.remat='full': set train.remat='none'"),
        (["--set=model.d_mlp=32"], None, "--vs-torch needs model.d_mlp = 4 x d_model"),
    ],
)
def test_a_torch_peer_that_cannot_run_or_compare_is_refused_before_compiling(
    flags, missing, message, capsys, monkeypatch
):
    found = importlib.util.find_spec
    monkeypatch.setattr(  # torch and transformers present (or not), whatever is installed
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else (found(name, *a) or types.SimpleNamespace()),
    )
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", "--vs-torch", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_a_config_is_one_line(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("batch size 64, lr 2.5e-4\n")
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main([f"--config={notes}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config={notes}: not a config file (SyntaxError")
    assert len(err.strip().splitlines()) == 1


def test_a_results_file_that_cannot_be_written_is_one_line_after_the_report(capsys, monkeypatch):
    """The disk filling during the run: /dev/full exists and opens, and every write fails."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: {"step_time_s": 1.0})
    monkeypatch.setattr(bench, "report", lambda r: "the report")
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", "--json=/dev/full"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "the report\n"
    no_space = "could not write it (No space left on device); the results are above"
    assert err == f"error: --json=/dev/full: {no_space}\n"


def test_a_given_peak_is_one_devices(monkeypatch):
    """--peak-tflops is per device: 8 accelerators have 8 times the peak. A CPU's forced
    devices share its cores, so there the peak is the host's."""
    monkeypatch.setattr(measure.jax, "device_count", lambda: 8)
    monkeypatch.setattr(measure.jax, "default_backend", lambda: "gpu")
    assert measure.peak_flops("NVIDIA H100 80GB HBM3", 0, 100) == (
        8e14,
        "--peak-tflops x 8 devices",
    )
    assert measure.peak_flops("NVIDIA H100 80GB HBM3", 0, None)[0] == 8 * 989e12
    monkeypatch.setattr(measure.jax, "default_backend", lambda: "cpu")
    assert measure.peak_flops("cpu", 5e11, 100) == (1e14, "--peak-tflops")


def test_a_cpus_peak_is_the_faster_of_xla_and_onednn_matmuls(result, monkeypatch):
    """On some CPUs oneDNN's matmul is the faster (often, on an AMD EPYC): a step
    through it would read above a peak measured with XLA's own matmul alone."""
    expected = ({}, train.ONEDNN_CPU_OPTIONS) if ON_CPU else ({},)
    assert [expected] == MATMUL_LIBRARIES
    n, repeats = 8, 3
    for first, second in ((2.0, 1.0), (1.0, 2.0)):  # the faster wins, in either place
        times = iter([first] * repeats + [second] * repeats)
        monkeypatch.setattr(measure, "timed", lambda fn, times=times: next(times))
        flops = measure.matmul_flops_per_s(n, repeats, libraries=({}, train.ONEDNN_CPU_OPTIONS))
        assert flops == 2 * n**3 / 1.0
        assert next(times, None) is None  # every library timed `repeats` times


def test_a_matmul_library_xla_cannot_compile_is_left_out(caplog):
    """oneDNN exists only in x86 builds of XLA: elsewhere the peak is XLA's own matmul."""
    missing = {"xla_cpu_no_such_library": True}
    with pytest.raises(RuntimeError, match="xla_cpu_no_such_library"):
        measure.matmul_flops_per_s(8, 1, libraries=(missing,))  # no library left: an error
    caplog.set_level(logging.WARNING)
    assert measure.matmul_flops_per_s(8, 1, libraries=({}, missing)) > 0
    assert "xla_cpu_no_such_library" in caplog.text


def test_flops_per_token_by_hand():
    gpt1 = ModelConfig(
        vocab_size=40478, n_ctx=512, n_layer=12, n_head=12, d_model=768, d_mlp=3072, dropout=0.1
    )
    # 6 x 116,534,784 = 699,208,704 for the weights; 12 x 12 x 768 x 512 = 56,623,104
    # for attention scores and values: 0.756 GFLOP per token.
    assert flops_per_token(gpt1, 116_534_784) == 755_831_808


def test_named_configs():
    cpu = bench_step.load_config("bench-cpu")
    m = cpu.model
    assert (m.n_layer, m.n_head, m.d_model, m.n_ctx, m.vocab_size) == (6, 6, 384, 256, 8192)
    assert (cpu.train.batch_size, cpu.train.compute_dtype, m.dropout) == (8, "float32", 0.1)
    assert (cpu.train.lr, cpu.train.b2, cpu.train.weight_decay) == (2.5e-4, 0.999, 0.01)
    assert (cpu.train.attention, cpu.train.attention_blocks) == ("auto", 2)
    assert cpu.train.cpu_matmuls == "onednn"
    gpt1 = bench_step.load_config("gpt1")
    assert gpt1.model.to_dict() == gpt1_config().model.to_dict()
    assert gpt1.train.batch_size == (1 if jax.default_backend() == "cpu" else 64)
    tiny = bench_step.load_config("tiny", ("train.compute_dtype=bfloat16", "model.n_layer=2"))
    assert (tiny.train.compute_dtype, tiny.model.n_layer) == ("bfloat16", 2)
    assert tiny.train.cpu_matmuls == "xla"  # so that its compile is cached (above)
    with pytest.raises(UserError, match="model.n_layers"):
        bench_step.load_config("tiny", ("model.n_layers=2",))
    with pytest.raises(UserError, match="train.batch_size: give SECTION.KEY=VALUE"):
        bench_step.load_config("tiny", ("train.batch_size",))
    with pytest.raises(UserError, match="train.lr=nan must be a finite number"):  # as main's
        bench_step.load_config("tiny", ("train.lr=nan",))


def test_pipeline_times_an_epoch_of_at_least_min_batches(monkeypatch):
    """A text too short for MIN_BATCHES batches is repeated to make an epoch of them; the
    batches timed are that epoch's after the first, and their tokens give the rate."""
    config = bench_step.load_config("tiny")
    drawn, streams, clock = [], [], iter(range(1000))
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr(bench_parts, "time", fake_time)

    class Windows(bench_parts.PackedWindows):
        def __init__(self, tokens, *args):
            super().__init__(tokens, *args)
            streams.append((tokens, len(self)))

    def iterator(windows, batch_size, seed):
        for batch in pipeline.train_iterator(windows, batch_size, seed):
            drawn.append(batch)
            yield batch

    monkeypatch.setattr(bench_parts, "PackedWindows", Windows)
    monkeypatch.setattr(bench_parts, "train_iterator", iterator)
    r = bench_parts.bench_pipeline(
        config, bench_step.Settings(text_chars=3000, tokenizer_vocab=128)
    )
    (stream, num_windows), batch = streams[0], config.train.batch_size
    text_tokens = r["pipeline_tokens"]
    assert text_tokens < bench_parts.MIN_BATCHES * batch * config.model.n_ctx  # too short
    assert stream.size % text_tokens == 0 and stream.size > text_tokens
    np.testing.assert_array_equal(stream[text_tokens : 2 * text_tokens], stream[:text_tokens])
    assert len(drawn) == num_windows // batch >= bench_parts.MIN_BATCHES  # one epoch
    # Each perf_counter() call is one "second": tokenizing took 1, the timed batches 1.
    timed = (len(drawn) - 1) * batch * config.model.n_ctx
    assert r["batch_tokens_per_s"] == timed and r["tokenize_tokens_per_s"] == text_tokens


@pytest.mark.parametrize(
    "flags, fix",
    [
        (["--text-chars=200", "--tokenizer-vocab=4096"], "raise --text-chars or lower --tok"),
        (["--tokenizer-vocab=5"], "raise --tokenizer-vocab: the text has more distinct char"),
    ],
)
def test_a_tokenizer_the_flags_cannot_make_is_one_line_before_anything_runs(
    flags, fix, capsys, monkeypatch
):
    monkeypatch.setattr(bench, "TrainStep", lambda config: pytest.fail("compiled"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--config=tiny", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --text-chars=") and fix in err


@pytest.fixture(scope="module")
def estimated():
    config = bench_step.load_config("tiny")
    return config, estimate.estimate(config)


def test_estimate_counts_the_models_parameters(estimated, result):
    config, r = estimated
    # The benchmark's count is `count_params` of the state `train.create_state` initialised.
    assert r["num_params"] == result["num_params"]
    cfg = ModelConfig.from_config(config.model, config.train)
    assert r["flops_per_token"] == flops_per_token(cfg, result["num_params"])


def test_estimate_memory_analysis_and_time(estimated, result):
    config, r = estimated
    mem = r["memory_per_device"]
    assert min(mem.values()) > 0
    # From shapes alone, as much as the step the benchmark compiled from arrays and ran.
    assert mem == {k: result[f"xla_{k}"] for k in mem}
    assert mem["argument_bytes"] >= 3 * 4 * r["num_params"]  # parameters, Adam's mu, nu
    assert (r["steps"], r["tokens"]) == (10, 10 * 4 * 32)  # train.num_steps x batch x n_ctx
    throughput = r["mfu"] * r["accelerator_peak_flops"] * r["devices"]
    assert r["train_seconds"] == pytest.approx(r["tokens"] * r["flops_per_token"] / throughput)
    # configs/bench_cpu.py's estimate section (the tiny config is derived from it).
    assert (r["accelerator"], r["devices"], r["mfu"]) == ("H100", 1, 0.4)
    assert r["fits_in_memory"] is (mem["peak_bytes"] <= r["accelerator_memory_bytes"])
    # XLA's count of the compiled step: the formula's matmuls and the element-wise rest.
    assert 1.0 <= r["xla_flops_per_token"] / r["flops_per_token"] < 1.5
    assert r["topology"] is None


def test_estimate_for_other_devices_than_compiled_says_fit_unknown():
    """The memory analysis is of the step compiled for this machine's devices (here one
    holding the whole batch): no verdict for 16."""
    config = bench_step.load_config("tiny")
    config.estimate.devices = 16
    r = estimate.estimate(config)
    assert r["fits_in_memory"] is None
    assert "fit unknown: compiled for 1 device(s)" in estimate.table(r)


def test_estimate_run_prints_a_table_and_writes_json(estimated, tmp_path, capsys, monkeypatch):
    config, r = estimated
    monkeypatch.setattr(estimate, "estimate", lambda _: r)
    assert estimate.run(config, str(tmp_path)) == r
    assert "time to train" in capsys.readouterr().out
    assert json.loads((tmp_path / "estimate.json").read_text()) == json.loads(json.dumps(r))


@pytest.mark.parametrize(
    "seconds, text",
    [
        (1e-5, "under a millisecond"),
        (0.0128, "0.0128 seconds"),
        (59.6, "59.6 seconds"),
        (3599.9, "1.00 hours"),
        (86399, "1.00 days"),
        (90, "1.50 minutes"),
        (8.4 * 3600, "8.40 hours"),
        (86400, "1.00 days"),
        (30.2 * 86400, "30.20 days"),
    ],
)
def test_the_time_to_train_reads_in_a_fitting_unit(seconds, text):
    assert estimate.duration(seconds) == text


def test_estimate_length_of_an_epoch_run():
    config = gpt1_config()  # 100 epochs of 64 x 512
    steps, tokens = estimate.training_length(config, estimate.BOOKCORPUS_TOKENS)
    assert steps == 100 * estimate.BOOKCORPUS_TOKENS // (64 * 512) and tokens == steps * 64 * 512
    assert estimate.settings(config) == estimate.DEFAULTS  # the defaults are gpt1.py's
    partial = ml_collections.ConfigDict({"estimate": {"mfu": 0.5}})
    assert estimate.settings(partial) == {**estimate.DEFAULTS, "mfu": 0.5}
    with pytest.raises(UserError, match="accelerators"):
        estimate.settings(ml_collections.ConfigDict({"estimate": {"accelerators": 8}}))


@pytest.mark.parametrize(
    "kind, name",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("v5e", "v5e"),
        ("h100", "H100"),
        ("cpu", None),
    ],
)
def test_find_accelerator(kind, name):
    found = estimate.find_accelerator(kind)
    assert (found and found.name) == name


def test_estimate_mode_through_the_command_line(tmp_path, capsys):
    from cli import main_in_process

    from gptjax.model import GPT, count_params

    status, _ = main_in_process(tmp_path / "est", "--mode=estimate")
    assert status == 0
    report = json.loads((tmp_path / "est" / "estimate.json").read_text())
    # The tiny config of tests/cli.py: vocab 96, n_ctx 16, 2 blocks, width 32, MLP 64.
    cfg = ModelConfig(96, 16, 2, 2, 32, 64, 0.0)
    params = GPT(cfg).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 16), "int32"))
    assert report["num_params"] == count_params(params["params"])


def test_estimate_of_a_fine_tune_compiles_its_tasks_step(tmp_path, capsys):
    """A fine-tuning config is estimated with its task's model (the GPT with the three
    special rows, and the head) and batch: a RACE example is 4 sequences, an SST-2 one 1,
    so RACE's step holds about 4 times the activations."""
    from cli import main_in_process

    from gptjax.model import GPT, count_params

    sizes = dict(vocab_size=96, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_mlp=64)
    flags = [f"--config.model.{k}={v}" for k, v in sizes.items()]
    flags += ["--config.train.batch_size=4", "--mode=estimate"]
    reports = {}
    for name in ("sst2", "race"):
        status, _ = main_in_process(tmp_path / name, *flags, config=f"configs/finetune.py:{name}")
        assert status == 0
        reports[name] = json.loads((tmp_path / name / "estimate.json").read_text())
    sst2, race = reports["sst2"], reports["race"]
    assert (sst2["task"], sst2["sequences_per_example"]) == ("sst2", 1)
    assert (race["task"], race["sequences_per_example"]) == ("race", 4)
    cfg = ModelConfig(**{**sizes, "vocab_size": 96 + 3}, dropout=0.0)
    params = GPT(cfg).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 16), "int32"))
    gpt = count_params(params["params"])
    assert sst2["num_params"] == gpt + 32 * 2 + 2  # a linear head to the two classes
    assert race["num_params"] == gpt + 32 + 1  # one score per choice
    # Without train.num_steps a fine-tune's length is its examples: no time to train.
    assert race["tokens"] is None and race["train_seconds"] is None
    assert 1.0 <= race["xla_flops_per_token"] / race["flops_per_token"] < 1.5
    temps = [r["memory_per_device"]["temp_bytes"] for r in (sst2, race)]
    assert temps[1] > 2.5 * temps[0]
    out = capsys.readouterr().out
    assert "race, 4 sequence(s) an example" in out and "4 x 4 x 16 a step" in out
    status, _ = main_in_process(
        tmp_path / "steps", *flags, "--config.train.num_steps=10", config="configs/finetune.py:race"
    )
    report = json.loads((tmp_path / "steps" / "estimate.json").read_text())
    assert status == 0 and report["tokens"] == 10 * 4 * 4 * 16 and report["train_seconds"] > 0
    # Without the auxiliary LM loss the tied head's product is gone from the step.
    no_lm = ["--config.finetune.lm_coef=0"]
    status, _ = main_in_process(
        tmp_path / "no_lm", *flags, *no_lm, config="configs/finetune.py:sst2"
    )
    report = json.loads((tmp_path / "no_lm" / "estimate.json").read_text())
    assert report["flops_per_token"] == sst2["flops_per_token"] - 6 * 99 * 32
    assert report["xla_flops_per_token"] < sst2["xla_flops_per_token"]
    # A workdir that holds a pretraining run is not a fine-tune's, in this mode too.
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.json").write_text(json.dumps({"model": sizes}))
    capsys.readouterr()
    status, last = main_in_process(
        tmp_path / "pre", *flags, config="configs/finetune.py:sst2", capsys=capsys
    )
    assert status == 2 and "holds a pretraining run, not a fine-tune" in last, last
    assert not (tmp_path / "pre" / "estimate.json").exists()


def test_a_fine_tunes_estimated_ids_are_stored_as_encode_stores_them():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}))
    for rows, dtype in ((40478 + 3, "uint16"), (70000, "int32")):
        batch = estimate.abstract_task_batch(2, 4, 16, rows, False, mesh)
        assert batch["tokens"].shape == (2, 4, 16) and batch["tokens"].dtype == dtype
