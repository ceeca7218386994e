"""Bad-input tests: every kind of broken file gives a DataError naming the file and the reason."""

from __future__ import annotations

import numpy as np
import pytest
from imgutil import disk, rgb, save
from PIL import Image, ImageFile

from skinfusion.data.imageio import image_size, read_image, read_mask
from skinfusion.data.readers import ManifestReader
from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.data.validate import (
    check_inside_root,
    check_unique_ids,
    load_record,
    validate_record,
    validate_records,
)
from skinfusion.errors import DataError


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture
def good(tmp_path):
    image = save(tmp_path / "img" / "ISIC_0000001.jpg", rgb(40, 30), quality=95)
    mask = save(tmp_path / "msk" / "ISIC_0000001_segmentation.png", disk(40, 30))
    return Record(image=image, mask=mask, label="MEL")


def test_good_record_has_no_problems(good):
    assert validate_record(good, ISIC_CLASSES) == []
    loaded = load_record(good, ISIC_CLASSES)
    assert loaded.image.shape == (30, 40, 3)
    assert loaded.orig_size == (40, 30)
    np.testing.assert_array_equal(loaded.mask, disk(40, 30) // 255)


def test_load_truncated_images_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match="file not found") as info:
        read_image(path)
    assert info.value.path == str(path)
    problems = validate_record(Record(image=path), ISIC_CLASSES)
    assert [p.path for p in problems] == [str(path)]


@pytest.mark.parametrize(("name", "kwargs"), [("t.jpg", {"quality": 95}), ("t.png", {})])
def test_truncated_image(tmp_path, name, kwargs):
    path = _truncate(save(tmp_path / name, rgb(64, 48), **kwargs))
    with pytest.raises(DataError, match="truncated") as info:
        read_image(path)
    assert info.value.path == str(path)
    # Reduced-resolution decoding still reads every block, so truncation is still found.
    with pytest.raises(DataError, match="truncated"):
        read_image(path, max_side=8)


def test_truncated_mask(tmp_path, good):
    mask = _truncate(save(tmp_path / "m.png", np.tile(disk(40, 30), (1, 1))), keep=0.6)
    problems = validate_record(Record(image=good.image, mask=mask), ISIC_CLASSES)
    assert len(problems) == 1
    assert problems[0].path == str(mask)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty file") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("this is not a JPEG")
    with pytest.raises(DataError, match="not a recognised image"):
        read_image(path)


def test_mask_size_mismatch(tmp_path, good):
    mask = save(tmp_path / "m.png", disk(30, 30))
    record = Record(image=good.image, mask=mask)
    problems = validate_record(record)
    assert len(problems) == 1
    assert problems[0].path == str(mask)
    assert "mask is 30x30 but image ISIC_0000001.jpg is 40x30" in problems[0].reason
    with pytest.raises(DataError, match="mask is 30x30"):
        load_record(record)


def test_rgb_mask_with_differing_channels_is_an_error(tmp_path):
    m = np.stack([disk(), disk(), np.zeros_like(disk())], axis=-1)
    path = save(tmp_path / "m.png", m)
    with pytest.raises(DataError, match="colour channels that differ") as info:
        read_mask(path)
    assert info.value.path == str(path)


