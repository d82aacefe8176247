"""Benchmark: AWQ's scale and clip searches on one large linear layer, next to round-to-nearest.

Prints wall-clock seconds for

* RTN: :func:`quantlab.awq.awq_quantize` on the whole weight (the baseline every method pays);
* the scale search (:func:`quantlab.awq.search_scales`, 20 grid points, output MSE on the tokens);
* the clip search (:func:`quantlab.awq.search_clip`) with ``method="matmul"`` on the whole layer and
  with ``method="reference"`` (llm-awq's broadcast-multiply-and-sum, bit-exact) on ``--ref-rows``
  output channels, extrapolated linearly to the whole layer unless ``--full-reference`` is given
  (on a CPU the reference formulation materialises ``rows * tokens * in`` products per candidate);

and the layer-output MSE of RTN, AWQ scales, and AWQ scales + clipping on the same synthetic layer
(activations with a few 30x outlier channels, as in LLMs).

Usage::

    python benchmarks/bench_awq.py                      # 4096 x 4096, 512 tokens, W4 g128
    python benchmarks/bench_awq.py --out 1024 --in 1024 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from quantlab.awq import (
    apply_clip,
    awq_quantize,
    output_mse,
    quantize_with_scales,
    search_clip,
    search_scales,
)


def synthetic_layer(out_f: int, in_f: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ~ N(0, 0.02^2); inputs with log-normal channel scales and 1 % channels at 30x."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    channel_scale = torch.exp(0.5 * torch.randn(in_f, generator=g))  # (in,)
    channel_scale[torch.randperm(in_f, generator=g)[: max(1, in_f // 100)]] = 30.0
    X = torch.randn(tokens, in_f, generator=g) * channel_scale  # (tokens, in)
    return W, X


def timed(fn, repeat: int = 1):
    """Run ``fn`` ``repeat`` times; return (median wall seconds, median CPU seconds, last result).

    CPU seconds (this process, all threads) are the steadier number on a shared machine, where the
    wall clock also counts time spent waiting for a core.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=int, default=4096, help="out_features")
    p.add_argument("--in", dest="in_f", type=int, default=4096, help="in_features")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    p.add_argument("--n-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--oc-batch-size", type=int, default=64, help="output channels per clip-search chunk")
    p.add_argument("--ref-rows", type=int, default=128, help="rows timed with the reference clip method")
    p.add_argument("--full-reference", action="store_true", help="time the reference clip on every row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    W, X = synthetic_layer(args.out, args.in_f, args.tokens, args.seed)
    bits, gs = args.n_bits, args.group_size
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"AWQ search on a {args.out}x{args.in_f} layer, {args.tokens} tokens, "
        f"W{bits} g{gs}, n_grid={args.n_grid}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {load:.1f}"
    )

    t_rtn, c_rtn, W_rtn = timed(lambda: awq_quantize(W, bits, gs), repeat=3)
    t_scale, c_scale, res = timed(lambda: search_scales(W, X, bits, gs, args.n_grid))
    W_s, X_s = W * res.scales.view(1, -1), X / res.scales.view(1, -1)  # what the clip search sees

    clip_kw = dict(n_bits=bits, group_size=gs, n_sample_tokens=min(512, args.tokens))
    t_mm, c_mm, mv = timed(lambda: search_clip(W_s, X_s, method="matmul", oc_batch_size=256, **clip_kw))
    rows = args.out if args.full_reference else min(args.ref_rows, args.out)
    t_ref_rows, c_ref_rows, mv_ref = timed(
        lambda: search_clip(W_s[:rows], X_s, method="reference", oc_batch_size=args.oc_batch_size, **clip_kw)
    )
    t_ref, c_ref = t_ref_rows * args.out / rows, c_ref_rows * args.out / rows
    agree = (mv_ref == mv[:rows]).float().mean().item()

    W_awq = quantize_with_scales(W, res.scales, bits, gs)
    W_awq_clip = awq_quantize(apply_clip(W_s, mv), bits, gs) / res.scales.view(1, -1)
    mse_rtn = output_mse(W, W_rtn, X)
    mse_awq = output_mse(W, W_awq, X)
    mse_clip = output_mse(W, W_awq_clip, X)

    ref_note = "measured" if rows == args.out else f"{rows} rows measured, extrapolated"
    print()
    print(f"{'step':<44}{'wall s':>10}{'CPU s':>10}")
    table = [
        ("RTN (awq_quantize, median of 3)", t_rtn, c_rtn),
        ("scale search (search_scales)", t_scale, c_scale),
        ("clip search, method=matmul", t_mm, c_mm),
        ("clip search, method=reference", t_ref, c_ref),
        ("AWQ total = scale + clip(matmul) + RTN", t_scale + t_mm + t_rtn, c_scale + c_mm + c_rtn),
        ("AWQ total = scale + clip(reference) + RTN", t_scale + t_ref + t_rtn, c_scale + c_ref + c_rtn),
    ]
    for name, wall, cpu in table:
        note = f"   ({ref_note})" if name.endswith("reference") else ""
        print(f"{name:<44}{wall:>10.3f}{cpu:>10.3f}{note}")
    print()
    print(
        f"best ratio {res.best_ratio:.2f}; "
        f"matmul and reference clip thresholds agree on {agree:.2%} of groups"
    )
    print(f"{'layer output MSE':<44}{'value':>12}{'vs RTN':>10}")
    for name, mse in [("RTN", mse_rtn), ("AWQ scales", mse_awq), ("AWQ scales + clip", mse_clip)]:
        print(f"{name:<44}{mse:>12.4e}{mse / mse_rtn:>10.3f}")


if __name__ == "__main__":
    main()
