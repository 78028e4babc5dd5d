"""GPT-1 weights in and out: the original OpenAI release and HuggingFace's `openai-gpt`.

    python -m gptjax.convert from-openai SRC DST   # the original release's files (below)
    python -m gptjax.convert from-hf SRC DST       # a save_pretrained directory
    python -m gptjax.convert to-hf SRC DST         # a gptjax workdir -> save_pretrained layout

`from-openai` reads params_shapes.json, params_0.npy .. params_9.npy, encoder_bpe_40000.json
and vocab_40000.bpe; the release does not record the number of attention heads, so
`--n_head` gives it (default 12, GPT-1's; it must divide the width).

`from-*` write a gptjax workdir: `config.json` (configs/gpt1.py with the source's sizes,
plus `converted_from`), an Orbax checkpoint at step 0 holding only `params` (what
`checkpoint.restore_params` reads, as fine-tuning's `init_from` does; there is no
optimiser state, so it is not a run to resume) and the tokenizer as `vocab.json` +
`merges.txt`. An HF `OpenAIGPTDoubleHeadsModel`
becomes a fine-tuned multiple-choice workdir (TaskModel parameters `transformer` and
`head`; the last three token rows are taken to be `_start_`, `_delimiter_`, `_classify_`).

`to-hf` writes `config.json`, `model.safetensors` and the workdir's `vocab.json` +
`merges.txt` when it has them. A pretrained workdir becomes `OpenAIGPTLMHeadModel`; a
fine-tuned multiple-choice one `OpenAIGPTDoubleHeadsModel` with our head as
`multiple_choice_head.summary` (pass our `_classify_` positions as `mc_token_ids`). HF
has no equivalent of our other heads (its sequence classifier reads the last token and
has no bias; similarity adds two orderings), so other fine-tuned workdirs become
`OpenAIGPTLMHeadModel` (specials' rows included) plus `task_head.safetensors`: `kernel`
[D, C] and `bias` [C], applied to the final hidden state at `_classify_` (whose id its
metadata holds). A fine-tuned workdir's export adds `added_tokens.json` (the specials'
ids, which HF's tokenizers read) and, for a named task, `id2label` in `config.json`.

The tensor maps are in `gptjax.hf_format`, the reading of HF directories in
`gptjax.hf_source`. HF's openai-gpt calls the tanh-approximated
GELU "gelu" (its own activation table), so `afn` must be "gelu". Nothing is written to
DST until the source has been read and checked.
"""

import json
import logging
import os
import runpy
import shutil
import sys

import numpy as np

from gptjax import hf_source
from gptjax.atomic import temporary_name
from gptjax.errors import UserError, argument_parser, fail, local_path, one_line
from gptjax.hf_format import (
    OPENAI_SHAPES,
    PAPER_DROPOUT,
    hf_config,
    hf_mc_head,
    hf_to_params,
    openai_to_hf,
    params_to_hf,
    split_openai,
)
from gptjax.hf_source import HF_CONFIG, HF_WEIGHTS, MERGES_FILE, VOCAB_FILE
from gptjax.tokenizer import SPECIAL_TOKENS

TASK_HEAD_FILE = "task_head.safetensors"
ADDED_TOKENS_FILE = "added_tokens.json"  # a fine-tuned model's specials, for HF's tokenizer
OPENAI_SHARDS = 10
OPENAI_VOCAB, OPENAI_MERGES = "encoder_bpe_40000.json", "vocab_40000.bpe"


# ---------------------------------------------------------------- gptjax workdirs


def _sizes(params: dict, n_head: int) -> dict:
    """config.model's architecture keys, from a GPT's parameters."""
    return {
        "vocab_size": params["tokens_embed"]["embedding"].shape[0],
        "n_ctx": params["positions_embed"]["embedding"].shape[0],
        "n_layer": sum(k.startswith("h_") for k in params),
        "n_head": n_head,
        "d_model": params["tokens_embed"]["embedding"].shape[1],
        "d_mlp": params["h_0"]["mlp"]["c_fc"]["kernel"].shape[1],
    }


def run_config(sizes: dict, dropout: float, source: dict, clf_dropout: float | None = None):
    """configs/gpt1.py (or, for a multiple-choice model, configs/finetune.py with
    task.kind=multiple_choice) with the converted model's sizes, as JSON."""
    name = "gpt1.py" if clf_dropout is None else "finetune.py"
    from gptjax.config import shipped_config

    config = runpy.run_path(shipped_config(name))["get_config"]()
    with config.unlocked():
        config.model.update(sizes, dropout=dropout)
        if clf_dropout is not None:
            config.task.kind = "multiple_choice"
            config.finetune.clf_dropout = clf_dropout
        config.converted_from = source
    return config.to_json_best_effort(indent=2)


