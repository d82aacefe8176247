"""A fused int4-dequantize + matmul kernel (W4A16) in Triton, that also runs on a laptop CPU.

What you will learn
-------------------
* how a Triton program sees the problem: a grid of *programs*, each owning a tile of the output, with
  ``tl.arange`` blocks of offsets and *masks* for the ragged edges;
* how to unpack 4-bit codes from bytes (or 32-bit words) *in registers* with a shift and a mask, so
  the weight travels from memory at 4 bits and is expanded only where it is used;
* how group-wise scales and zero-points are gathered for each tile (``group = k // group_size``);
* why the accumulator is fp32 even when the activations are fp16 (a K-long sum of fp16 products
  loses about ``log2(K)`` bits);
* why this is faster at all: at small batch, a matmul is limited by the bytes it reads, and the
  weight is 4x smaller than in fp16 (see :func:`bytes_moved`).

The kernel computes ``y = x @ dequant(W)^T`` for an ``nn.Linear``-shaped weight ``W (N, K)``
(``N = out_features``, ``K = in_features``) stored as 4-bit codes packed along ``K`` exactly as
:func:`quantlab.packing.pack_codes` lays them out (``order="low_first"``): two codes per ``uint8``
(element ``2j`` in the low nibble of byte ``j``) or eight per ``int32`` (element ``8j + i`` in bits
``4i .. 4i+3`` of word ``j``). Dequantization is ``w = (code - zero_point) * scale`` with one
``scale`` / ``zero_point`` per (output row, group of ``group_size`` input columns) — the convention of
GPTQ, AWQ and :mod:`quantlab.granularity`. An optional ``g_idx`` (group of each input column) runs
GPTQ layers quantized with act-order unchanged.

Running on a CPU
----------------
Triton compiles kernels for GPUs. Its *interpreter* (``TRITON_INTERPRET=1``) instead runs the same
kernel with NumPy, one program at a time: slow, but exact, and enough to learn and test on a laptop.
The launchers pick the mode from the tensors: CUDA tensors compile for real; CPU tensors, on a machine
with no CUDA device (so a GPU machine never silently falls back), run in the interpreter. Triton fixes
its mode when it is first imported, so the first CPU launch sets ``TRITON_INTERPRET=1`` in this
process and then imports Triton; importing this module imports nothing and changes nothing.
Triton is optional: where it is not installed (macOS, Windows) :func:`triton_available` is False,
the launchers raise a clear error, and :func:`w4a16_matmul_reference` (pure PyTorch) still works.

References:
    Tillet, Kung and Cox, "Triton: An Intermediate Language and Compiler for Tiled Neural Network
    Computations", MAPL 2019.
    Frantar et al., "GPTQ", ICLR 2023 and Lin et al., "AWQ", MLSys 2024 (the group-wise int4 layouts).
    The Triton tutorials (vector addition, matrix multiplication) for the program/block/mask model.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from quantlab._checks import check_float_tensor, check_group_size, check_int

# `tl` is bound to `triton.language` by `_build` on first use, after TRITON_INTERPRET is decided:
# Triton reads that variable when it is *imported*, so importing it here would fix the mode too early.
tl = None

__all__ = [
    "bytes_moved",
    "dequantize_int4",
    "dequantize_int4_reference",
    "interpreter_mode",
    "load_triton",
    "triton_available",
    "unpack_int4_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (Linux wheels; not macOS/Windows)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_mode(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs in Triton's interpreter.

    CPU tensors run interpreted only when no CUDA device exists (on a GPU machine a CPU tensor is
    almost certainly a mistake, so the launcher refuses it instead of silently crawling).
    """
    if device.type == "cuda":
        return False
    if device.type == "cpu" and not torch.cuda.is_available():
        return True
    raise ValueError(
        f"the Triton kernels run on CUDA tensors, or on CPU tensors on a machine without a GPU; "
        f"got a {device} "
        "tensor: move the inputs to the GPU (.cuda())"
    )


# -----------------------------------------------------------------------------
# The pure-PyTorch reference: what the kernels must compute


