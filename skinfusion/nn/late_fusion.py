"""Late fusion of clinical metadata: a metadata-only model's evidence added to the image network's logits.

The network learns the diagnosis from the image alone; a multinomial logistic regression on the encoded age,
sex and site (:func:`~skinfusion.data.dataset.encode_metadata`), fitted on the training images that have them,
gives ``log p(c | metadata)``. At inference, an image whose metadata is known gets

    class_logits + log p(c | metadata) - log p(c)

(Bayes' rule with the metadata model's own class prior divided out, as if image and metadata were independent
given the class), and an image without metadata keeps the image network's logits. So "metadata unknown" can
never mark a data set (the shortcut a metadata branch learns when one source has metadata and another has not),
and the image-only diagnosis is exactly the image network's. The fitted model is a few buffers of the network:
checkpoints, safetensors, Hugging Face folders and exports carry it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MetadataLateFusion"]


class MetadataLateFusion(nn.Module):
    """The metadata model of late fusion: ``forward(meta)`` gives the log-likelihood ratio to add to the logits.

    Args:
        meta_dim: width of the encoded metadata.
        num_classes: classes of the network.
        unknown_flags: indices of the encoded vector's "missing" flags (age, sex, site); a row with all of them
            set has no metadata and gets zeros.

    Shape:
        forward: meta (B, meta_dim) -> (B, num_classes); zeros until :meth:`fit` ran.
    """

    def __init__(self, meta_dim: int, num_classes: int, unknown_flags: tuple[int, ...]) -> None:
        super().__init__()
        if meta_dim < 1 or num_classes < 1:
            raise ValueError(f"meta_dim and num_classes must be positive, got {meta_dim}, {num_classes}")
        if any(not 0 <= i < meta_dim for i in unknown_flags):
            raise ValueError(f"unknown_flags {unknown_flags} out of range for meta_dim {meta_dim}")
        self.unknown_flags = tuple(unknown_flags)
        self.register_buffer("weight", torch.zeros(num_classes, meta_dim))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("log_prior", torch.zeros(num_classes))
        #: 1 for a class the metadata model saw in training; the others get no evidence (0), not a veto.
        self.register_buffer("informative", torch.zeros(num_classes))

    @classmethod
    def for_encoded_metadata(cls, meta_dim: int, num_classes: int) -> MetadataLateFusion:
        """The late fusion of :func:`~skinfusion.data.dataset.encode_metadata`'s vectors (its three "missing" flags).

        Raises:
            ValueError: ``meta_dim`` is not that encoding's width.
        """
        from skinfusion.data.dataset import META_DIM, SEXES

        if meta_dim != META_DIM:
            raise ValueError(f"late fusion reads encode_metadata's vectors (meta_dim={META_DIM}), got {meta_dim}")
        return cls(meta_dim, num_classes, unknown_flags=(1, 2 + len(SEXES), META_DIM - 1))

    @property
    def fitted(self) -> bool:
        return bool(self.informative.any())

    @torch.no_grad()
    def fit(self, meta: Tensor, labels: Tensor, l2: float = 1.0, max_iter: int = 500) -> None:
        """Fit the logistic regression (L-BFGS, L2 penalty ``l2 / 2 * ||W||^2`` on the summed loss, as
        scikit-learn's ``LogisticRegression(C=1 / l2)``) on rows of encoded metadata with at least one known
        field, and the classes' prior among them (add-one smoothed)."""
        meta = meta.detach().to(torch.float64).cpu()
        labels = labels.detach().to(torch.long).cpu()
        known = self.known(meta)
        meta, labels = meta[known], labels[known]
        k, d = self.weight.shape
        if len(labels) == 0:
            raise ValueError("no training image has clinical metadata: late fusion has nothing to fit")
        weight = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            max_iter=max_iter,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )
        n = len(labels)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(meta @ weight.T + bias, labels, reduction="sum")
            loss = (loss + 0.5 * l2 * weight.pow(2).sum()) / n
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        self.weight.copy_(weight.detach())
        self.bias.copy_(bias.detach())
        self.log_prior.copy_(torch.log((counts + 1) / (counts.sum() + k)))
        self.informative.copy_((counts > 0).to(self.informative.dtype))

    def known(self, meta: Tensor) -> Tensor:
        """Rows with at least one known field (not every "missing" flag set)."""
        return (meta[:, list(self.unknown_flags)] < 0.5).any(dim=1)

    def forward(self, meta: Tensor) -> Tensor:
        log_p = torch.log_softmax(meta.to(self.weight.dtype) @ self.weight.T + self.bias, dim=1)
        evidence = (log_p - self.log_prior) * self.informative
        return evidence * self.known(meta).unsqueeze(1).to(evidence.dtype)
