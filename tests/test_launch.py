"""The launch scripts, through their --dry-run output (no cloud is touched)."""

import shutil
import subprocess
import time

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
    # Installed again from another fork: that fork's default branch, not the old origin's.
    refetch = "remote set-url origin r && git -C ~/gptjax fetch --depth 1 origin HEAD"
    assert refetch.replace(" ", "\\ ").replace("&", "\\&") in out
    # The TPU images' python3 is 3.10; gptjax's JAX needs 3.11: a venv of its own.
    assert "uv\\ venv\\ --allow-existing\\ --python\\ 3.11\\ ~/gptjax-venv" in out
    assert "--python\\ ~/gptjax-venv/bin/python\\ -e\\ ~/gptjax" in out
    out = launch("launch/tpu.sh", "--dry-run", "train", "s", "--type", "v4-8", "--books", "/b")
    assert "~/gptjax-venv/bin/python\\ -m\\ gptjax.main" in out.stdout


def test_books_are_passed_only_when_given():
    """A fine-tuning config (or the demo corpus) reads no books: train runs it without
    --books; gptjax itself says so when a config that reads books has none."""
    out = launch(
        "launch/tpu.sh", "--dry-run", "train", "s", "--workdir", "/w",
        "--config", "configs/finetune.py:sst2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--config=configs/finetune.py:sst2" in out.stdout
    assert "data.books" not in out.stdout


def test_tpu_missing_settings_are_errors():
    result = launch("launch/tpu.sh", "--dry-run", "install", "s")
    assert result.returncode == 2 and "--repo" in result.stderr
    result = launch("launch/tpu.sh", "--dry-run", "bogus", "s")  # said before anything
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: unknown command bogus (see --help)\n"


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
        "srun --cpus-per-task=8 --kill-on-bad-exit=0 python -m gptjax.main "
        "--config=configs/gpt1.py --workdir=runs/gpt1 --config.data.books=/shared/books "
        "--config.train.num_steps=5"
    )
    # An empty --books (an unset variable) is refused at once, not by every task.
    result = launch("launch/slurm.sbatch", "--dry-run", "--books=")
    assert (result.returncode, result.stderr) == (2, "error: --books is empty (see --help)\n")
    # A fine-tune reads no books: none are asked for, and no data.books is passed.
    result = launch("launch/slurm.sbatch", "--dry-run", "--config=configs/finetune.py:sst2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        "python -m gptjax.main --config=configs/finetune.py:sst2 --workdir=runs/gpt1"
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
    assert result.stdout.splitlines()[-1].startswith("`python -m gptjax.main` (e.g.")


def fake_gcloud(tmp_path, accelerator_type="v4-8", ssh_fails=False):
    """A `gcloud` that records its calls, describes a slice of `accelerator_type` and
    keeps each ssh --command (failing it with `ssh_fails`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "gcloud"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {tmp_path}/calls\n'
        'for a in "$@"; do case "$a" in\n'
        f"  --format=value\\(acceleratorType\\)) echo projects/p/{accelerator_type}; exit 0 ;;\n"
        f'  --command=*) printf "%s" "${{a#--command=}}" > {tmp_path}/command'
        + ("; exit 1" if ssh_fails else "")
        + " ;;\nesac; done\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}


def launch_with(env, *args):
    return subprocess.run(
        ["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


def test_commands_after_create_read_the_slices_own_type(tmp_path):
    env = fake_gcloud(tmp_path, "v4-16")
    result = launch_with(env, "launch/tpu.sh", "status", "s", "--zone=europe-west4-a")
    assert result.returncode == 0, result.stderr
    assert "# slice s: v4-16 in europe-west4-a, 2 worker(s): 0 1" in result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == (
        "compute tpus tpu-vm describe s --zone=europe-west4-a --format=value(acceleratorType)"
    )


def test_status_of_a_queued_resource_before_its_slice_exists(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        "  *tpu-vm\\ describe*) echo 'NOT_FOUND' >&2; exit 1 ;;\n"
        "  *queued-resources\\ describe*) echo WAITING_FOR_RESOURCES ;;\n"
        "esac\n"
    )
    (bin_dir / "gcloud").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = launch_with(env, "launch/tpu.sh", "status", "s", "--queued")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "WAITING_FOR_RESOURCES"
    result = launch_with(env, "launch/tpu.sh", "status", "s")  # not said to be queued
    assert result.returncode == 2 and "status s --queued" in result.stderr


def test_status_asks_every_worker_whichever_fails(tmp_path):
    env = fake_gcloud(tmp_path, "v4-32", ssh_fails=True)
    result = launch_with(env, "launch/tpu.sh", "status", "s")
    assert result.returncode == 0, result.stderr
    assert [f"worker {w}: unreachable" in result.stdout for w in range(4)] == [True] * 4


def test_train_starts_one_run_a_worker_and_stop_stops_it(tmp_path):
    """The command train sends each worker, run here with a stand-in for the venv's
    python: the pid file names the run's own process, a second train is refused while
    it lives, and stop sends it SIGTERM."""
    env = fake_gcloud(tmp_path)
    assert launch_with(env, "launch/tpu.sh", "train", "s", "--books", "/b").returncode == 0
    command = (tmp_path / "command").read_text().replace("sleep 30", "sleep 0.5")
    (tmp_path / "gptjax").mkdir()
    python = tmp_path / "gptjax-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/usr/bin/env bash\necho $$ > ~/run.pid\n"
        "trap 'echo stopped by TERM; exit 75' TERM\necho started \"$@\"\n"
        "while true; do sleep 0.1; done\n"
    )
    python.chmod(0o755)
    worker = dict(env, PATH="/usr/bin:/bin")
    first = subprocess.run(["bash", "-c", command], env=worker, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "started -m gptjax.main --config=configs/gpt1.py" in first.stdout  # the log's tail
    assert (tmp_path / "gptjax-train.pid").read_text() == (tmp_path / "run.pid").read_text()
    second = subprocess.run(["bash", "-c", command], env=worker, capture_output=True, text=True)
    assert second.returncode == 1 and "a run is live here" in second.stderr
    assert launch_with(env, "launch/tpu.sh", "stop", "s").returncode == 0
    stop = (tmp_path / "command").read_text()
    stopped = subprocess.run(["bash", "-c", stop], env=worker, capture_output=True, text=True)
    assert stopped.stdout.startswith("stopping ")
    for _ in range(50):
        if "stopped by TERM" in (tmp_path / "gptjax-train.log").read_text():
            break
        time.sleep(0.1)
    assert "stopped by TERM" in (tmp_path / "gptjax-train.log").read_text()


def test_options_take_their_value_after_an_equals_sign():
    out = launch("launch/tpu.sh", "--dry-run", "create", "s", "--type=v5p-16", "--zone=z").stdout
    assert "--zone=z --accelerator-type=v5p-16 --version=v2-alpha-tpuv5" in out


@pytest.mark.parametrize("status, requeued", [(75, True), (0, False), (1, False)])
def test_slurm_requeues_a_run_stopped_by_a_signal(tmp_path, status, requeued):
    """gptjax exits 75 after saving on SIGTERM (a time limit, a preemption): the job is
    requeued and resumes; any other status is the job's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", f"exit {status}"), ("scontrol", f'echo "$*" > {tmp_path}/sc')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "123", "SLURM_CPUS_PER_TASK": "4"}
    result = launch_with(env, "launch/slurm.sbatch", "--books", "/shared/books")
    assert result.returncode == status
    assert result.stdout.startswith("srun --cpus-per-task=4 ")
    assert (tmp_path / "sc").exists() == requeued
    if requeued:
        assert (tmp_path / "sc").read_text().strip() == "requeue 123"


def test_delete_needs_no_description_of_the_slice(tmp_path):
    """A queued resource not yet provisioned, or a slice half gone, has nothing to
    describe: delete goes ahead without asking for its type."""
    env = fake_gcloud(tmp_path)
    result = launch_with(env, "launch/tpu.sh", "delete", "s", "--queued")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["compute tpus queued-resources delete s --zone=us-central2-b --force --quiet"]
