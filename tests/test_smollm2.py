"""Tests for quantlab.models.smollm2: GGUF name mapping, the RoPE un-permutation, loading, the real model."""

from __future__ import annotations

import jinja2
import pytest
import torch
import torch.nn.functional as F

from quantlab.assets import smollm2_gguf_path
from quantlab.gguf import read_gguf, write_gguf
from quantlab.models.llama import Llama, LlamaConfig, rope_cos_sin
from quantlab.models.smollm2 import (
    chat_prompt,
    config_from_gguf_metadata,
    generate_text,
    gguf_to_hf_name,
    load_smollm2,
    unpermute_rope_rows,
)
from quantlab.models.tokenizer import bytes_to_unicode

# ----------------------------------------------------------------------------------------------
# llama.cpp conventions, written out independently as references


def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to q/k rows: interleave the two halves of every head."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def rope_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's NORMAL-mode RoPE: rotate pairs (2i, 2i+1) by position * theta^(-2i/hd)."""
    hd = x.shape[-1]
    angles = positions[:, None].float() * theta ** (-torch.arange(0, hd, 2).float() / hd)  # (T, hd/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_unpermute_inverts_the_converter_permutation() -> None:
    w = torch.randn(3 * 64, 40)
    for heads in (1, 3):
        p = llamacpp_permute(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(unpermute_rope_rows(p, heads), w)
    with pytest.raises(ValueError, match="n_heads"):
        unpermute_rope_rows(torch.zeros(6, 4), 2)


def test_adjacent_pair_rope_on_gguf_rows_equals_half_split_rope_on_hf_rows() -> None:
    """The reason for the permutation: both conventions give the same attention scores."""
    torch.manual_seed(0)
    hd, heads, T, theta = 16, 2, 7, 10000.0
    wq, wk, x = torch.randn(heads * hd, 24), torch.randn(heads * hd, 24), torch.randn(T, 24)
    pos = torch.arange(T)
    # llama.cpp: permuted weights, adjacent-pair rotation.
    q_cpp = rope_adjacent_pairs(
        (x @ llamacpp_permute(wq, heads).T).view(T, heads, hd).transpose(0, 1), pos, theta
    )
    k_cpp = rope_adjacent_pairs(
        (x @ llamacpp_permute(wk, heads).T).view(T, heads, hd).transpose(0, 1), pos, theta
    )
    # quantlab / Hugging Face: original rows, half-split rotation.
    cos, sin = rope_cos_sin(pos, hd, theta)
    from quantlab.models.llama import apply_rope

    q_hf = apply_rope((x @ wq.T).view(T, heads, hd).transpose(0, 1), cos, sin)
    k_hf = apply_rope((x @ wk.T).view(T, heads, hd).transpose(0, 1), cos, sin)
    torch.testing.assert_close(
        q_cpp @ k_cpp.transpose(-1, -2), q_hf @ k_hf.transpose(-1, -2), rtol=1e-4, atol=1e-4
    )


def test_gguf_names() -> None:
    assert gguf_to_hf_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    for bad in ("blk.x.attn_q.weight", "blk.0.attn_qkv.weight", "rope_freqs.weight"):
        with pytest.raises(ValueError, match="unknown GGUF tensor"):
            gguf_to_hf_name(bad)


# ----------------------------------------------------------------------------------------------
# Loading a small synthetic GGUF written the way llama.cpp's converter writes one

TINY = LlamaConfig(
    vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128
)


def tiny_metadata(cfg: LlamaConfig) -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [bytes_to_unicode()[b] for b in range(256)]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    return {
        "general.architecture": "llama",
        "llama.block_count": cfg.n_layers,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.freq_base": cfg.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def write_tiny_gguf(path, model: Llama) -> None:
    """Export ``model`` as llama.cpp would: GGUF names, permuted q/k rows, F32 tensors."""
    hf_to_gguf = {gguf_to_hf_name(n): n for n in ["token_embd.weight", "output_norm.weight", "output.weight"]}
    for i in range(model.config.n_layers):
        for part in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ):
            hf_to_gguf[gguf_to_hf_name(f"blk.{i}.{part}.weight")] = f"blk.{i}.{part}.weight"
    tensors = {}
    for name, p in model.named_parameters():
        w = p.detach().clone()
        if name.endswith("q_proj.weight"):
            w = llamacpp_permute(w, model.config.n_heads)
        elif name.endswith("k_proj.weight"):
            w = llamacpp_permute(w, model.config.n_kv_heads)
        tensors[hf_to_gguf[name]] = (w, "F32")
    write_gguf(path, tensors, tiny_metadata(model.config))


@pytest.mark.parametrize("tie", [True, False])
def test_load_synthetic_gguf_reproduces_the_model(tmp_path, tie: bool) -> None:
    torch.manual_seed(0)
    original = Llama(LlamaConfig(**{**TINY.__dict__, "tie_embeddings": tie})).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0.0, 0.2 if p.ndim == 2 else 1.0)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original)
    assert ("output.weight" in read_gguf(path).tensor_info) is not tie

    model, tok = load_smollm2(path)
    assert model.config == original.config
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), original(idx), rtol=0, atol=0)
    assert tok.encode("<|im_start|>hi") == [1, tok.token_to_id["h"], tok.token_to_id["i"]]

    half, _ = load_smollm2(path, dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="make setup"):
        load_smollm2(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="dtype"):
        load_smollm2(tmp_path / "missing.gguf", dtype=torch.int8)


