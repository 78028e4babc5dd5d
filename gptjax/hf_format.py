"""HuggingFace's openai-gpt and OpenAI's release in gptjax's parameter layout: pure maps.

Every parameter maps by a reshape only: HF's Conv1D stores weights as (in, out), as our
kernels do, with q, k, v then heads in the fused QKV's columns. The release is HF's
tensors in a fixed order, flattened into ten files. `gptjax.convert` reads and writes the
files; this module only renames and reshapes arrays.
"""

import numpy as np

from gptjax.errors import UserError

OPENAI_SHAPES = "params_shapes.json"
# The only activation HF's openai-gpt and ours share: its "gelu" is the tanh GELU.
HF_AFN = "gelu"
LN_EPSILON = 1e-5  # gptjax.model.LN_EPSILON (not imported: that would load JAX)
# The paper's dropout (and HF's default): for the release, which records none.
PAPER_DROPOUT = 0.1


def _block_layout(d: int, h: int, f: int) -> dict:
    """HF name under h.{i} -> (our path under h_{i}, our shape, HF shape), in the
    original release's order."""
    k = d // h
    return {
        "attn.c_attn.weight": (("attn", "c_attn", "kernel"), (d, 3, h, k), (d, 3 * d)),
        "attn.c_attn.bias": (("attn", "c_attn", "bias"), (3, h, k), (3 * d,)),
        "attn.c_proj.weight": (("attn", "c_proj", "kernel"), (h, k, d), (d, d)),
        "attn.c_proj.bias": (("attn", "c_proj", "bias"), (d,), (d,)),
        "ln_1.weight": (("ln_1", "scale"), (d,), (d,)),
        "ln_1.bias": (("ln_1", "bias"), (d,), (d,)),
        "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), (d, f), (d, f)),
        "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), (f,), (f,)),
        "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), (f, d), (f, d)),
        "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), (d,), (d,)),
        "ln_2.weight": (("ln_2", "scale"), (d,), (d,)),
        "ln_2.bias": (("ln_2", "bias"), (d,), (d,)),
    }


BLOCK_TENSORS = tuple(_block_layout(1, 1, 1))  # one block's HF names, the release's order


# ---------------------------------------------------------------- pure parameter maps


