"""Exercises of lab 06 (AWQ): the scale grid search for one layer, and the salient-channel selection.

* ``06.search_scales``: ``search_scales(W, X, n_bits, group_size, n_grid) -> (best_ratio, scales,
  loss_history)``, AWQ's grid search over ``alpha = i / n_grid`` (Lin et al., Eq. 4-5) with
  ``s = mean|x|^alpha`` normalised by ``sqrt(max(s) min(s))``, the loss the output MSE of
  ``Q(W diag(s)) diag(s)^-1`` on the *original* inputs, and the *first* minimum kept. The student may
  call AWQ's quantizer :func:`quantlab.awq.awq_quantize`; the reference is
  :func:`quantlab.awq.search_scales`.
* ``06.salient_channels``: ``select_salient(W, X, fraction) -> idx``, the ``round(fraction * in)`` (at
  least one) input channels with the largest mean ``|x|``, largest first; the reference is
  :func:`quantlab.awq.salient_channels` on :func:`quantlab.awq.activation_stat`. ``W`` is passed
  too, so that ranking by weight magnitude (the paper's Table 1 contrast) can be diagnosed.

The cases are built so that every known mistake gives a different output: a layer whose activation
statistics make max and mean ``|x|`` rank channels differently, a tie (every channel with the same
mean ``|x|``, so every grid point gives the same loss), a dead input channel (mean ``|x|`` = 0, where
the ``clamp(min=1e-4)`` matters), and channel counts where ``round``, ``floor`` and ``ceil`` of
``fraction * in`` differ.

References:
    Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
    Acceleration", MLSys 2024 (Eq. 4-5; Table 1: salient channels by activation vs by weight vs random).
    mit-han-lab/llm-awq, ``awq/quantize/auto_scale.py`` (the grid, the normalisation, the strict ``<``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quantlab.awq import activation_stat, awq_quantize, salient_channels, search_scales
from quantlab.exercises.core import Case, Exercise, Mistake

__all__ = ["EXERCISES"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(out_f: int, in_f: int, tokens: int, seed: int, n_outliers: int = 2) -> tuple[torch.Tensor, ...]:
    """Weights ~ N(0, 0.05^2); inputs with log-normal channel magnitudes and a few 20x channels."""
    g = _gen(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    magnitude = torch.exp(0.5 * torch.randn(in_f, generator=g))  # (in,)
    magnitude[torch.randperm(in_f, generator=g)[:n_outliers]] = 20.0
    X = torch.randn(tokens, in_f, generator=g) * magnitude  # (tokens, in)
    return W, X


# -----------------------------------------------------------------------------
# 06.search_scales: the grid search of AWQ's auto_scale for one linear layer


def _ref_search(W, X, n_bits, group_size, n_grid):
    res = search_scales(W, X, n_bits=n_bits, group_size=group_size, n_grid=n_grid)
    return (
        torch.tensor(res.best_ratio, dtype=torch.float64),
        res.scales,
        torch.tensor(res.loss_history, dtype=torch.float64),
    )


def _search_cases() -> list[Case]:
    W1, X1 = _layer(32, 128, 256, seed=0)
    W2, X2 = _layer(24, 96, 200, seed=1, n_outliers=3)
    # Every channel has mean |x| = 1 exactly (random signs): s = 1 at every ratio, so every grid point
    # gives exactly the same loss and only the tie-breaking decides the best ratio.
    g = _gen(2)
    W3 = torch.randn(16, 64, generator=g) * 0.05
    X3 = torch.randint(0, 2, (128, 64), generator=g).float() * 2 - 1
    # A dead input channel (always 0): its statistic is 0, and 0^alpha must be floored at 1e-4.
    W4, X4 = _layer(16, 64, 128, seed=3)
    X4[:, 5] = 0.0
    return [
        Case(
            "outlier channels, 4 bits", (W1, X1, 4, 64, 20), "W (32, 128), X (256, 128), group 64, 20 points"
        ),
        Case("3 bits, group 32, 10 points", (W2, X2, 3, 32, 10), "W (24, 96), X (200, 96)"),
        Case(
            "a tie: every grid point has the same loss",
            (W3, X3, 4, 32, 8),
            "every channel has mean |x| = 1, so s = 1 at every ratio",
        ),
        Case("a dead input channel", (W4, X4, 4, 32, 10), "X[:, 5] = 0: mean |x| = 0 for channel 5"),
    ]


def _grid_search(W, X, n_bits, group_size, ratios, stat_of, scales_of, loss_of, keep_last_tie=False):
    """The skeleton every variant shares; each mistake swaps one piece."""
    stat = stat_of(X)  # (in,)
    reference = F.linear(X, W)  # (tokens, out)
    best, best_ratio, best_s, history = math.inf, -1.0, None, []
    for ratio in ratios:
        s = scales_of(stat, ratio)  # (in,)
        loss = loss_of(W, X, s, reference, n_bits, group_size)
        history.append(loss)
        if loss < best or (keep_last_tie and loss == best):
            best, best_ratio, best_s = loss, ratio, s
    return (
        torch.tensor(best_ratio, dtype=torch.float64),
        best_s,
        torch.tensor(history, dtype=torch.float64),
    )


def _mean_abs(X):
    return X.abs().mean(dim=0)


def _normalised(stat, ratio):
    s = stat.pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _mse(W, X, s, reference, n_bits, group_size):
    W_q = awq_quantize(W * s, n_bits, group_size) / s  # the effective weight Q(W s) / s, (out, in)
    return (reference - F.linear(X, W_q)).pow(2).mean().item()


def _grid(n_grid):
    return [i / n_grid for i in range(n_grid)]


def _s_max(W, X, n_bits, group_size, n_grid):
    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), lambda x: x.abs().amax(0), _normalised, _mse)


def _s_linspace(W, X, n_bits, group_size, n_grid):
    ratios = torch.linspace(0, 1, n_grid).tolist()
    return _grid_search(W, X, n_bits, group_size, ratios, _mean_abs, _normalised, _mse)


def _s_one_extra(W, X, n_bits, group_size, n_grid):
    ratios = [i / n_grid for i in range(n_grid + 1)]
    return _grid_search(W, X, n_bits, group_size, ratios, _mean_abs, _normalised, _mse)


def _s_not_normalised(W, X, n_bits, group_size, n_grid):
    def scales(stat, ratio):
        return stat.pow(ratio).clamp(min=1e-4)

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, scales, _mse)


def _s_no_floor(W, X, n_bits, group_size, n_grid):
    def scales(stat, ratio):
        s = stat.pow(ratio)
        return s / (s.max() * s.min()).sqrt()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, scales, _mse)


def _s_scaled_input(W, X, n_bits, group_size, n_grid):
    def loss(W, X, s, reference, n_bits, group_size):
        W_q = awq_quantize(W * s, n_bits, group_size) / s
        return (reference - F.linear(X / s, W_q)).pow(2).mean().item()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, loss)


def _s_no_divide(W, X, n_bits, group_size, n_grid):
    def loss(W, X, s, reference, n_bits, group_size):
        return (reference - F.linear(X, awq_quantize(W * s, n_bits, group_size))).pow(2).mean().item()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, loss)


def _s_divide_weight(W, X, n_bits, group_size, n_grid):
    def loss(W, X, s, reference, n_bits, group_size):
        W_q = awq_quantize(W / s, n_bits, group_size) * s
        return (reference - F.linear(X, W_q)).pow(2).mean().item()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, loss)


def _s_sum(W, X, n_bits, group_size, n_grid):
    def loss(W, X, s, reference, n_bits, group_size):
        W_q = awq_quantize(W * s, n_bits, group_size) / s
        return (reference - F.linear(X, W_q)).pow(2).sum().item()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, loss)


def _s_weight_error(W, X, n_bits, group_size, n_grid):
    def loss(W, X, s, reference, n_bits, group_size):
        W_q = awq_quantize(W * s, n_bits, group_size) / s
        return (W - W_q).pow(2).mean().item()

    return _grid_search(W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, loss)


def _s_last_tie(W, X, n_bits, group_size, n_grid):
    return _grid_search(
        W, X, n_bits, group_size, _grid(n_grid), _mean_abs, _normalised, _mse, keep_last_tie=True
    )


SEARCH_SCALES = Exercise(
    id="06.search_scales",
    title="AWQ's scale grid search for one linear layer",
    signature="search_scales(W, X, n_bits, group_size, n_grid) -> (best_ratio, scales, loss_history)",
    hint=(
        "s_X = X.abs().mean(0); for ratio = i / n_grid (i < n_grid): s = s_X**ratio clamped at 1e-4, "
        "divided by sqrt(s.max() * s.min()); loss = mean((X W^T - X (awq_quantize(W * s) / s)^T)^2); keep "
        "the first strict minimum"
    ),
    reference=_ref_search,
    cases=_search_cases,
    output_name="the result",
    output_names=("best_ratio", "scales", "loss_history"),
    rtol=1e-4,
    atol=0.0,
    mistakes=(
        Mistake(
            "used max |x| per channel; AWQ's statistic s_X is the MEAN of |x| over the tokens "
            "(X.abs().mean(0)): the average magnitude, not a single extreme token.",
            _s_max,
        ),
        Mistake(
            "included ratio 1.0 in the grid (torch.linspace(0, 1, n_grid)): the grid is i / n_grid for "
            "i = 0 .. n_grid - 1 (range(n_grid)), so 1.0 is not on it and the step is 1 / n_grid.",
            _s_linspace,
        ),
        Mistake(
            "tried n_grid + 1 ratios (up to and including 1.0): the grid is i / n_grid for "
            "i in range(n_grid), exactly n_grid points.",
            _s_one_extra,
        ),
        Mistake(
            "forgot to normalise by sqrt(max(s) * min(s)): without it the scales are not centred "
            "around 1 (s.max() * s.min() == 1 after the division).",
            _s_not_normalised,
        ),
        Mistake(
            "forgot to floor s_X**ratio at 1e-4 before normalising: a dead channel (mean |x| = 0) gives "
            "s = 0, min(s) = 0 and a division by zero; use .clamp(min=1e-4).",
            _s_no_floor,
        ),
        Mistake(
            "measured the loss on the scaled X (X / s): Q(W*s)/s is the effective weight for the "
            "ORIGINAL input, the 1/s is already in it; compare F.linear(X, W) with F.linear(X, Q(W*s)/s).",
            _s_scaled_input,
        ),
        Mistake(
            "forgot to divide the quantized weight by s: the effective weight is "
            "awq_quantize(W * s) / s (the input is divided by s in the real network).",
            _s_no_divide,
        ),
        Mistake(
            "divided the weight by s before quantizing: salient channels are protected by MULTIPLYING "
            "their weight columns by s > 1 (and dividing the input), awq_quantize(W * s) / s.",
            _s_divide_weight,
        ),
        Mistake(
            "summed the squared errors: the loss is their MEAN over tokens and output channels "
            "(.pow(2).mean()), which is what loss_history reports.",
            _s_sum,
        ),
        Mistake(
            "measured the error of the weights (W - W_q); AWQ measures the error of the layer's OUTPUT, "
            "X W^T vs X W_q^T, which is what makes it activation-aware.",
            _s_weight_error,
        ),
        Mistake(
            "kept the last best on ties (<= instead of <): among equal losses the FIRST ratio wins "
            "(the smallest scaling), so use a strict loss < best_loss.",
            _s_last_tie,
        ),
    ),
)


# -----------------------------------------------------------------------------
# 06.salient_channels: the top 1 % input channels by mean |x|


def _ref_salient(W, X, fraction):
    return salient_channels(activation_stat(X), fraction)


def _salient_cases() -> list[Case]:
    cases = []
    for name, (out_f, in_f, tokens, fraction, seed), describe in (
        ("576 channels, 1 %", (8, 576, 64, 0.01, 10), "1 % of 576 is 5.76: 6 channels"),
        ("1536 channels, 1 %", (8, 1536, 48, 0.01, 11), "1 % of 1536 is 15.36: 15 channels"),
        ("32 channels, 1 %", (4, 32, 64, 0.01, 12), "1 % of 32 is 0.32: still at least one channel"),
        ("100 channels, 7 %", (6, 100, 80, 0.07, 13), "7 channels"),
    ):
        W, X = _layer(out_f, in_f, tokens, seed, n_outliers=max(1, in_f // 200))
        g = _gen(seed + 100)
        # Large weight columns where the activations are small: ranking by weight picks other channels.
        quiet = X.abs().mean(0).argsort()[: max(2, in_f // 50)]  # (k,) the quietest channels
        W[:, quiet] *= 40.0
        # One spike per channel in a few channels: their max |x| is large but their mean is not.
        spiky = torch.randperm(in_f, generator=g)[: max(2, in_f // 50)]
        X[torch.randint(0, tokens, (spiky.numel(),), generator=g), spiky] = 500.0
        cases.append(Case(name, (W, X, fraction), describe))
    return cases


def _n_keep(n, fraction):
    return max(1, round(fraction * n))


def _top(stat, k, largest=True):
    return torch.topk(stat, k, largest=largest).indices


def _sal_weight_mean(W, X, fraction):
    return _top(W.abs().mean(dim=0), _n_keep(W.shape[1], fraction))


def _sal_smallest(W, X, fraction):
    return _top(X.abs().mean(dim=0), _n_keep(X.shape[1], fraction), largest=False)


def _sal_floor(W, X, fraction):
    return _top(X.abs().mean(dim=0), max(1, int(fraction * X.shape[1])))


def _sal_ceil(W, X, fraction):
    return _top(X.abs().mean(dim=0), math.ceil(fraction * X.shape[1]))


def _sal_no_minimum(W, X, fraction):
    return _top(X.abs().mean(dim=0), round(fraction * X.shape[1]))


def _sal_max(W, X, fraction):
    return _top(X.abs().amax(dim=0), _n_keep(X.shape[1], fraction))


def _sal_signed(W, X, fraction):
    return _top(X.mean(dim=0), _n_keep(X.shape[1], fraction))


def _sal_ascending(W, X, fraction):
    return X.abs().mean(dim=0).argsort()[-_n_keep(X.shape[1], fraction) :]


def _sal_weight_times_act(W, X, fraction):
    return _top(W.abs().mean(dim=0) * X.abs().mean(dim=0), _n_keep(X.shape[1], fraction))


SALIENT_CHANNELS = Exercise(
    id="06.salient_channels",
    title="Salient input channels: the top fraction by activation magnitude",
    signature="select_salient(W, X, fraction) -> idx",
    hint=(
        "rank the input channels by X.abs().mean(0), keep max(1, round(fraction * in)) of them, "
        "largest first (torch.topk(...).indices)"
    ),
    reference=_ref_salient,
    cases=_salient_cases,
    output_name="the channel indices",
    mistakes=(
        Mistake(
            "ranked by weight magnitude instead of activation: AWQ's salient channels are the input "
            "channels with the largest mean |x| (X.abs().mean(0)); the paper's Table 1 shows that "
            "picking them by weight is hardly better than random.",
            _sal_weight_mean,
        ),
        Mistake(
            "took the smallest channels: salient channels have the LARGEST mean |x| "
            "(torch.topk(..., largest=True)).",
            _sal_smallest,
        ),
        Mistake(
            "wrong count rounding: int(fraction * in) rounds down (5.76 -> 5); keep "
            "max(1, round(fraction * in)) channels (6 of 576 at 1 %).",
            _sal_floor,
        ),
        Mistake(
            "wrong count rounding: math.ceil rounds up (15.36 -> 16); keep max(1, round(fraction * in)) "
            "channels (15 of 1536 at 1 %).",
            _sal_ceil,
        ),
        Mistake(
            "kept round(fraction * in) channels even when that is 0: keep at least one, "
            "max(1, round(fraction * in)).",
            _sal_no_minimum,
        ),
        Mistake(
            "ranked by max |x|: one extreme token is not salience; AWQ ranks by the MEAN |x| over all "
            "tokens (X.abs().mean(0)).",
            _sal_max,
        ),
        Mistake(
            "ranked by the signed mean of x, where positive and negative values cancel: take the mean "
            "of |x| (X.abs().mean(0)).",
            _sal_signed,
        ),
        Mistake(
            "returned the channels in increasing order of mean |x|: return them largest first "
            "(torch.topk(...).indices, or argsort(descending=True)[:k]).",
            _sal_ascending,
        ),
        Mistake(
            "ranked by |w| * |x|: the selection is by activation alone (X.abs().mean(0)); the weight "
            "does not enter.",
            _sal_weight_times_act,
        ),
    ),
)

EXERCISES: tuple[Exercise, ...] = (SEARCH_SCALES, SALIENT_CHANNELS)
