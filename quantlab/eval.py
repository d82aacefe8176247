"""Measuring what quantization costs: perplexity, bits per byte, layer error, activation statistics.

* :func:`perplexity` / :func:`bits_per_byte`: the language-modelling metrics, computed with the
  standard sliding-window evaluation (every token scored exactly once).
* :func:`layer_output_error`: how far one quantized ``nn.Linear``'s output is from the original's
  (relative MSE and SQNR in dB).
* :class:`LinearInputRecorder`, :func:`collect_linear_inputs`, :func:`channel_stats`: forward hooks
  that record what flows into each linear layer (the activations SmoothQuant, AWQ and GPTQ look at)
  and per-channel statistics of it (max, mean |x|, percentiles, kurtosis).
* :func:`cached` / :func:`cache_key`: a small json results cache in ``.results_cache/`` so labs do not
  recompute an evaluation they already ran; :func:`results_table` turns result rows into a DataFrame.

Everything runs under ``torch.inference_mode()`` on the model's own device, and log-probabilities
are computed in float32 (or float64 if the model is in float64) whatever the model's dtype.

References:
    Jelinek et al., "Perplexity—a measure of the difficulty of speech recognition tasks", JASA 1977.
    Hugging Face Transformers docs, "Perplexity of fixed-length models" (the sliding-window strategy).
    Gao et al., "The Pile: An 800GB Dataset of Diverse Text for Language Modeling", 2020 (bits per byte
    as a tokenizer-independent metric).
    Xiao et al., "SmoothQuant", ICML 2023, and Dettmers et al., "LLM.int8()", 2022 (activation outlier
    channels).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantlab._checks import check_float_tensor, check_int, check_probability

__all__ = [
    "ChannelStats",
    "HookManager",
    "LayerError",
    "PerplexityResult",
    "bits_per_byte",
    "cache_dir",
    "cache_key",
    "cached",
    "channel_stats",
    "collect_linear_inputs",
    "layer_output_error",
    "model_fingerprint",
    "perplexity",
    "results_table",
    "sliding_windows",
]


# -----------------------------------------------------------------------------
# Small helpers


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Call ``model(idx)`` and return the logits ``(B, T, vocab)``, unwrapping ``.logits`` or a tuple."""
    out = model(idx)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[:2] != idx.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model(idx) must return logits of shape (batch, time, vocab) = {tuple(idx.shape)} + (vocab,), "
            f"got {shape}"
        )
    return out


def _check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one long stream of token ids), got shape {tuple(tokens.shape)}"
        )
    if tokens.numel() < 2:
        raise ValueError(
            f"{name} needs at least 2 tokens (one to read, one to predict), got {tokens.numel()}"
        )
    return tokens


# -----------------------------------------------------------------------------
# Perplexity with a sliding window


@dataclass(frozen=True)
class PerplexityResult:
    """The result of :func:`perplexity`.

    Attributes:
        ppl: perplexity ``exp(nll)``.
        nll: mean negative log-likelihood per scored token, in nats.
        n_tokens: how many tokens were scored (``len(tokens) - 1``: the first has nothing to condition on).
    """

    ppl: float
    nll: float
    n_tokens: int

    @property
    def bits_per_token(self) -> float:
        """``nll / ln 2``."""
        return self.nll / math.log(2)


