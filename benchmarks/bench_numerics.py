"""Benchmark the core numerics: group-wise fake quantization against a plain per-tensor baseline.

Prints, for a 4096 x 4096 float32 weight:

* the baseline ``torch.round(w / s) * s`` (one precomputed per-tensor scale), the cheapest possible
  fake quantizer: three elementwise passes;
* :func:`quantlab.granularity.fake_quantize_weight` with 4-bit codes and ``group_size=128`` for each
  scheme (computes its own per-group scales and zero-points);
* the ratio of the two, measured in the same run (target: group-wise within 3x of the baseline);
* Q4_K quantization time with :func:`quantlab.gguf.quantize_q4_k` on the same weight (reads the
  weight once, writes 4.5 bits per weight), when that module exists; prints "not available yet"
  otherwise.

Timings are medians over interleaved repetitions so that a busy machine hurts both sides alike.
Run: ``python benchmarks/bench_numerics.py [--size 4096] [--repeats 7] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from quantlab.granularity import fake_quantize_weight


def _time_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _row(name: str, ms: float, n_weights: int, n_bytes: int) -> str:
    mw_s = n_weights / (ms * 1e-3) / 1e6
    gb_s = n_bytes / (ms * 1e-3) / 1e9
    return f"{name:<44s} {ms:9.2f} ms {mw_s:10.1f} Mweights/s {gb_s:7.2f} GB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="weight is (size, size) float32")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions per case")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--n-bits", type=int, default=4)
    parser.add_argument("--q4k-repeats", type=int, default=2, help="Q4_K runs (slow: seconds each)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # one thread gives steadier numbers on a busy machine

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size, dtype=torch.float32)
    n = w.numel()
    n_bytes = 2 * w.element_size() * n  # read the weight once, write the result once
    qmax = 2 ** (args.n_bits - 1) - 1
    s = w.abs().amax() / qmax

    def baseline():
        return torch.round(w / s) * s

    cases = {"baseline torch.round(w / s) * s (per-tensor)": baseline}
    for scheme in ("minmax", "absmax", "affine"):

        def case(scheme=scheme):
            return fake_quantize_weight(w, args.n_bits, "group", args.group_size, scheme=scheme)

        cases[f"group-wise {scheme} {args.n_bits}-bit g={args.group_size}"] = case

    for fn in cases.values():  # warm-up (allocator, thread pool)
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name] += _time_ms(fn, 1)
    med = {name: statistics.median(t) for name, t in times.items()}

    threads = torch.get_num_threads()
    print(f"weight {args.size} x {args.size} float32, torch {torch.__version__}, {threads} threads")
    base_name = next(iter(cases))
    for name in cases:
        line = _row(name, med[name], n, n_bytes)
        if name != base_name:
            line += f"   ratio {med[name] / med[base_name]:.2f}x"
        print(line)

    try:
        gguf = importlib.import_module("quantlab.gguf")
        quantize_q4_k = gguf.quantize_q4_k
    except (ImportError, AttributeError):
        print("Q4_K quantization (quantlab.gguf.quantize_q4_k): not available yet")
        return
    q4k = statistics.median(_time_ms(lambda: quantize_q4_k(w), args.q4k_repeats))
    print(_row("Q4_K quantlab.gguf.quantize_q4_k", q4k, n, w.element_size() * n))


if __name__ == "__main__":
    main()
