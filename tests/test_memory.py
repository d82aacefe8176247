"""Tests for quantlab.memory: the classic table, exact parameter counts, KV cache, Q4_K_M mixture."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.memory import (
    FORMATS,
    PRESETS,
    format_bits_per_weight,
    kv_cache_bytes,
    memory_table,
    model_memory,
    weight_bytes,
)
from quantlab.packing import bits_per_weight as group_bits_per_weight


def test_classic_70b_table():
    rows = memory_table(["Llama-2-70B"], ["FP32", "FP16", "INT8", "INT4"])
    assert [r.total_gb for r in rows] == pytest.approx([280.0, 140.0, 70.0, 35.0])


@pytest.mark.parametrize(
    ("name", "expected"),
    # Published parameter counts of these architectures.
    [("Llama-2-7B", 6_738_415_616), ("Llama-3-8B", 8_030_261_248), ("Llama-2-70B", 68_976_648_192)],
)
def test_exact_parameter_counts(name, expected):
    assert PRESETS[name].n_params == expected


def test_smollm2_parameter_count_and_tied_head():
    p = PRESETS["SmolLM2-135M"]
    # 49152*576 embedding + 30 layers of (q,o: 576^2; k,v: 576*192; 3 MLP mats 576*1536; 2 norms) + final norm
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert p.n_params == 49152 * 576 + 30 * per_layer + 576


def test_block_format_bits_from_byte_layout():
    assert FORMATS["Q8_0"].bits_per_weight == 8.5
    assert FORMATS["Q4_0"].bits_per_weight == 4.5
    assert FORMATS["Q4_K"].bits_per_weight == 4.5
    assert FORMATS["Q6_K"].bits_per_weight == pytest.approx(6.5625)
    assert FORMATS["NF4"].bits_per_weight == 4.5


def test_q4_k_m_is_about_4_8_bits():
    for name in ["Llama-2-7B", "Llama-3-8B", "Llama-2-70B"]:
        bpw = format_bits_per_weight("Q4_K_M", PRESETS[name])
        # strictly between its two ingredients, near the ~4.8 llama.cpp reports
        assert 4.5 < bpw < 6.5625
        assert bpw == pytest.approx(4.8, abs=0.1)


def test_mixed_format_needs_preset():
    with pytest.raises(ValueError, match="preset"):
        format_bits_per_weight("Q4_K_M")


def test_overhead_split_adds_up():
    r = model_memory("Llama-2-7B", "INT4-g128")
    assert r.weights_gb == pytest.approx(7e9 * 4 / 8 / 1e9)
    assert r.overhead_gb == pytest.approx(7e9 * (20 / 128) / 8 / 1e9)
    assert r.total_gb == pytest.approx(r.weights_gb + r.overhead_gb)


def test_kv_cache_llama2_7b_4k_is_2_gib():
    # 2 * 32 layers * 32 heads * 128 dims * 4096 tokens * 2 bytes = 2 GiB exactly
    assert kv_cache_bytes(PRESETS["Llama-2-7B"], 4096) == 2 * 2**30


def test_gqa_shrinks_kv_cache():
    llama3 = kv_cache_bytes(PRESETS["Llama-3-8B"], 1024)
    llama2 = kv_cache_bytes(PRESETS["Llama-2-7B"], 1024)
    assert llama2 / llama3 == 4  # 32 vs 8 KV heads, same depth and head dim


@settings(max_examples=50, deadline=None)
@given(
    n_bits=st.integers(1, 16),
    group_size=st.sampled_from([16, 32, 64, 128, 256]),
    scale_bits=st.sampled_from([8, 16, 32]),
)
def test_group_overhead_monotone_in_group_size(n_bits, group_size, scale_bits):
    small = group_bits_per_weight(n_bits, group_size, scale_bits)
    large = group_bits_per_weight(n_bits, group_size * 2, scale_bits)
    assert n_bits < large < small


@settings(max_examples=50, deadline=None)
@given(params=st.floats(1e6, 1e12), bits=st.floats(1, 32))
def test_weight_bytes_linear(params, bits):
    assert weight_bytes(2 * params, bits) == pytest.approx(2 * weight_bytes(params, bits))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: model_memory("Llama-9B"), ValueError, "unknown model 'Llama-9B'"),
        (lambda: model_memory("Llama-2-7B", "INT5"), ValueError, "unknown format 'INT5'"),
        (lambda: model_memory(7e9, "FP16", context_length=128), ValueError, "architecture"),
        (lambda: kv_cache_bytes(PRESETS["Llama-2-7B"], -1), ValueError, "context_length"),
        (lambda: kv_cache_bytes(PRESETS["Llama-2-7B"], 8, batch_size=0), ValueError, "batch_size"),
        (lambda: kv_cache_bytes(PRESETS["Llama-2-7B"], 8.5), TypeError, "context_length"),
        (lambda: weight_bytes(-1, 4), ValueError, "n_params"),
        (lambda: model_memory("Llama-2-7B", 4), TypeError, "fmt"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
