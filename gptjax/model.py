"""GPT-1 (Radford et al., 2018, Figure 1 left) in Flax Linen.

Reads top to bottom like the paper: token + learned position embeddings, a stack of
post-LN Transformer decoder blocks, and an LM head tied to the token embedding.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`,
`qkv`, `n_ctx`) that `gptjax.sharding` maps onto a device mesh with its one table of
rules; the model itself knows nothing about devices (`gptjax.attention` picks, per
platform, the fastest kernel computing attention's values). Tensor names carry their
shapes: B batch, L sequence length, D d_model, H heads, K head dim, F d_mlp, V vocabulary.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gptjax import attention, flash, kv_cache
from gptjax.dropout import Dropout
from gptjax.matmul import project, unembed

# The paper and the original release initialise every weight from N(0, 0.02).
INIT_STD = 0.02
# The original code's LayerNorm epsilon (Flax defaults to 1e-6).
LN_EPSILON = 1e-5

# Rematerialisation (`train.remat`): what the backward pass may keep from the forward
# pass of each block instead of recomputing it. Memory for compute; values unchanged.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the network (`config.model`)."""

    vocab_size: int
    n_ctx: int
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int
    dropout: float
    # How to compute, not what: parameters stay float32 whatever `dtype` is; "bfloat16"
    # runs the matmuls in bfloat16 with float32 softmax, LayerNorm statistics, logits and
    # loss. `attention` is "xla" (any dropout), "fused" (jax.nn.dot_product_attention,
    # cuDNN flash attention on GPUs with bfloat16; no attention dropout), "pallas"
    # (`flash.causal_attention`: xla's values and dropout in one kernel, in blocks of
    # `flash_block` queries and keys) or "auto" (the fastest of xla and pallas for the
    # backend: see `attention_kernel`); "xla" splits the queries into `attention_blocks`
    # blocks (see `attend_causal`). `lm_head_backward` is "compute" (the logits'
    # gradient rounded to `dtype` for the LM head's backward matmuls; see
    # `matmul.unembed`) or "float32" (that gradient as the loss gives it);
    # `lm_head_pad_to` pads the LM head's vocabulary side to a multiple (same values).
    dtype: str = "float32"
    attention: str = "auto"
    attention_blocks: int = 1
    flash_block: int = flash.DEFAULT_BLOCK
    lm_head_backward: str = "compute"
    lm_head_pad_to: int = 128

    # The fields above set from `config.train` rather than `config.model`.
    LEVERS = {
        "dtype": "compute_dtype",
        "attention": "attention",
        "attention_blocks": "attention_blocks",
        "flash_block": "flash_block",
        "lm_head_backward": "lm_head_backward",
        "lm_head_pad_to": "lm_head_pad_to",
    }

    @classmethod
    def from_config(
        cls, model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict = None
    ) -> "ModelConfig":
        """From `config.model`, plus the compute levers of `config.train` when given."""
        levers = {}
        if train_cfg is not None:
            levers = {field: train_cfg[key] for field, key in cls.LEVERS.items()}
        return cls(**{name: model_cfg[name] for name in cls.architecture()}, **levers)

    @classmethod
    def architecture(cls) -> list[str]:
        """The fields that define the network (what a checkpoint's `config.model` holds)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.LEVERS]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def _init(*axes: str | None) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes)


def _zeros(*axes: str | None) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(name: str, dtype: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPSILON,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros("embed"),
        name=name,
    )


class Projection(nn.Module):
    """An affine map from the last `n_in` axes of its input to `out_shape`.

    Flax's DenseGeneral would do, but it initialises kernels in a flattened 2-D shape,
    which clashes with multi-axis logical partitioning; this stores and initialises the
    kernel in its full logical shape. Every weight product of the blocks is one of
    these (the MLP's too, with the parameters `nn.Dense` would have), so all go through
    `matmul.project`.
    """

    out_shape: tuple[int, ...]
    n_in: int
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param("kernel", _init(*self.kernel_axes), in_shape + self.out_shape)
        bias = self.param("bias", _zeros(*self.bias_axes), self.out_shape)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return project(x, kernel, self.n_in) + bias


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with one fused QKV projection (768 -> 3 x 768)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool, cache: dict | None = None):
        """Attention over the sequence itself; with a `cache` (generation) over every
        position decoded so far instead, returning (output, updated cache)."""
        cfg = self.cfg
        # Fused QKV; the (3, H, K) output layout keeps whole heads together so tensor
        # parallelism can split heads, and flattens to the original (D, 3D) kernel.
        qkv_BxLx3xHxK = Projection(
            out_shape=(3, cfg.n_head, cfg.head_dim),
            n_in=1,
            kernel_axes=("embed", "qkv", "heads", "kv"),
            bias_axes=("qkv", "heads", "kv"),
            dtype=cfg.dtype,
            name="c_attn",
        )(x_BxLxD)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
        if cache is not None:  # generation: write this step's keys and values, attend
            out_BxLxHxK, cache = kv_cache.attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cache, cfg.dtype)
            return self._project(out_BxLxHxK), cache
        # An independent dropout mask per example and head ("fused" draws none).
        dropping = not deterministic and cfg.dropout > 0 and cfg.attention != "fused"
        key = self.make_rng("dropout") if dropping else None
        out_BxLxHxK = attention.causal(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cfg, key)
        return self._project(out_BxLxHxK)

    def _project(self, out_BxLxHxK: jax.Array) -> jax.Array:
        cfg = self.cfg
        return Projection(
            out_shape=(cfg.d_model,),
            n_in=2,
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            dtype=cfg.dtype,
            name="c_proj",
        )(out_BxLxHxK)


class MLP(nn.Module):
    """Position-wise feed-forward network with the tanh approximation of GELU."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = Projection(
            out_shape=(self.cfg.d_mlp,),
            n_in=1,
            kernel_axes=("embed", "mlp"),
            bias_axes=("mlp",),
            dtype=self.cfg.dtype,
            name="c_fc",
        )(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        return Projection(
            out_shape=(self.cfg.d_model,),
            n_in=1,
            kernel_axes=("mlp", "embed"),
            bias_axes=("embed",),
            dtype=self.cfg.dtype,
            name="c_proj",
        )(h_BxLxF)


class Block(nn.Module):
    """A post-LN decoder block: n = LN(x + attn(x)); h = LN(n + mlp(n))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool, cache: dict | None = None):
        """The block's output; with a `cache`, (output, updated cache)."""
        drop = functools.partial(Dropout(self.cfg.dropout), deterministic=deterministic)
        a_BxLxD = CausalSelfAttention(self.cfg, name="attn")(x_BxLxD, deterministic, cache)
        if cache is not None:
            a_BxLxD, cache = a_BxLxD
        n_BxLxD = _layer_norm("ln_1", self.cfg.dtype)(x_BxLxD + drop(a_BxLxD))
        m_BxLxD = MLP(self.cfg, name="mlp")(n_BxLxD)
        h_BxLxD = _layer_norm("ln_2", self.cfg.dtype)(n_BxLxD + drop(m_BxLxD))
        h_BxLxD = nn.with_logical_constraint(h_BxLxD, ("batch", "length", "embed"))
        return h_BxLxD if cache is None else (h_BxLxD, cache)


class ScanBlock(Block):
    """A Block in the (carry, output) form `nn.scan` expects."""

    def __call__(self, x_BxLxD: jax.Array, deterministic: bool):
        return super().__call__(x_BxLxD, deterministic), None


class GPT(nn.Module):
    """The GPT-1 decoder: `encode` gives final hidden states, `__call__` LM logits.

    `remat` is "none" or a key of REMAT_POLICIES; it changes memory use, not values.
    `scan_layers` applies the blocks with `nn.scan`: their parameters are the per-layer
    ones stacked under `h` with a leading `layers` axis instead of `h_0` ... `h_{n-1}`
    (see stack_layers / unstack_layers). `scan_unroll` is how many blocks each iteration
    of that loop runs: 0 (or n_layer) unrolls it, no loop, so the step computes as the
    per-layer model does but one block is traced and the optimiser sees one array per
    kind of parameter (both cut compile time); 1 compiles a single block (compile time
    stops growing with depth, at some cost in step time). None of these change values,
    except that under `nn.scan` each block's dropout key is folded differently, so with
    dropout the masks (not their distribution) differ from the per-layer model's.
    """

    cfg: ModelConfig
    remat: str = "none"
    scan_layers: bool = False
    scan_unroll: int = 0

    def setup(self):
        cfg = self.cfg
        self.tokens_embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=_init("vocab", "embed")
        )
        self.positions_embed = nn.Embed(
            cfg.n_ctx, cfg.d_model, embedding_init=_init("n_ctx", "embed")
        )
        # Dropout after summing token and position embeddings (as HuggingFace does; the
        # original dropped elements of the embedding matrix itself instead).
        self.embed_dropout = Dropout(cfg.dropout)
        block = ScanBlock if self.scan_layers else Block
        if self.remat != "none":
            # static_argnums counts the module itself as 0: `deterministic` is 2.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
        if self.scan_layers:
            self.h = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=cfg.n_layer,
                unroll=self.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.blocks = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]

    def encode(self, tokens_BxL: jax.Array, deterministic: bool = True) -> jax.Array:
        """Final hidden states [B, L, D]; there is no final LayerNorm in GPT-1."""
        length = tokens_BxL.shape[1]
        if length > self.cfg.n_ctx:
            raise ValueError(f"sequence length {length} exceeds n_ctx={self.cfg.n_ctx}")
        x_BxLxD = self.tokens_embed(tokens_BxL) + self.positions_embed(jnp.arange(length))
        x_BxLxD = self.embed_dropout(x_BxLxD, deterministic=deterministic)
        # The residual stream enters the blocks in the compute dtype, the dtype they
        # output: a scan's carry must keep one dtype from layer to layer.
        x_BxLxD = x_BxLxD.astype(self.cfg.dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        if self.scan_layers:
            x_BxLxD, _ = self.h(x_BxLxD, deterministic)
            return x_BxLxD
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, deterministic)
        return x_BxLxD

    def decode(self, tokens_BxL: jax.Array, caches: list[dict]):
        """Generation: the LM logits [B, L, V] of `tokens_BxL`, which sit at positions
        `pos` .. `pos` + L - 1 of each row (`caches[i]["pos"]` [B], the same in every
        layer), attending to the keys and values cached before them. Returns the logits
        and the caches with these keys and values written in and `pos` advanced by L.
        One pass over the prompts fills the caches; each later call adds a token. The
        caches come from `kv_cache.init_cache`; parameters must be per layer (not scanned)."""
        pos_B = caches[0]["pos"]
        length = tokens_BxL.shape[1]
        positions_BxL = pos_B[:, None] + jnp.arange(length)
        x_BxLxD = self.tokens_embed(tokens_BxL) + self.positions_embed(positions_BxL)
        x_BxLxD = x_BxLxD.astype(self.cfg.dtype)  # as in `encode`
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x_BxLxD, cache = block(x_BxLxD, True, cache)
            new_caches.append({**cache, "pos": pos_B + length})
        return self.lm_logits(x_BxLxD), new_caches

    def lm_logits(self, h_BxLxD: jax.Array) -> jax.Array:
        """Next-token logits [B, L, V] from the LM head tied to the token embedding."""
        # Accumulated and returned in float32 whatever the compute dtype.
        grad_in_dtype = self.cfg.lm_head_backward == "compute"
        return unembed(
            h_BxLxD,
            self.tokens_embed.embedding,
            self.cfg.dtype,
            grad_in_dtype,
            self.cfg.lm_head_pad_to,
        )

    def __call__(self, tokens_BxL: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.lm_logits(self.encode(tokens_BxL, deterministic))


class TaskModel(nn.Module):
    """The fine-tuning model (Section 3.2): the GPT above plus one linear layer on the
    final hidden state of each sequence's `_classify_` token.

    Inputs are the transformed examples of `gptjax.tasks.transforms`: tokens [B, S, L]
    with S sequences per example and `clf_pos` [B, S] the `_classify_` positions. Returns
    the task output and the LM logits of every sequence (for the auxiliary loss):
    classification and entailment (S = 1): class logits [B, C]; similarity (S = 2, both
    orderings): the two hidden states are summed before the head, giving class logits
    [B, C] or, for regression, a score [B]; multiple choice (S = choices): one scalar per
    choice, [B, S], to be softmaxed over the choices of each example.
    """

    cfg: ModelConfig  # vocab_size counts the three fine-tuning specials
    kind: str
    num_outputs: int
    regression: bool = False
    clf_dropout: float = 0.1
    remat: str = "none"
    scan_layers: bool = False
    scan_unroll: int = 0

    def setup(self):
        self.transformer = GPT(
            self.cfg, remat=self.remat, scan_layers=self.scan_layers, scan_unroll=self.scan_unroll
        )
        # One dropout mask over the choices of an example, as in the original code.
        self.dropout = Dropout(self.clf_dropout, broadcast_dims=(1,))
        self.head = nn.Dense(
            self.num_outputs, kernel_init=_init("embed", None), bias_init=_zeros(None)
        )

    def __call__(
        self, tokens_BxSxL: jax.Array, clf_pos_BxS: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        b, s, length = tokens_BxSxL.shape
        h_NxLxD = self.transformer.encode(tokens_BxSxL.reshape(b * s, length), deterministic)
        lm_logits_NxLxV = self.transformer.lm_logits(h_NxLxD)
        rows_N = jnp.arange(b * s)
        h_BxSxD = h_NxLxD[rows_N, clf_pos_BxS.reshape(-1)].reshape(b, s, -1)
        if self.kind == "similarity":
            h_BxSxD = jnp.sum(h_BxSxD, axis=1, keepdims=True)  # both orderings, added
        h_BxSxD = self.dropout(h_BxSxD.astype(jnp.float32), deterministic=deterministic)
        out_BxSxC = self.head(h_BxSxD)
        if self.kind == "multiple_choice":
            return out_BxSxC[..., 0], lm_logits_NxLxV
        out_BxC = out_BxSxC[:, 0]
        return (out_BxC[:, 0] if self.regression else out_BxC), lm_logits_NxLxV


def language_model(config: ml_collections.ConfigDict) -> GPT:
    """The GPT of a run's config: its sizes from `config.model`, how its blocks are
    compiled from `config.train` (pretraining, domain adaptation, the estimate, the
    benchmark)."""
    return GPT(ModelConfig.from_config(config.model, config.train), **layer_options(config.train))


def layer_options(train_cfg: ml_collections.ConfigDict) -> dict:
    """GPT's (and TaskModel's) keyword arguments from `config.train`: how the blocks are
    compiled, not what they compute."""
    return {
        "remat": train_cfg.remat,
        "scan_layers": train_cfg.scan_layers,
        "scan_unroll": train_cfg.scan_unroll,
    }


def stack_layers(params: dict, n_layer: int) -> dict:
    """Per-layer parameters `h_0` ... `h_{n-1}` -> the scanned layout (`h`, stacked).
    Also takes a TaskModel's parameters (the GPT under `transformer`)."""
    if "transformer" in params:
        return {**params, "transformer": stack_layers(params["transformer"], n_layer)}
    layers = [params[f"h_{i}"] for i in range(n_layer)]
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
    """The scanned layout (`h`, stacked) -> per-layer parameters `h_0` ... `h_{n-1}`."""
    if "transformer" in params:
        return {**params, "transformer": unstack_layers(params["transformer"])}
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    for i in range(n_layer):
        rest[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["h"])
    return rest


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, num_params: int) -> int:
    """Training FLOPs per token: 6N for the weights' matmuls (forward + backward) plus
    12 * n_layer * d_model * n_ctx for attention scores and values (QK^T and AV,
    counted over the full n_ctx window without halving for the causal mask).
    N counts all parameters, embeddings included."""
    return 6 * num_params + 12 * cfg.n_layer * cfg.d_model * cfg.n_ctx
