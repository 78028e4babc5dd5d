"""Reading a HuggingFace `openai-gpt` directory (what `save_pretrained` writes) for
`gptjax.convert`: its tensors, the config checks that refuse what gptjax cannot
represent, and its tokenizer files; also the two small readers every `convert` command
uses (`load_json`, `read_bytes`). Every problem is a `UserError` naming the file."""

import json
import logging
import os

import numpy as np

from gptjax.bpe import BPETokenizer
from gptjax.errors import UserError
from gptjax.hf_format import HF_AFN, LN_EPSILON, PAPER_DROPOUT

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # HF's names, and gptjax.bpe's
HF_CONFIG, HF_WEIGHTS, HF_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"


def read_hf_tensors(src: str) -> dict[str, np.ndarray]:
    """The tensors of an HF save_pretrained directory, with `transformer.` stripped:
    safetensors through its numpy API, pytorch_model.bin through PyTorch when installed."""
    path = os.path.join(src, HF_WEIGHTS)
    if os.path.exists(path):
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except Exception as e:  # a truncated file, or a dtype numpy lacks (bfloat16)
            raise UserError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
    elif os.path.exists(os.path.join(src, HF_PICKLE)):
        tensors = _read_torch_pickle(os.path.join(src, HF_PICKLE))
    else:
        raise UserError(
            f"{src} has neither {HF_WEIGHTS} nor {HF_PICKLE}; point at a directory that "
            "save_pretrained wrote (sharded checkpoints are not supported)"
        )
    prefix = "transformer."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch pickle: reading it needs PyTorch (pip install torch), or "
            "re-save the model as safetensors (save_pretrained's default)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
    return {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in state.items()
        if torch.is_tensor(v)
    }


# HF openai-gpt's size settings: whole numbers, the counts positive.
HF_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def check_config(hf: dict, path: str):
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a JSON object: not a save_pretrained config.json")
    if hf.get("model_type") != "openai-gpt":
        raise UserError(f"{path}: model_type is {hf.get('model_type')!r}, not 'openai-gpt'")
    if hf.get("afn", HF_AFN) != HF_AFN:
        raise UserError(
            f"{path}: activation afn={hf['afn']!r} is not supported; gptjax implements the "
            f"tanh-approximated GELU only (HF openai-gpt's afn={HF_AFN!r})"
        )
    bad = [k for k in HF_SIZES if k in hf and not (type(hf[k]) is int and hf[k] > 0)]
    if bad or (type(hf.get("n_special", 0)) is not int or hf.get("n_special", 0) < 0):
        name = bad[0] if bad else "n_special"
        raise UserError(
            f"{path}: {name}={hf[name]!r} is not a whole number of at least 1 (0 for n_special)"
        )
    width, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    if width % heads:
        raise UserError(f"{path}: n_embd={width} is not a multiple of n_head={heads}")
    eps = hf.get("layer_norm_epsilon", LN_EPSILON)
    if not np.isclose(eps, LN_EPSILON, rtol=1e-6, atol=0):
        raise UserError(f"{path}: layer_norm_epsilon={eps} is not supported (only {LN_EPSILON})")


def check_heads(hf: dict, tensors: dict, path: str) -> bool:
    """Whether the checkpoint has a multiple-choice head we can carry; rejects tensors
    that would otherwise be dropped silently."""
    known = ("tokens_embed.", "positions_embed.", "h.", "lm_head.", "multiple_choice_head.")
    unknown = sorted(k for k in tensors if k != "position_ids" and not k.startswith(known))
    if unknown:
        raise UserError(
            f"{path}: tensors {', '.join(unknown[:3])} belong to a head gptjax does not "
            "convert (only OpenAIGPTLMHeadModel and OpenAIGPTDoubleHeadsModel are)"
        )
    if "multiple_choice_head.summary.weight" not in tensors:
        return False
    summary = {
        "summary_type": ("cls_index", hf.get("summary_type", "cls_index")),
        "summary_use_proj": (True, hf.get("summary_use_proj", True)),
        "summary_activation": (None, hf.get("summary_activation")),
    }
    wrong = [f"{k}={v!r} (need {want!r})" for k, (want, v) in summary.items() if v != want]
    if wrong:
        raise UserError(f"{path}: a multiple-choice head other than ours: {', '.join(wrong)}")
    return True


def dropout_rate(hf: dict) -> float:
    """Our one dropout rate from HF's three (they agree in every released model)."""
    rates = {hf.get(k, PAPER_DROPOUT) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(rates) > 1:
        logging.warning("HF's dropout rates differ (%s); using resid_pdrop", sorted(rates))
    return float(hf.get("resid_pdrop", PAPER_DROPOUT))


def tokenizer_files(src: str) -> dict[str, bytes]:
    """vocab.json + merges.txt as saved, or rebuilt from a tokenizers tokenizer.json
    (what transformers 5 writes)."""
    vocab, merges = os.path.join(src, VOCAB_FILE), os.path.join(src, MERGES_FILE)
    if os.path.exists(vocab) and os.path.exists(merges):
        return {VOCAB_FILE: read_bytes(vocab), MERGES_FILE: read_bytes(merges)}
    path = os.path.join(src, "tokenizer.json")
    if not os.path.exists(path):
        logging.warning("%s has no tokenizer files: the workdir gets none", src)
        return {}
    saved = load_json(path, "")
    model = saved.get("model", {}) if isinstance(saved, dict) else {}
    if (
        not isinstance(model, dict)
        or model.get("type") != "BPE"
        or not {"vocab", "merges"} <= model.keys()
    ):
        raise UserError(f"{path} is not a tokenizers BPE tokenizer with vocab and merges")
    pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        VOCAB_FILE: json.dumps(model["vocab"], ensure_ascii=False).encode(),
        MERGES_FILE: "\n".join(["#version: 0.2", *pairs, ""]).encode(),
    }


def check_tokenizer(
    files: dict[str, bytes], rows: int, src: str, names: tuple[str, str] = (VOCAB_FILE, MERGES_FILE)
):
    """Refuses, before anything is written, tokenizer files gptjax could not load, or
    ids past the token embedding's `rows` (they would read another token's row).
    `names`: what the errors call the two files (the release names them otherwise)."""
    if not files:
        return
    try:
        texts = [files[name].decode("utf-8") for name in (VOCAB_FILE, MERGES_FILE)]
    except UnicodeDecodeError:
        raise UserError(f"{src}: the tokenizer files are not UTF-8 text") from None
    try:
        tokenizer = BPETokenizer.from_texts(*texts, pretokenizer="bert", names=names)
    except UserError as e:
        raise UserError(f"{src}: {e}") from None
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{src}: the tokenizer has {tokenizer.vocab_size} pieces but the token "
            f"embedding {rows} rows: the tokenizer files belong to another model"
        )


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_json(path: str, what: str):
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
