"""Property tests over malformed inputs: only documented errors escape, nothing written is damaged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from skinfusion.data.imageio import read_image, read_mask
from skinfusion.data.readers import create_reader
from skinfusion.data.transforms import build_transforms
from skinfusion.errors import DataError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _attempt(fn, *args, **kwargs):
    """``(result, None)``, or ``(None, error)`` for a DataError; any other exception propagates (fails the test)."""
    try:
        return fn(*args, **kwargs), None
    except DataError as error:
        return None, error


def _encoded(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded(fmt, mode, (13, 9)) for fmt, mode in [("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("BMP", "RGB")]]


@st.composite
def malformed_files(draw) -> bytes:
    """Random bytes, or a valid image truncated, with bytes flipped, or with junk appended."""
    kind = draw(st.sampled_from(["random", "truncate", "flip", "append"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "append":
        return bytes(data) + draw(st.binary(min_size=1, max_size=64))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(data=malformed_files(), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_read_image_raises_only_data_error(tmp_path, data, suffix):
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    image, error = _attempt(read_image, path, max_side=int(np.random.default_rng(len(data)).integers(4, 32)))
    if error is not None:
        assert str(path) in str(error)
    else:
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3
    assert path.read_bytes() == data  # reading never modifies the file


@FUZZ
@given(data=malformed_files())
def test_read_mask_raises_only_data_error(tmp_path, data):
    path = tmp_path / "mask.png"
    path.write_bytes(data)
    mask, error = _attempt(read_mask, path)
    if error is not None:
        assert str(path) in str(error)
    else:
        assert mask.dtype == np.uint8
        assert mask.ndim == 2
        assert set(np.unique(mask).tolist()) <= {0, 1}


@FUZZ
@given(values=st.lists(st.integers(0, 255), min_size=1, max_size=6, unique=True))
def test_read_mask_accepts_exactly_binary_values(tmp_path, values):
    array = np.array(values * 4, dtype=np.uint8)[: 4 * len(values)].reshape(4, len(values))
    path = tmp_path / "mask.png"
    Image.fromarray(array, "L").save(path)
    binary = set(values) <= {0, 255} or set(values) <= {0, 1}
    if binary:
        assert set(np.unique(read_mask(path)).tolist()) <= {0, 1}
    else:
        with pytest.raises(DataError, match="not binary"):
            read_mask(path)


_CELL = st.text(alphabet=st.sampled_from(list("abcMELNV01.,;\"' \n\t/_-") + ["é", "\x00"]), max_size=12)


@FUZZ
@given(
    header=st.lists(
        st.sampled_from(["image", "mask", "label", "split", "age", "sex", "site", "id", "x", ""]), max_size=6
    ),
    rows=st.lists(st.lists(_CELL, max_size=7), max_size=5),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
)
def test_manifest_reader_raises_only_data_error(tmp_path, header, rows, raw):
    path = tmp_path / "manifest.csv"
    if raw is not None:
        path.write_bytes(raw)
    else:
        lines = [",".join(header), *(",".join(cell.replace("\n", " ") for cell in row) for row in rows)]
        path.write_text("\n".join(lines), encoding="utf-8")
    try:
        records = create_reader("manifest", path).read()
    except DataError:
        return
    for record in records:
        assert record.image is not None


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    stage=st.sampled_from(["train", "val"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_transforms_handle_any_image_size(height, width, stage, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (height, width), dtype=np.uint8)
    transform = build_transforms(stage, image_size=16, normalization="unit", color_jitter=0.2, seed=seed)
    out = transform(image=image, mask=mask)
    assert tuple(out["image"].shape) == (3, 16, 16)
    assert tuple(out["mask"].shape) == (1, 16, 16)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert float(out["image"].min()) >= 0.0
    assert float(out["image"].max()) <= 1.0


def _write_pair(folder: Path, name: str) -> tuple[str, str]:
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 6:18] = 255
    Image.fromarray(mask).save(folder / f"{name}_segmentation.png")
    return f"{name}.png", f"{name}_segmentation.png"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=malformed_files(), victim=st.integers(0, 5), target=st.sampled_from(["image", "mask"]))
def test_failing_prepare_leaves_earlier_output_intact(tmp_path_factory, data, victim, target):
    from skinfusion.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepare")
    rows = ["image,mask,label"]
    for i in range(6):
        image, mask = _write_pair(root, f"ISIC_{i:07d}")
        rows.append(f"{image},{mask},{['MEL', 'NV'][i % 2]}")
    manifest = root / "sources.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = root / "out"
    prepare([f"manifest:{manifest}"], out, size=16, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "manifest.csv" in before

    broken = root / f"ISIC_{victim:07d}{'' if target == 'image' else '_segmentation'}.png"
    broken.write_bytes(data)
    try:
        prepare([f"manifest:{manifest}"], out, size=16, workers=1, progress=False)
    except DataError:
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after.get(out / "manifest.csv") == before[out / "manifest.csv"]
        assert {p: b for p, b in after.items() if p in before} == before  # nothing written earlier changed


def test_predict_path_raises_only_data_error(tmp_path, tiny_net):
    predict = pytest.importorskip("skinfusion.inference.predictor")
    if not hasattr(predict, "Predictor"):
        pytest.skip("skinfusion.inference.predictor has no Predictor yet")

    net = tiny_net()
    good = tmp_path / "ISIC_0000001.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(good)
    for i, data in enumerate([b"", b"not an image", SEEDS[0][:40], SEEDS[2][:-30]]):
        bad = tmp_path / f"ISIC_{i + 2:07d}.png"
        bad.write_bytes(data)
        predictor = predict.Predictor(net, image_size=32, device="cpu", progress=False)
        results, error = _attempt(lambda p=predictor, b=bad: list(p.predict_paths([good, b])))
        if error is not None:
            assert bad.name in str(error)
        else:
            assert len(results) >= 1
