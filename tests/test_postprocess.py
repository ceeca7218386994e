"""Mask post-processing: each step on a small hand-made map."""

from __future__ import annotations

import numpy as np
import pytest

from skinfusion.inference.postprocess import PostProcess, resize_probability


def _square(shape=(20, 20), top=5, left=5, size=8, value=0.9, background=0.1):
    prob = np.full(shape, background, dtype=np.float32)
    prob[top : top + size, left : left + size] = value
    return prob


def test_threshold_is_strict_and_configurable():
    prob = np.array([[0.4, 0.5, 0.6, 0.8]], dtype=np.float32)
    plain = PostProcess(threshold=0.5, fill_holes=False, largest_component=False)
    np.testing.assert_array_equal(plain(prob), [[False, False, True, True]])
    high = PostProcess(threshold=0.7, fill_holes=False, largest_component=False)
    np.testing.assert_array_equal(high(prob), [[False, False, False, True]])


def test_hole_is_filled():
    prob = _square()
    prob[8:10, 8:10] = 0.0  # a 2x2 hole inside the 8x8 lesion
    np.testing.assert_array_equal(PostProcess()(prob), _square() > 0.5)
    assert PostProcess(fill_holes=False)(prob).sum() == 64 - 4


def test_region_open_to_the_border_is_not_a_hole():
    prob = np.zeros((10, 10), dtype=np.float32)
    prob[:, 2:8] = 0.9
    prob[:6, 4:6] = 0.0  # a notch open to the top edge
    assert PostProcess()(prob).sum() == 60 - 12


def test_small_component_is_removed():
    prob = _square()
    prob[0:2, 17:19] = 0.9  # a 2x2 speck far from the lesion
    lesion = _square() > 0.5
    np.testing.assert_array_equal(PostProcess(largest_component=True)(prob), lesion)
    np.testing.assert_array_equal(PostProcess(largest_component=False, min_size=5)(prob), lesion)
    assert PostProcess(largest_component=False)(prob).sum() == 64 + 4


def test_diagonal_neighbours_are_one_component():
    prob = np.zeros((6, 6), dtype=np.float32)
    prob[0:2, 0:2] = 0.9  # 4 px
    prob[2:5, 2:5] = 0.9  # 9 px touching the first square at a corner (8-connectivity)
    assert PostProcess()(prob).sum() == 13


def test_opening_removes_one_pixel_spur():
    prob = _square()
    prob[9, 13:19] = 0.9  # a 1-px wide, 6-px long strand sticking out to the right
    out = PostProcess(opening_radius=1)(prob)
    # gone, but for its root pixel that the disk still covers from inside the lesion
    assert not out[9, 14:19].any()
    # the lesion body survives (a radius-1 disk only rounds off its four corners)
    assert out[6:12, 6:12].all()
    assert 64 - 4 <= out.sum() <= 64 + 1
    assert PostProcess(opening_radius=0)(prob)[9, 13:19].all()


def test_empty_stays_empty():
    prob = np.full((8, 8), 0.2, dtype=np.float32)
    out = PostProcess(opening_radius=1)(prob)
    assert out.dtype == bool
    assert out.shape == (8, 8)
    assert not out.any()


def test_fallback_keeps_the_region_around_the_argmax():
    prob = np.full((10, 10), 0.05, dtype=np.float32)
    prob[2:5, 2:5] = 0.3  # the most probable region, all below the threshold
    prob[3, 3] = 0.4
    prob[7:9, 7:9] = 0.25  # above half the maximum but not connected to the argmax
    out = PostProcess(fallback=True)(prob)
    expected = np.zeros((10, 10), dtype=bool)
    expected[2:5, 2:5] = True
    np.testing.assert_array_equal(out, expected)
    assert not PostProcess(fallback=True)(np.zeros((4, 4), dtype=np.float32)).any()
    assert not PostProcess(fallback=False)(prob).any()


def test_bool_mask_input_skips_threshold():
    mask = _square() > 0.5
    mask[8, 8] = False
    np.testing.assert_array_equal(PostProcess(threshold=0.99)(mask), _square() > 0.5)


def test_resize_probability_is_bilinear_with_pixel_centres():
    prob = np.array([[0.0, 1.0]], dtype=np.float32)
    # output pixel x samples source x' = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped)
    out = resize_probability(prob, (4, 1))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    assert resize_probability(np.zeros((3, 5)), (7, 2)).shape == (2, 7)


def test_postprocess_resizes_before_thresholding():
    prob = np.array([[0.0, 1.0]], dtype=np.float32)
    out = PostProcess(fill_holes=False, largest_component=False)(prob, size=(4, 1))
    # thresholding the upsampled map, not upsampling the 2-px mask: 0.25 and 0.75 split
    np.testing.assert_array_equal(out, [[False, False, True, True]])
    assert PostProcess()(np.zeros((4, 4), np.float32), size=(600, 400)).shape == (400, 600)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": 1.0}, "threshold"), ({"opening_radius": -1}, "opening_radius"), ({"min_size": -2}, "min_size")],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostProcess(**kwargs)


@pytest.mark.parametrize(
    ("prob", "match"), [(np.zeros((2, 4, 4), np.float32), "2-D"), (np.zeros((4, 4), np.uint8), "dtype")]
)
def test_bad_maps_raise_value_error(prob, match):
    with pytest.raises(ValueError, match=match):
        PostProcess()(prob)


def test_resize_probability_bad_size():
    with pytest.raises(ValueError, match="size"):
        resize_probability(np.zeros((4, 4)), (0, 4))