def unpack_int4_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack 4-bit codes packed ``low_first`` along the last dim into ``(N, k)`` int32 codes.

    Args:
        packed: ``(N, k/2)`` uint8 or ``(N, k/8)`` int32.
        k: number of codes per row.

    Returns:
        ``(N, k)`` int32 codes in ``[0, 15]``.
    """
    per = 2 if packed.dtype == torch.uint8 else 8
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * 4  # (per,)
    words = packed.to(torch.int32).unsqueeze(-1)  # (N, k/per, 1)
    codes = (words >> shifts) & 0xF  # (N, k/per, per): arithmetic shift, then the mask drops sign bits
    return codes.reshape(packed.shape[0], -1)[:, :k]  # (N, k)


def _expand_groups(params: torch.Tensor, k: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-group parameters ``(N, n_groups)`` expanded to one per column ``(N, k)``."""
    if g_idx is None:
        g_idx = torch.arange(k, device=params.device) // group_size  # (k,)
    return params[:, g_idx.long()]  # (N, k)


def dequantize_int4_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    k: int | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W = (code - zero_point) * scale`` in fp32, shape ``(N, K)``: the reference dequantizer."""
    k = k if k is not None else packed.shape[1] * (2 if packed.dtype == torch.uint8 else 8)
    codes = unpack_int4_reference(packed, k).to(torch.float32)  # (N, K)
    s = _expand_groups(scale.to(torch.float32), k, group_size, g_idx)  # (N, K)
    z = _expand_groups(zero_point.to(torch.float32), k, group_size, g_idx)  # (N, K)
    return (codes - z) * s


def w4a16_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W)^T`` with an fp32 accumulator, in plain PyTorch.

    Args:
        x: ``(M, K)`` activations (fp16, bf16 or fp32).
        packed, scale, zero_point, group_size, g_idx: as in :func:`w4a16_matmul`.

    Returns:
        ``(M, N)`` in ``x``'s dtype.
    """
    w = dequantize_int4_reference(packed, scale, zero_point, group_size, x.shape[-1], g_idx)  # (N, K)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


# -----------------------------------------------------------------------------
# The kernels (plain functions; `_build` turns them into Triton kernels for the chosen mode)


