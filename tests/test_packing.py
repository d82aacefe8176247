"""Tests for quantlab.packing: bit layouts, lossless round trips, errors, bits per weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.packing import (
    bits_per_weight,
    codes_per_container,
    pack_codes,
    packed_length,
    unpack_codes,
)

CONTAINERS = [torch.uint8, torch.int32]
ORDERS = ["low_first", "high_first"]


def _to_unsigned(words: torch.Tensor) -> list[int]:
    """int32 words as their unsigned 32-bit patterns."""
    return [w & 0xFFFFFFFF for w in words.tolist()]


# -----------------------------------------------------------------------------
# Hand-computed layouts


def test_4bit_bytes_both_orders():
    codes = torch.tensor([0x1, 0x2, 0xA, 0xF])
    assert pack_codes(codes, 4).tolist() == [0x21, 0xFA]  # element 2j in the low nibble
    assert pack_codes(codes, 4, order="high_first").tolist() == [0x12, 0xAF]  # element 2j in the high nibble


def test_4bit_int32_low_first_is_gptq_layout():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 15])
    word = pack_codes(codes, 4, torch.int32)
    assert word.dtype == torch.int32 and word.shape == (1,)
    assert _to_unsigned(word) == [0xF7654321]  # element i at bits 4i .. 4i+3
    assert word.item() == 0xF7654321 - 2**32  # two's complement: the top nibble makes it negative
    assert _to_unsigned(pack_codes(codes, 4, torch.int32, "high_first")) == [0x1234567F]


def test_gptq_int32_packing_reference(gen):
    """GPTQ packs 32 // bits codes per int32 word: qweight |= code[i] << (bits * i)."""
    for n_bits in (2, 4, 8):
        per = 32 // n_bits
        codes = torch.randint(0, 2**n_bits, (3, 4 * per), generator=gen)
        words = []
        for row in codes.tolist():
            words.append([sum(row[j * per + i] << (n_bits * i) for i in range(per)) for j in range(4)])
        assert [_to_unsigned(r) for r in pack_codes(codes, n_bits, torch.int32)] == words


def test_2bit_and_8bit_hand_values():
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11100100]
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2, order="high_first").tolist() == [0b00011011]
    codes = torch.tensor([1, 2, 3, 255])
    assert pack_codes(codes, 8).tolist() == [1, 2, 3, 255]  # 8-bit codes in bytes: the identity
    assert _to_unsigned(pack_codes(codes, 8, torch.int32)) == [0xFF030201]


def test_3bit_continuous_bit_stream():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])  # 24 bits = 3 bytes, no padding
    # low_first: sum(c_i << 3i) = 0x1F58D1, stored little-endian
    assert pack_codes(codes, 3).tolist() == [0xD1, 0x58, 0x1F]
    # high_first: the codes written MSB first, one after the other: 001 010 011 100 101 110 111 000
    assert pack_codes(codes, 3, order="high_first").tolist() == [0b00101001, 0b11001011, 0b10111000]


def test_3bit_codes_straddle_int32_words():
    codes = torch.zeros(32, dtype=torch.int64)
    codes[10] = 0b101  # bits 30, 31 of word 0 and bit 0 of word 1
    words = pack_codes(codes, 3, torch.int32)
    assert words.shape == (3,)
    assert _to_unsigned(words) == [0b01 << 30, 0b1, 0]
    assert torch.equal(unpack_codes(words, 3, 32, torch.int32), codes.to(torch.uint8))


def test_3bit_pads_the_last_container():
    codes = torch.tensor([7, 7, 7])  # 9 bits -> 2 bytes, 7 padding bits set to 0
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [0xFF, 0x01]
    assert packed_length(3, 3) == 2
    assert unpack_codes(packed, 3, 3).tolist() == [7, 7, 7]


def test_codes_per_container_and_lengths():
    assert codes_per_container(4, torch.uint8) == 2
    assert codes_per_container(4, torch.int32) == 8
    assert codes_per_container(3, torch.int32) is None
    assert packed_length(128, 4, torch.int32) == 16
    assert packed_length(32, 3, torch.int32) == 3
    assert packed_length(33, 3, torch.int32) == 4


