#!/usr/bin/env bash
# Cloud TPU VM slices for gptjax: create, install, train, resume, status, stop, delete.
#
#   launch/tpu.sh [--dry-run] COMMAND NAME [options]
#
# Commands:
#   create NAME    create a slice (--spot for spot VMs, --queued for a queued resource)
#   install NAME   clone --repo (its default branch; again: fetch it, also from another
#                  --repo) and install it on every worker, in a
#                  Python 3.11 venv at ~/gptjax-venv (made with uv)
#   train NAME     start training on every worker, detached, logging to ~/gptjax-train.log
#                  (refused while a run started there is still live; 30 s later shows
#                  each log's last lines, so a run that fails at once says so)
#   resume NAME    the same as train: gptjax resumes from the workdir's latest checkpoint
#   status NAME    show the slice and the last lines of every worker's log (with
#                  --queued, a queued resource's state, also before its slice exists)
#   stop NAME      stop the run on every worker (it saves a checkpoint first)
#   delete NAME    delete the slice (or the queued resource)
#
# A preempted spot slice does not come back: delete it and create, install and resume
# again (docs/scaling.md). The commands that reach the workers read the slice's type
# from the slice itself (gcloud's describe): --type is needed only with create and
# --dry-run.
#
# Options (or the environment variables in brackets):
#   --zone Z             [GPTJAX_ZONE]    default us-central2-b
#   --type T             [GPTJAX_TYPE]    accelerator type, default v4-32 (create, --dry-run)
#   --version V          [GPTJAX_VERSION] TPU VM software; default by --type: v2-alpha-tpuv5-lite
#                                         (v5litepod), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e),
#                                         else tpu-ubuntu2204-base (v4 and older)
#   --repo URL           [GPTJAX_REPO]    git URL the workers clone
#   --config PATH        [GPTJAX_CONFIG]  default configs/gpt1.py
#   --workdir DIR        [GPTJAX_WORKDIR] the run's directory, the same path on every
#                                         worker; with several workers it must be a
#                                         shared mount (NFS, Filestore; checked at the
#                                         start: "is not shared"). Default (one
#                                         worker): ~/gptjax-runs/NAME, outside the clone
#   --books PATH         [GPTJAX_BOOKS]   the corpus on every worker (a directory or glob),
#                                         passed as --config.data.books: needed by a
#                                         config that reads books (configs/gpt1.py), not
#                                         by one that fine-tunes or reads the demo corpus
#   --spot               with create
#   --queued             with create, status and delete (a queued resource)
#   --dry-run            print the commands instead of running them
# Options take their value as `--zone Z` or `--zone=Z`. Anything after `--` is passed to
# `python -m gptjax.main` (e.g. --config.train.num_steps=10).
set -euo pipefail

usage() { sed -n '2,/^[^#]/{/^#/p;}' "$0" | sed 's/^# \{0,1\}//'; }  # the header comment

dry_run=0
zone=${GPTJAX_ZONE:-us-central2-b}
type=${GPTJAX_TYPE:-}
version=${GPTJAX_VERSION:-}
repo=${GPTJAX_REPO:-}
config=${GPTJAX_CONFIG:-configs/gpt1.py}
workdir=${GPTJAX_WORKDIR:-}
books=${GPTJAX_BOOKS:-}
spot=0
queued=0
command=""
name=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --zone=*|--type=*|--version=*|--repo=*|--config=*|--workdir=*|--books=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --zone|--type|--version|--repo|--config|--workdir|--books)
      [[ $# -gt 1 ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in
        --zone) zone=$2 ;;
        --type) type=$2 ;;
        --version) version=$2 ;;
        --repo) repo=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --books) books=$2 ;;
      esac
      shift ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ -z $command ]]; then command=$1
      elif [[ -z $name ]]; then name=$1
      else echo "error: unexpected argument $1 (see --help)" >&2; exit 2
      fi ;;
  esac
  shift
done

[[ -n $command && -n $name ]] || { usage >&2; exit 2; }
case "$command" in
  create|install|train|resume|status|stop|delete) ;;
  *) echo "error: unknown command $command (see --help)" >&2; exit 2 ;;
esac