def sliding_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window evaluation over a stream of ``n_tokens`` tokens.

    Window ``w`` feeds the model the inputs ``tokens[begin:end]`` and predicts ``tokens[begin+1:end+1]``;
    only the **last** ``n_score`` of those predictions count, the ones no earlier window scored.
    Windows start every ``stride`` tokens, so:

    * every target ``tokens[1:]`` is scored exactly once;
    * a target is predicted from all the tokens between its window's start and itself, between 1 and
      ``seq_len`` tokens of context; with ``stride < seq_len`` every target after the first window sees
      at least ``seq_len - stride + 1`` tokens, which lowers (improves) the perplexity towards the
      value at full context, at ``seq_len / stride`` times the compute;
    * ``stride == seq_len`` gives disjoint windows (the cheapest evaluation).

    Args:
        n_tokens: length of the token stream, >= 2.
        seq_len: model input length per window, >= 1.
        stride: step between window starts, ``1 <= stride <= seq_len``; default ``seq_len``.

    Returns:
        ``[(begin, end, n_score), ...]`` with ``end - begin <= seq_len``.

    >>> sliding_windows(10, 4, 2)
    [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 9, 1)]
    """
    n_tokens = check_int(n_tokens, "n_tokens")
    seq_len = check_int(seq_len, "seq_len")
    stride = seq_len if stride is None else check_int(stride, "stride")
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    last_input = n_tokens - 1  # the final token is only ever a target
    windows = []
    scored_until = 0  # inputs [0, scored_until) have had their next token scored
    begin = 0
    while scored_until < last_input:
        end = min(begin + seq_len, last_input)
        windows.append((begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


def _sum_nll(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int | None, batch_size: int
) -> tuple[float, int]:
    """Total NLL (nats, float64 accumulation) and number of scored tokens over the sliding windows."""
    batch_size = check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = sliding_windows(tokens.numel(), seq_len, stride)
    device = _model_device(model)
    tokens = tokens.to(device=device, dtype=torch.long)
    total, count = 0.0, 0
    # Windows of equal length and equal n_score are batched together (all but possibly the last).
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, n_score in windows:
        groups.setdefault((end - begin, n_score), []).append(begin)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for (length, n_score), begins in groups.items():
                offsets = torch.arange(length + 1, device=device)  # (length+1,)
                for i in range(0, len(begins), batch_size):
                    starts = torch.tensor(begins[i : i + batch_size], device=device)  # (b,)
                    rows = tokens[starts[:, None] + offsets]  # (b, length+1)
                    logits = _logits(model, rows[:, :-1])  # (b, length, vocab)
                    logits = logits[:, length - n_score :]  # (b, n_score, vocab)
                    if logits.dtype not in (torch.float32, torch.float64):
                        logits = logits.float()
                    targets = rows[:, length - n_score + 1 :]  # (b, n_score)
                    nll = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                    )  # (b * n_score, vocab) -> scalar
                    total += float(nll.double())
                    count += targets.numel()
    finally:
        model.train(was_training)
    return total, count


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of a causal language model on one token stream, by sliding-window evaluation.

    ``ppl = exp(-(1/N) sum_t log p(x_t | x_<t within its window))`` over the ``N = len(tokens) - 1``
    targets, each scored exactly once (see :func:`sliding_windows` for which context each gets).

    Args:
        model: ``model(idx (B, T) long) -> logits (B, T, vocab)`` (or an object with ``.logits``, or a
            tuple whose first element is the logits). Run in eval mode; its training flag is restored.
        tokens: ``(n_tokens,)`` integer token ids.
        seq_len: window length fed to the model (at most the model's context).
        stride: step between windows, ``1 <= stride <= seq_len``; default ``seq_len`` (disjoint windows).
        batch_size: windows per forward pass; the logits of one pass take
            ``batch_size * seq_len * vocab * 4`` bytes (800 MB for SmolLM2 at 8 x 512), so lower it on a
            small machine.

    Returns:
        :class:`PerplexityResult` with ``ppl``, mean ``nll`` (nats/token) and ``n_tokens`` scored.
    """
    tokens = _check_tokens(tokens)
    total, count = _sum_nll(model, tokens, seq_len, stride, batch_size)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count)


