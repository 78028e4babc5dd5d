"""The PyTorch peer of `python -m gptjax.bench --vs-torch`: the same architecture, batch
and optimiser in HuggingFace transformers, and its generation with and without a
key/value cache. torch and transformers are imported only when it is built (they live
in the `bench` and `test` extras)."""

import importlib.util
from collections.abc import Callable

import ml_collections
import numpy as np

from gptjax.errors import UserError


def check_comparable(config: ml_collections.ConfigDict):
    """UserError unless the torch peer computes what the config's step computes, before
    anything is compiled: torch and transformers installed; HF's MLP of 4 x n_embd; and
    the step float32, in one micro-batch, without rematerialisation (the peer has
    neither bfloat16 nor gptjax's levers, so its ratio would compare other work)."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"--vs-torch needs {' and '.join(missing)}, not installed: pip install -e '.[bench]'"
        )
    m, t = config.model, config.train
    if m.d_mlp != 4 * m.d_model:
        raise UserError("--vs-torch needs model.d_mlp = 4 x d_model (HF openai-gpt's MLP)")
    levers = {
        "train.compute_dtype": (t.compute_dtype, "float32"),
        "train.microbatches": (t.microbatches, 1),
        "train.remat": (t.remat, "none"),
    }
    for name, (value, plain) in levers.items():
        if value != plain:
            raise UserError(
                f"--vs-torch compares float32 steps of one micro-batch without "
                f"rematerialisation, and {name}={value!r}: set {name}={plain!r}, or time the "
                "lever against the plain step with --versus"
            )


class TorchReference:
    """The same architecture, batch and optimiser in HuggingFace transformers on
    PyTorch: `OpenAIGPTLMHeadModel` (GPT-1's port; tanh GELU, dropout, train mode) with
    AdamW, decaying matrices only as optim.decay_mask does, and global-norm clipping.
    torch and transformers are imported only here."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        tokens: np.ndarray,
        compile_model: bool,
        num_threads: int,
    ):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(num_threads)
        torch.manual_seed(0)
        m, t = config.model, config.train
        self.shape = {
            "vocab_size": m.vocab_size,
            "n_positions": m.n_ctx,
            "n_embd": m.d_model,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
        }
        dropout = {k: m.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        self.openai_config = transformers.OpenAIGPTConfig(**self.shape, **dropout, afn="gelu")
        self.model = transformers.OpenAIGPTLMHeadModel(self.openai_config).train()
        params = list(self.model.parameters())  # the tied LM head counted once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.grad_clip = t.grad_clip
        ids = torch.from_numpy(tokens).long()
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:].reshape(-1)
        self.torch, self.transformers = torch, transformers

    def train_step(self):
        logits = self.forward(input_ids=self.inputs).logits
        loss = self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.targets
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def generators(self, prompt: list[int], new_tokens: int) -> dict[str, Callable]:
        """Greedy generation of `new_tokens` after `prompt` with `GPT2LMHeadModel` of the
        same shape (a key/value cache) and `OpenAIGPTLMHeadModel` (none: every token
        reruns the whole prefix)."""
        torch, transformers = self.torch, self.transformers
        gpt2_config = transformers.GPT2Config(
            **self.shape, activation_function="gelu_new", bos_token_id=None, eos_token_id=None
        )
        models = {
            "gpt2": transformers.GPT2LMHeadModel(gpt2_config).eval(),
            "openai": transformers.OpenAIGPTLMHeadModel(self.openai_config).eval(),
        }
        ids = torch.tensor([prompt])

        def generate(model):
            def call():
                with torch.inference_mode():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                assert out.shape[1] == len(prompt) + new_tokens, out.shape

            return call

        return {name: generate(model) for name, model in models.items()}
