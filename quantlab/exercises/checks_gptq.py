"""Exercises of lab 05 (GPTQ): the one-column OBS update, and the Hessian of a linear layer.

* ``05.column_update``: ``gptq_columns(W, H, n_bits) -> Q``, column-by-column GPTQ in the natural
  column order with one min-max grid per row (fitted on the original ``W``) and no damping. The lab
  gives the loop (grid, ``H⁻¹``, rounding of column ``q``); the student writes the body: push the
  rounding error of column ``q`` onto the columns not yet quantized (GPTQ Eq. 2) and remove ``q``
  from ``H⁻¹`` (GPTQ Eq. 3). The reference is :func:`quantlab.gptq.gptq_quantize_reference` with
  ``damp=0`` in float64, and the output compared is the quantized matrix after *every* column, so a
  wrong update shows up in the columns after the first.
* ``05.hessian``: ``accumulate_hessian(batches) -> H``, ``H = 2/n Σ x xᵀ`` over every token of every
  batch, ``n`` the number of calibration *samples* (sequences), as
  :class:`quantlab.gptq.HessianAccumulator` (and the GPTQ reference code) count them. Each batch is
  ``(batch, seq, in)``.

The cases are chosen so that every known mistake gives a different output: Hessians with strongly
correlated inputs and unequal diagonals (with a diagonal ``H`` there is no error feedback at all, and
with ``[H⁻¹]_qq = 1`` dividing by it once or twice is the same); batches of different sizes whose token
counts are equal (so dividing by batches, samples or tokens gives three different answers, while a
``(tokens, tokens)`` matrix ``XXᵀ`` can still be summed over batches without an error); activations
with a non-zero mean (so a covariance differs from the second moment).

References:
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR 2023 (Eq. 1: ``H = 2XXᵀ`` with X ``(in, tokens)``; Eqs. 2-3).
    Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022 (the column-by-column OBQ update).
    Hassibi & Stork, "Second Order Derivatives for Network Pruning: Optimal Brain Surgeon", NIPS 1993.
    IST-DASLab/gptq, ``gptq.py`` (``add_batch``: the running average over ``nsamples``).
"""

from __future__ import annotations

import torch

from quantlab.exercises.core import Case, Exercise, Mistake
from quantlab.gptq import HessianAccumulator, gptq_quantize_reference
from quantlab.uniform import minmax_fake_quantize, minmax_params