def test_config_from_metadata_checks() -> None:
    meta = tiny_metadata(TINY)
    assert config_from_gguf_metadata(meta) == TINY
    with pytest.raises(ValueError, match="architecture"):
        config_from_gguf_metadata({**meta, "general.architecture": "gpt2"})
    with pytest.raises(ValueError, match="partial rotary"):
        config_from_gguf_metadata({**meta, "llama.rope.dimension_count": 8})
    missing = dict(meta)
    del missing["llama.block_count"]
    with pytest.raises(ValueError, match="llama.block_count"):
        config_from_gguf_metadata(missing)


def test_chat_prompt_layout() -> None:
    assert chat_prompt("Hi") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(conv, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="messages"):
        chat_prompt([{"content": "no role"}])


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct

needs_smollm2 = pytest.mark.skipif(not smollm2_gguf_path().is_file(), reason="SmolLM2 GGUF not fetched")

PROSE = (
    "The history of the city begins in the early Middle Ages, when a small settlement grew up around a "
    "river crossing. Over the following centuries, merchants built warehouses along the banks, and the town "
    "became an important center of trade. In the nineteenth century, the arrival of the railway brought new "
    "industries, and the population grew rapidly. Today, the city is known for its museums, its parks, and "
    "its lively markets, which attract visitors from all over the world."
)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_structure(smollm2) -> None:
    model, tok = smollm2
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (30, 576, 9, 3, 1536)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.vocab_size == tok.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert model.num_parameters() == 49152 * 576 + 30 * per_layer + 576
    # Q4_1 rows: 32 consecutive weights share one (scale, min), so each block has <= 16 distinct values.
    block = model.model.layers[0].mlp.up_proj.weight[0, :32]
    assert len(torch.unique(block)) <= 16


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_chat_template_matches_the_gguf_jinja_template(smollm2) -> None:
    template = read_gguf(smollm2_gguf_path()).metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
    assert chat_prompt(messages) == rendered


@pytest.mark.slow
@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2) -> None:
    model, tok = smollm2
    raw = generate_text(model, tok, "The capital of France is", max_new_tokens=8)
    assert "Paris" in raw
    chat = generate_text(model, tok, "What is the capital of France?", max_new_tokens=16, chat=True)
    assert "Paris" in chat


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_perplexity_on_english_prose(smollm2) -> None:
    model, tok = smollm2
    ids = torch.tensor([tok.encode(PROSE)])  # (1, 92)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    ppl = F.cross_entropy(logits[0], ids[0, 1:]).exp().item()
    # Measured 8.6 with the dequantized Q4_1 weights; skipping the RoPE un-permutation gives ~53 and a
    # uniform guess 49152. A correct 135M model lands around 10-30 on plain prose.
    assert 3.0 < ppl < 20.0, ppl