def bits_per_byte(
    model: nn.Module,
    data: bytes | torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    n_bytes: int | None = None,
) -> float:
    """Bits per byte: the total negative log2-likelihood divided by the number of bytes of text.

    Bits per byte compares models with different tokenizers (a byte-level model and SmolLM2 alike):
    ``bpb = (sum of NLL in nats) / ln 2 / n_bytes``.

    Args:
        model: as in :func:`perplexity`.
        data: ``bytes`` for a byte-level model (token id = byte value; ``n_bytes`` is the number of
            scored bytes, ``len(data) - 1``), or ``(n_tokens,)`` token ids for a tokenized model, in which
            case ``n_bytes`` (the UTF-8 length of the text after the first token) is required.
        seq_len, stride, batch_size: as in :func:`perplexity`.
        n_bytes: bytes covered by the scored tokens, for token-id input only.

    Returns:
        Bits per byte (a float).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if n_bytes is not None:
            raise ValueError("n_bytes is only for token-id input; for bytes it is len(data) - 1")
        if len(data) < 2:
            raise ValueError(f"data needs at least 2 bytes, got {len(data)}")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (n_bytes,)
    else:
        tokens = _check_tokens(data, "data")
        if n_bytes is None:
            raise ValueError(
                "n_bytes is required when data is token ids (the UTF-8 length of the scored text)"
            )
        n_bytes = check_int(n_bytes, "n_bytes")
        if n_bytes < 1:
            raise ValueError(f"n_bytes must be >= 1, got {n_bytes}")
    total, count = _sum_nll(model, tokens, seq_len, stride, batch_size)
    return total / math.log(2) / (count if n_bytes is None else n_bytes)


# -----------------------------------------------------------------------------
# Layer-wise output error


@dataclass(frozen=True)
class LayerError:
    """How far a quantized layer's output is from the reference layer's, on the same inputs.

    Attributes:
        mse: mean squared error ``mean((Y_ref - Y_q)^2)``.
        rel_mse: ``||Y_ref - Y_q||^2 / ||Y_ref||^2`` (0 is perfect; 1 is as large as the signal).
        sqnr_db: signal-to-quantization-noise ratio ``10 log10(||Y_ref||^2 / ||Y_ref - Y_q||^2)``
            (``inf`` when the outputs are identical); each bit of a uniform quantizer adds about 6 dB.
    """

    mse: float
    rel_mse: float
    sqnr_db: float


def _apply_layer(layer: nn.Module | torch.Tensor, X: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(layer, torch.Tensor):
        if layer.ndim != 2 or layer.shape[1] != X.shape[-1]:
            raise ValueError(
                f"{name} as a weight must be (out_features, in_features={X.shape[-1]}), "
                f"got {tuple(layer.shape)}"
            )
        return X @ layer.to(X.dtype).T  # (..., out)
    if isinstance(layer, nn.Module):
        return layer(X)
    raise TypeError(f"{name} must be an nn.Module or a weight tensor (out, in), got {type(layer).__name__}")


def layer_output_error(
    ref_linear: nn.Module | torch.Tensor, q_linear: nn.Module | torch.Tensor, X: torch.Tensor
) -> LayerError:
    """Output error of a quantized layer relative to the reference: the quantity GPTQ and AWQ minimize.

    GPTQ's layer-wise objective is ``||W X - W_q X||^2`` (Frantar et al. 2023, Eq. 1); here it is
    reported normalized by the signal, as relative MSE and SQNR, so layers of any scale compare.

    Args:
        ref_linear: the original layer, an ``nn.Module`` (e.g. ``nn.Linear``) or a weight ``(out, in)``.
        q_linear: the quantized layer, same kind of object and shape.
        X: inputs ``(..., in_features)``, floating point.

    Returns:
        :class:`LayerError` (computed in float64).
    """
    check_float_tensor(X, "X")
    with torch.inference_mode():
        y_ref = _apply_layer(ref_linear, X, "ref_linear").double()  # (..., out)
        y_q = _apply_layer(q_linear, X, "q_linear").double()  # (..., out)
    if y_ref.shape != y_q.shape:
        raise ValueError(f"output shapes differ: ref {tuple(y_ref.shape)} vs quantized {tuple(y_q.shape)}")
    noise = float(((y_ref - y_q) ** 2).sum())
    signal = float((y_ref**2).sum())
    if signal == 0.0:
        raise ValueError("the reference output is all zeros, so the relative error is undefined")
    rel = noise / signal
    sqnr = math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)
    return LayerError(mse=noise / y_ref.numel(), rel_mse=rel, sqnr_db=sqnr)


# -----------------------------------------------------------------------------
# Activation statistics with forward hooks


class HookManager:
    """Registers forward hooks and always removes them, even if the forward pass raises.

    Use as a context manager::

        with HookManager() as hooks:
            hooks.add(layer, fn)     # fn(module, inputs, output), as torch's register_forward_hook
            model(x)
        # every hook is gone here
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, module: nn.Module, fn) -> None:
        """Register ``fn`` as a forward hook of ``module``."""
        self._handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        """Remove every hook registered so far."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookManager:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _select_linears(model: nn.Module, layer_names: list[str] | None) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layer_names is None:
        return linears
    unknown = [n for n in layer_names if n not in linears]
    if unknown:
        shown = list(linears)[:8] + (["..."] if len(linears) > 8 else [])
        raise ValueError(
            f"layer_names {unknown} are not nn.Linear modules of the model; valid names: {shown}"
        )
    return {n: linears[n] for n in layer_names}


def _as_batches(batches: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        return [batches if batches.ndim == 2 else batches.unsqueeze(0)]
    return list(batches)


def collect_linear_inputs(
    model: nn.Module,
    batches: torch.Tensor | list[torch.Tensor],
    layer_names: list[str] | None = None,
    max_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model and record the input of each ``nn.Linear``, flattened to rows of features.

    These are the activations that GPTQ (``H = 2 X X^T``), AWQ (per-channel mean ``|x|``) and
    SmoothQuant (per-channel max ``|x|``) compute their statistics from.

    Args:
        model: any module; its ``nn.Linear`` layers are found by name.
        batches: one ``(B, T)`` batch of token ids, or a list of them, fed as ``model(batch)``.
        layer_names: names from ``model.named_modules()``; default every ``nn.Linear``.
        max_rows: keep at most this many rows (the first ones) per layer, to bound memory.

    Returns:
        ``{name: X}`` with ``X`` of shape ``(rows, in_features)`` (``rows = sum of B*T``), float32 on CPU.
    """
    linears = _select_linears(model, layer_names)
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    store: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    counts = dict.fromkeys(linears, 0)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])  # (B*T, in_features)
            if max_rows is not None:
                x = x[: max(0, max_rows - counts[name])]
            if x.shape[0]:
                store[name].append(x.float().cpu())
                counts[name] += x.shape[0]

        return hook

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with HookManager() as hooks, torch.inference_mode():
            for name, module in linears.items():
                hooks.add(module, make_hook(name))
            for batch in _as_batches(batches):
                model(batch.to(device))
    finally:
        model.train(was_training)
    return {
        name: torch.cat(xs) if xs else torch.empty(0, linears[name].in_features) for name, xs in store.items()
    }