def test_rgb_mask_with_equal_channels_is_accepted(tmp_path):
    path = save(tmp_path / "m.png", np.stack([disk()] * 3, axis=-1))
    np.testing.assert_array_equal(read_mask(path), disk() // 255)


def test_non_binary_mask_names_values(tmp_path):
    m = disk()
    m[0, 0] = 128
    path = save(tmp_path / "m.png", m)
    with pytest.raises(DataError, match=r"not binary: values \{0, 128, 255\}") as info:
        read_mask(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(disk() // 255),  # {0,1}
        lambda: Image.fromarray(disk()).convert("1"),  # bilevel
        lambda: Image.fromarray(disk().astype(np.uint16) * 257),  # 16-bit {0,65535}
        lambda: Image.fromarray(disk()).convert("P"),  # palette
    ],
    ids=["0-1", "bilevel", "16bit", "palette"],
)
def test_binary_mask_encodings(tmp_path, make):
    path = tmp_path / "m.png"
    make().save(path)
    np.testing.assert_array_equal(read_mask(path), disk() // 255)


def test_16bit_grayscale_image_is_scaled(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.shape == (1, 4, 3)
    # v * 255 / 65535 rounded: 0, 1, 127.5 -> 128, 255.
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_rgba_drops_alpha(tmp_path):
    a = np.dstack([rgb(), np.full((24, 32), 10, np.uint8)])
    path = save(tmp_path / "a.png", a)
    np.testing.assert_array_equal(read_image(path), rgb())


def test_grayscale_becomes_three_channels(tmp_path):
    g = rgb()[..., 0]
    path = save(tmp_path / "g.png", g)
    out = read_image(path)
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_palette_image_maps_through_palette(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])


def test_exif_rotated_jpeg(tmp_path):
    # Stored 40 wide x 30 high, tagged orientation 6 ("rotate 90 CW to display"): upright it is 30x40.
    stored = rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "ISIC_0000002.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    assert image_size(path) == (30, 40)
    out = read_image(path)
    assert out.shape == (40, 30, 3)
    expected = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 3
    upright_mask = save(tmp_path / "up.png", disk(30, 40))
    assert validate_record(Record(image=path, mask=upright_mask)) == []
    stored_mask = save(tmp_path / "stored.png", disk(40, 30))
    problems = validate_record(Record(image=path, mask=stored_mask))
    assert len(problems) == 1
    assert "after EXIF orientation" in problems[0].reason


def test_unknown_class(good):
    record = Record(image=good.image, mask=good.mask, label="XYZ")
    problems = validate_record(record, ISIC_CLASSES)
    assert len(problems) == 1
    assert problems[0].path == str(good.image)
    assert "unknown class 'XYZ'" in problems[0].reason


def test_duplicate_id(tmp_path):
    a = save(tmp_path / "a" / "ISIC_0000009.jpg", rgb())
    b = save(tmp_path / "b" / "ISIC_0000009.jpg", rgb(seed=1))
    records = [Record(image=a, source="x"), Record(image=b, source="y")]
    with pytest.raises(DataError, match="duplicate image id") as info:
        check_unique_ids(records)
    assert "ISIC_0000009" in str(info.value)
    assert str(b) in str(info.value)
    assert any("duplicate image id" in p.reason for p in validate_records(records))


def test_manifest_path_escaping_root(tmp_path):
    outside = save(tmp_path / "outside.jpg", rgb())
    root = tmp_path / "ds"
    root.mkdir()
    csv_path = root / "manifest.csv"
    for bad in ("../outside.jpg", str(outside)):
        csv_path.write_text(f"image,mask,label,lesion_id\n{bad},,MEL,\n")
        with pytest.raises(DataError, match="escapes its root") as info:
            ManifestReader(csv_path).read()
        assert info.value.path == str(csv_path)
        assert "line 2" in info.value.reason
        assert bad in info.value.reason
        (record,) = ManifestReader(csv_path, allow_outside_root=True).read()
        assert record.image == outside.resolve()


def test_check_inside_root_accepts_inside(tmp_path):
    assert check_inside_root("a/../b.jpg", tmp_path) == (tmp_path / "b.jpg").resolve()


def test_image_too_large(tmp_path):
    path = save(tmp_path / "big.png", rgb(40, 30))
    with pytest.raises(DataError, match="too large: 40x30 = 1200 pixels exceeds the limit of 1000") as info:
        read_image(path, max_pixels=1000)
    assert info.value.path == str(path)
    assert read_image(path, max_pixels=1200).shape == (30, 40, 3)
    problems = validate_record(Record(image=path), max_pixels=1000)
    assert "too large" in problems[0].reason


def test_reduced_decoding_matches_full_decoding(tmp_path):
    path = save(tmp_path / "big.jpg", rgb(800, 600), quality=95)
    fast = read_image(path, max_side=100)
    full = read_image(path, max_side=100, reduce=False)
    assert fast.shape == full.shape == (75, 100, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2
    short = read_image(path, max_side=100, side="shortest")
    assert short.shape == (100, 133, 3)
    assert read_image(path, max_side=2000).shape == (600, 800, 3)  # never upscaled