# -----------------------------------------------------------------------------
# Round trips


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.sampled_from(CONTAINERS),
    st.sampled_from(ORDERS),
    st.integers(1, 3),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.int64, torch.uint8, torch.float32, torch.int32]),
)
def test_round_trip_every_width_container_order(n_bits, container, order, rows, k, seed, dtype):
    per = codes_per_container(n_bits, container)
    n = k * per if per is not None else k  # bit-stream widths accept any n
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**n_bits, (rows, n), generator=gen).to(dtype)
    packed = pack_codes(codes, n_bits, container, order)
    assert packed.dtype == container
    assert packed.shape == (rows, packed_length(n, n_bits, container))
    out = unpack_codes(packed, n_bits, n, container, order)
    assert out.dtype == torch.uint8 and torch.equal(out, codes.to(torch.uint8))


def test_round_trip_higher_dimensional(gen):
    codes = torch.randint(0, 16, (2, 3, 5, 16), generator=gen)
    for container in CONTAINERS:
        packed = pack_codes(codes, 4, container)
        assert packed.shape[:-1] == (2, 3, 5)
        assert torch.equal(unpack_codes(packed, 4, 16, container), codes.to(torch.uint8))


def test_orders_are_mirror_images_per_byte(gen):
    codes = torch.randint(0, 16, (64,), generator=gen)
    low = pack_codes(codes, 4)
    high = pack_codes(codes, 4, order="high_first")
    assert torch.equal(high, ((low & 0x0F) << 4) | (low >> 4))  # swapping nibbles turns one into the other


# -----------------------------------------------------------------------------
# Bad input


def test_pack_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        pack_codes(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="multiple"):
        pack_codes(torch.zeros(12, dtype=torch.int64), 4, torch.int32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.tensor([1, 16]), 4)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="integer-valued"):
        pack_codes(torch.tensor([0.5, 1.0]), 4)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([float("nan"), 1.0]), 4)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.empty(0, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="codes"):
        pack_codes(torch.tensor([True, False]), 1)
    with pytest.raises(TypeError, match="codes"):
        pack_codes([1, 2], 4)
    with pytest.raises(ValueError, match="n_bits"):
        pack_codes(torch.tensor([1, 2]), 9)
    with pytest.raises(ValueError, match="n_bits"):
        pack_codes(torch.tensor([1, 2]), 0)
    with pytest.raises(TypeError, match="n_bits"):
        pack_codes(torch.tensor([1, 2]), 4.0)
    with pytest.raises(ValueError, match="container"):
        pack_codes(torch.tensor([1, 2]), 4, torch.int16)
    with pytest.raises(ValueError, match="order"):
        pack_codes(torch.tensor([1, 2]), 4, order="big_endian")


def test_unpack_bad_input():
    packed = pack_codes(torch.tensor([1, 2, 3, 4]), 4)
    with pytest.raises(TypeError, match="container"):
        unpack_codes(packed, 4, 4, torch.int32)
    with pytest.raises(ValueError, match="n=6"):
        unpack_codes(packed, 4, 6)
    with pytest.raises(ValueError, match="multiple"):
        unpack_codes(packed, 4, 3)
    with pytest.raises(ValueError, match="n must be a positive"):
        unpack_codes(packed, 4, 0)
    with pytest.raises(TypeError, match="packed"):
        unpack_codes([1, 2], 4, 4)


# -----------------------------------------------------------------------------
# Bits per weight


def test_bits_per_weight_hand_values():
    assert bits_per_weight(4, group_size=128, scale_bits=16, zero_point_bits=4) == 4 + 20 / 128
    assert bits_per_weight(4, 128, scale_bits=16, zero_point_bits=4) == pytest.approx(4.156, abs=1e-3)
    assert bits_per_weight(8, in_features=4096) == 8 + 16 / 4096  # per-channel fp16 scale
    assert bits_per_weight(4) == 4.0
    assert bits_per_weight(4, 64, scale_bits=32) == 4.5  # NF4 with fp32 absmax
    assert bits_per_weight(4, 64, scale_bits=8 + 32 / 256) == pytest.approx(4.127, abs=1e-3)  # + double quant


def test_bits_per_weight_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        bits_per_weight(4, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        bits_per_weight(4, group_size=12.5)
    with pytest.raises(ValueError, match="n_bits"):
        bits_per_weight(0)
    with pytest.raises(ValueError, match="scale_bits"):
        bits_per_weight(4, 128, scale_bits=-16)
    with pytest.raises(ValueError, match="not both"):
        bits_per_weight(4, group_size=128, in_features=4096)
