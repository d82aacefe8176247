"""Benchmark the two real models on CPU: load time, evaluation throughput, one perplexity, peak memory.

Run: ``python benchmarks/bench_models.py`` (``--tokens 2048`` for a quick run, ``--threads 1`` to pin
torch's intra-op threads, which is often faster on a shared machine). For each model it prints

* the load time (SmolLM2: parse the GGUF, dequantize every Q4_1/Q8_0 block to float32, build the model);
* one perplexity evaluation of ``--tokens`` tokens at ``--seq-len`` (disjoint windows), its wall and CPU
  time and the evaluation throughput in tokens per second;
* the time of ``quantize_model(model, "rtn")`` (4-bit; group 64 for SmolLM2, whose width 576 has no
  factor 128; group 128 for the tiny GPT) on every linear but the head, and the perplexity after it;
* the peak resident memory of the process so far (``resource.getrusage``, Linux reports KiB).

SmolLM2 is evaluated on the prose evaluation split (:func:`quantlab.data.prose_corpus`), the tiny GPT
(only when its checkpoint exists) on the validation split of the code corpus, in bytes. Wall times on a
shared machine are noisy; the CPU time next to them is not (for one thread, CPU time is close to what
a quiet machine's wall time would be).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

from quantlab.data import code_corpus, prose_corpus
from quantlab.eval import perplexity
from quantlab.models.tiny_gpt import checkpoint_paths, load_tiny_gpt
from quantlab.surgery import module_bytes, quantize_model


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6


def timed(fn):
    """``(wall seconds, CPU seconds, result)`` of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def report_eval(name: str, model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch: int) -> None:
    wall, cpu, res = timed(lambda: perplexity(model, tokens, seq_len=seq_len, batch_size=batch))
    print(
        f"{name}: perplexity {res.ppl:.4f} over {res.n_tokens} tokens (seq_len {seq_len}) in {wall:.2f} s "
        f"wall / {cpu:.2f} s CPU -> {res.n_tokens / wall:.0f} tokens/s"
    )


def report_rtn(name: str, model: torch.nn.Module, group_size: int) -> None:
    wall, cpu, rep = timed(lambda: quantize_model(model, "rtn", n_bits=4, group_size=group_size))
    print(
        f"{name}: quantize_model rtn 4-bit g{group_size} ({len(rep.layers)} linears, "
        f"{rep.bits_per_weight:.3f} bits/weight) {wall:.2f} s wall / {cpu:.2f} s CPU"
    )


def bench_smollm2(args: argparse.Namespace) -> None:
    from quantlab.models.smollm2 import load_smollm2

    wall, cpu, (model, tokenizer) = timed(load_smollm2)
    mb = module_bytes(model) / 1e6
    print(f"SmolLM2-135M: load {wall:.2f} s wall / {cpu:.2f} s CPU; {mb:.1f} MB of tensors in memory")
    wall, cpu, ids = timed(lambda: torch.tensor(tokenizer.encode(prose_corpus("evaluation"))))
    print(f"SmolLM2-135M: tokenize the prose evaluation split ({ids.numel()} tokens) {wall:.2f} s")
    tokens = ids[: args.tokens + 1]  # n + 1 ids give n scored predictions
    report_eval("SmolLM2-135M", model, tokens, args.seq_len, args.batch_size)
    # group 64: SmolLM2's width 576 = 2^6 * 9 has no factor 128, so groups of 128 cannot tile its rows
    report_rtn("SmolLM2-135M", model, group_size=64)
    report_eval("SmolLM2-135M rtn 4-bit g64", model, tokens, args.seq_len, args.batch_size)
    print(f"peak RSS so far: {peak_rss_mb():.0f} MB")


def bench_tiny_gpt(args: argparse.Namespace) -> None:
    weights, _ = checkpoint_paths()
    if not weights.is_file():
        print("tiny GPT: no checkpoint (train it with `python -m quantlab.models.train_tiny_gpt`); skipped")
        return
    wall, cpu, model = timed(load_tiny_gpt)
    mb = module_bytes(model) / 1e6
    print(f"tiny GPT: load {wall:.2f} s wall / {cpu:.2f} s CPU; {mb:.2f} MB of tensors in memory")
    data = code_corpus("validation")[: args.tokens + 1]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # byte-level: a byte is a token
    seq_len = min(args.seq_len, model.config.block_size)
    report_eval("tiny GPT (bytes)", model, tokens, seq_len, args.batch_size)
    report_rtn("tiny GPT", model, group_size=128)
    report_eval("tiny GPT rtn 4-bit g128", model, tokens, seq_len, args.batch_size)
    print(f"peak RSS so far: {peak_rss_mb():.0f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens", type=int, default=8192, help="tokens scored per perplexity (default 8192)"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if not args.skip_smollm2:
        bench_smollm2(args)
    bench_tiny_gpt(args)
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