def hf_to_params(tensors: dict[str, np.ndarray], n_head: int) -> dict:
    """HF openai-gpt tensors (names without the `transformer.` prefix) -> our GPT
    parameters (unscanned layout). Checks every name and shape."""

    def get(name, shape=None):
        if name not in tensors:
            raise UserError(f"the checkpoint has no tensor {name!r}; is it an openai-gpt model?")
        x = np.asarray(tensors[name], np.float32)
        if shape is not None and x.shape != tuple(shape):
            raise UserError(f"tensor {name} has shape {list(x.shape)}, expected {list(shape)}")
        return x

    tokens_VxD, positions_CxD = get("tokens_embed.weight"), get("positions_embed.weight")
    if tokens_VxD.ndim != 2 or positions_CxD.ndim != 2:
        raise UserError("the token and position embeddings must be matrices")
    d = tokens_VxD.shape[1]
    if positions_CxD.shape[1] != d:
        raise UserError("the token and position embeddings do not share one width")
    if d % n_head:
        raise UserError(f"width {d} is not divisible by n_head={n_head}")
    n_layer = len({name.split(".")[1] for name in tensors if name.startswith("h.")})
    f = get("h.0.mlp.c_fc.weight").shape[-1]
    if n_layer == 0 or get("h.0.mlp.c_fc.weight").ndim != 2:
        raise UserError("the checkpoint has no complete Transformer block")
    params = {
        "tokens_embed": {"embedding": tokens_VxD},
        "positions_embed": {"embedding": positions_CxD},
    }
    for i in range(n_layer):
        block = {}
        for name, (path, ours, theirs) in _block_layout(d, n_head, f).items():
            node = block
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = get(f"h.{i}.{name}", theirs).reshape(ours)
        params[f"h_{i}"] = block
    return params


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """Our GPT parameters (either layout) -> HF openai-gpt tensors, `transformer.`-named."""
    if "h" in params:  # trained with train.scan_layers
        from gptjax.model import unstack_layers

        params = unstack_layers(params)
    d = np.shape(params["tokens_embed"]["embedding"])[1]
    n_head = np.shape(params["h_0"]["attn"]["c_proj"]["kernel"])[0]
    f = np.shape(params["h_0"]["mlp"]["c_fc"]["kernel"])[1]
    out = {
        "transformer.tokens_embed.weight": params["tokens_embed"]["embedding"],
        "transformer.positions_embed.weight": params["positions_embed"]["embedding"],
    }
    n_layer = sum(k.startswith("h_") for k in params)
    for i in range(n_layer):
        for name, (path, _, theirs) in _block_layout(d, n_head, f).items():
            x = params[f"h_{i}"]
            for key in path:
                x = x[key]
            out[f"transformer.h.{i}.{name}"] = x.reshape(theirs)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def openai_to_hf(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The original release's tensors (split and reshaped by params_shapes.json) -> HF
    names: positions, tokens, then twelve tensors per block; Conv1D weights [1, in, out]."""
    positions, tokens, *blocks = arrays
    if len(blocks) % len(BLOCK_TENSORS) or not blocks:
        raise UserError(f"{OPENAI_SHAPES} lists {len(arrays)} tensors: expected 2 + 12 per layer")
    out = {"positions_embed.weight": positions, "tokens_embed.weight": tokens}
    for j, x in enumerate(blocks):
        i, name = divmod(j, len(BLOCK_TENSORS))
        name = BLOCK_TENSORS[name]
        out[f"h.{i}.{name}"] = x[0] if name.endswith("weight") and x.ndim == 3 else x
    return out


def split_openai(flat: np.ndarray, shapes: list[list[int]]) -> list[np.ndarray]:
    """The release's flat concatenation, split by the shapes' sizes and reshaped."""
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(type(n) is int and n > 0 for n in s) for s in shapes
    ):
        raise UserError(f"{OPENAI_SHAPES} is not a list of shapes (lists of positive sizes)")
    sizes = [int(np.prod(s)) for s in shapes]
    if flat.size != sum(sizes):
        raise UserError(
            f"the params_*.npy files hold {flat.size:,} numbers but {OPENAI_SHAPES} needs "
            f"{sum(sizes):,}"
        )
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    return [p.reshape(s) for p, s in zip(pieces, shapes, strict=True)]


def hf_mc_head(tensors: dict[str, np.ndarray], d_model: int) -> dict:
    """`multiple_choice_head.summary` (nn.Linear, [out, in]) -> our TaskModel head."""
    w, b = (
        tensors["multiple_choice_head.summary.weight"],
        tensors.get("multiple_choice_head.summary.bias"),
    )
    if w.shape != (1, d_model) or b is None or b.shape != (1,):
        raise UserError(
            "multiple_choice_head.summary must be a linear map to 1 output with a bias "
            f"(it has shape {list(w.shape)}); set summary_proj_to_labels and summary_use_proj"
        )
    return {"kernel": np.asarray(w, np.float32).T.copy(), "bias": np.asarray(b, np.float32)}


def hf_config(sizes: dict, dropout: float, architecture: str, clf_dropout: float = PAPER_DROPOUT):
    """An openai-gpt config.json that reproduces our model (written without transformers)."""
    return {
        "architectures": [architecture],
        "model_type": "openai-gpt",
        "vocab_size": sizes["vocab_size"],
        "n_positions": sizes["n_ctx"],
        "n_embd": sizes["d_model"],
        "n_layer": sizes["n_layer"],
        "n_head": sizes["n_head"],
        "afn": HF_AFN,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "layer_norm_epsilon": LN_EPSILON,
        "initializer_range": 0.02,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": clf_dropout,
        "tie_word_embeddings": True,
    }
