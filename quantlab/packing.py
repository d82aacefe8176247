"""Bit packing: store low-bit integer codes densely in ``uint8`` bytes or ``int32`` words.

A 4-bit code wastes half of the byte it is stored in. Real formats pack several codes into one
*container* (a byte or a 32-bit word) and unpack them on the fly inside the matmul kernel. This module
packs along the **last** dimension of a code tensor and defines the layout precisely, because a kernel
that reads the bits in a different order produces garbage with no error.

Layout: one continuous bit stream
---------------------------------
Think of the ``n`` codes of a row, each ``n_bits`` wide, written one after the other into a stream of
bits, and the stream cut into containers of ``C`` bits (``C = 8`` for ``torch.uint8``, ``32`` for
``torch.int32``). Code ``i`` occupies stream positions ``i*n_bits .. i*n_bits + n_bits - 1``.

* ``order="low_first"`` (the GPTQ / AutoGPTQ ``qweight`` convention): stream position ``p`` is bit
  ``p % C`` of container ``p // C`` (counting from the least significant bit), and each code is written
  least significant bit first. For 4-bit codes in ``uint8``: element ``2j`` is the *low* nibble of byte
  ``j``; in ``int32``: element ``8j + i`` sits at bits ``4i .. 4i+3`` of word ``j``.
* ``order="high_first"``: stream position ``p`` is bit ``C - 1 - p % C`` of container ``p // C`` and each
  code is written most significant bit first, so the first code lands in the *high* bits (the
  bitsandbytes NF4 byte layout: element ``2j`` is the high nibble of byte ``j``).

When ``n_bits`` divides ``C`` (1, 2, 4, 8 bits) every code sits whole inside one container and ``n`` must
be a multiple of ``C // n_bits``. Otherwise (3, 5, 6, 7 bits) codes straddle container boundaries: a
3-bit row is 3 bits per code, no gaps, e.g. 32 codes fill exactly 3 ``int32`` words (code 10 is split
between bit 30-31 of word 0 and bit 0 of word 1, as in GPTQ's 3-bit kernels). The stream is padded with
zero bits up to a whole container; :func:`unpack_codes` needs ``n`` to drop the padding.

``int32`` words are stored two's-complement: a word whose bit 31 is set is negative. Use
:func:`bits_per_weight` to count what the packed codes plus their scales cost per weight.

References:
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR 2023 (the ``int32`` ``qweight`` packing of its CUDA kernels, low bits first).
    Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (4-bit storage, first
    element in the high nibble; double quantization overhead of 0.127 bits per parameter).
"""

from __future__ import annotations

import math

import torch

from quantlab._checks import check_int, check_positive

__all__ = [
    "ORDERS",
    "bits_per_weight",
    "codes_per_container",
    "container_bits",
    "pack_codes",
    "packed_length",
    "unpack_codes",
]

ORDERS: tuple[str, ...] = ("low_first", "high_first")
_CONTAINER_BITS = {torch.uint8: 8, torch.int32: 32}


# -----------------------------------------------------------------------------
# Small helpers: argument checks and sizes


def _check_pack_bits(n_bits: object) -> int:
    n_bits = check_int(n_bits, "n_bits")
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an int in [1, 8] for packing (codes unpack to uint8), got {n_bits}")
    return n_bits


def container_bits(container: torch.dtype) -> int:
    """Bits in one container: 8 for ``torch.uint8``, 32 for ``torch.int32``.

    >>> container_bits(torch.int32)
    32
    """
    if container not in _CONTAINER_BITS:
        raise ValueError(f"container must be torch.uint8 or torch.int32, got {container!r}")
    return _CONTAINER_BITS[container]


def _check_order(order: object) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order  # type: ignore[return-value]


def codes_per_container(n_bits: int, container: torch.dtype = torch.uint8) -> int | None:
    """How many whole codes fit in one container, or ``None`` when codes straddle containers.

    >>> codes_per_container(4, torch.int32), codes_per_container(3, torch.uint8)
    (8, None)
    """
    n_bits, c_bits = _check_pack_bits(n_bits), container_bits(container)
    return c_bits // n_bits if c_bits % n_bits == 0 else None


