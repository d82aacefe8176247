"""Tests for quantlab.models.llama: shapes, causality, GQA, RoPE, the KV cache and generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.models.llama import (
    KVCache,
    Llama,
    LlamaAttention,
    LlamaConfig,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rotate_half,
)

EPS32 = torch.finfo(torch.float32).eps


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(**overrides)).eval()
    # Larger than the 0.02 init so attention patterns are far from uniform and bugs show up.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model


# ----------------------------------------------------------------------------------------------
# Config and shapes


def test_default_config_is_smollm2_135m() -> None:
    cfg = LlamaConfig()
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (576, 30, 9, 3, 64)
    assert (cfg.hidden_dim, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 1e5)


@pytest.mark.parametrize(
    "overrides",
    [dict(n_heads=3), dict(n_kv_heads=3), dict(dim=36, n_heads=4), dict(dim=0), dict(norm_eps=0.0)],
)
def test_config_rejects_bad_values(overrides) -> None:
    with pytest.raises(ValueError):
        tiny_config(**overrides)


def test_config_rejects_non_int() -> None:
    with pytest.raises(TypeError, match="n_layers"):
        tiny_config(n_layers=2.0)


def test_forward_shapes_and_loss() -> None:
    model = tiny_model()
    idx = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(1))
    logits = model(idx)
    assert logits.shape == (3, 7, 61) and logits.dtype == torch.float32
    logits2, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits2.shape == (3, 6, 61)
    expected = F.cross_entropy(logits2.reshape(-1, 61), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_module_names_follow_hf_layout() -> None:
    names = {name for name, _ in tiny_model().named_modules()}
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.1.self_attn.{suffix}" in names
    for suffix in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{suffix}" in names
    assert {"model.embed_tokens", "model.norm", "lm_head", "model.layers.0.input_layernorm"} <= names
    assert "model.layers.0.post_attention_layernorm" in names
    linears = [m for m in tiny_model().modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(m.bias is None for m in linears)


def test_tied_and_untied_heads() -> None:
    tied = tiny_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() == tied.num_parameters() + 61 * 32


def test_forward_rejects_bad_idx() -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Causality


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_future_tokens_do_not_change_past_logits(t: int, seed: int) -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (2, 12), generator=g)
    other = idx.clone()
    other[:, t:] = torch.randint(0, 61, (2, 12 - t), generator=g)
    with torch.no_grad():
        a, b = model(idx), model(other)
    # Masked scores get exactly zero weight, so the past rows are computed from identical numbers.
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)


def test_past_tokens_do_change_future_logits() -> None:
    model = tiny_model()
    idx = torch.arange(8)[None] % 61
    other = idx.clone()
    other[0, 0] = 60
    with torch.no_grad():
        assert not torch.allclose(model(idx)[:, -1], model(other)[:, -1])


# ----------------------------------------------------------------------------------------------
# Grouped-query attention


def reference_attention(attn: LlamaAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Plain loop over heads with an explicit softmax; query head j uses key/value head j // n_rep."""
    B, T, _ = x.shape
    hd, h, h_kv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    cos, sin = rope_cos_sin(torch.arange(T), hd, theta)
    q = apply_rope(attn.q_proj(x).view(B, T, h, hd).transpose(1, 2), cos, sin)  # (B, h, T, hd)
    k = apply_rope(attn.k_proj(x).view(B, T, h_kv, hd).transpose(1, 2), cos, sin)  # (B, h_kv, T, hd)
    v = attn.v_proj(x).view(B, T, h_kv, hd).transpose(1, 2)  # (B, h_kv, T, hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for j in range(h):
        kv = j // (h // h_kv)
        scores = q[:, j] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        heads.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v[:, kv])
    y = torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, h * hd)  # (B, T, h * hd)
    return attn.o_proj(y)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_attention_matches_reference_loop(n_kv_heads: int) -> None:
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    attn = LlamaAttention(cfg)
    x = torch.randn(2, 9, cfg.dim)
    cos, sin = rope_cos_sin(torch.arange(9), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cfg.rope_theta))


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa_cfg = tiny_config(n_heads=4, n_kv_heads=2)
    mha_cfg = tiny_config(n_heads=4, n_kv_heads=4)
    torch.manual_seed(0)
    gqa, mha = LlamaAttention(gqa_cfg), LlamaAttention(mha_cfg)
    hd = gqa_cfg.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, hd, gqa_cfg.dim)  # (h_kv, hd, d)
            # Query heads 0,1 share kv head 0 and heads 2,3 share kv head 1.
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * hd, gqa_cfg.dim))
        x = torch.randn(3, 10, gqa_cfg.dim)
        cos, sin = rope_cos_sin(torch.arange(10), hd, gqa_cfg.rope_theta)
        torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))


