"""Late fusion of clinical metadata (``meta_fusion="late"``, skinfusion.nn.late_fusion).

The metadata model is checked against scikit-learn's logistic regression (the same penalised likelihood, solved
independently), the fusion against Bayes' rule computed by hand, and the network's contract: the image-only
diagnosis is the image network's own, "unknown" adds nothing, and training fits the model from the data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modelutil import tiny_net
from sklearn.linear_model import LogisticRegression

from skinfusion.data.dataset import META_DIM, encode_metadata, unknown_metadata
from skinfusion.nn.late_fusion import MetadataLateFusion

SITES = ["back", "face", "lower extremity", "trunk"]


def _metadata(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded metadata whose class (0..3) depends on age and site, with noise; a quarter of the rows unknown."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    rows = []
    for i, y in enumerate(labels):
        if i % 4 == 3:
            rows.append(encode_metadata({}))
            continue
        age = 30 + 15 * y + rng.normal(0, 10)
        site = SITES[y] if rng.random() < 0.7 else SITES[rng.integers(0, 4)]
        rows.append(encode_metadata({"age": age, "sex": "male" if rng.random() < 0.5 else "female", "site": site}))
    return torch.from_numpy(np.stack(rows)), torch.from_numpy(labels)


def test_fit_is_scikit_learns_logistic_regression_on_the_rows_with_metadata():
    meta, labels = _metadata(400)
    model = MetadataLateFusion.for_encoded_metadata(META_DIM, 4)
    model.fit(meta, labels)
    known = model.known(meta)
    assert known.sum() == 300
    x = meta[known].double().numpy()  # float64: scikit-learn solves float32 input in float32 (errors ~1e-4)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x, labels[known].numpy())
    log_p = torch.log_softmax(meta.double() @ model.weight.double().T + model.bias.double(), dim=1)
    np.testing.assert_allclose(log_p[known].exp().numpy(), reference.predict_proba(x), atol=1e-5)
    # The prior is the training rows' class frequencies (add-one smoothed).
    counts = np.bincount(labels[known].numpy(), minlength=4)
    np.testing.assert_allclose(model.log_prior.exp().numpy(), (counts + 1) / (counts.sum() + 4), rtol=1e-6)
    # A class the training rows never show is not informative (forward gives it no evidence).
    five = MetadataLateFusion.for_encoded_metadata(META_DIM, 5)
    five.fit(meta, labels)
    assert five.informative.tolist() == [1, 1, 1, 1, 0]


def test_forward_is_bayes_evidence_and_zero_without_metadata():
    meta, labels = _metadata(200)
    model = MetadataLateFusion.for_encoded_metadata(META_DIM, 5)
    model.fit(meta, labels)
    evidence = model(meta)
    known = model.known(meta)
    log_p = torch.log_softmax(meta @ model.weight.T + model.bias, dim=1)
    expected = (log_p - model.log_prior)[:, :4]
    torch.testing.assert_close(evidence[known][:, :4], expected[known])
    assert (evidence[:, 4] == 0).all()  # a class the metadata model never saw gets no evidence, not a veto
    assert (evidence[~known] == 0).all()
    assert (model(unknown_metadata(meta)) == 0).all()
    # One known field is metadata: age alone moves the evidence.
    age_only = torch.from_numpy(encode_metadata({"age": 80}))[None]
    assert model.known(age_only).all()
    assert model(age_only).abs().sum() > 0


def test_an_unfitted_model_adds_nothing_and_fit_needs_metadata():
    model = MetadataLateFusion.for_encoded_metadata(META_DIM, 3)
    meta, _ = _metadata(8)
    assert not model.fitted
    assert (model(meta) == 0).all()
    with pytest.raises(ValueError, match="no training image has clinical metadata"):
        model.fit(unknown_metadata(meta), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="meta_dim"):
        MetadataLateFusion.for_encoded_metadata(META_DIM + 1, 3)


def test_network_adds_the_evidence_only_in_eval_mode_and_keeps_image_only_logits():
    torch.manual_seed(0)
    kwargs = {"decoder": False, "fusion": "none", "attention": None, "attention_placement": [], "num_classes": 4}
    kwargs["dropout"] = 0.0
    net = tiny_net(0, meta_dim=META_DIM, meta_fusion="late", **kwargs)
    plain = tiny_net(0, **kwargs)
    assert net.meta is None  # no metadata branch: the classifier reads the image only
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("late_fusion.")})
    meta, labels = _metadata(64)
    net.late_fusion.fit(meta, labels)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    net.eval(), plain.eval()
    with torch.no_grad():
        image_logits = plain(images).class_logits
        fused = net(images, meta).class_logits
        without = net(images, unknown_metadata(meta)).class_logits
        net.train(), plain.train()
        training, plain_training = net(images, meta).class_logits, plain(images).class_logits
    torch.testing.assert_close(without, image_logits)  # image only: exactly the image network
    torch.testing.assert_close(training, plain_training)  # training sees no metadata: no shortcut to learn
    torch.testing.assert_close(fused, image_logits + net.late_fusion(meta))
    assert (fused - without).abs().max() > 0.1
    with pytest.raises(ValueError, match="pass meta"):
        net(images)
    with pytest.raises(ValueError, match="unknown meta_fusion"):
        tiny_net(0, meta_dim=META_DIM, meta_fusion="early", **kwargs)


def test_fit_fits_late_fusion_from_the_training_split_and_the_checkpoint_carries_it(tmp_path):
    """Training on synthetic data (which has age, sex and site) fits the metadata model; the checkpoint keeps it."""
    import pytorch_lightning as pl

    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.inference.predictor import load_model
    from skinfusion.training.module import SkinFusionModule

    datamodule = SkinFusionDataModule(
        synthetic_samples=32, synthetic_size=32, image_size=32, batch_size=4, num_workers=0, use_metadata=True
    )
    module = SkinFusionModule(tiny_net(0, meta_dim=META_DIM, meta_fusion="late"))
    assert not module.net.late_fusion.fitted
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule)
    records = [r for r in datamodule.records("train") if r.label in module.class_names]
    meta = torch.from_numpy(np.stack([encode_metadata(r.meta) for r in records]))
    assert module.net.late_fusion.known(meta).sum() > 0  # the synthetic set has metadata: the fit had rows
    labels = torch.tensor([module.class_names.index(r.label) for r in records])
    reference = MetadataLateFusion.for_encoded_metadata(META_DIM, len(module.class_names))
    reference.fit(meta, labels)
    torch.testing.assert_close(module.net.late_fusion.weight.cpu(), reference.weight)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    net, settings = load_model(tmp_path / "trained.ckpt")
    assert settings.net_config["meta_fusion"] == "late"
    torch.testing.assert_close(net.late_fusion.weight.cpu(), reference.weight)


def test_fit_refuses_late_fusion_without_metadata_in_the_training_split(tmp_path):
    import pytorch_lightning as pl

    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.errors import DataError
    from skinfusion.training.module import SkinFusionModule

    manifest = tmp_path / "data" / "manifest.csv"
    from skinfusion.data.synthetic import write_synthetic

    write_synthetic(manifest.parent, n=16, seed=0, size=32)
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in ("age", "sex", "site")]
    manifest.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n")
    datamodule = SkinFusionDataModule(
        manifest=str(manifest), image_size=32, batch_size=4, num_workers=0, use_metadata=True
    )
    module = SkinFusionModule(tiny_net(0, meta_dim=META_DIM, meta_fusion="late"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False)
    with pytest.raises(DataError, match="needs training images with age, sex or site"):
        trainer.fit(module, datamodule)
