"""Tests for quantlab.surgery: one entry point for every method, on tiny random Llama and TinyGPT models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.eval import collect_linear_inputs
from quantlab.granularity import fake_quantize_weight
from quantlab.models.llama import Llama, LlamaConfig
from quantlab.models.tiny_gpt import GPTConfig, TinyGPT
from quantlab.surgery import (
    ADAPTERS,
    METHODS,
    Method,
    QuantReport,
    detect_adapter,
    module_bytes,
    quantize_model,
    register_method,
)

# Widths of 256 so that every format's block (Q4_K: 256) tiles every row; one or two blocks deep.
WIDTH = 256
# Small searches keep AWQ fast; everything else runs with the method's defaults.
FAST = {
    "awq": {"n_grid": 4, "clip_n_grid": 4, "n_sample_tokens": 64},
    "awq+gptq": {"n_grid": 4, "clip_n_grid": 4, "n_sample_tokens": 64},
}
EXPECTED_BITS = {  # at in_features = 256, defaults (fp16 scales)
    "rtn": 4 + (16 + 4) / 128,  # 4-bit, group 128, asymmetric: fp16 scale + 4-bit zero-point per group
    "nf4": 4 + 32 / 64,  # fp32 absmax per block of 64
    "gguf_q8_0": 8 * 34 / 32,
    "gguf_q4_0": 8 * 18 / 32,
    "gguf_q4_1": 8 * 20 / 32,
    "gguf_q4_k": 8 * 144 / 256,
    "gguf_q6_k": 8 * 210 / 256,
    "fp16": 16.0,
    "bf16": 16.0,
    "gptq": 4 + (16 + 4) / 128,
    "awq": 4 + (16 + 4) / 128,
    "awq+gptq": 4 + (16 + 4) / 128,
    "smoothquant": 8 + 16 / WIDTH,  # int8 per output channel with one fp16 scale per row
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: a second thread only adds synchronisation (and contention on a shared box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(n_layers: int = 2, n_kv_heads: int = 2, tie: bool = True) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=WIDTH, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads,
                      hidden_dim=WIDTH, max_seq_len=64, tie_embeddings=tie)  # fmt: skip
    return Llama(cfg).eval()


def tiny_gpt(n_layer: int = 2) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(block_size=64, n_layer=n_layer, n_head=4, n_embd=WIDTH, mlp_ratio=1)).eval()


MODELS = {"llama": tiny_llama, "tiny_gpt": tiny_gpt}


def calibration(model: nn.Module, n: int = 4, seq: int = 32) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def embeddings(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# -----------------------------------------------------------------------------
# Every method, both models


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(EXPECTED_BITS))
def test_every_method_runs_and_leaves_embeddings_and_head_alone(kind, method):
    model = MODELS[kind]()
    names = linears(model)
    before, embeds = snapshot(model), embeddings(model)
    tokens = calibration(model)
    report = quantize_model(model, method, calibration=tokens, **FAST.get(method, {}))

    assert isinstance(report, QuantReport) and report.model is model
    assert report.adapter == kind
    assert report.excluded == ["lm_head"]
    assert [r.name for r in report.layers] == [n for n in names if n != "lm_head"]
    for name, w in embeds.items():  # embeddings are never touched
        assert torch.equal(model.get_submodule(name).weight, w), name
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    changed = [r.name for r in report.layers if not torch.equal(model.get_submodule(r.name).weight,
                                                                before[r.name + ".weight"])]  # fmt: skip
    assert changed, "no weight changed"
    for r in report.layers:
        assert r.bits_per_weight == pytest.approx(EXPECTED_BITS[method], abs=1e-12)
        assert 0 <= r.weight_rel_error < 0.05  # 4 bits and up: well below the signal
        assert r.output_rel_error is not None and 0 <= r.output_rel_error < 0.05
    logits = model(tokens)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant", "awq+gptq"])
def test_excluded_layers_are_untouched(method):
    model = tiny_llama()
    before = snapshot(model)
    patterns = ("lm_head", "*.mlp.down_proj", "model.layers.1.self_attn.v_proj")  # uniform and per-block
    report = quantize_model(model, method, calibration=calibration(model), exclude=patterns,
                            **FAST.get(method, {}))  # fmt: skip
    expected = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj",
                "model.layers.1.mlp.down_proj", "lm_head"]  # fmt: skip
    assert sorted(report.excluded) == sorted(expected)
    for name in expected:
        for key in (k for k in before if k.startswith(name + ".")):
            assert torch.equal(model.state_dict()[key], before[key]), key
    assert {r.name for r in report.layers}.isdisjoint(expected)
    assert torch.isfinite(model(calibration(model))).all()


def test_tied_head_is_untied_and_the_embedding_kept():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    report = quantize_model(model, "rtn", exclude=(), group_size=64)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not torch.equal(model.lm_head.weight, embed)
    assert any("untied" in note for note in report.notes)
    head = next(r for r in report.layers if r.name == "lm_head")
    # memory: the embedding still counts in full, the new head at its quantized size
    others = sum(r.bytes_before for r in report.layers if r.name != "lm_head")
    after = sum(r.bytes_after for r in report.layers)
    assert report.memory_after == pytest.approx(report.memory_before - others + after)
    assert head.bytes_after == pytest.approx(embed.numel() * (4 + 20 / 64) / 8)


def test_tied_head_with_gptq_outside_the_blocks():
    model = tiny_llama(n_layers=1)
    embed = model.model.embed_tokens.weight.detach().clone()
    report = quantize_model(model, "gptq", calibration=calibration(model), exclude=(), group_size=64)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert "lm_head" in {r.name for r in report.layers}
    assert any("layer-wise GPTQ" in note for note in report.notes)
    assert next(r for r in report.layers if r.name == "lm_head").weight_rel_error > 0


def test_copy_leaves_the_original_untouched():
    model = tiny_gpt()
    before = snapshot(model)
    report = quantize_model(model, "nf4", copy=True)
    assert report.model is not model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(report.model.blocks[0].attn.q.weight, before["blocks.0.attn.q.weight"])


# -----------------------------------------------------------------------------
# Numbers: round trips, errors, bits


@pytest.mark.parametrize("method, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_16bit_round_trip_within_half_an_ulp(method, dtype):
    model = tiny_gpt(n_layer=1)
    with torch.no_grad():  # spread magnitudes over many binades, including fp16 subnormals
        w = model.blocks[0].mlp.fc.weight
        w.mul_(torch.logspace(-9, 4, w.shape[1]).view(1, -1))
    before = snapshot(model)
    quantize_model(model, method)
    finfo = torch.finfo(dtype)
    tiny_step = finfo.smallest_normal * finfo.eps  # spacing of the subnormals
    for name in linears(model)[:-1]:
        w0 = before[name + ".weight"]
        w1 = model.get_submodule(name).weight
        bound = torch.maximum(w0.abs() * finfo.eps / 2, torch.full_like(w0, tiny_step / 2))
        assert ((w1 - w0).abs() <= bound).all(), name
        assert torch.equal(w1.to(dtype).float(), w1)  # exactly representable now


def test_fp16_overflow_is_an_error_and_nothing_changes():
    model = tiny_gpt(n_layer=1)
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight[0, 0] = 1e5  # beyond fp16's 65504
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.proj.*float16"):
        quantize_model(model, "fp16")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # checked up front
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(model, "rtn")


def test_rtn_8bit_error_is_within_half_a_step():
    model = tiny_llama()
    before = snapshot(model)
    tokens = calibration(model)
    X = collect_linear_inputs(copy.deepcopy(model), [tokens], max_rows=256)
    report = quantize_model(model, "rtn", calibration=tokens, n_bits=8, granularity="channel")
    for r in report.layers:
        W0 = before[r.name + ".weight"].double()
        W1 = model.get_submodule(r.name).weight.detach().double()
        E = W1 - W0
        # min-max grid: range stretched to contain 0, 255 steps; every error is at most half a step, plus
        # float32 rounding of w / s (a value within an ulp of a midpoint may go either way) and of s * q
        lo, hi = W0.amin(1).clamp(max=0), W0.amax(1).clamp(min=0)
        half_step = ((hi - lo) / 255 / 2).view(-1, 1)
        ulps = 2 * torch.finfo(torch.float32).eps * W0.abs().amax(1, keepdim=True)
        assert (E.abs() <= half_step + ulps).all()
        assert r.weight_rel_error == pytest.approx(float(E.pow(2).sum() / W0.pow(2).sum()), rel=1e-9)
        assert r.weight_rel_error <= float(half_step.pow(2).sum() * W0.shape[1] / W0.pow(2).sum())
        # output error: recomputed independently, and bounded by Cauchy-Schwarz ||X E^T|| <= ||X|| ||E||
        x = X[r.name].double()
        y0, dy = x @ W0.T, x @ E.T
        rel = float(dy.pow(2).sum() / y0.pow(2).sum())
        # the report runs the layers in float32: rounding of ~sqrt(in) eps |y| per output, relative to |dy|
        tol = 4 * math.sqrt(W0.shape[1]) * torch.finfo(torch.float32).eps / math.sqrt(rel)
        assert r.output_rel_error == pytest.approx(rel, rel=tol)
        assert r.output_rel_error <= float(x.pow(2).sum() * E.pow(2).sum() / y0.pow(2).sum())
        assert r.output_sqnr_db > 30  # "tiny": 8 bits is ~6 dB per bit minus the range-to-std penalty
        assert r.bits_per_weight == 8 + (16 + 8) / r.shape[1]


@settings(max_examples=25, deadline=None)
@given(
    n_bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.sampled_from([8, 16, 32]),
    symmetric=st.booleans(),
)
def test_rtn_matches_granularity_and_counts_its_bits(n_bits, granularity, group_size, symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16, bias=True), nn.ReLU(), nn.Linear(16, 8, bias=False))
    before = snapshot(model)
    g = min(group_size, 16) if granularity == "group" else None  # must divide both widths, 32 and 16
    kw = {"group_size": g} if granularity == "group" else {}
    report = quantize_model(model, "rtn", exclude=(), n_bits=n_bits, granularity=granularity,
                            symmetric=symmetric, **kw)  # fmt: skip
    assert report.adapter is None  # per-layer methods need no adapter
    for r, (idx, in_f) in zip(report.layers, ((0, 32), (2, 16)), strict=True):
        expect = fake_quantize_weight(before[f"{idx}.weight"], n_bits, granularity, g, "minmax", symmetric)
        assert torch.equal(model[idx].weight, expect)
        share = {"tensor": r.numel, "channel": in_f}.get(granularity, g)
        assert r.bits_per_weight == pytest.approx(n_bits + (16 + (0 if symmetric else n_bits)) / share)
    assert torch.equal(model[0].bias, before["0.bias"])  # biases stay in full precision


def test_known_bits_per_weight_and_memory():
    model = tiny_llama()
    r = quantize_model(model, "rtn", n_bits=4, group_size=128, symmetric=False)
    assert r.bits_per_weight == pytest.approx(4 + (16 + 4) / 128)  # the example: 4.15625
    assert quantize_model(tiny_llama(), "rtn", symmetric=True).bits_per_weight == pytest.approx(4 + 16 / 128)
    assert quantize_model(tiny_llama(), "rtn", scheme="absmax").layers[0].format == "int4 g128 sym"
    dq = quantize_model(tiny_llama(), "nf4", double_quant=True).layers[0]
    n = dq.numel  # 256 x 256: 1024 blocks of 64 -> 8-bit absmax + 4 fp32 second-level scales + fp32 mean
    assert dq.bits_per_weight == pytest.approx((4 * n + 8 * (n // 64) + 32 * (n // 64 // 256) + 32) / n)
    act = quantize_model(tiny_llama(), "gptq", calibration=calibration(model), act_order=True).layers[0]
    assert act.bits_per_weight == pytest.approx(4 + 20 / 128 + 32 / act.shape[0])  # plus g_idx (int32)
    # memory: every parameter once (tied head), quantized linears at their format's size
    assert r.memory_before == module_bytes(tiny_llama(), buffers=False)
    quantized = sum(x.numel for x in r.layers)
    assert r.memory_after == pytest.approx(
        r.memory_before - 4 * quantized + quantized * r.bits_per_weight / 8
    )
    assert r.compression == pytest.approx(r.memory_before / r.memory_after)
    assert len(r.table()) == len(r.layers) and r.summary()["method"] == "rtn"


def test_gguf_fallback_for_rows_that_do_not_tile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 32, bias=False), nn.Linear(32, 256, bias=False), nn.Linear(256, 8))
    with pytest.raises(ValueError, match="fallback"):
        quantize_model(model, "gguf_q4_k", exclude=())
    report = quantize_model(model, "gguf_q4_k", exclude=(), fallback="Q8_0")
    assert [r.format for r in report.layers] == ["Q8_0", "Q8_0", "Q4_K"]
    assert [r.bits_per_weight for r in report.layers] == [8.5, 8.5, 4.5]


def test_rescaling_methods_are_measured_in_the_original_coordinates():
    # At 16 bits the quantization error is ~1e-9; AWQ and SmoothQuant rescale columns (and AWQ the rows
    # of v_proj / up_proj) by factors far from 1. Only if the report undoes them is the error tiny.
    for method, kw in (("smoothquant", {"n_bits": 16, "alpha": 0.8}),
                       ("awq", {"n_bits": 16, "group_size": 64, **FAST["awq"]})):  # fmt: skip
        model = tiny_llama(n_kv_heads=4)  # v_proj and o_proj of equal shape: AWQ scales v -> o too
        report = quantize_model(model, method, calibration=calibration(model), **kw)
        scaled = report.details["smoothing"] if method == "smoothquant" else report.details["awq"].scales
        assert len(scaled) > 0
        for r in report.layers:
            assert r.weight_rel_error < 1e-7, (method, r.name)
            assert r.output_rel_error < 1e-7, (method, r.name)


def test_gptq_beats_rtn_on_the_calibration_inputs():
    tokens = calibration(tiny_gpt(), n=8)
    rtn = quantize_model(tiny_gpt(), "rtn", calibration=tokens, n_bits=3, group_size=64)
    gptq = quantize_model(tiny_gpt(), "gptq", calibration=tokens, n_bits=3, group_size=64)
    assert gptq.config["n_bits"] == 3 and gptq.details["gptq"].layers
    assert gptq.output_rel_error < rtn.output_rel_error


# -----------------------------------------------------------------------------
# Registry, adapters and bad input


def test_register_a_new_method():
    sign = Method(
        name="test_sign",
        description="sign(w) * mean|w| per row (1 bit + an fp16 scale per row)",
        defaults={"scale_bits": 16},
        bits_fn=lambda shape, c: 1 + c["scale_bits"] / shape[1],
        format_fn=lambda shape, c: "sign",
        weight_fn=lambda W, c: torch.sign(W) * W.abs().mean(dim=1, keepdim=True),
    )
    register_method(sign, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_method(sign)
    assert METHODS["test_sign"] is sign
    model = tiny_gpt(n_layer=1)
    report = quantize_model(model, "test_sign")
    assert report.bits_per_weight == pytest.approx(1 + 16 / WIDTH)
    for row in model.blocks[0].attn.q.weight:  # one magnitude per row: the row's mean |w|
        assert row.abs().unique().numel() == 1


def test_adapter_detection():
    assert detect_adapter(tiny_llama()) is ADAPTERS["llama"]
    assert detect_adapter(tiny_gpt()) is ADAPTERS["tiny_gpt"]
    with pytest.raises(ValueError, match="recognises no layout"):
        detect_adapter(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="does not have the 'llama' layout"):
        quantize_model(tiny_gpt(), "rtn", adapter="llama")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "int4"}, ValueError, "valid methods.*rtn"),
        ({"method": "gptq"}, ValueError, "needs calibration"),
        ({"method": "rtn", "bits": 4}, ValueError, r"unknown option.*\['bits'\].*n_bits"),
        ({"method": "fp16", "n_bits": 4}, ValueError, "takes no options"),
        ({"method": "rtn", "group_size": 96}, ValueError, "in_features=256.*group_size=96"),
        ({"method": "rtn", "granularity": "row"}, ValueError, "granularity must be one of"),
        ({"method": "rtn", "n_bits": 0}, ValueError, "n_bits"),
        ({"method": "rtn", "n_bits": 4.0}, TypeError, "n_bits must be an int"),
        ({"method": "nf4", "block_size": 0}, ValueError, "block_size"),
        ({"method": "rtn", "exclude": "lm_head"}, TypeError, "collection of names"),
        ({"method": "rtn", "exclude": ("*",)}, ValueError, "excludes every"),
        ({"method": "rtn", "adapter": "opt"}, ValueError, "adapter must be"),
        ({"method": "rtn", "calibration": torch.zeros(2, 8)}, TypeError, "integer tensor of token ids"),
        ({"method": "rtn", "calibration": torch.zeros(8, dtype=torch.long)}, ValueError, r"\(batch, seq\)"),
        ({"method": "gptq", "calibration": "tokens"}, TypeError, "calibration must be"),
        ({"method": "smoothquant", "alpha": 1.5, "calibration": None}, ValueError, "needs calibration"),
        ({"method": "smoothquant", "alpha": 1.5, "calibration": "ok"}, ValueError, "alpha"),
        ({"method": "smoothquant", "act_quant": "per_row", "calibration": "ok"}, ValueError, "act_quant"),
        ({"method": "gptq", "damp": -1.0, "calibration": "ok"}, ValueError, "damp"),
        ({"method": "awq", "auto_clip": "yes", "calibration": "ok"}, TypeError, "auto_clip must be a bool"),
        ({"method": "awq", "n_grid": 0, "calibration": "ok"}, ValueError, "n_grid"),
        ({"method": "awq", "clip_method": "fast", "calibration": "ok"}, ValueError, "clip_method must be"),
        ({"method": "gguf_q4_0", "fallback": "Q5_0"}, ValueError, "fallback"),
    ],
)
def test_bad_input_is_rejected_before_anything_changes(kwargs, error, match):
    model = tiny_llama(n_layers=1)
    before = snapshot(model)
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("calibration"), str) and kwargs["calibration"] == "ok":
        kwargs["calibration"] = calibration(model)
    with pytest.raises(error, match=match):
        quantize_model(model, **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bad_model_and_no_linears():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_model(torch.zeros(3, 3), "rtn")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), "rtn")
    with pytest.raises(ValueError, match="recognises no layout"):
        quantize_model(
            nn.Sequential(nn.Linear(8, 8)), "gptq", calibration=torch.zeros(1, 4, dtype=torch.long)
        )


def test_unmatched_exclude_pattern_is_noted():
    report = quantize_model(tiny_gpt(n_layer=1), "bf16", exclude=("lm_head", "no_such_layer"))
    assert any("no_such_layer" in note for note in report.notes)
    assert math.isfinite(report.bits_per_weight) and "bf16" in str(report)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_search_options_reach_the_search(method, monkeypatch):
    """clip_method and oc_batch_size are passed to quantlab.awq.awq_quantize_model, not dropped."""
    import quantlab.awq

    seen = {}
    original = quantlab.awq.awq_quantize_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(quantlab.awq, "awq_quantize_model", spy)
    model = tiny_llama(n_layers=1)
    quantize_model(model, method, calibration=calibration(model), clip_method="matmul", oc_batch_size=32,
                   **FAST[method])  # fmt: skip
    assert seen["clip_method"] == "matmul" and seen["oc_batch_size"] == 32
    assert METHODS[method].defaults["clip_method"] == "reference"  # llm-awq's arithmetic unless asked