run() {
  # Prints the command, shell-quoted, and runs it unless --dry-run.
  printf '%q ' "$@"
  printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

queued_state() {  # a queued resource's state: WAITING_FOR_RESOURCES, ACTIVE, ...
  run gcloud compute tpus queued-resources describe "$name" --zone="$zone" \
    --format='value(state.state)'
}

# The slice's type: given, or the slice's own, or (create, delete: needed only for the
# defaults and the line below; a deleted or still queued slice has none) create's default.
if [[ -z $type ]]; then
  if [[ $command == create || $command == delete || $dry_run -eq 1 ]]; then
    type=v4-32
  elif ! type=$(gcloud compute tpus tpu-vm describe "$name" --zone="$zone" \
      --format='value(acceleratorType)') || [[ -z $type ]]; then
    if [[ $command == status && $queued -eq 1 ]]; then  # no slice yet, or none any more
      queued_state || { echo "error: no queued resource $name in $zone" >&2; exit 1; }
      exit 0
    fi
    echo "error: cannot read the type of slice $name in $zone (give --type, or create it" \
      "first; a queued resource's slice exists once it is ACTIVE: status $name --queued)" >&2
    exit 2
  fi
  type=${type##*/}  # some gcloud versions print the type's whole resource path
fi

# The TPU VM software each generation needs (Cloud TPU's "TPU software versions").
if [[ -z $version ]]; then
  case "$type" in
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

# Hosts in a slice: v2/v3/v4/v5p types count TensorCores (8 per host); v5e/v6e
# (v5litepod-N, v6e-N) count chips, 4 per host beyond a single 8-chip host.
workers() {
  local family=${type%-*} size=${type##*-}
  case "$family" in
    v2|v3|v4|v5p) echo $(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod|v5e|v6e) echo $(( size > 8 ? size / 4 : 1 )) ;;
    *) echo "error: unknown accelerator type $type" >&2; exit 2 ;;
  esac
}

# shellcheck disable=SC2088
pid_file='~/gptjax-train.pid'  # the worker's ~, expanded by its shell

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

train_command() {
  local args
  local books_flag=()
  [[ -z $books ]] || books_flag=("--config.data.books=$books")
  args=$(printf '%q ' "--config=$config" "--workdir=$workdir" ${books_flag[@]+"${books_flag[@]}"} \
    ${extra[@]+"${extra[@]}"})
  # A run still live on a worker (its pid file names a live process) is not started
  # twice. GPTJAX_DISTRIBUTED=auto: every worker joins through
  # jax.distributed.initialize(). setsid + nohup: the run outlives the ssh session; the
  # log stays on each worker; `&` on the command alone, so that $! is its process (setsid
  # and nohup exec it). Then 30 s of its log, where a run that fails at once says why.
  echo "if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then" \
    "echo \"a run is live here (pid \$(cat $pid_file)), or still saving after a stop:" \
    "stop it first (launch/tpu.sh stop), then wait until status shows it has exited\" >&2; exit 1; fi;" \
    "cd ~/gptjax || exit 1; GPTJAX_DISTRIBUTED=auto setsid nohup $venv/bin/python -m gptjax.main" \
    "${args}>> ~/gptjax-train.log 2>&1 < /dev/null & echo \$! > $pid_file;" \
    "sleep 30; tail -n 5 ~/gptjax-train.log"
}

# gptjax's Python 3.11 environment; the ~ is the worker's, expanded by its shell.
# shellcheck disable=SC2088
venv='~/gptjax-venv'
n=$(workers)
echo "# slice $name: $type in $zone, $n worker(s): $(seq -s ' ' 0 $((n - 1)))"
if [[ -z $workdir ]]; then
  if [[ $n -gt 1 && ( $command == train || $command == resume ) ]]; then
    echo "error: $n workers need --workdir on a filesystem they all share (checkpoints," \
      "tokenizer and data position must be the same for every worker)" >&2
    exit 2
  fi
  workdir="../gptjax-runs/$name"  # ~/gptjax-runs/NAME: the command runs in ~/gptjax
fi

case "$command" in
  create)
    if [[ $queued -eq 1 ]]; then
      flags=(--node-id="$name" --zone="$zone" --accelerator-type="$type" --runtime-version="$version")
      [[ $spot -eq 1 ]] && flags+=(--spot)
      run gcloud compute tpus queued-resources create "$name" "${flags[@]}"
    else
      flags=(--zone="$zone" --accelerator-type="$type" --version="$version")
      [[ $spot -eq 1 ]] && flags+=(--spot)
      run gcloud compute tpus tpu-vm create "$name" "${flags[@]}"
    fi ;;
  install)
    [[ -n $repo ]] || { echo "error: --repo URL (where the workers clone gptjax) is required" >&2; exit 2; }
    # Runs live outside the clone, so re-installing never touches them. The TPU images
    # are Ubuntu 22.04, whose python3 is 3.10, and gptjax's JAX needs 3.11 or later:
    # uv (installed for the user) makes a venv with a Python 3.11 it fetches itself.
    install_python="python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --allow-existing --python 3.11 $venv && ~/.local/bin/uv pip install --python $venv/bin/python -e ~/gptjax 'jax[tpu]>=0.10.2,<0.12'"
    # Again: the default branch of --repo as given now, which may be another fork.
    q_repo=$(printf '%q' "$repo")
    ssh_all "if [ -d ~/gptjax ]; then git -C ~/gptjax remote set-url origin $q_repo && git -C ~/gptjax fetch --depth 1 origin HEAD && git -C ~/gptjax reset --hard FETCH_HEAD; else git clone --depth 1 $q_repo ~/gptjax; fi && $install_python" ;;
  train|resume)
    ssh_all "$(train_command)" ;;
  status)  # every worker, whichever cannot answer
    if [[ $queued -eq 1 ]]; then queued_state || echo "queued resource $name: not described"; fi
    run gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format="value(state,health)" ||
      echo "slice $name: not described (deleted or preempted?)"
    for ((w = 0; w < n; w++)); do
      run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$w" \
        --command="tail -n 3 ~/gptjax-train.log 2>/dev/null || echo '(no log yet)'" ||
        echo "worker $w: unreachable"
    done ;;
  stop)  # SIGTERM: gptjax saves a checkpoint and exits 75
    ssh_all "if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then kill -TERM \$(cat $pid_file) && echo stopping \$(cat $pid_file); else echo 'no live run'; fi" ;;
  delete)
    if [[ $queued -eq 1 ]]; then
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    fi ;;
  *) echo "error: unknown command $command (see --help)" >&2; exit 2 ;;
esac