def _check_dst(dst: str):
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UserError(f"{parent} (where {dst} would go) is not a directory; create it first")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        what = "holds a checkpoint" if os.path.isdir(os.path.join(dst, "checkpoints")) else ""
        raise UserError(
            f"{dst} {what or 'is not an empty directory'}; nothing was overwritten: choose a "
            "new destination"
        )


def _write_dir(dst: str, write):
    """Runs `write(tmp)` in a sibling temporary directory, then renames it to `dst`:
    DST appears complete or not at all."""
    dst = os.path.abspath(dst)
    tmp = temporary_name(dst)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty, checked
        os.rename(tmp, dst)
    except OSError as e:  # a full disk, no permission
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {dst}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_workdir(dst: str, params: dict, config_json: str, files: dict[str, bytes]):
    """A gptjax workdir: config.json, `params` (per layer) at step 0 in the layout the
    config names (stacked under `h` with train.scan_layers, the default), and the
    tokenizer files."""
    import orbax.checkpoint as ocp

    from gptjax import checkpoint
    from gptjax.model import stack_layers
    from gptjax.run_config import CONFIG_FILE

    config = json.loads(config_json)
    if config["train"]["scan_layers"]:
        params = stack_layers(params, config["model"]["n_layer"])

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_json)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with checkpoint.manager(tmp, async_save=False) as mngr:
            mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))

    _check_dst(dst)
    _write_dir(dst, write)


def read_workdir(src: str, step: int | None = None) -> tuple[dict, dict]:
    """(run config, parameters as numpy) of a workdir's checkpoint (default: latest)."""
    import jax

    from gptjax import checkpoint
    from gptjax.run_config import CONFIG_FILE

    config = hf_source.load_json(os.path.join(src, CONFIG_FILE), "SRC must be a gptjax workdir")
    return config, jax.tree.map(np.asarray, checkpoint.read_params(src, step))


def _task_kind(config: dict) -> tuple[str, bool, tuple[str, ...]]:
    """A fine-tuned workdir's task: (kind, regression, its class names where a named task
    has them; a custom task's come from its files, which the workdir does not hold)."""
    task = config.get("task", {})
    if task.get("name", "custom") == "custom":
        return task.get("kind", "classification"), bool(task.get("regression", False)), ()
    import ml_collections

    from gptjax.tasks import registry

    spec = registry.get_task(ml_collections.ConfigDict(task))
    return spec.kind, spec.regression, spec.label_names


# ---------------------------------------------------------------- the three commands


def from_openai(src: str, dst: str, n_head: int = 12):
    """The original release (params_shapes.json, params_0..9.npy, encoder_bpe_40000.json,
    vocab_40000.bpe) -> a gptjax workdir. The release does not record n_head (12)."""
    if n_head < 1:
        raise UserError(f"--n_head={n_head} must be at least 1 (the release's is 12)")
    shapes = hf_source.load_json(os.path.join(src, OPENAI_SHAPES), "SRC must be the OpenAI release")
    files = [os.path.join(src, f"params_{n}.npy") for n in range(OPENAI_SHARDS)]
    tokenizer = {}
    for path, name in ((OPENAI_VOCAB, VOCAB_FILE), (OPENAI_MERGES, MERGES_FILE)):
        files.append(os.path.join(src, path))
        tokenizer[name] = os.path.join(src, path)
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        raise UserError(
            f"{missing[0]} is missing; the release is {OPENAI_SHAPES}, params_0.npy .. "
            f"params_{OPENAI_SHARDS - 1}.npy, {OPENAI_VOCAB} and {OPENAI_MERGES}"
        )
    shards = []
    for path in files[:OPENAI_SHARDS]:
        try:
            shards.append(np.load(path, mmap_mode="r", allow_pickle=False).reshape(-1))
        except (OSError, ValueError, EOFError) as e:
            raise UserError(
                f"{path} is not a NumPy array file as released ({one_line(e)[:150]}); "
                "download the release again"
            ) from None
    flat = np.concatenate(shards)
    tensors = openai_to_hf(split_openai(flat.astype(np.float32), shapes))
    tokens = tensors["tokens_embed.weight"]  # (one not a matrix: hf_to_params says so)
    if tokens.ndim == 2 and tokens.shape[1] % n_head:
        raise UserError(f"--n_head={n_head} does not divide the release's width, {tokens.shape[1]}")
    params = hf_to_params(tensors, n_head)
    source = {"format": "openai", "source": os.path.abspath(src)}
    sizes = _sizes(params, n_head)
    tokenizer_files = {k: hf_source.read_bytes(p) for k, p in tokenizer.items()}
    hf_source.check_tokenizer(
        tokenizer_files, sizes["vocab_size"], src, names=(OPENAI_VOCAB, OPENAI_MERGES)
    )
    write_workdir(dst, params, run_config(sizes, PAPER_DROPOUT, source), tokenizer_files)
    return params


