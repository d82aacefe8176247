"""Train the tiny byte-level GPT on numpy's sources, deterministically, on a CPU.

Run ``python -m quantlab.models.train_tiny_gpt --help`` for the options. The defaults reproduce the
shipped checkpoint (``quantlab/models/checkpoints/tiny_gpt.*``): a fixed number of steps (never a time
limit, so that the result does not depend on the machine's speed), a seeded model init and a seeded
batch sampler, ``torch.set_num_threads(2)`` (``--threads``; with fewer free cores than threads, e.g. a
busy shared machine, set ``OMP_WAIT_POLICY=PASSIVE`` so waiting threads sleep instead of spinning: it
changes the speed, not the numbers). AdamW with linear warm-up and cosine decay to 10 % of the
peak learning rate, weight decay on matrices only, gradient clipping at 1.0.

At the end it evaluates validation bits per byte with :func:`quantlab.eval.bits_per_byte` (disjoint
windows of ``block_size`` bytes) and writes ``tiny_gpt.safetensors`` (float32 weights) and
``tiny_gpt.json`` (config, training settings, wall time, final validation bpb, the exact command,
the code corpus fingerprint, torch version).

Bit-for-bit identical weights need the same torch version, thread count and CPU instruction set;
across machines, expect the same loss curve to within float rounding.

References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), ICLR 2019.
    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine schedule), 2017.
    Karpathy, nanoGPT, https://github.com/karpathy/nanoGPT (training loop).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from quantlab.data import code_corpus, corpus_fingerprint
from quantlab.eval import bits_per_byte
from quantlab.models.tiny_gpt import GPTConfig, TinyGPT, checkpoint_paths

__all__ = [
    "build_parser",
    "evaluate_bpb",
    "explicit_command",
    "get_batch",
    "lr_at",
    "main",
    "make_optimizer",
    "save_checkpoint",
    "train",
]


# -----------------------------------------------------------------------------
# Settings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (their defaults reproduce the shipped checkpoint)."""
    p = argparse.ArgumentParser(
        prog="python -m quantlab.models.train_tiny_gpt",
        description="Train quantlab's tiny byte-level GPT on numpy's sources (deterministic, CPU).",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=3000, help="optimizer steps (fixed, not a time limit)"
    )
    p.add_argument("--out", type=str, default=None, help="output folder (default: the shipped checkpoints/)")
    p.add_argument("--seed", type=_non_negative_int, default=1337)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--block-size", type=_positive_int, default=128)
    p.add_argument("--n-layer", type=_positive_int, default=5)
    p.add_argument("--n-head", type=_positive_int, default=4)
    p.add_argument("--n-embd", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=_non_negative_int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=_positive_int, default=2, help="torch.set_num_threads")
    p.add_argument("--log-every", type=_non_negative_int, default=100)
    p.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=500,
        help="validation bpb every N steps (0: only at the end)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


# -----------------------------------------------------------------------------
# Pieces of the loop


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of windows from a byte stream.

    Args:
        data: ``(n_bytes,)`` uint8 or long.
        batch_size, block_size: output shape ``(batch_size, block_size)``.
        generator: seeded; the only source of randomness.

    Returns:
        ``(x, y)``, each ``(batch_size, block_size)`` long, ``y`` shifted one byte ahead of ``x``.
    """
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T+1,)
    rows = data[starts[:, None] + offsets].long()  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: TinyGPT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (linears, embeddings) and none on norm gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def evaluate_bpb(model: TinyGPT, data: bytes, block_size: int) -> float:
    """Validation bits per byte with disjoint windows of ``block_size`` bytes."""
    return bits_per_byte(model, data, seq_len=block_size, batch_size=32)


# -----------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, log: Callable[[str], None] | None = print) -> tuple[TinyGPT, dict]:
    """Train a model with the settings ``args`` (from :func:`build_parser`).

    The caller's global RNG state and thread count are restored afterwards: the run seeds its own.

    Args:
        args: parsed options.
        log: called with progress strings (``None`` for silence).

    Returns:
        ``(model in eval mode, metadata dict)``; the metadata is what the json file stores.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the model's initialization
            return _train(args, log or (lambda *_: None))
    finally:
        torch.set_num_threads(previous_threads)


def _train(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[TinyGPT, dict]:
    config = GPTConfig(
        block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
    )
    model = TinyGPT(config)
    train_bytes, val_bytes = code_corpus("train"), code_corpus("validation")
    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)  # (n_bytes,)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    log(f"tiny GPT: {model.num_params():,} parameters; {len(train_bytes):,} training bytes")

    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(data, args.batch_size, config.block_size, generator)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            elapsed = time.perf_counter() - t0
            log(
                f"step {step:5d}  loss {loss.item():.4f}  ({loss.item() / math.log(2):.3f} bpb)  "
                f"lr {lr:.2e}  {elapsed:.0f}s"
            )
            history.append({"step": step, "train_loss": round(loss.item(), 5)})
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            val = evaluate_bpb(model, val_bytes, config.block_size)
            model.train()
            log(f"step {step:5d}  validation {val:.4f} bpb")
            history.append({"step": step, "val_bpb": round(val, 5)})
    train_seconds = time.perf_counter() - t0

    model.eval()
    t1 = time.perf_counter()
    val_bpb = evaluate_bpb(model, val_bytes, config.block_size)
    eval_seconds = time.perf_counter() - t1
    log(f"final validation {val_bpb:.5f} bits/byte (eval {eval_seconds:.1f}s); training {train_seconds:.0f}s")
    meta = {
        "config": asdict(config),
        "n_params": model.num_params(),
        "train": {k: v for k, v in vars(args).items() if k not in ("out", "quiet", "log_every")},
        "metrics": {
            "val_bpb": val_bpb,
            "val_bytes": len(val_bytes),
            "eval": "quantlab.eval.bits_per_byte(model, code_corpus('validation'), seq_len=block_size)",
            "train_wall_seconds": round(train_seconds, 1),
            "final_train_loss": history[-1]["train_loss"] if history else None,
        },
        "history": history,
        "corpus": {
            "name": "numpy sources (quantlab.data.code_corpus)",
            "fingerprint": corpus_fingerprint("code"),
        },
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
    }
    return model, meta


def save_checkpoint(model: TinyGPT, meta: dict, directory: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``tiny_gpt.safetensors`` (float32) and ``tiny_gpt.json`` into ``directory``."""
    from safetensors.torch import save_file

    weights_path, meta_path = checkpoint_paths(directory)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": "pt"})
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights_path, meta_path


def explicit_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a run, every training option spelled out (defaults may change)."""
    parts = ["python", "-m", "quantlab.models.train_tiny_gpt"]
    for key, value in vars(args).items():
        if key in ("quiet", "log_every") or value is None:
            continue
        parts += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the metadata written to the json file."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    model, meta = train(args, log=None if args.quiet else lambda s: print(s, flush=True))
    meta["command"] = explicit_command(args)
    weights_path, meta_path = save_checkpoint(model, meta, args.out)
    if not args.quiet:
        print(f"wrote {weights_path} and {meta_path}", flush=True)
    return meta


if __name__ == "__main__":
    main()