# ----------------------------------------------------------------------------------------------
# RoPE and RMSNorm


def test_rotate_half_is_a_rotation_of_half_split_pairs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5), 16, 10000.0)
    # Reference: pair (x[i], x[i + 8]) as the complex number x[i] + 1j x[i + 8], times e^{i angle}.
    z = torch.complex(x[..., :8], x[..., 8:]) * torch.polar(
        torch.ones(5, 8), torch.atan2(sin[:, :8], cos[:, :8])
    )
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(m: int, n: int, shift: int, seed: int) -> None:
    hd = 16
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    cos, sin = rope_cos_sin(torch.tensor([m, n, m + shift, n + shift]), hd, 10000.0)

    def score(i: int, j: int) -> torch.Tensor:
        return apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j])

    # float32 angles up to 1000 rad carry an error of about 1000 * eps rad; the dot product moves by
    # at most |q| |k| times that angle error (plus rounding of the products themselves).
    tol = 4 * 1000 * EPS32 * float(q.norm() * k.norm()) + 1e-5
    assert abs(float(score(0, 1) - score(2, 3))) <= tol
    # Rotations keep norms.
    assert math.isclose(float(apply_rope(q, cos[0], sin[0]).norm()), float(q.norm()), rel_tol=1e-5)


def test_rope_frequencies() -> None:
    cos, sin = rope_cos_sin(torch.tensor([1]), 8, 100.0)
    angles = torch.tensor([1.0, 100 ** (-2 / 8), 100 ** (-4 / 8), 100 ** (-6 / 8)])
    torch.testing.assert_close(cos[0], torch.cat([angles, angles]).cos())
    torch.testing.assert_close(sin[0], torch.cat([angles, angles]).sin())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), c=st.floats(0.01, 100.0))
def test_rmsnorm_formula_and_scale_invariance(seed: int, c: float) -> None:
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    x = torch.randn(3, 8, generator=g) + 0.5
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # Scale invariance up to eps: 1/sqrt(c^2 ms + eps) vs 1/sqrt(ms + eps) after rescaling differ by a
    # relative |1 - c^2| eps / (2 c^2 ms) at first order (ms = mean(x^2)), plus float32 rounding.
    ms = float((x**2).mean(-1).min())
    rtol = abs(1 - c**2) * 1e-6 / (2 * c**2 * ms) + 16 * EPS32
    torch.testing.assert_close(norm(c * x), norm(x), rtol=rtol, atol=16 * EPS32)


def test_rmsnorm_keeps_half_precision_dtype() -> None:
    x = torch.randn(4, 8).to(torch.bfloat16)
    norm = RMSNorm(8).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# KV cache and generation


def test_kv_cache_matches_full_forward() -> None:
    model = tiny_model()
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config.n_layers)
        # Prefill 5 tokens, then a chunk of 4 (explicit-mask path), then 3 single tokens.
        pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 12)]
    assert cache.seq_len == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_argmax_loop() -> None:
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(idx, max_new_tokens=6)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], idx)
    expected = idx
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    model = tiny_model()
    idx = torch.tensor([[7, 8]])
    a = model.generate(idx, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    greedy = model.generate(idx, 8)
    assert torch.equal(model.generate(idx, 8, temperature=0.7, top_k=1), greedy)


def test_generate_stops_at_eos() -> None:
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3]])
    greedy = model.generate(idx, 5)
    eos = int(greedy[0, 4])  # the second generated token
    out = model.generate(idx, 5, eos_id=eos)
    first = (greedy[0, 3:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0], greedy[0, : 3 + first + 1])


def test_generate_rejects_bad_arguments() -> None:
    model = tiny_model()
    idx = torch.tensor([[1]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, temperature=1.0, top_k=0)