def from_hf(src: str, dst: str):
    """An HF openai-gpt save_pretrained directory -> a gptjax workdir (pretrained, or
    fine-tuned multiple choice for OpenAIGPTDoubleHeadsModel)."""
    _check_dst(dst)  # before reading any tensor
    config_path = os.path.join(src, HF_CONFIG)
    hf = hf_source.load_json(config_path, "SRC must be a directory written by save_pretrained")
    hf_source.check_config(hf, config_path)
    tensors = hf_source.read_hf_tensors(src)
    if "tokens_embed.weight" not in tensors and "lm_head.weight" in tensors:
        tensors["tokens_embed.weight"] = tensors["lm_head.weight"]  # DoubleHeads saves this
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and not np.array_equal(lm_head, tensors["tokens_embed.weight"]):
        raise UserError(f"{src}: lm_head.weight is not tied to the token embedding")
    mc = hf_source.check_heads(hf, tensors, config_path)
    params = hf_to_params(tensors, hf.get("n_head", 12))
    sizes = _sizes(params, hf.get("n_head", 12))
    expected = {
        "vocab_size": hf.get("vocab_size", sizes["vocab_size"]) + hf.get("n_special", 0),
        "n_ctx": hf.get("n_positions", sizes["n_ctx"]),
        "n_layer": hf.get("n_layer", sizes["n_layer"]),
        "d_model": hf.get("n_embd", sizes["d_model"]),
        "d_mlp": 4 * sizes["d_model"],  # HF's openai-gpt fixes the MLP at 4 x width
    }
    wrong = [f"{k} {v} (tensors: {sizes[k]})" for k, v in expected.items() if sizes[k] != v]
    if wrong:
        raise UserError(f"{config_path} disagrees with the weights: {', '.join(wrong)}")
    source = {"format": "huggingface", "source": os.path.abspath(src)}
    clf_dropout = None
    if mc:
        if sizes["vocab_size"] <= len(SPECIAL_TOKENS):
            raise UserError(f"{src}: too few token rows for the fine-tuning specials")
        params = {"transformer": params, "head": hf_mc_head(tensors, sizes["d_model"])}
        sizes["vocab_size"] -= len(SPECIAL_TOKENS)  # config.model.vocab_size excludes the specials
        source["specials"] = "the last 3 token rows: _start_, _delimiter_, _classify_"
        clf_dropout = float(hf.get("summary_first_dropout", PAPER_DROPOUT))
    config_json = run_config(sizes, hf_source.dropout_rate(hf), source, clf_dropout)
    tokenizer_files = hf_source.tokenizer_files(src)
    hf_source.check_tokenizer(tokenizer_files, sizes["vocab_size"], src)
    write_workdir(dst, params, config_json, tokenizer_files)
    return params


def _step_to_export(src: str, step: int | None) -> int | None:
    """`step`, else the checkpoint a fine-tuned run's results.json reports (its best, by
    default: the model its scores are of) while it is kept, else the latest (None)."""
    from gptjax import checkpoint
    from gptjax.data.pipeline import read_json
    from gptjax.results import RESULTS_JSON

    steps = checkpoint.all_steps(src)
    if step is None:
        path = os.path.join(src, RESULTS_JSON)
        scored = read_json(path).get("checkpoint_step")  # none, or damaged: the latest
        if isinstance(scored, int) and scored in steps:
            logging.info(
                "exporting checkpoint %d, the one %s reports (--step N for another)", scored, path
            )
            return scored
        if isinstance(scored, int):
            logging.warning("%s reports checkpoint %d, which is no longer kept", path, scored)
    if steps and step in (None, steps[-1]):
        logging.info("exporting checkpoint %d, the latest", steps[-1])
    elif step in steps:
        logging.info("exporting checkpoint %d", step)
    return step


