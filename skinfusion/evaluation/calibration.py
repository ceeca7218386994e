"""Probability calibration.

* Temperature scaling (C. Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
  one scalar ``T`` fitted on validation logits by minimising the negative log-likelihood of
  ``softmax(logits / T)``; it changes confidences, never the predicted class.
* Expected calibration error (Naeini et al., AAAI 2015; as in Guo et al.): top-label confidence
  in equal-width bins.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(values: torch.Tensor | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def _known(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected (N,K) scores and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if ((labels < -1) | (labels >= logits.shape[1])).any():
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}) or -1 (unknown)")
    known = labels >= 0
    if not known.any():
        raise ValueError("no labelled samples")
    return logits[known], labels[known]


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, max_iter: int = 100) -> float:
    """The temperature ``T`` (> 1 softens over-confident predictions) that minimises the NLL of ``softmax(logits / T)``.

    ``logits`` (N,K) of a held-out set, ``labels`` (N,) class indices (-1: unknown, ignored). L-BFGS with a
    strong-Wolfe line search on ``log T`` (so ``T`` stays positive), from ``T = 1``.

    Raises:
        ValueError: on inconsistent shapes, out-of-range labels or no labelled row.
    """
    logits, labels = _known(_as_tensor(logits, torch.float64), _as_tensor(labels, torch.int64))
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_temperature.detach().exp())


def expected_calibration_error(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, n_bins: int = 15
) -> float:
    """Top-label expected calibration error in [0, 1], with ``n_bins`` equal-width confidence bins over [0, 1].

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` where the confidence is the highest
    probability of a row of ``probs`` (N,K), bin ``b`` holds confidences in ``((b-1)/n_bins, b/n_bins]``, and
    the prediction is the arg-max (first index on a tie). ``labels`` (N,): class indices, -1 (unknown) ignored.

    Raises:
        ValueError: on inconsistent shapes, out-of-range labels, or ``n_bins < 1``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = _known(_as_tensor(probs, torch.float64), _as_tensor(labels, torch.int64))
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).to(torch.float64)
    # bin b holds (b/n, (b+1)/n]: ceil(conf * n) - 1, with a confidence of exactly 0 in bin 0
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    confidence_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((confidence_sum - correct_sum).abs().sum() / labels.numel())
