"""Tests for quantlab.eval: sliding-window perplexity, bits per byte, layer error, hooks, cache."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from quantlab import eval as qeval
from quantlab.models.tiny_gpt import GPTConfig, TinyGPT
from quantlab.uniform import minmax_fake_quantize, minmax_params

# float64 sums of a few hundred log-probabilities: agreement to ~1e-12 relative is expected; 1e-10 is safe.
F64_RTOL = 1e-10


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: for these small tensors a second thread only adds synchronization, which on a
    busy shared CPU (more runnable threads than cores) costs far more than the work itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def toy_model(block_size: int = 16, seed: int = 0) -> TinyGPT:
    """A random tiny GPT in float64: its predictions depend on the whole context, as a real model's do."""
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    return model.double().eval()


def window_start(t: int, seq_len: int, stride: int) -> int:
    """The documented rule, derived independently: target t is scored by the first window reaching it."""
    return max(0, math.ceil((t - seq_len) / stride)) * stride


def nll_by_hand(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int) -> list[float]:
    """Score every target on its own, feeding exactly the context its window gives it."""
    out = []
    with torch.no_grad():
        for t in range(1, tokens.numel()):
            b = window_start(t, seq_len, stride)
            logits = model(tokens[b:t].unsqueeze(0))[0, -1]  # (vocab,)
            out.append(-float(F.log_softmax(logits, dim=-1)[tokens[t]]))
    return out


# -----------------------------------------------------------------------------
# Sliding windows


@settings(max_examples=80, deadline=None)
@given(n_tokens=st.integers(2, 200), seq_len=st.integers(1, 40), data=st.data())
def test_sliding_windows_score_every_target_exactly_once(n_tokens, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    windows = qeval.sliding_windows(n_tokens, seq_len, stride)
    scored = []
    for begin, end, n_score in windows:
        assert 0 < end - begin <= seq_len
        assert 1 <= n_score <= end - begin
        # targets begin+1 .. end; the last n_score of them count
        targets = list(range(end - n_score + 1, end + 1))
        for t in targets:
            context = t - begin
            assert 1 <= context <= seq_len
            if begin > 0:
                assert context >= seq_len - stride + 1
            assert begin == window_start(t, seq_len, stride)
        scored += targets
    assert scored == list(range(1, n_tokens))


def test_sliding_windows_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        qeval.sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        qeval.sliding_windows(10, 4, 0)
    with pytest.raises(ValueError, match="n_tokens"):
        qeval.sliding_windows(1, 4)
    with pytest.raises(TypeError, match="seq_len"):
        qeval.sliding_windows(10, 4.0)


# -----------------------------------------------------------------------------
# Perplexity and bits per byte


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 8), (8, 3), (8, 1), (16, 16), (5, 4)])
def test_perplexity_is_exp_mean_nll_by_hand(seq_len, stride):
    model = toy_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (45,), generator=g)
    nlls = nll_by_hand(model, tokens, seq_len, stride)
    result = qeval.perplexity(model, tokens, seq_len, stride=stride, batch_size=3)
    assert result.n_tokens == tokens.numel() - 1
    assert result.nll == pytest.approx(sum(nlls) / len(nlls), rel=F64_RTOL)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=F64_RTOL)
    assert result.bits_per_token == pytest.approx(result.nll / math.log(2), rel=F64_RTOL)


def test_default_stride_is_seq_len_and_batch_size_does_not_matter():
    model = toy_model()
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2))
    a = qeval.perplexity(model, tokens, 16)
    b = qeval.perplexity(model, tokens, 16, stride=16, batch_size=1)
    c = qeval.perplexity(model, tokens, 16, stride=16, batch_size=64)
    assert a.nll == pytest.approx(b.nll, rel=F64_RTOL) and a.nll == pytest.approx(c.nll, rel=F64_RTOL)


