"""Tests for the tiny byte-level GPT, its training script and the shipped checkpoint."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantlab.data import code_corpus, corpus_fingerprint
from quantlab.models import train_tiny_gpt as trainer
from quantlab.models.tiny_gpt import (
    CHECKPOINT_DIR,
    GPTConfig,
    TinyGPT,
    checkpoint_paths,
    load_tiny_gpt,
    load_tiny_gpt_metadata,
    quantizable_linears,
)
from quantlab.uniform import minmax_fake_quantize, minmax_params

TINY_ARGS = [
    "--steps", "40", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
    "--batch-size", "8", "--lr", "1e-2", "--warmup", "5", "--eval-every", "0", "--threads", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: for these small tensors a second thread only adds synchronization, which on a
    busy shared CPU (more runnable threads than cores) costs far more than the work itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shipped():
    """The shipped checkpoint: model, metadata and the validation bytes."""
    return load_tiny_gpt(), load_tiny_gpt_metadata(), code_corpus("validation")


@pytest.fixture(scope="module")
def shipped_bpb(shipped):
    """Validation bits per byte of the shipped model, measured here (computed once for two tests)."""
    model, meta, val = shipped
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread below
    try:
        return val_bpb(model, val, meta["config"]["block_size"])
    finally:
        torch.set_num_threads(previous)


def val_bpb(model: nn.Module, data: bytes, block_size: int) -> float:
    """Validation bits per byte exactly as the training script records it."""
    return trainer.evaluate_bpb(model, data, block_size)


# -----------------------------------------------------------------------------
# The model


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        GPTConfig(block_size=True)


def test_forward_shapes_loss_and_causality():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 256, (3, 12))
    logits = model(idx)
    assert logits.shape == (3, 12, 256)
    targets = torch.randint(0, 256, (3, 12))
    torch.testing.assert_close(
        model(idx, targets), F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    )
    # changing a later byte must not change any earlier prediction
    idx2 = idx.clone()
    idx2[:, 8] = (idx2[:, 8] + 1) % 256
    logits2 = model(idx2)
    torch.testing.assert_close(logits2[:, :8], logits[:, :8], rtol=0, atol=0)
    assert not torch.allclose(logits2[:, 8:], logits[:, 8:])


def test_forward_bad_input():
    model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(4, dtype=torch.long))


def test_every_matmul_is_a_plain_linear():
    model = TinyGPT(GPTConfig(block_size=8, n_layer=3, n_head=2, n_embd=16))
    linears = quantizable_linears(model)
    assert len(linears) == 6 * 3 and "lm_head" not in linears
    assert list(linears)[:6] == [
        f"blocks.0.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj")
    ]
    assert all(type(m) is nn.Linear and m.bias is None for m in linears.values())
    assert "lm_head" in quantizable_linears(model, include_head=True)


# -----------------------------------------------------------------------------
# Training


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [trainer.lr_at(s, 100, 1.0, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--batch-size", "-1"], ["--warmup", "-5"]])
def test_cli_rejects_bad_numbers(bad, capsys):
    with pytest.raises(SystemExit):
        trainer.build_parser().parse_args(bad)
    assert "must be" in capsys.readouterr().err


def test_a_few_training_steps_lower_the_loss_deterministically():
    args = trainer.build_parser().parse_args(TINY_ARGS)
    torch.manual_seed(args.seed)
    untrained = TinyGPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    before = val_bpb(untrained, code_corpus("validation"), 64)
    model, meta = trainer.train(args, log=None)
    assert meta["metrics"]["val_bpb"] < before - 1.0  # 8 bits/byte (uniform) falls fast on code
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]
    model2, _ = trainer.train(args, log=None)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_main_writes_a_checkpoint_that_its_recorded_command_reproduces(tmp_path):
    meta = trainer.main([*TINY_ARGS, "--steps", "3", "--out", str(tmp_path / "a")])
    weights, meta_path = checkpoint_paths(tmp_path / "a")
    assert weights.is_file() and json.loads(meta_path.read_text()) == meta
    assert meta["config"]["n_layer"] == 1 and meta["train"]["steps"] == 3
    assert meta["corpus"]["fingerprint"] == corpus_fingerprint("code")
    model = load_tiny_gpt(tmp_path / "a")
    assert not model.training and model.num_params() == meta["n_params"]
    # the recorded command, pointed at another folder, writes byte-identical weights
    argv = shlex.split(meta["command"])[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    trainer.main([*argv, "--quiet"])
    assert checkpoint_paths(tmp_path / "b")[0].read_bytes() == weights.read_bytes()


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_gpt"):
        load_tiny_gpt(tmp_path)


# -----------------------------------------------------------------------------
# The shipped checkpoint


def test_shipped_checkpoint_metadata(shipped):
    model, meta, _ = shipped
    weights, _ = checkpoint_paths()
    assert weights.parent == CHECKPOINT_DIR
    assert weights.stat().st_size < 8 * 2**20  # a few MB: it ships inside the package
    assert not model.training
    assert model.num_params() == meta["n_params"]
    assert 1_000_000 <= meta["n_params"] <= 3_000_000
    assert meta["command"].startswith("python -m quantlab.models.train_tiny_gpt --steps")
    assert meta["train"]["steps"] >= 1000
    # the checkpoint was trained and evaluated on exactly the corpus this installation ships
    assert meta["corpus"]["fingerprint"] == corpus_fingerprint("code"), (
        "the numpy sources differ from the ones the checkpoint was trained on: is numpy==2.4.6 installed?"
    )


def test_shipped_checkpoint_reproduces_recorded_validation_bpb(shipped, shipped_bpb):
    _, meta, _ = shipped
    bpb = shipped_bpb
    # The same float32 computation in a possibly different order (other CPU kernels, thread count):
    # each log-probability moves by ~sqrt(C) * eps32 ~ 1e-6 relative, and the mean over 65k bytes by
    # less; 1e-4 relative is a safe bound that still catches any real change of weights or data.
    assert bpb == pytest.approx(meta["metrics"]["val_bpb"], rel=1e-4)
    assert bpb < 2.6  # a trained model, far below the 8 bits/byte of a uniform guess


def rtn_quantize_(model: nn.Module, n_bits: int, group_size: int | None = None) -> None:
    """Round-to-nearest every quantizable linear in place with GPTQ's min-max quantizer.

    Per output channel (``group_size=None``) or per group of ``group_size`` input columns.
    """
    with torch.no_grad():
        for layer in quantizable_linears(model).values():
            W = layer.weight
            out, inp = W.shape
            g = inp if group_size is None else group_size
            Wg = W.reshape(out * (inp // g), g)  # (out * n_groups, group_size)
            scale, zero_point = minmax_params(Wg, n_bits)  # (out * n_groups, 1) each
            layer.weight.copy_(minmax_fake_quantize(Wg, scale, zero_point, n_bits).reshape(out, inp))


@pytest.mark.slow
def test_rtn_ladder_on_the_shipped_model(shipped, shipped_bpb):
    _, meta, val = shipped
    block = meta["config"]["block_size"]
    fp = shipped_bpb
    bpb = {}
    for n_bits in (8, 4, 3):
        model = load_tiny_gpt()
        rtn_quantize_(model, n_bits)
        bpb[n_bits] = val_bpb(model, val, block)
    assert abs(bpb[8] - fp) <= 0.01 * fp  # 8-bit RTN is near lossless
    assert fp <= bpb[8] * (1 + 1e-3) and bpb[8] < bpb[4] < bpb[3]  # fewer bits, worse model
    assert bpb[3] - bpb[4] > 0.02  # the ladder is steep enough to teach with
