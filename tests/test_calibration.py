"""Temperature scaling, expected calibration error and flip/rotation test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinfusion.evaluation.calibration import expected_calibration_error, fit_temperature
from skinfusion.inference.tta import tta_flips, tta_transforms


def _overconfident(t_true: float, n: int = 20000, k: int = 5, seed: int = 0):
    """Logits z whose labels are drawn from softmax(z / t_true): z is over-confident when t_true > 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * 3.0
    labels = torch.multinomial((logits / t_true).softmax(dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    logits, labels = _overconfident(t_true)
    assert fit_temperature(logits, labels) == pytest.approx(t_true, rel=0.05)


def test_fit_temperature_accepts_numpy_and_ignores_unknown_labels():
    logits, labels = _overconfident(2.0, n=5000)
    labels = labels.clone()
    labels[:100] = -1
    fitted = fit_temperature(logits.numpy(), labels.numpy())
    assert fitted == pytest.approx(fit_temperature(logits[100:], labels[100:]), rel=1e-6)


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.55, 0.45], [0.99, 0.01]])
    labels = np.array([0, 1, 1, 0, -1])  # the last row is unlabelled and ignored
    # bins of width .2: (.8,1]: {.9 right}; (.6,.8]: {.75 wrong, .7 right}; (.4,.6]: {.55 right}
    expected = 1 / 4 * abs(1 - 0.9) + 2 / 4 * abs(0.5 - 0.725) + 1 / 4 * abs(1 - 0.55)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    assert expected == pytest.approx(0.25)


def test_ece_upper_bin_edge_is_inclusive():
    # confidence exactly 0.8 belongs to (0.6, 0.8] with 5 bins: one bin, |1 - 0.8|
    probs = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
    assert expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=5) == pytest.approx(0.2)
    assert expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=1) == pytest.approx(0.2)


def test_temperature_scaling_reduces_ece():
    logits, labels = _overconfident(3.0, seed=1)
    fit_logits, fit_labels = logits[:10000], labels[:10000]
    test_logits, test_labels = logits[10000:], labels[10000:]
    temperature = fit_temperature(fit_logits, fit_labels)
    before = expected_calibration_error(test_logits.softmax(1), test_labels)
    after = expected_calibration_error((test_logits / temperature).softmax(1), test_labels)
    assert before > 0.1
    assert after < 0.03
    assert after < before / 4


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 3, 0]), "class indices"),
        (torch.zeros(4, 3), torch.tensor([0, 1]), "expected"),
        (torch.zeros(2, 3), torch.tensor([-1, -1]), "no labelled"),
    ],
)
def test_bad_calibration_inputs_raise_value_error(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(logits.softmax(1), labels)


def test_ece_bad_bins():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.full((2, 2), 0.5), torch.tensor([0, 1]), n_bins=0)


# ---------------------------------------------------------------------------------------------
# Test-time augmentation
# ---------------------------------------------------------------------------------------------


def _equivariant_fn(image):
    """Mask logits = the first channel (flip/rotation-equivariant); class logits = channel means (invariant)."""
    return image[:, :1], image.mean(dim=(2, 3))


@pytest.mark.parametrize("rot90", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 3, 6, 10)])
def test_tta_of_equivariant_model_equals_plain_output(rot90, shape):
    image = torch.randn(*shape)
    mask, classes = tta_flips(_equivariant_fn, image, rot90=rot90)
    plain_mask, plain_classes = _equivariant_fn(image)
    torch.testing.assert_close(mask, plain_mask)
    torch.testing.assert_close(classes, plain_classes)


def test_tta_probability_averaging_keeps_logit_type():
    image = torch.randn(2, 3, 8, 8)
    mask, classes = tta_flips(_equivariant_fn, image, average="probs")
    plain_mask, plain_classes = _equivariant_fn(image)
    torch.testing.assert_close(mask, plain_mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(classes.softmax(1), plain_classes.softmax(1))


def test_tta_averages_the_unflipped_views():
    # a model that is not flip-equivariant: it weights columns by a ramp
    ramp = torch.arange(4.0)

    def fn(image):
        return image[:, :1] * ramp, None

    image = torch.randn(1, 1, 4, 4)
    mask, classes = tta_flips(fn, image)
    assert classes is None
    # identity and vflip see the ramp, hflip and rot180 its mirror, once undone
    expected = image * (ramp + ramp.flip(0)) / 2
    torch.testing.assert_close(mask, expected)


def test_tta_accepts_skinfusion_output_and_counts_views():
    from skinfusion.nn.output import SkinFusionOutput

    calls = []

    def fn(image):
        calls.append(image.shape)
        return SkinFusionOutput(image[:, :1], None, {})

    mask, classes = tta_flips(fn, torch.randn(1, 3, 4, 6), rot90=True)
    assert len(calls) == len(tta_transforms(rot90=True)) == 8
    assert sorted(set(calls)) == [(1, 3, 4, 6), (1, 3, 6, 4)]
    assert mask.shape == (1, 1, 4, 6)
    assert classes is None
    assert len(tta_transforms()) == 4


def test_tta_bad_arguments():
    with pytest.raises(ValueError, match="B,C,H,W"):
        tta_flips(_equivariant_fn, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="average"):
        tta_flips(_equivariant_fn, torch.zeros(1, 3, 4, 4), average="median")