def test_smaller_stride_gives_more_context_on_a_model_that_uses_it():
    # A "copy" model that predicts token t from token t-period: only windows seeing `period` tokens back
    # can be right, so shrinking the stride (more context per target) must lower the perplexity.
    period = 6

    class Copy(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            B, T = idx.shape
            logits = torch.zeros(B, T, 256, dtype=torch.float64)
            for j in range(T):
                if j + 1 - period >= 0:
                    logits[torch.arange(B), j, idx[:, j + 1 - period]] = 10.0
            return logits

    tokens = torch.arange(period).repeat(20)  # 0..5 0..5 ...
    full = qeval.perplexity(Copy(), tokens, 12, stride=12)
    sliding = qeval.perplexity(Copy(), tokens, 12, stride=4)
    assert sliding.ppl < full.ppl


def test_bits_per_byte_byte_level_and_token_level():
    model = toy_model()
    text = b"def f(x):\n    return x + 1\n" * 3
    tokens = torch.tensor(list(text))
    nlls = nll_by_hand(model, tokens, 16, 16)
    assert qeval.bits_per_byte(model, text, 16) == pytest.approx(
        sum(nlls) / math.log(2) / (len(text) - 1), rel=F64_RTOL
    )
    # token-level input: total bits over the given byte count
    assert qeval.bits_per_byte(model, tokens, 16, n_bytes=200) == pytest.approx(
        sum(nlls) / math.log(2) / 200, rel=F64_RTOL
    )
    with pytest.raises(ValueError, match="n_bytes is required"):
        qeval.bits_per_byte(model, tokens, 16)
    with pytest.raises(ValueError, match="only for token-id input"):
        qeval.bits_per_byte(model, text, 16, n_bytes=3)


def test_perplexity_accepts_hf_style_outputs_and_restores_training_flag():
    model = toy_model()

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return SimpleNamespace(logits=self.inner(idx))

    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    wrapped = Wrapped(model).train()
    a = qeval.perplexity(wrapped, tokens, 8)
    assert wrapped.training and model.training
    b = qeval.perplexity(model.eval(), tokens, 8)
    assert a.nll == pytest.approx(b.nll, rel=F64_RTOL)


def test_low_precision_models_are_scored_in_float32():
    model = toy_model().to(torch.bfloat16)
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4))
    result = qeval.perplexity(model, tokens, 8)
    assert math.isfinite(result.nll) and result.nll > 0


