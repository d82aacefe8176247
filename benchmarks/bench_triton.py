"""Benchmark the W4A16 Triton kernel.

On a machine without a GPU (the default here): checks the kernel in Triton's interpreter against the
PyTorch reference on a small layer, and times the reference path (unpack + dequantize + fp32 matmul)
on the real shapes.

On a CUDA machine: times the compiled kernel against fp16 ``torch.matmul`` at batch 1, 16 and 64 for
4096x4096 and 4096x11008 weights, and reports achieved bandwidth and its fraction of the card's peak
(pass ``--peak-gbs`` for cards not in the table). Record GPU numbers in benchmarks/RESULTS.md.

    python benchmarks/bench_triton.py [--peak-gbs 3350]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from quantlab.kernels import w4a16 as K
from quantlab.packing import pack_codes

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features N, in_features K)
BATCHES = [1, 16, 64]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "RTX 4090": 1008.0, "L4": 300.0}


def make_layer(n: int, k: int, group_size: int = 128, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    packed = pack_codes(codes, 4, container=torch.uint8, order="low_first").to(device)
    scale = (torch.rand(n, k // group_size, generator=g) * 0.01 + 0.001).to(device)
    zero_point = torch.full((n, k // group_size), 8.0).to(device)
    return packed, scale, zero_point


def timeit(fn, repeats: int = 5, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_report() -> None:
    print("no CUDA device: Triton runs in its interpreter (exact, slow); timing the reference path instead\n")
    packed, scale, zero_point = make_layer(96, 256, 64)
    x = torch.randn(20, 256)
    t0 = time.perf_counter()
    y = K.w4a16_matmul(x, packed, scale, zero_point, 64)
    t_interp = time.perf_counter() - t0
    ref = K.w4a16_matmul_reference(x, packed, scale, zero_point, 64)
    print(f"interpreter check 20x256 @ 256x96: max |kernel - reference| = {(y - ref).abs().max():.2e} "
          f"(ran in {t_interp:.2f} s)")  # fmt: skip
    print(f"\n{'shape (N x K)':>16} {'batch':>5} {'reference ms':>13} {'fp32 matmul ms':>15}")
    for n, k in SHAPES:
        packed, scale, zero_point = make_layer(n, k)
        w = torch.randn(n, k)
        for m in BATCHES:
            x = torch.randn(m, k)
            ref = functools.partial(K.w4a16_matmul_reference, x, packed, scale, zero_point, 128)
            t_ref = timeit(ref, repeats=3)
            t_mm = timeit(functools.partial(torch.matmul, x, w.T), repeats=3)
            print(f"{n:>7} x {k:<6} {m:>5} {1e3 * t_ref:13.1f} {1e3 * t_mm:15.1f}")
    print(
        "\nOn the CPU the reference dequantizes the whole matrix first:"
        " it is a correctness path, not a fast one."
    )


def gpu_report(peak_gbs: float | None) -> None:
    name = torch.cuda.get_device_name()
    peak = peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"device: {name}; peak bandwidth: {peak or 'unknown'} GB/s\n")
    sync = torch.cuda.synchronize
    header = (
        f"{'N x K':>13} {'batch':>5} {'w4a16 us':>9} {'fp16 us':>9} {'speed-up':>8}"
        f" {'w4a16 GB/s':>10} {'% peak':>6}"
    )
    print(header)
    for n, k in SHAPES:
        packed, scale, zero_point = make_layer(n, k, device="cuda")
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = K.w4a16_matmul(x, packed, scale, zero_point, 128, block_m=16, block_n=64, block_k=64)
            ref = K.w4a16_matmul_reference(x, packed, scale, zero_point, 128)
            assert torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
            kernel = functools.partial(K.w4a16_matmul, x, packed, scale, zero_point, 128, None, 16, 64, 64)
            t_q = timeit(kernel, 20, sync)
            t_h = timeit(functools.partial(torch.matmul, x, w16.T), 20, sync)
            moved = K.bytes_moved(m, n, k, weight_bits=4, group_size=128)["total"]
            gbs = moved / t_q / 1e9
            pct = f"{100 * gbs / peak:5.1f}" if peak else "  n/a"
            print(
                f"{n:>6} x {k:<5} {m:>5} {1e6 * t_q:9.1f} {1e6 * t_h:9.1f} {t_h / t_q:8.2f}"
                f" {gbs:10.1f} {pct:>6}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peak-gbs", type=float, default=None, help="the card's peak memory bandwidth in GB/s"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if not K.triton_available():
        print("Triton is not installed on this platform: nothing to benchmark")
        return
    if torch.cuda.is_available():
        gpu_report(args.peak_gbs)
    else:
        cpu_report()


if __name__ == "__main__":
    main()
