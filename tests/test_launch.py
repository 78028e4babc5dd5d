"""The launch scripts, through their --dry-run output (no cloud is touched)."""

import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = ["launch/tpu.sh", "launch/slurm.sbatch"]


def launch(*args):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_tpu_train_dry_run_for_a_v4_32_slice():
    result = launch(
        "launch/tpu.sh",
        "--dry-run",
        "train",
        "gpt1-pod",
        "--type",
        "v4-32",
        "--books",
        "/data/books",
        "--workdir",
        "/mnt/runs/gpt1",
        "--",
        "--config.train.num_steps=10",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# slice gpt1-pod: v4-32 in us-central2-b, 4 worker(s): 0 1 2 3"
    command = lines[1]
    assert command.startswith("gcloud compute tpus tpu-vm ssh gpt1-pod ")
    assert "--worker=all" in command
    for part in (
        "gptjax.main",
        "--config=configs/gpt1.py",
        "--workdir=/mnt/runs/gpt1",
        "--config.data.books=/data/books",
        "--config.train.num_steps=10",
        "GPTJAX_DISTRIBUTED=auto",
        "nohup",
        "gptjax-train.log",
    ):
        assert part in command.replace("\\", ""), part


@pytest.mark.parametrize(
    "type_, workers", [("v4-8", 1), ("v4-32", 4), ("v5p-128", 16), ("v5litepod-16", 4), ("v3-8", 1)]
)
def test_status_names_every_worker(type_, workers):
    result = launch("launch/tpu.sh", "--dry-run", "status", "s", "--type", type_)
    assert result.returncode == 0, result.stderr
    assert f"{workers} worker(s)" in result.stdout
    for w in range(workers):
        assert f"--worker={w} " in result.stdout


def test_tpu_create_spot_queued_and_delete():
    out = launch("launch/tpu.sh", "--dry-run", "create", "s", "--spot", "--queued").stdout
    assert "gcloud compute tpus queued-resources create s --node-id=s" in out
    assert "--accelerator-type=v4-32" in out and out.rstrip().endswith("--spot")
    out = launch("launch/tpu.sh", "--dry-run", "delete", "s").stdout
    assert "gcloud compute tpus tpu-vm delete s --zone=us-central2-b --quiet" in out


def test_several_workers_need_a_shared_workdir():
    result = launch("launch/tpu.sh", "--dry-run", "train", "s", "--books", "/b")
    assert result.returncode == 2 and "--workdir" in result.stderr
    one = launch("launch/tpu.sh", "--dry-run", "train", "s", "--type", "v4-8", "--books", "/b")
    assert one.returncode == 0 and "--workdir=../gptjax-runs/s" in one.stdout


def test_reinstall_keeps_runs():
    out = launch("launch/tpu.sh", "--dry-run", "install", "s", "--repo", "r").stdout
    assert "rm -rf" not in out and "reset\\ --hard\\ FETCH_HEAD" in out
    # The TPU images' python3 is 3.10; gptjax's JAX needs 3.11: a venv of its own.
    assert "uv\\ venv\\ --allow-existing\\ --python\\ 3.11\\ ~/gptjax-venv" in out
    assert "--python\\ ~/gptjax-venv/bin/python\\ -e\\ ~/gptjax" in out
    out = launch("launch/tpu.sh", "--dry-run", "train", "s", "--type", "v4-8", "--books", "/b")
    assert "~/gptjax-venv/bin/python\\ -m\\ gptjax.main" in out.stdout


def test_tpu_missing_settings_are_errors():
    result = launch("launch/tpu.sh", "--dry-run", "train", "s", "--workdir", "/w")
    assert result.returncode == 2 and "--books" in result.stderr
    result = launch("launch/tpu.sh", "--dry-run", "install", "s")
    assert result.returncode == 2 and "--repo" in result.stderr


def test_slurm_dry_run():
    result = launch(
        "launch/slurm.sbatch",
        "--dry-run",
        "--books=/shared/books",
        "--",
        "--config.train.num_steps=5",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "srun --kill-on-bad-exit=1 python -m gptjax.main --config=configs/gpt1.py "
        "--workdir=runs/gpt1 --config.data.books=/shared/books --config.train.num_steps=5"
    )


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "type_, version",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-16", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_software_follows_the_generation(type_, version):
    out = launch("launch/tpu.sh", "--dry-run", "create", "s", "--type", type_).stdout
    assert f"--accelerator-type={type_} --version={version}" in out
    given = launch("launch/tpu.sh", "--dry-run", "create", "s", "--type", type_, "--version", "x")
    assert "--version=x" in given.stdout


def test_an_option_without_its_value_is_a_usage_error():
    result = launch("launch/tpu.sh", "status", "s", "--zone")
    assert (
        result.returncode == 2
        and result.stderr.strip() == "error: --zone needs a value (see --help)"
    )


def test_help_is_the_whole_header_comment():
    """--help prints the script's header, from its usage line to its last line."""
    result = launch("launch/tpu.sh", "--help")
    header = (ROOT / "launch" / "tpu.sh").read_text().splitlines()[1:]  # after the shebang
    comment = header[: next(i for i, line in enumerate(header) if not line.startswith("#"))]
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        line[2:] if line.startswith("# ") else line[1:] for line in comment
    ]
    assert result.stdout.splitlines()[-1].startswith("Anything after `--` is passed")