def test_perplexity_bad_input():
    model = toy_model()
    with pytest.raises(TypeError, match="integer token ids"):
        qeval.perplexity(model, torch.rand(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        qeval.perplexity(model, torch.zeros(2, 10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        qeval.perplexity(model, torch.zeros(1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="batch_size"):
        qeval.perplexity(model, torch.zeros(10, dtype=torch.long), 4, batch_size=0)
    with pytest.raises(ValueError, match="logits of shape"):
        qeval.perplexity(nn.Identity(), torch.zeros(10, dtype=torch.long), 4)


# -----------------------------------------------------------------------------
# Layer output error


def test_layer_output_error_of_a_scaled_layer():
    torch.manual_seed(0)
    ref = nn.Linear(32, 16, bias=False)
    scaled = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(0.9 * ref.weight)
    X = torch.randn(64, 32)
    err = qeval.layer_output_error(ref, scaled, X)
    # Y_q = 0.9 Y, so the noise is 0.1 Y: rel_mse = 0.01, SQNR = 20 dB (up to float32 rounding of 0.9 W)
    assert err.rel_mse == pytest.approx(0.01, rel=1e-5)
    assert err.sqnr_db == pytest.approx(20.0, abs=1e-4)
    same = qeval.layer_output_error(ref, ref, X)
    assert same.rel_mse == 0.0 and same.sqnr_db == math.inf
    # a weight tensor is accepted in place of the module
    assert qeval.layer_output_error(ref.weight, scaled.weight, X).rel_mse == pytest.approx(
        err.rel_mse, rel=1e-6
    )


def test_sqnr_gains_about_6_db_per_bit():
    torch.manual_seed(1)
    W = torch.randn(64, 128)
    X = torch.randn(256, 128)
    sqnr = {}
    for n_bits in (4, 6, 8):
        scale, zp = minmax_params(W, n_bits)
        sqnr[n_bits] = qeval.layer_output_error(W, minmax_fake_quantize(W, scale, zp, n_bits), X).sqnr_db
    # 20 log10(2) = 6.02 dB per bit for a uniform quantizer; rounding noise is close to that ideal
    assert sqnr[6] - sqnr[4] == pytest.approx(2 * 6.02, abs=1.5)
    assert sqnr[8] - sqnr[6] == pytest.approx(2 * 6.02, abs=1.5)


def test_layer_output_error_bad_input():
    X = torch.randn(4, 8)
    with pytest.raises(ValueError, match="in_features=8"):
        qeval.layer_output_error(torch.randn(3, 5), torch.randn(3, 5), X)
    with pytest.raises(TypeError, match="nn.Module or a weight"):
        qeval.layer_output_error("w", torch.randn(3, 8), X)
    with pytest.raises(ValueError, match="all zeros"):
        qeval.layer_output_error(torch.zeros(3, 8), torch.ones(3, 8), X)
    with pytest.raises(TypeError, match="floating-point"):
        qeval.layer_output_error(torch.randn(3, 8), torch.randn(3, 8), X.long())


# -----------------------------------------------------------------------------
# Hooks and activation statistics


def test_hook_manager_removes_hooks_even_on_error():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with qeval.HookManager() as hooks:
            hooks.add(layer, lambda m, i, o: None)
            assert len(layer._forward_hooks) == 1 and len(hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_collect_linear_inputs_records_what_each_linear_sees():
    model = toy_model().float()
    idx = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(5))
    inputs = qeval.collect_linear_inputs(model, [idx, idx[:1]])
    assert set(inputs) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        x0 = model.blocks[0].ln_1(model.wte(idx) + model.wpe(torch.arange(10)))  # (3, 10, C)
    assert inputs["blocks.0.attn.q"].shape == (40, 16)
    torch.testing.assert_close(inputs["blocks.0.attn.q"][:30], x0.reshape(30, 16))
    assert inputs["blocks.0.mlp.proj"].shape == (40, 64)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_collect_linear_inputs_layer_selection_and_row_cap():
    model = toy_model().float()
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(6))
    inputs = qeval.collect_linear_inputs(model, idx, layer_names=["lm_head"], max_rows=5)
    assert list(inputs) == ["lm_head"] and inputs["lm_head"].shape == (5, 16)
    with pytest.raises(ValueError, match="not nn.Linear modules"):
        qeval.collect_linear_inputs(model, idx, layer_names=["blocks.0.nope"])
    with pytest.raises(ValueError, match="max_rows"):
        qeval.collect_linear_inputs(model, idx, max_rows=0)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 60), channels=st.integers(1, 6), seed=st.integers(0, 1000))
def test_channel_stats_match_numpy_and_scipy(rows, channels, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=3, size=(rows, channels))
    s = qeval.channel_stats(torch.from_numpy(x), percentiles=(0.0, 0.25, 0.99, 1.0))
    a = np.abs(x)
    f32 = dict(rtol=1e-6, atol=1e-6)  # results are returned as float32
    np.testing.assert_allclose(s.absmax.numpy(), a.max(axis=0), **f32)
    np.testing.assert_allclose(s.mean_abs.numpy(), a.mean(axis=0), **f32)
    for q in (0.0, 0.25, 0.99, 1.0):
        np.testing.assert_allclose(s.percentiles[q].numpy(), np.quantile(a, q, axis=0), **f32)
    np.testing.assert_allclose(s.kurtosis.numpy(), stats.kurtosis(x, axis=0, fisher=False), rtol=1e-5)
    assert s.n_rows == rows


def test_channel_stats_flags_an_outlier_channel_and_constant_channels():
    torch.manual_seed(7)
    X = torch.randn(2, 500, 4)
    X[0, 3, 1] = 60.0  # one huge value: the LLM.int8() outlier pattern
    X[..., 2] = 1.0
    s = qeval.channel_stats(X)
    assert s.kurtosis[1] > 50 and abs(float(s.kurtosis[0]) - 3.0) < 1.0
    assert torch.isnan(s.kurtosis[2])
    with pytest.raises(ValueError, match="percentiles"):
        qeval.channel_stats(X, percentiles=(1.5,))


# -----------------------------------------------------------------------------
# Results cache and tables


def test_cached_computes_once_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTLAB_NO_CACHE", raising=False)
    calls = []

    def compute():
        calls.append(1)
        return {"bpb": 2.25, "bits": (4, 8)}

    key = {"model": "tiny", "method": "rtn", "config": {"n_bits": 4, "group": 32}, "split": "validation"}
    first = qeval.cached(key, compute, directory=tmp_path)
    reordered = {
        "split": "validation",
        "config": {"group": 32, "n_bits": 4},
        "method": "rtn",
        "model": "tiny",
    }
    second = qeval.cached(reordered, compute, directory=tmp_path)
    assert first == second == {"bpb": 2.25, "bits": [4, 8]}
    assert len(calls) == 1
    (path,) = tmp_path.glob("*.json")
    assert path.stem == qeval.cache_key(key)
    assert json.loads(path.read_text())["key"] == key
    other = qeval.cached({**key, "method": "gptq"}, compute, directory=tmp_path)
    assert other == first and len(calls) == 2


def test_no_cache_env_var_disables_reading_and_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_NO_CACHE", "1")
    calls = []
    for _ in range(2):
        qeval.cached({"a": 1}, lambda: calls.append(1) or 3.0, directory=tmp_path)
    assert len(calls) == 2 and not list(tmp_path.iterdir())


def test_cache_recovers_from_a_corrupt_file_and_rejects_bad_values(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTLAB_NO_CACHE", raising=False)
    key = {"a": 1}
    (tmp_path / f"{qeval.cache_key(key)}.json").write_text("{not json")
    assert qeval.cached(key, lambda: 5, directory=tmp_path) == 5
    assert qeval.cached(key, lambda: 6, directory=tmp_path) == 5
    with pytest.raises(TypeError, match="JSON-serializable"):
        qeval.cached({"b": 1}, lambda: torch.zeros(2), directory=tmp_path)
    with pytest.raises(TypeError, match="JSON-serializable"):
        qeval.cache_key({"model": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="callable"):
        qeval.cached({"c": 1}, 3, directory=tmp_path)


def test_cache_dir_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(tmp_path / "c"))
    assert qeval.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QUANTLAB_CACHE_DIR")
    assert qeval.cache_dir().name == ".results_cache"


def test_model_fingerprint_changes_with_weights():
    model = toy_model()
    fp = qeval.model_fingerprint(model)
    assert fp == qeval.model_fingerprint(toy_model())
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert qeval.model_fingerprint(model) != fp


def test_results_table():
    rows = [{"method": "fp32", "bpb": 2.0}, qeval.LayerError(mse=1.0, rel_mse=0.1, sqnr_db=10.0)]
    df = qeval.results_table(rows)
    assert list(df.columns) == ["method", "bpb", "mse", "rel_mse", "sqnr_db"]
    assert len(df) == 2 and df.loc[0, "bpb"] == 2.0
    assert list(qeval.results_table(rows[:1], columns=["bpb", "method"]).columns) == ["bpb", "method"]
    with pytest.raises(TypeError, match="rows\\[0\\]"):
        qeval.results_table([3])