def packed_length(n: int, n_bits: int, container: torch.dtype = torch.uint8) -> int:
    """Number of containers holding ``n`` codes of ``n_bits``: ``ceil(n * n_bits / C)``.

    >>> packed_length(10, 3, torch.uint8), packed_length(32, 3, torch.int32)
    (4, 3)
    """
    n = check_int(n, "n")
    if n <= 0:
        raise ValueError(f"n must be a positive number of codes, got {n}")
    n_bits, c_bits = _check_pack_bits(n_bits), container_bits(container)
    return -(-n * n_bits // c_bits)


def _group_geometry(n_bits: int, c_bits: int) -> tuple[int, int]:
    """The smallest whole number of codes that fills whole containers: ``(codes, containers)``."""
    period = math.lcm(n_bits, c_bits)  # bits in one repeating unit of the layout
    return period // n_bits, period // c_bits


def _pieces(n_bits: int, c_bits: int, order: str):
    """Where each code of a repeating group lands: yields ``(code, container, code_shift, bit_shift, width)``.

    The piece of code ``i`` made of its bits ``code_shift .. code_shift + width - 1`` (LSB = bit 0) goes
    to bits ``bit_shift .. bit_shift + width - 1`` of container ``container`` of the group. A code has
    one piece, or two when it straddles a container boundary.
    """
    g_codes, _ = _group_geometry(n_bits, c_bits)
    for i in range(g_codes):
        start = i * n_bits  # stream position of the code's first bit
        k, r = divmod(start, c_bits)
        first = min(n_bits, c_bits - r)  # bits that fit in container k
        rest = n_bits - first
        if order == "low_first":
            # stream is LSB first: the code's low `first` bits go to bits r.. of container k
            yield i, k, 0, r, first
            if rest:
                yield i, k + 1, first, 0, rest
        else:
            # stream is MSB first: the code's high `first` bits go to the top free bits of container k
            yield i, k, rest, c_bits - r - first, first
            if rest:
                yield i, k + 1, 0, c_bits - rest, rest


# -----------------------------------------------------------------------------
# Pack / unpack


def _check_codes(codes: object, n_bits: int) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"codes must have an integer or float dtype, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dimension (packing runs along the last one)")
    if codes.numel() == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        if not bool(torch.isfinite(codes).all()):
            raise ValueError("codes contains NaN or Inf; codes must be integer-valued")
        if not bool((codes == torch.round(codes)).all()):
            raise ValueError("codes must be integer-valued; got a float tensor with fractional values")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi > 2**n_bits - 1:
        raise ValueError(
            f"codes must lie in [0, {2**n_bits - 1}] for n_bits={n_bits}, got values in [{lo}, {hi}]"
        )
    return codes


def pack_codes(
    codes: torch.Tensor, n_bits: int, container: torch.dtype = torch.uint8, order: str = "low_first"
) -> torch.Tensor:
    """Pack unsigned ``n_bits`` codes along the last dimension into ``uint8`` or ``int32`` containers.

    See the module docstring for the exact bit layout.

    Args:
        codes: ``(..., n)`` integer-valued tensor (any integer or float dtype) with values in
            ``[0, 2^n_bits - 1]``.
        n_bits: bits per code, 1..8.
        container: ``torch.uint8`` (bytes) or ``torch.int32`` (words, two's complement).
        order: ``"low_first"`` (code 0 in the lowest bits) or ``"high_first"`` (code 0 in the highest).

    Returns:
        ``(..., ceil(n * n_bits / C))`` tensor of dtype ``container``, e.g. ``(..., n / 2)`` for 4-bit
        codes in bytes, ``(..., n / 8)`` for 4-bit codes in ``int32``.

    Raises:
        ValueError: when ``n_bits`` divides the container size but ``n`` is not a multiple of the codes
            per container, or codes are out of range / not integers.

    >>> pack_codes(torch.tensor([1, 2, 3, 4]), 4)
    tensor([33, 67], dtype=torch.uint8)
    >>> [hex(b) for b in pack_codes(torch.tensor([1, 2]), 4, order="high_first").tolist()]
    ['0x12']
    >>> pack_codes(torch.tensor([0, 0, 0, 0, 0, 0, 0, 15]), 4, torch.int32)
    tensor([-268435456], dtype=torch.int32)
    """
    n_bits = _check_pack_bits(n_bits)
    c_bits = container_bits(container)
    order = _check_order(order)
    codes = _check_codes(codes, n_bits)
    n = codes.shape[-1]
    per = codes_per_container(n_bits, container)
    if per is not None and n % per != 0:
        raise ValueError(
            f"the last dimension of codes ({n}) must be a multiple of {per}, the number of "
            f"{n_bits}-bit codes per {container}; pad the codes first"
        )
    g_codes, g_words = _group_geometry(n_bits, c_bits)
    n_out = packed_length(n, n_bits, container)
    c = codes.to(torch.int64)
    pad = -n % g_codes
    if pad:  # bit-stream layouts only: zero codes add zero bits after the last real code
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, g_codes)  # (..., n_groups, g_codes)
    out = torch.zeros(*c.shape[:-1], g_words, dtype=torch.int64, device=c.device)  # (..., n_groups, g_words)
    for i, k, code_shift, bit_shift, width in _pieces(n_bits, c_bits, order):
        piece = (c[..., i] >> code_shift) & ((1 << width) - 1)
        out[..., k] |= piece << bit_shift
    out = out.reshape(*out.shape[:-2], -1)[..., :n_out]  # (..., n_out)
    if container == torch.int32:
        out = torch.where(out >= 2**31, out - 2**32, out)  # unsigned 32-bit pattern -> two's complement
    return out.to(container)