def to_hf(src: str, dst: str, step: int | None = None):
    """A gptjax workdir (pretrained or fine-tuned) -> an HF save_pretrained directory."""
    from safetensors.numpy import save_file

    _check_dst(dst)
    step = _step_to_export(src, step)
    config, params = read_workdir(src, step)
    head = params.get("head")
    gpt = params.get("transformer", params)
    tensors = params_to_hf(gpt)
    d = tensors["transformer.tokens_embed.weight"].shape[1]
    n_head = int(config["model"]["n_head"])
    f = tensors["transformer.h.0.mlp.c_fc.weight"].shape[1]
    if f != 4 * d:
        raise UserError(f"HF's openai-gpt needs d_mlp = 4 x d_model; {src} has {f} and {d}")
    sizes = {
        "vocab_size": tensors["transformer.tokens_embed.weight"].shape[0],  # specials too
        "n_ctx": tensors["transformer.positions_embed.weight"].shape[0],
        "n_layer": sum(k.endswith(".ln_1.weight") for k in tensors),
        "n_head": n_head,
        "d_model": d,
    }
    dropout = float(config["model"].get("dropout", PAPER_DROPOUT))
    clf_dropout = float(config.get("finetune", {}).get("clf_dropout", PAPER_DROPOUT))
    architecture, extra, labels = "OpenAIGPTLMHeadModel", {}, ()
    # A fine-tuned model's last three token rows are the specials (tokenizer.py's order).
    base = sizes["vocab_size"] - len(SPECIAL_TOKENS)
    specials = {name: base + i for i, name in enumerate(SPECIAL_TOKENS)}
    if head is not None:
        kind, regression, labels = _task_kind(config)
        labels = () if regression or kind == "multiple_choice" else labels
        kernel_DxC, bias_C = np.asarray(head["kernel"]), np.asarray(head["bias"])
        if kind == "multiple_choice" and kernel_DxC.shape[1] == 1:
            architecture = "OpenAIGPTDoubleHeadsModel"
            tensors["multiple_choice_head.summary.weight"] = np.ascontiguousarray(kernel_DxC.T)
            tensors["multiple_choice_head.summary.bias"] = bias_C
        else:
            usage = (
                "logits = h @ kernel + bias, h the final hidden state at the _classify_ "
                "token" + (" summed over both orderings" if kind == "similarity" else "")
            )
            extra[TASK_HEAD_FILE] = (
                {"kernel": kernel_DxC, "bias": bias_C},
                {
                    "kind": kind,
                    "regression": str(regression).lower(),
                    "usage": usage,
                    "classify_token_id": str(specials["_classify_"]),
                },
            )
    files = {}
    for name in (VOCAB_FILE, MERGES_FILE):
        if os.path.exists(os.path.join(src, name)):
            files[name] = hf_source.read_bytes(os.path.join(src, name))
    if not files:  # a SentencePiece tokenizer.model has no openai-gpt equivalent
        logging.warning("%s has no vocab.json + merges.txt: no tokenizer written", src)
    else:
        # Checked as from-hf checks what it reads: a damaged file is not exported.
        hf_source.check_tokenizer(files, sizes["vocab_size"], src)
        if head is not None:  # the specials, as HF's tokenizers read added tokens
            files[ADDED_TOKENS_FILE] = json.dumps(specials, indent=2).encode()
    hf = hf_config(sizes, dropout, architecture, clf_dropout)
    if labels:
        hf["id2label"] = dict(enumerate(labels))
        hf["label2id"] = {name: i for i, name in enumerate(labels)}

    def write(tmp):
        with open(os.path.join(tmp, HF_CONFIG), "w") as fh:
            json.dump(hf, fh, indent=2)
        save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        for name, (arrays, metadata) in extra.items():
            save_file(arrays, os.path.join(tmp, name), metadata=metadata)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)

    _write_dir(dst, write)
    return architecture


def main(argv: list[str] | None = None):
    parser = argument_parser(
        prog="python -m gptjax.convert",
        description="Convert GPT-1 weights between the OpenAI release, HuggingFace and gptjax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("from-openai", help="the original release -> a gptjax workdir")
    p.add_argument(
        "src",
        help="directory with params_shapes.json, params_0..9.npy, encoder_bpe_40000.json and "
        "vocab_40000.bpe",
    )
    p.add_argument("dst", help="new gptjax workdir")
    p.add_argument(
        "--n_head", type=int, default=12, help="attention heads, not in the files (default: 12)"
    )
    p = commands.add_parser("from-hf", help="an HF openai-gpt directory -> a gptjax workdir")
    p.add_argument("src", help="directory written by save_pretrained")
    p.add_argument("dst", help="new gptjax workdir")
    p = commands.add_parser("to-hf", help="a gptjax workdir -> an HF openai-gpt directory")
    p.add_argument("src", help="gptjax workdir (pretrained or fine-tuned)")
    p.add_argument("dst", help="new directory for from_pretrained")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    # force: importing Orbax has already configured the root logger (at WARNING).
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on every save/restore
    try:
        args.src, args.dst = local_path(args.src, "SRC"), local_path(args.dst, "DST")
        if args.command == "from-openai":
            from_openai(args.src, args.dst, args.n_head)
        elif args.command == "from-hf":
            from_hf(args.src, args.dst)
        else:
            logging.info("wrote %s", to_hf(args.src, args.dst, args.step))
    except UserError as e:
        fail(str(e))
    logging.info("converted %s -> %s", args.src, args.dst)


if __name__ == "__main__":
    from gptjax import host_memory

    host_memory.at_start()
    main(sys.argv[1:])
