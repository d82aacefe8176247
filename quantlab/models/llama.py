"""A small, readable Llama written from scratch (nanoGPT style), the model every lab quantizes.

The architecture, top to bottom (``B`` batch, ``T`` tokens, ``d`` = ``dim``, ``h`` query heads,
``h_kv`` key/value heads, ``hd`` = ``head_dim``)::

    idx (B, T) --embed_tokens--> x (B, T, d)
    repeat n_layers times (LlamaBlock, pre-norm residual):
        x = x + o_proj(attention(RoPE(q_proj(rms(x))), RoPE(k_proj(rms(x))), v_proj(rms(x))))
        x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))          # SwiGLU
    logits (B, T, vocab) = lm_head(norm(x))

Every linear layer is a plain ``nn.Linear`` without bias (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``), so a quantization method can
swap one out for its own module or rewrite its ``weight`` in place. Module names follow the Hugging
Face ``LlamaForCausalLM`` layout (``model.layers[i].self_attn.q_proj``, ``model.norm``, ``lm_head``)
so the names in a paper's reference code map one to one onto ours.

RoPE uses the Hugging Face "half-split" convention: dimension ``i`` of a head is rotated together
with dimension ``i + hd/2`` (``rotate_half``). llama.cpp rotates adjacent pairs ``(2i, 2i+1)``
instead, which is why its GGUF converter permutes the rows of ``q_proj``/``k_proj``;
:mod:`quantlab.models.smollm2` undoes that permutation when it loads a GGUF file.

References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023 (the architecture).
    Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019 (RMSNorm, eq. 4).
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021 (RoPE, eq. 34).
    Shazeer, "GLU Variants Improve Transformer", 2020 (SwiGLU, eq. 6).
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
    Checkpoints", EMNLP 2023 (grouped-query attention).
    Karpathy, nanoGPT, https://github.com/karpathy/nanoGPT (the style of this file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantlab._checks import check_int, check_positive

__all__ = [
    "KVCache",
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "RMSNorm",
    "apply_rope",
    "rope_cos_sin",
    "rotate_half",
]


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama model.

    The defaults are SmolLM2-135M's. ``head_dim`` is ``dim // n_heads``.

    Attributes:
        vocab_size: number of token ids.
        dim: width of the residual stream ``d``.
        n_layers: number of decoder blocks.
        n_heads: number of query heads ``h``.
        n_kv_heads: number of key/value heads ``h_kv``; ``h`` must be a multiple (GQA).
        hidden_dim: width of the SwiGLU MLP.
        norm_eps: the epsilon inside RMSNorm's square root.
        rope_theta: RoPE base frequency.
        max_seq_len: the longest sequence the model accepts.
        tie_embeddings: whether ``lm_head.weight`` is ``embed_tokens.weight``.
    """

    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = check_int(getattr(self, name), name)
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")
        check_positive(self.norm_eps, "norm_eps")
        check_positive(self.rope_theta, "rope_theta")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for RoPE")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                f"(grouped-query attention shares each key/value head among n_heads / n_kv_heads heads)"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``dim // n_heads``."""
        return self.dim // self.n_heads