__all__ = ["EXERCISES"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# 05.column_update: err = (w_q - q) / [H⁻¹]_qq; W[:, F] -= err ⊗ H⁻¹[q, F]; eliminate q from H⁻¹


def _ref_columns(W, H, n_bits):
    return gptq_quantize_reference(W, H, n_bits=n_bits, damp=0.0, dtype=torch.float64).Q


def _layer(
    out_f: int, in_f: int, tokens: int, seed: int, correlation: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` ``(out, in)`` and ``H = 2/n XᵀX`` from inputs with correlated, unequally scaled channels."""
    g = _gen(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)  # (out, in)
    shared = torch.randn(tokens, 1, generator=g, dtype=torch.float64)  # (tokens, 1): a common factor
    own = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)  # (tokens, in)
    magnitude = torch.exp(0.5 * torch.randn(in_f, generator=g, dtype=torch.float64))  # (in,)
    X = (correlation * shared + (1 - correlation) * own) * magnitude  # (tokens, in)
    H = 2 / tokens * X.T @ X  # (in, in)
    H = (H + H.T) / 2  # exactly symmetric before rounding to float32
    return W.float(), H.float()


def _columns_cases() -> list[Case]:
    W1, H1 = _layer(8, 6, 64, seed=0)
    W2, H2 = _layer(16, 12, 128, seed=1, correlation=0.6)
    W3, H3 = _layer(4, 24, 96, seed=2, correlation=0.9)
    W4, H4 = _layer(6, 8, 40, seed=3, correlation=0.7)
    W4 = W4 * torch.tensor([[0.01], [0.1], [1.0], [10.0], [1.0], [0.1]])  # rows of very different size
    return [
        Case("4 bits, 6 columns", (W1, H1, 4), "W (8, 6), H from correlated inputs"),
        Case("3 bits, 12 columns", (W2, H2, 3), "W (16, 12)"),
        Case("2 bits, 24 columns", (W3, H3, 2), "W (4, 24), strongly correlated inputs: large updates"),
        Case("rows of different magnitude", (W4, H4, 4), "W (6, 8), rows scaled by 0.01 ... 10"),
    ]


def _columns(W, H, n_bits, update, start=torch.linalg.inv):
    """The lab's loop around one column update; ``update(W, Hinv, H, q, w, w_hat) -> (W, Hinv)``.

    ``start(H)`` is the matrix the loop begins with as ``Hinv`` (a mistake may begin with ``H``).
    """
    scale, zero_point = minmax_params(W, n_bits)  # (out, 1) each, on the original W
    scale, zero_point = scale.double(), zero_point.double()
    W = W.double().clone()  # (out, in)
    H = H.double()
    Hinv = start(H)  # (in, in)
    Q = torch.zeros_like(W)
    for q in range(W.shape[1]):
        w = W[:, q].clone()  # (out,)
        w_hat = minmax_fake_quantize(w[:, None], scale, zero_point, n_bits)[:, 0]  # (out,)
        Q[:, q] = w_hat
        W, Hinv = update(W, Hinv, H, q, w, w_hat)
    return Q


def _eliminate(Hinv, q):
    return Hinv - Hinv[:, q : q + 1] @ Hinv[q : q + 1, :] / Hinv[q, q]  # (in, in)


def _u_squared(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / Hinv[q, q] ** 2
    W[:, q + 1 :] -= err[:, None] * Hinv[q, q + 1 :][None, :]
    return W, _eliminate(Hinv, q)


def _u_times(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) * Hinv[q, q]
    W[:, q + 1 :] -= err[:, None] * Hinv[q, q + 1 :][None, :]
    return W, _eliminate(Hinv, q)


def _u_no_update(W, Hinv, H, q, w, w_hat):
    return W, _eliminate(Hinv, q)


def _u_sign(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / Hinv[q, q]
    W[:, q + 1 :] += err[:, None] * Hinv[q, q + 1 :][None, :]
    return W, _eliminate(Hinv, q)


def _u_no_elimination(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / Hinv[q, q]
    W[:, q + 1 :] -= err[:, None] * Hinv[q, q + 1 :][None, :]
    return W, Hinv


def _u_elimination_not_divided(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / Hinv[q, q]
    W[:, q + 1 :] -= err[:, None] * Hinv[q, q + 1 :][None, :]
    return W, Hinv - Hinv[:, q : q + 1] @ Hinv[q : q + 1, :]


def _u_used_h(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / H[q, q]
    W[:, q + 1 :] -= err[:, None] * H[q, q + 1 :][None, :]
    return W, _eliminate(Hinv, q)


def _correct(W, Hinv, H, q, w, w_hat):
    err = (w - w_hat) / Hinv[q, q]  # (out,)
    W[:, q + 1 :] -= err[:, None] * Hinv[q, q + 1 :][None, :]  # (out, in - q - 1)
    return W, _eliminate(Hinv, q)


def _mistake(update, start=torch.linalg.inv, name=None):
    def fn(W, H, n_bits):
        return _columns(W, H, n_bits, update, start)

    fn.__name__ = name or update.__name__.replace("_u_", "_c_")
    return fn


COLUMN_UPDATE = Exercise(
    id="05.column_update",
    title="The one-column GPTQ/OBS update: spread the rounding error, then eliminate the column",
    signature="gptq_columns(W, H, n_bits) -> Q",
    hint=(
        "spread the error (w - w_hat) / [H⁻¹]_qq over the free columns q+1, ... along row q of H⁻¹ "
        "(Eq. 2, all rows at once), then eliminate q from H⁻¹ (Eq. 3: subtract the outer product of its "
        "column q and row q, divided by the pivot)"
    ),
    reference=_ref_columns,
    cases=_columns_cases,
    output_name="Q",
    rtol=1e-5,
    atol=1e-6,
    mistakes=(
        Mistake(
            "divided the error by [H⁻¹]_qq squared: err = (w_q - w_hat) / [H⁻¹]_qq, once. (A square appears "
            "only in the Cholesky form, where [H⁻¹]_qq = U_qq²: there err = (w_q - w_hat) / U_qq, spread "
            "along U[q, F].)",
            _mistake(_u_squared),
        ),
        Mistake(
            "multiplied the error by [H⁻¹]_qq; divide: err = (w_q - w_hat) / [H⁻¹]_qq (a direction in "
            "which H⁻¹ is large is cheap to move along, so it gets a large share of the error).",
            _mistake(_u_times),
        ),
        Mistake(
            "forgot to update the remaining columns: your Q is plain round-to-nearest. After rounding "
            "column q, subtract err ⊗ H⁻¹[q, F] from the columns F = q+1, ... that are still free.",
            _mistake(_u_no_update),
        ),
        Mistake(
            "sign error in the update: δ_F = -(w_q - w_hat) / [H⁻¹]_qq · H⁻¹[q, F], so W[:, F] -= err ⊗ "
            "H⁻¹[q, F] with err = (w_q - w_hat) / [H⁻¹]_qq. Adding it pushes the error the wrong way "
            "(the loss grows instead of shrinking).",
            _mistake(_u_sign),
        ),
        Mistake(
            "did not remove column q from H⁻¹: after the update, eliminate it (GPTQ Eq. 3): "
            "Hinv -= Hinv[:, q:q+1] @ Hinv[q:q+1, :] / Hinv[q, q]. Without it, later columns use the "
            "inverse Hessian of a problem in which column q could still move.",
            _mistake(_u_no_elimination),
        ),
        Mistake(
            "the elimination must divide the outer product by the pivot: Hinv -= Hinv[:, q:q+1] @ "
            "Hinv[q:q+1, :] / Hinv[q, q] (one step of Gaussian elimination; afterwards row and column q "
            "of Hinv are 0).",
            _mistake(_u_elimination_not_divided),
        ),
        Mistake(
            "used H instead of H⁻¹ in the update: the error is divided by [H⁻¹]_qq and spread along the "
            "row H⁻¹[q, F] of the *inverse* Hessian (H[q, F] has the wrong sign and size).",
            _mistake(_u_used_h),
        ),
        Mistake(
            "used H instead of H⁻¹ throughout (update and elimination): start from Hinv = "
            "torch.linalg.inv(H) and use only Hinv inside the loop.",
            _mistake(_correct, start=torch.clone, name="_c_used_h_everywhere"),
        ),
    ),
)


# -----------------------------------------------------------------------------
# 05.hessian: H = 2/n Σ_batches Σ_tokens x xᵀ, n = number of samples (sequences)


def _ref_hessian(batches):
    acc = HessianAccumulator(batches[0].shape[-1])
    for X in batches:
        acc.add_batch(X)
    return acc.H


def _activations(shapes: list[tuple[int, int, int]], seed: int) -> list[torch.Tensor]:
    """Batches ``(batch, seq, in)`` of activations with a non-zero mean and unequal channels."""
    g = _gen(seed)
    in_f = shapes[0][2]
    mean = torch.randn(in_f, generator=g)  # (in,)
    magnitude = torch.exp(0.5 * torch.randn(in_f, generator=g))  # (in,)
    return [(torch.randn(*shape, generator=g) + mean) * magnitude for shape in shapes]


def _hessian_cases() -> list[Case]:
    return [
        Case(
            "two batches of different sizes",
            (_activations([(2, 12, 8), (4, 6, 8)], seed=0),),
            "(2, 12, 8) and (4, 6, 8): 6 samples, 2 batches, 48 tokens",
        ),
        Case("one batch", (_activations([(3, 5, 6)], seed=1),), "(3, 5, 6): 3 samples, 15 tokens"),
        Case(
            "three batches",
            (_activations([(1, 16, 10), (2, 8, 10), (4, 4, 10)], seed=2),),
            "7 samples, 3 batches, 48 tokens",
        ),
        Case(
            "more features than tokens",
            (_activations([(2, 4, 32), (2, 4, 32)], seed=3),),
            "(2, 4, 32) twice: 4 samples, 16 tokens, 32 features",
        ),
    ]


def _sum_xtx(batches):
    in_f = batches[0].shape[-1]
    H = torch.zeros(in_f, in_f, dtype=torch.float64)
    for X in batches:
        Xf = X.reshape(-1, in_f).double()  # (tokens, in)
        H += Xf.T @ Xf
    return H


def _n_samples(batches):
    return sum(X.shape[0] for X in batches)


def _h_no_two(batches):
    return _sum_xtx(batches) / _n_samples(batches)


def _h_per_batch_count(batches):
    return 2 * _sum_xtx(batches) / len(batches)


def _h_per_token(batches):
    return 2 * _sum_xtx(batches) / sum(X.shape[0] * X.shape[1] for X in batches)


def _h_xxt(batches):
    H = 0
    for X in batches:
        Xf = X.reshape(-1, X.shape[-1]).double()  # (tokens, in)
        H = H + Xf @ Xf.T  # (tokens, tokens)
    return 2 * H / _n_samples(batches)


def _h_overwrite(batches):
    for X in batches:
        Xf = X.reshape(-1, X.shape[-1]).double()  # (tokens, in)
        H = 2 * Xf.T @ Xf / _n_samples(batches)
    return H


def _h_centred(batches):
    in_f = batches[0].shape[-1]
    X = torch.cat([b.reshape(-1, in_f) for b in batches]).double()  # (tokens, in)
    X = X - X.mean(dim=0)
    return 2 * X.T @ X / _n_samples(batches)


HESSIAN = Exercise(
    id="05.hessian",
    title="The layer Hessian H = 2/n Σ x xᵀ from calibration batches",
    signature="accumulate_hessian(batches) -> H",
    hint=(
        "flatten each batch to (tokens, in), add X.T @ X, count the samples (X.shape[0] of each "
        "(batch, seq, in) batch), return 2 * sum / n_samples"
    ),
    reference=_ref_hessian,
    cases=_hessian_cases,
    output_name="H",
    rtol=1e-4,
    atol=1e-5,
    mistakes=(
        Mistake(
            "forgot the factor 2: the Hessian of ||WX - QX||² is 2XᵀX (the derivative of a square), "
            "so H = 2/n Σ x xᵀ.",
            _h_no_two,
        ),
        Mistake(
            "divided by the number of batches: n counts calibration samples (sequences), "
            "sum(X.shape[0] for X in batches), however they were grouped into batches.",
            _h_per_batch_count,
        ),
        Mistake(
            "averaged over tokens: GPTQ's n counts samples (sequences), not tokens. Any positive "
            "factor gives the same GPTQ result, but the reference code (and HessianAccumulator) uses "
            "n = number of sequences, which sets the units of the reported error.",
            _h_per_token,
        ),
        Mistake(
            "computed XXᵀ, a (tokens, tokens) matrix: with X of shape (tokens, in) the Hessian is "
            "XᵀX, (in, in), one entry per pair of input features (the paper writes XXᵀ because its X "
            "is (in, tokens)).",
            _h_xxt,
        ),
        Mistake(
            "overwrote H with each batch: accumulate, H += X.T @ X over every batch, then scale once.",
            _h_overwrite,
        ),
        Mistake(
            "subtracted the mean of the activations: H is the raw second moment Σ x xᵀ, not a "
            "covariance, because the layer's output error (W - Q)x includes the mean of x.",
            _h_centred,
        ),
    ),
)

EXERCISES: tuple[Exercise, ...] = (COLUMN_UPDATE, HESSIAN)