@dataclass(frozen=True)
class ChannelStats:
    """Per-input-channel statistics of activations ``X (rows, channels)``; every tensor is ``(channels,)``.

    Attributes:
        absmax: ``max |x|`` (SmoothQuant's activation scale).
        mean_abs: ``mean |x|`` (AWQ's activation salience).
        percentiles: ``{q: q-quantile of |x|}`` for each requested ``q`` in [0, 1].
        kurtosis: Pearson kurtosis ``E[(x-mu)^4] / sigma^4`` (3 for a Gaussian; outlier channels are far
            above); NaN for a constant channel.
        n_rows: number of rows the statistics were computed over.
    """

    absmax: torch.Tensor
    mean_abs: torch.Tensor
    percentiles: dict[float, torch.Tensor]
    kurtosis: torch.Tensor
    n_rows: int


def channel_stats(X: torch.Tensor, percentiles: tuple[float, ...] = (0.5, 0.99, 0.999)) -> ChannelStats:
    """Per-channel statistics of activations (reduce over rows, keep the last dim).

    Args:
        X: ``(..., channels)`` activations; all leading dims are flattened into rows.
        percentiles: quantiles of ``|x|`` to report, each in [0, 1] (linear interpolation, as
            ``torch.quantile``).

    Returns:
        :class:`ChannelStats`; statistics are computed in float64 and returned as float32 ``(channels,)``.

    >>> s = channel_stats(torch.tensor([[1.0, -2.0], [3.0, 2.0]]), percentiles=(0.5,))
    >>> s.absmax, s.mean_abs, s.percentiles[0.5]
    (tensor([3., 2.]), tensor([2., 2.]), tensor([2., 2.]))
    """
    check_float_tensor(X, "X")
    qs = [check_probability(q, "percentiles") for q in percentiles]
    x = X.detach().reshape(-1, X.shape[-1]).double()  # (rows, channels)
    a = x.abs()
    mu = x.mean(dim=0)  # (channels,)
    centered = x - mu
    var = (centered**2).mean(dim=0)  # (channels,)
    m4 = (centered**4).mean(dim=0)  # (channels,)
    kurt = torch.where(var > 0, m4 / var.clamp(min=torch.finfo(torch.float64).tiny) ** 2, torch.nan)
    sorted_abs = a.sort(dim=0).values  # (rows, channels)
    n = sorted_abs.shape[0]
    pct = {}
    for q in qs:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        frac = pos - lo
        pct[q] = (sorted_abs[lo] * (1 - frac) + sorted_abs[hi] * frac).float()  # (channels,)
    return ChannelStats(
        absmax=a.amax(dim=0).float(),
        mean_abs=a.mean(dim=0).float(),
        percentiles=pct,
        kurtosis=kurt.float(),
        n_rows=n,
    )