def _dequant_kernel(
    packed_ptr,  # *u8 or *i32: the packed codes, row-major (N, K / PER)
    scale_ptr,  # *f32: (N, n_groups) scales
    zero_ptr,  # *f32: (N, n_groups) zero-points
    out_ptr,  # *f32: (N, K) output
    N,  # rows (out_features)
    K,  # columns (in_features), codes per row
    n_groups,  # groups per row = K / group_size
    group_size,  # columns sharing one scale and zero-point
    PER: tl.constexpr,  # codes per container: 2 (uint8) or 8 (int32)
    BLOCK: tl.constexpr,  # output elements handled by one program
):
    pid = tl.program_id(0)  # this program's block of the flattened (N, K) output
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # flat output indices, (BLOCK,)
    mask = offs < N * K  # the last block may run past the end
    row = offs // K
    col = offs % K
    word = tl.load(packed_ptr + row * (K // PER) + col // PER, mask=mask, other=0).to(tl.int32)
    code = (word >> ((col % PER) * 4)) & 0xF  # the nibble of this element
    g = col // group_size
    s = tl.load(scale_ptr + row * n_groups + g, mask=mask, other=0.0)
    z = tl.load(zero_ptr + row * n_groups + g, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (code.to(tl.float32) - z) * s, mask=mask)


def _w4a16_kernel(
    x_ptr,  # *f16/bf16/f32: activations (M, K), row-major
    packed_ptr,  # *u8 or *i32: packed 4-bit weight codes (N, K / PER), row-major
    scale_ptr,  # *f32: (N, n_groups) scales
    zero_ptr,  # *f32: (N, n_groups) zero-points
    gidx_ptr,  # *i32: (K,) group of each input column (GPTQ act-order), read only if HAS_GIDX
    y_ptr,  # *f16/bf16/f32: output (M, N), row-major
    M,  # rows of x (tokens)
    N,  # out_features
    K,  # in_features
    n_groups,  # groups per weight row
    group_size,  # columns per group
    stride_xm,  # elements between rows of x
    stride_pn,  # containers between rows of packed
    stride_ym,  # elements between rows of y
    PER: tl.constexpr,  # codes per container: 2 (uint8) or 8 (int32)
    HAS_GIDX: tl.constexpr,  # use gidx_ptr instead of k // group_size
    BLOCK_M: tl.constexpr,  # tile rows of y (tokens)
    BLOCK_N: tl.constexpr,  # tile columns of y (output features)
    BLOCK_K: tl.constexpr,  # reduction step
):
    pid_m = tl.program_id(0)  # which tile of tokens
    pid_n = tl.program_id(1)  # which tile of output features
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x / y
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W / columns of y
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulator (see module docstring)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of this step
        # activations tile (BLOCK_M, BLOCK_K); out-of-range rows/columns read 0 and add nothing
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        )
        # weight tile: fetch the containers, then unpack the 4-bit codes in registers
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        word = tl.load(packed_ptr + rn[:, None] * stride_pn + rk[None, :] // PER, mask=w_mask, other=0)
        code = (word.to(tl.int32) >> ((rk[None, :] % PER) * 4)) & 0xF  # (BLOCK_N, BLOCK_K)
        if HAS_GIDX:
            g = tl.load(gidx_ptr + rk, mask=rk < K, other=0)
        else:
            g = rk // group_size
        s = tl.load(scale_ptr + rn[:, None] * n_groups + g[None, :], mask=w_mask, other=0.0)
        z = tl.load(zero_ptr + rn[:, None] * n_groups + g[None, :], mask=w_mask, other=0.0)
        w = (code.to(tl.float32) - z) * s  # dequantized tile (BLOCK_N, BLOCK_K), fp32
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def load_triton(device: torch.device | str = "cpu"):
    """Import Triton in the mode that ``device`` needs and return ``(triton, triton.language)``.

    Triton decides between compiling and interpreting when ``triton`` is first *imported* (its own
    library functions such as ``tl.zeros`` are jitted then). So for a CPU device on a machine without
    a GPU this sets ``TRITON_INTERPRET=1`` before the import; if Triton was already imported in
    compiled mode in this process, interpretation is impossible and we say so. Labs call this once
    before defining their own ``@triton.jit`` kernels.

    Raises:
        RuntimeError: Triton is not installed, or was imported before the interpreter could be enabled.
    """
    global tl
    if not triton_available():
        raise RuntimeError(
            "Triton is not installed here (it ships wheels for Linux only); the pure-PyTorch reference "
            "functions (w4a16_matmul_reference, dequantize_int4_reference) work everywhere"
        )
    interpret = interpreter_mode(torch.device(device))
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError(
                "triton was imported before quantlab could enable its CPU interpreter; restart the kernel, "
                "or set TRITON_INTERPRET=1 before importing triton"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language

    tl = triton.language
    return triton, triton.language


@functools.cache
def _build(interpret: bool):
    """The plain functions above, turned into Triton kernels (built once per mode)."""
    triton, _ = load_triton("cpu" if interpret else "cuda")
    return triton.jit(_dequant_kernel), triton.jit(_w4a16_kernel)


# -----------------------------------------------------------------------------
# Launchers: check everything, pick the grid, launch


@dataclass(frozen=True)
class _Layout:
    n: int
    k: int
    per: int
    n_groups: int


def _check_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    k: int,
    g_idx: torch.Tensor | None,
) -> _Layout:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype not in (torch.uint8, torch.int32):
        raise TypeError(
            f"packed must be uint8 (2 codes per byte) or int32 (8 codes per word), got dtype {packed.dtype}"
        )
    if packed.ndim != 2:
        raise ValueError(
            f"packed must be 2-D (out_features, in_features / codes_per_container), got {tuple(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous (call .contiguous())")
    k = check_int(k, "in_features")
    per = 2 if packed.dtype == torch.uint8 else 8
    if k % per != 0 or packed.shape[1] != k // per:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}, but in_features={k} packed {per} per {packed.dtype} "
            f"needs shape ({packed.shape[0]}, {k // per}) and in_features divisible by {per}"
        )
    n = packed.shape[0]
    if g_idx is None:
        group_size = check_group_size(group_size, k)
        n_groups = k // group_size
    else:
        group_size = check_int(group_size, "group_size")
        if g_idx.shape != (k,) or g_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"g_idx must be an integer tensor of shape ({k},), got {g_idx.dtype} {tuple(g_idx.shape)}"
            )
        n_groups = scale.shape[1] if scale.ndim == 2 else -1
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise ValueError(
                f"g_idx values must lie in [0, {n_groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]"
            )
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (n, n_groups):
            raise ValueError(
                f"{name} must have shape (out_features, n_groups) = ({n}, {n_groups}), got {tuple(t.shape)}"
            )
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
    return _Layout(n=n, k=k, per=per, n_groups=n_groups)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    in_features: int | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """Warm-up kernel: dequantize packed int4 codes to an fp32 ``(N, K)`` matrix with Triton.

    Args:
        packed: ``(N, K/2)`` uint8 or ``(N, K/8)`` int32, packed ``low_first`` along K.
        scale, zero_point: ``(N, K / group_size)``.
        group_size: input columns per group (must divide K).
        in_features: K (default: inferred from ``packed``).
        block: output elements per program.

    Returns:
        ``(N, K)`` float32, equal to :func:`dequantize_int4_reference`.
    """
    if not triton_available():
        raise RuntimeError("Triton is not installed here; use dequantize_int4_reference (pure PyTorch)")
    k = (
        in_features
        if in_features is not None
        else packed.shape[-1] * (2 if packed.dtype == torch.uint8 else 8)
    )
    layout = _check_weight(packed, scale, zero_point, group_size, k, None)
    dequant, _ = _build(interpreter_mode(packed.device))
    out = torch.empty((layout.n, layout.k), dtype=torch.float32, device=packed.device)
    grid = (-(-layout.n * layout.k // block),)  # ceil-div: one program per block of outputs
    dequant[grid](
        packed, scale.float().contiguous(), zero_point.float().contiguous(), out,
        layout.n, layout.k, layout.n_groups, group_size, PER=layout.per, BLOCK=block,
    )  # fmt: skip
    return out


def w4a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """The fused W4A16 GEMM ``y = x @ dequant(W)^T`` with fp32 accumulation.

    Args:
        x: ``(M, K)`` fp16/bf16/fp32 activations, contiguous (leading dims are flattened by callers).
        packed: ``(N, K/2)`` uint8 or ``(N, K/8)`` int32 codes, ``low_first`` (see module docstring).
        scale, zero_point: ``(N, n_groups)``; zero-points may be integers or floats (AWQ/GPTQ store codes).
        group_size: input columns per group; must divide K unless ``g_idx`` is given.
        g_idx: optional ``(K,)`` group of each input column (GPTQ with act-order).
        block_m, block_n, block_k: tile sizes (powers of two, >= 16 for ``tl.dot``).

    Returns:
        ``(M, N)`` in ``x``'s dtype.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, non-contiguous input, bad group size.
    """
    if not triton_available():
        raise RuntimeError("Triton is not installed here; use w4a16_matmul_reference (pure PyTorch)")
    check_float_tensor(x, "x", ndim=2)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous()); the kernel assumes unit stride along K")
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        b = check_int(b, name)
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    layout = _check_weight(packed, scale, zero_point, group_size, x.shape[1], g_idx)
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but packed is on {packed.device}")
    _, matmul = _build(interpreter_mode(x.device))
    m = x.shape[0]
    y = torch.empty((m, layout.n), dtype=x.dtype, device=x.device)
    gidx = (
        g_idx.to(torch.int32).contiguous()
        if g_idx is not None
        else torch.zeros(1, dtype=torch.int32, device=x.device)
    )
    grid = (-(-m // block_m), -(-layout.n // block_n))  # one program per (BLOCK_M, BLOCK_N) tile of y
    matmul[grid](
        x, packed, scale.float().contiguous(), zero_point.float().contiguous(), gidx, y,
        m, layout.n, layout.k, layout.n_groups, group_size if g_idx is None else 1,
        x.stride(0), packed.stride(0), y.stride(0),
        PER=layout.per, HAS_GIDX=g_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y


# -----------------------------------------------------------------------------
# Why it is fast: bytes moved per matmul


def bytes_moved(
    m: int,
    n: int,
    k: int,
    weight_bits: float = 4.0,
    group_size: int | None = 128,
    act_bytes: int = 2,
    param_bytes: int = 2,
) -> dict[str, float]:
    """Bytes a ``(M, K) x (K, N)`` matmul must read and write, with the weight at ``weight_bits``.

    At batch 1 the weight dominates: fp16 weights move ``2 N K`` bytes, int4 ``N K / 2`` plus the
    scales and zero-points, so the kernel can be up to ~4x faster when memory-bound.

    Returns:
        ``{"weight": ..., "scales": ..., "activations": ..., "output": ..., "total": ...,
        "flops": 2 M N K, "intensity": flops / total}``.
    """
    weight = n * k * weight_bits / 8
    scales = 0.0 if group_size is None else 2 * n * (k // group_size) * param_bytes
    acts = m * k * act_bytes
    out = m * n * act_bytes
    total = weight + scales + acts + out
    flops = 2.0 * m * n * k
    return {"weight": weight, "scales": scales, "activations": acts, "output": out, "total": total,
            "flops": flops, "intensity": flops / total}  # fmt: skip
