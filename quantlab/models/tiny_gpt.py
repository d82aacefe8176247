"""A tiny byte-level GPT: the small model every quantization lab can afford to break.

The model reads raw bytes (vocabulary 256, no tokenizer) and predicts the next byte. It is trained
by :mod:`quantlab.models.train_tiny_gpt` on numpy's own Python sources (see
:func:`quantlab.data.code_corpus`), and a trained checkpoint ships with quantlab, so a lab can
quantize a real, trained transformer in seconds on a laptop CPU.

The architecture is nanoGPT's, top to bottom::

    bytes (B, T) -> token embedding + learned position embedding (B, T, C)
                 -> n_layer x Block: x + Attn(RMSNorm(x)),  x + MLP(RMSNorm(x))
                 -> RMSNorm -> lm_head -> logits (B, T, 256)

Every matrix multiply is a plain ``torch.nn.Linear`` without bias (q, k, v and the attention output
projection ``proj``; the MLP's ``fc`` and ``proj``; the ``lm_head``), so quantizers can find them with
``model.named_modules()`` and swap their ``weight`` in place. Normalization is RMSNorm, as in LLaMA and
SmolLM2, so what a lab learns here carries over to the bigger model.

References:
    Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019.
    Karpathy, nanoGPT, https://github.com/karpathy/nanoGPT (the code structure).
    Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CHECKPOINT_DIR",
    "GPTConfig",
    "TinyGPT",
    "checkpoint_paths",
    "load_tiny_gpt",
    "load_tiny_gpt_metadata",
    "quantizable_linears",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of :class:`TinyGPT`.

    Attributes:
        block_size: the longest context the model can read (learned position embeddings).
        vocab_size: 256 for a byte-level model.
        n_layer: number of transformer blocks.
        n_head: attention heads; ``n_embd`` must be divisible by it.
        n_embd: the residual stream width ``C``.
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * n_embd``.
    """

    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


# -----------------------------------------------------------------------------
# Building blocks


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v`` and output ``proj`` linears."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        # Separate q/k/v (not one fused c_attn) so each is its own nn.Linear for the quantizers.
        self.q = nn.Linear(C, C, bias=False)
        self.k = nn.Linear(C, C, bias=False)
        self.v = nn.Linear(C, C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``. Returns ``(B, T, C)``."""
        B, T, C = x.shape
        hs = C // self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, n_head, T, hs)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network: ``proj(gelu(fc(x)))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``. Returns ``(B, T, C)``."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, T, C)``. Returns ``(B, T, C)``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model


class TinyGPT(nn.Module):
    """A byte-level GPT (see the module docstring for the architecture).

    Args:
        config: the hyper-parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.RMSNorm(config.n_embd, eps=1e-5)
        # Not tied to wte: safetensors stores each tensor once and the labs quantize the two separately.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """The number of parameters (embeddings included)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Next-byte logits, or the mean cross-entropy loss if ``targets`` are given.

        Args:
            idx: byte values ``(B, T)`` of an integer dtype, ``T <= block_size``.
            targets: optional ``(B, T)`` next bytes.

        Returns:
            logits ``(B, T, vocab_size)`` if ``targets`` is None, else the scalar mean loss in nats.
        """
        if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"idx must be an integer tensor of byte values, got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (batch, time), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (B*T, vocab)


def quantizable_linears(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers a weight quantizer acts on, by qualified name, in forward order.

    Args:
        model: a :class:`TinyGPT` (or any module).
        include_head: also return ``lm_head`` (usually kept in high precision, like the embeddings).

    Returns:
        ``{name: module}``, e.g. ``"blocks.0.attn.q"``.
    """
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (include_head or name != "lm_head")
    }


# -----------------------------------------------------------------------------
# The shipped checkpoint


def checkpoint_paths(directory: str | Path | None = None, name: str = "tiny_gpt") -> tuple[Path, Path]:
    """The ``(weights .safetensors, metadata .json)`` paths of a checkpoint.

    Args:
        directory: folder; default the shipped :data:`CHECKPOINT_DIR`.
        name: file stem.
    """
    directory = CHECKPOINT_DIR if directory is None else Path(directory)
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def load_tiny_gpt_metadata(directory: str | Path | None = None) -> dict:
    """The checkpoint's json: ``config``, training settings, recorded metrics and reproduce command."""
    _, meta_path = checkpoint_paths(directory)
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no tiny GPT metadata at {meta_path}; train one with `python -m quantlab.models.train_tiny_gpt`"
        )
    return json.loads(meta_path.read_text())


def load_tiny_gpt(
    directory: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyGPT:
    """Load the shipped (or a freshly trained) tiny GPT in eval mode.

    Weights are read with ``safetensors`` only (no pickle).

    Args:
        directory: checkpoint folder holding ``tiny_gpt.safetensors`` and ``tiny_gpt.json``;
            default the checkpoint that ships with quantlab.
        device: where to put the model.
        dtype: parameter dtype (float32 by default; the checkpoint is stored in float32).

    Returns:
        A :class:`TinyGPT` in ``eval()`` mode.
    """
    from safetensors.torch import load_file

    weights_path, _ = checkpoint_paths(directory)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"no tiny GPT weights at {weights_path}; "
            "train one with `python -m quantlab.models.train_tiny_gpt`"
        )
    config = GPTConfig(**load_tiny_gpt_metadata(directory)["config"])
    model = TinyGPT(config)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.to(device=device, dtype=dtype).eval()