def unpack_codes(
    packed: torch.Tensor, n_bits: int, n: int, container: torch.dtype = torch.uint8, order: str = "low_first"
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: recover ``n`` codes per row from packed containers.

    Args:
        packed: ``(..., ceil(n * n_bits / C))`` tensor of dtype ``container``.
        n_bits: bits per code, 1..8.
        n: number of codes per row to recover (drops the padding of bit-stream layouts).
        container: ``torch.uint8`` or ``torch.int32``; must equal ``packed.dtype``.
        order: ``"low_first"`` or ``"high_first"``, as used when packing.

    Returns:
        ``(..., n)`` ``torch.uint8`` codes.

    >>> unpack_codes(torch.tensor([33, 67], dtype=torch.uint8), 4, 4)
    tensor([1, 2, 3, 4], dtype=torch.uint8)
    """
    n_bits = _check_pack_bits(n_bits)
    c_bits = container_bits(container)
    order = _check_order(order)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != container:
        raise TypeError(f"packed must have dtype container={container}, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one dimension")
    n_out = packed_length(n, n_bits, container)
    per = codes_per_container(n_bits, container)
    if per is not None and n % per != 0:
        raise ValueError(
            f"n={n} must be a multiple of {per}, the number of {n_bits}-bit codes per {container}"
        )
    if packed.shape[-1] != n_out:
        raise ValueError(
            f"packed has {packed.shape[-1]} containers in its last dimension, but n={n} codes of "
            f"{n_bits} bits need {n_out}"
        )
    g_codes, g_words = _group_geometry(n_bits, c_bits)
    p = packed.to(torch.int64) & (2**c_bits - 1)  # two's complement int32 -> its unsigned bit pattern
    pad = -n_out % g_words
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*p.shape[:-1], -1, g_words)  # (..., n_groups, g_words)
    out = torch.zeros(*p.shape[:-1], g_codes, dtype=torch.int64, device=p.device)  # (..., n_groups, g_codes)
    for i, k, code_shift, bit_shift, width in _pieces(n_bits, c_bits, order):
        piece = (p[..., k] >> bit_shift) & ((1 << width) - 1)
        out[..., i] |= piece << code_shift
    out = out.reshape(*out.shape[:-2], -1)[..., :n]  # (..., n)
    return out.to(torch.uint8)


# -----------------------------------------------------------------------------
# Storage cost


def bits_per_weight(
    n_bits: float,
    group_size: int | None = None,
    scale_bits: float = 16,
    zero_point_bits: float = 0,
    in_features: int | None = None,
) -> float:
    """Average storage per weight: the code plus its share of the group's scale and zero-point.

    ``bits = n_bits + (scale_bits + zero_point_bits) / group_size``. For per-channel quantization pass
    ``in_features`` instead of ``group_size`` (one scale per row). With neither, the overhead is taken as
    negligible (one scale for a large tensor) and ``n_bits`` is returned. Fractional ``scale_bits``
    express double quantization, e.g. QLoRA's NF4: 8-bit absmax per 64 weights plus one fp32 constant per
    256 absmax values, ``scale_bits = 8 + 32 / 256``.

    Args:
        n_bits: bits per code (> 0, may be fractional, e.g. 1.58 for ternary).
        group_size: weights sharing one scale / zero-point, or None.
        scale_bits: bits of one scale (16 for fp16).
        zero_point_bits: bits of one zero-point (0 for symmetric, often ``n_bits`` or 16).
        in_features: row length for per-channel quantization (only when ``group_size`` is None).

    Returns:
        Bits per weight as a float.

    >>> bits_per_weight(4, group_size=128, scale_bits=16, zero_point_bits=4)
    4.15625
    >>> round(bits_per_weight(4, 64, scale_bits=8 + 32 / 256), 3)
    4.127
    """
    n_bits = check_positive(n_bits, "n_bits")
    scale_bits = check_positive(scale_bits, "scale_bits", allow_zero=True)
    zero_point_bits = check_positive(zero_point_bits, "zero_point_bits", allow_zero=True)
    if group_size is not None and in_features is not None:
        raise ValueError("pass group_size (per-group) or in_features (per-channel), not both")
    share = group_size if group_size is not None else in_features
    if share is None:
        return n_bits
    name = "group_size" if group_size is not None else "in_features"
    share = check_int(share, name)
    if share <= 0:
        raise ValueError(f"{name} must be a positive int, got {share}")
    return n_bits + (scale_bits + zero_point_bits) / share