# ----------------------------------------------------------------------------------------------
# Small parts: RMSNorm and RoPE


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich, eq. 4).

    No mean subtraction and no bias. The statistic is computed in float32 even for half-precision
    inputs, as in the reference implementation, then the result is cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension.

        Args:
            x: activations, shape ``(..., dim)``.

        Returns:
            The normalized, rescaled activations, same shape and dtype as ``x``.
        """
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the RoPE angles ``m * theta^(-2i/hd)`` (RoFormer, eq. 34).

    Args:
        positions: integer token positions ``m``, shape ``(T,)``.
        head_dim: width of a head ``hd`` (even).
        theta: the base frequency.
        dtype: dtype of the returned tables (angles are always computed in float32).

    Returns:
        ``(cos, sin)``, each of shape ``(T, hd)``: the ``hd/2`` angles repeated twice,
        ``[a_0 .. a_{hd/2-1}, a_0 .. a_{hd/2-1}]``, matching the half-split pairing of
        :func:`rotate_half`.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map ``[x1, x2] -> [-x2, x1]`` on the last dimension split in two halves.

    Together with :func:`apply_rope` this rotates each pair ``(x[i], x[i + hd/2])`` by its angle.

    >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([-3., -4.,  1.,  2.])
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their position's angles.

    Because every pair is rotated by ``m * freq``, the dot product of a query at position ``m`` with
    a key at position ``n`` depends only on ``m - n`` (the property RoPE is designed for).

    Args:
        x: queries or keys, shape ``(B, heads, T, hd)``.
        cos: from :func:`rope_cos_sin`, shape ``(T, hd)``.
        sin: from :func:`rope_cos_sin`, shape ``(T, hd)``.

    Returns:
        The rotated tensor, shape ``(B, heads, T, hd)``.
    """
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Attention with an optional key/value cache


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer, for fast generation.

    Attention layers append to it in place; :attr:`seq_len` is the position of the next token.
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        """Number of cached positions (0 for an empty cache)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values of ``layer`` and return all of them.

        Args:
            layer: index of the decoder block.
            k: new keys, shape ``(B, h_kv, T_new, hd)``.
            v: new values, shape ``(B, h_kv, T_new, hd)``.

        Returns:
            ``(keys, values)`` for every position so far, each ``(B, h_kv, T_past + T_new, hd)``.
        """
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (B, h_kv, S, hd)
            v = torch.cat([self.values[layer], v], dim=2)  # (B, h_kv, S, hd)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE.

    ``n_heads`` query heads share ``n_kv_heads`` key/value heads: query head ``j`` reads key/value
    head ``j // (n_heads // n_kv_heads)`` (GQA; multi-head attention when the counts are equal).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend from every token to itself and the tokens before it.

        Args:
            x: normalized activations, shape ``(B, T, d)``.
            cos: RoPE cosines for the ``T`` new positions, shape ``(T, hd)``.
            sin: RoPE sines for the ``T`` new positions, shape ``(T, hd)``.
            cache: optional key/value cache holding earlier positions; updated in place.

        Returns:
            The attention output projected back to the residual stream, shape ``(B, T, d)``.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, h_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, h_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, h_kv, S, hd), S = T_past + T
        S = k.shape[2]
        # GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads.
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, h, S, hd)
        v = v.repeat_interleave(n_rep, dim=1)  # (B, h, S, hd)
        if S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, hd)
        elif T == 1:
            # One new token (the usual generation step) may see every cached position: no mask.
            y = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, hd)
        else:
            # New queries sit at positions S-T .. S-1; is_causal would align them to position 0.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, h * hd)
        return self.o_proj(y)


# ----------------------------------------------------------------------------------------------
# MLP and decoder block


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Shazeer 2020, eq. 6)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: activations, shape ``(B, T, d)``.

        Returns:
            Shape ``(B, T, d)`` (the hidden activations are ``(B, T, hidden_dim)``).
        """
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One pre-norm decoder block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Args: ``x`` ``(B, T, d)``, RoPE tables ``(T, hd)``, optional cache. Returns ``(B, T, d)``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# ----------------------------------------------------------------------------------------------
# The model


class LlamaModel(nn.Module):
    """The decoder stack without the head: ``embed_tokens``, ``layers``, final ``norm``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Llama(nn.Module):
    """A Llama causal language model.

    Build one from a :class:`LlamaConfig` (random weights) or load SmolLM2 with
    :func:`quantlab.models.smollm2.load_smollm2`.

    >>> cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=32)
    >>> Llama(cfg)(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 32])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tie_weights()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal init (std 0.02, as GPT-2/Llama) so random models give sane logits in tests.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very same Parameter as ``embed_tokens.weight``.

        Call it again after replacing ``model.embed_tokens.weight`` (e.g. when loading weights).
        """
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compute next-token logits (and the cross-entropy loss when ``targets`` is given).

        Args:
            idx: token ids, shape ``(B, T)``, int64.
            targets: optional next-token ids, shape ``(B, T)``; entries equal to -100 are ignored.
            cache: optional :class:`KVCache`; ``idx`` then continues the cached sequence.

        Returns:
            ``logits`` of shape ``(B, T, vocab)`` in the model's dtype when ``targets`` is None,
            otherwise ``(logits, loss)`` with the scalar mean cross entropy (computed in float32).
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be an int64/int32 tensor of token ids, got {got}")
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, tokens) with tokens >= 1, got {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0 if cache is None else cache.seq_len
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.model.embed_tokens(idx)  # (B, T, d)
        positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)  # (T, hd)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)  # (B, T, d)
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` token by token, using a :class:`KVCache`.

        Args:
            idx: prompt token ids, shape ``(B, T)``.
            max_new_tokens: how many tokens to add at most.
            temperature: 0 for greedy decoding (argmax), otherwise the softmax temperature.
            top_k: if given, sample only among the ``top_k`` most likely tokens.
            eos_id: if given, a row that produced it keeps producing it, and generation stops early
                once every row has.
            generator: optional random generator, for reproducible sampling.

        Returns:
            The prompt followed by the new tokens, shape ``(B, T + n_new)`` with
            ``n_new <= max_new_tokens``.
        """
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_positive(temperature, "temperature", allow_zero=True)
        if top_k is not None and not 1 <= check_int(top_k, "top_k") <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.config.vocab_size}], got {top_k}")
        cache = KVCache(self.config.n_layers)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache)[:, -1, :].float()  # (B, vocab)
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)  # (B, vocab)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(done[:, None], eos_id)
                done = done | (next_id[:, 0] == eos_id)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
            step_input = next_id
            if eos_id is not None and bool(done.all()):
                break
        return idx

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