# -----------------------------------------------------------------------------
# A json results cache and result tables


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, bytes): a cache key part.

    Two models with the same fingerprint compute the same function, so a quantized model and its
    float original never share a cache entry.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_dir() -> Path:
    """Where :func:`cached` keeps its json files.

    ``$QUANTLAB_CACHE_DIR`` if set; else ``.results_cache/`` at the project root when quantlab runs
    from a source checkout (the folder holding ``pyproject.toml``, gitignored); else
    ``./.results_cache`` in the working directory.
    """
    env = os.environ.get("QUANTLAB_CACHE_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return root / ".results_cache"
    return Path.cwd() / ".results_cache"


def cache_key(key: dict) -> str:
    """A stable sha256 hex digest of a JSON-serializable dict (keys sorted, so their order is irrelevant).

    Args:
        key: e.g. ``{"model": ..., "method": "gptq", "config": {"n_bits": 4}, "split": "evaluation",
            "corpus": corpus_fingerprint()}``.
    """
    if not isinstance(key, dict):
        raise TypeError(f"key must be a dict, got {type(key).__name__}")
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise TypeError(f"key must be JSON-serializable (str, numbers, lists, dicts): {err}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached(key: dict, fn, directory: str | Path | None = None):
    """Return ``fn()``'s result, computing it only if no result for ``key`` is stored yet.

    Results are stored as ``<cache_key(key)>.json`` holding ``{"key": key, "value": value}``. Setting
    the environment variable ``QUANTLAB_NO_CACHE=1`` bypasses the cache (nothing is read or written).
    Include everything the result depends on in ``key`` (model fingerprint, method, its config, data
    split and :func:`quantlab.data.corpus_fingerprint`): the cache cannot know what you left out.

    Args:
        key: a JSON-serializable dict identifying the computation.
        fn: a zero-argument callable returning a JSON-serializable value (dicts, lists, numbers, str).
        directory: cache folder; default :func:`cache_dir`.

    Returns:
        The value, as ``json.loads`` reads it back (tuples come back as lists), also on the first call.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a zero-argument callable, got {type(fn).__name__}")
    digest = cache_key(key)
    if os.environ.get("QUANTLAB_NO_CACHE", "") not in ("", "0"):
        return fn()
    folder = cache_dir() if directory is None else Path(directory)
    path = folder / f"{digest}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["value"]
        except (json.JSONDecodeError, KeyError):
            pass  # a truncated or foreign file: recompute and overwrite it
    value = fn()
    try:
        text = json.dumps({"key": key, "value": value}, indent=1, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"fn() must return a JSON-serializable value to be cached: {err}") from None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return json.loads(text)["value"]


def results_table(rows: list, columns: list[str] | None = None):
    """Result rows as a ``pandas.DataFrame`` (pandas comes with the ``lab`` extra).

    Args:
        rows: dicts (or dataclass instances) with one entry per column, e.g.
            ``{"method": "rtn", "n_bits": 4, "bpb": 2.1}``.
        columns: column order; default the keys in first-seen order.

    Returns:
        A DataFrame with one row per entry of ``rows``.
    """
    import pandas as pd

    records = []
    for i, row in enumerate(rows):
        if is_dataclass(row) and not isinstance(row, type):
            row = asdict(row)
        if not isinstance(row, dict):
            raise TypeError(f"rows[{i}] must be a dict or a dataclass instance, got {type(row).__name__}")
        records.append(row)
    if columns is None:
        columns = list(dict.fromkeys(k for r in records for k in r))
    return pd.DataFrame.from_records(records, columns=columns)
