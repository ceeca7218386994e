"""The web demo (``skinfusion demo``): the analysis behind the page, the toy model cache, and the page itself
in a real browser (the system chromium driven by playwright; skipped where either is missing)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from browserutil import CHROMIUM, CHROMIUM_ARGS, free_port
from imgutil import save
from modelutil import IMAGE_SIZE, ColourNet, make_module
from PIL import Image

from skinfusion import Predictor
from skinfusion.cli import main
from skinfusion.data.records import ISIC_CLASSES
from skinfusion.demo import (
    HEAT_MAP_METHODS,
    analyse,
    demo_examples,
    demo_main,
    heat_map,
    require_gradio,
    toy_model,
)
from skinfusion.inference.explain import EXPLAIN_METHODS

FIXTURES = Path(__file__).parent / "fixtures" / "isic"
REAL_IMAGE = FIXTURES / "ISIC_0024951.jpg"  # HAM10000, 200x150, CC BY-NC 4.0 (see ATTRIBUTION.md)
#: A toy model small enough to train in a test (the demo's own trains for longer).
TINY_TOY = {"steps": 4, "data": {"synthetic_samples": 40, "synthetic_size": 32, "image_size": 32, "batch_size": 8}}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(make_module(), image_size=IMAGE_SIZE, progress=False)


def read_mask(data: bytes | Path) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image


def assert_isic_mask(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.format == "PNG"
    assert image.mode == "L"
    assert image.size == size
    assert set(np.unique(np.asarray(image)).tolist()) <= {0, 255}


# ---------------------------------------------------------------------------------------------
# The analysis behind the page
# ---------------------------------------------------------------------------------------------


def test_the_heat_map_offers_attention_and_grad_cam():
    assert HEAT_MAP_METHODS == EXPLAIN_METHODS == ("attention", "gradcam", "gradcam++")


@pytest.mark.parametrize("method", HEAT_MAP_METHODS)
def test_heat_map_is_explain_stretched_to_the_image(predictor, method):
    prediction = next(iter(predictor.predict_paths([REAL_IMAGE])))
    heat = heat_map(predictor, prediction, method)
    assert heat.shape == (150, 200)  # the original's height x width, not the network's 64x64
    assert heat.dtype == np.float32
    assert heat.min() >= 0.0
    assert heat.max() <= 1.0
    assert heat_map(predictor, prediction, method, size=(40, 30)).shape == (30, 40)
    if method == "attention":  # the classifier's attention map, min-max scaled
        assert heat.max() == pytest.approx(1.0, abs=1e-3)
        assert heat.min() == pytest.approx(0.0, abs=1e-3)


def test_heat_map_refuses_unknown_methods_and_maps_the_network_cannot_give(predictor):
    prediction = next(iter(predictor.predict_paths([REAL_IMAGE])))
    with pytest.raises(ValueError, match="unknown heat-map method 'lime'"):
        heat_map(predictor, prediction, "lime")
    plain = Predictor(make_module(attention="none", attention_placement=[]), image_size=IMAGE_SIZE, progress=False)
    with pytest.raises(ValueError, match="no attention map"):
        heat_map(plain, next(iter(plain.predict_paths([REAL_IMAGE]))), "attention")


def test_analyse_shows_grad_cam_of_the_top_class(predictor, tmp_path):
    result = analyse(predictor, REAL_IMAGE, "gradcam++", out_dir=tmp_path / "out")
    assert result.error is None
    assert result.heat.shape == (150, 200, 3)
    top = max(result.probabilities, key=result.probabilities.get)
    assert f"heat map: Grad-CAM++ of {top}" in result.summary
    assert "unknown heat-map method 'lime'" in analyse(predictor, REAL_IMAGE, "lime").error


def test_analyse_without_the_map_keeps_the_other_results(tmp_path):
    plain = Predictor(make_module(attention="none", attention_placement=[]), image_size=IMAGE_SIZE, progress=False)
    result = analyse(plain, REAL_IMAGE, "attention", out_dir=tmp_path / "out")
    assert result.error is None
    assert result.heat is None
    assert result.contour is not None
    assert result.probabilities is not None
    assert "no attention map: this network returns no attention map" in result.summary


def test_analyse_real_image_gives_overlays_probabilities_and_isic_mask(predictor, tmp_path):
    result = analyse(predictor, REAL_IMAGE, out_dir=tmp_path / "out")
    assert result.error is None
    assert result.contour.shape == (150, 200, 3)
    assert result.contour.dtype == np.uint8
    assert result.heat.shape == (150, 200, 3)
    assert result.mask_preview.shape == (150, 200)
    assert list(result.probabilities) == list(ISIC_CLASSES)
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.mask_file == tmp_path / "out" / "ISIC_0024951_segmentation.png"
    assert_isic_mask(read_mask(result.mask_file), (200, 150))
    assert "ISIC_0024951" in result.summary
    assert "200x150" in result.summary
    assert "heat map: attention map" in result.summary


def bad_input(kind: str, folder: Path) -> Path | None:
    """An input of kind ``kind`` that the demo must refuse with a message."""
    if kind == "nothing":
        return None
    path = folder / {"missing": "missing.png", "text": "notes.txt", "empty": "empty.jpg", "truncated": "cut.jpg"}.get(
        kind, "ok.jpg"
    )
    if kind == "text":
        path.write_text("not an image")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(REAL_IMAGE.read_bytes()[:700])
    elif kind in ("bytes", "pixels"):
        shutil.copy(REAL_IMAGE, path)
    return path


@pytest.mark.parametrize(
    ("kind", "limits", "expected"),
    [
        ("nothing", {}, "Upload a dermoscopic image"),
        ("missing", {}, "Could not read the uploaded file missing.png"),
        ("text", {}, "notes.txt is not an image this demo can read"),
        ("empty", {}, "empty.jpg is not an image this demo can read"),
        ("truncated", {}, "cut.jpg could not be decoded"),
        ("bytes", {"max_bytes": 1000}, "ok.jpg is too large: 0.0 MB (the limit is 0.000953674 MB)"),
        ("pixels", {"max_pixels": 200 * 150 - 1}, "ok.jpg is too large: 200x150 = 0.0 megapixels"),
    ],
)
def test_analyse_bad_input_returns_a_message_not_an_exception(predictor, tmp_path, kind, limits, expected):
    result = analyse(predictor, bad_input(kind, tmp_path), out_dir=tmp_path / "out", **limits)
    assert expected in result.error
    assert result.mask_file is None
    assert result.probabilities is None
    assert result.contour is None
    assert not (tmp_path / "out").exists()


def test_demo_examples_are_synthetic_images_written_once(tmp_path):
    paths = demo_examples(tmp_path / "examples", size=64)
    assert [p.name for p in paths] == [f"synthetic_{c}.png" for c in ("MEL", "NV", "BCC", "VASC")]
    stamps = [p.stat().st_mtime_ns for p in paths]
    for path in paths:
        assert Image.open(path).size == (64, 64)
    assert demo_examples(tmp_path / "examples", size=64) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_toy_model_trains_once_then_loads_from_the_cache(tmp_path):
    first = toy_model(tmp_path, TINY_TOY)
    assert first.trained_now
    assert first.path.is_file()
    assert first.path.parent == tmp_path / "demo"
    assert first.steps == 4
    assert first.samples == 40
    assert set(first.metrics) == {"val/dice", "val/accuracy"}
    assert "Toy model, for trying the app only" in first.describe()
    assert "4 steps on 40 synthetic" in first.describe()
    start = time.perf_counter()
    second = toy_model(tmp_path, TINY_TOY)
    assert not second.trained_now
    assert second.path == first.path
    assert second.metrics == first.metrics
    assert time.perf_counter() - start < 1.0
    other = toy_model(tmp_path, {**TINY_TOY, "steps": 3})  # a different recipe is a different cache entry
    assert other.trained_now
    assert other.path != first.path
    toy_predictor = Predictor(second.path, progress=False)
    assert toy_predictor.image_size == 32
    assert toy_predictor.normalization == "unit"
    assert analyse(toy_predictor, REAL_IMAGE, out_dir=tmp_path / "out").error is None


def test_toy_model_cache_defaults_to_skinfusion_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINFUSION_CACHE", str(tmp_path / "cache"))
    assert toy_model(config=TINY_TOY).path.parent == tmp_path / "cache" / "demo"


# ---------------------------------------------------------------------------------------------
# Command line and the optional dependency
# ---------------------------------------------------------------------------------------------


def test_cli_lists_and_documents_the_demo_command(capsys):
    main(["--help"])
    assert "demo       [--ckpt CKPT]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ckpt", "--host", "--port", "--max-mb", "--max-megapixels", "skinfusion[demo]"):
        assert option in text


def test_missing_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "skinfusion\[demo\]"'):
        require_gradio()
    for run in (demo_main, lambda argv: main(["demo", *argv])):
        with pytest.raises(SystemExit) as exit_info:
            run([])
        assert exit_info.value.code == 1
        message = 'skinfusion demo: error: The web demo needs Gradio, an optional extra: pip install "skinfusion[demo]"'
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo as `skinfusion demo` starts it without --ckpt (a smaller toy model), on a free port."""
    pytest.importorskip("gradio", reason='the web demo needs gradio: pip install "skinfusion[demo]"')
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium browser (Debian: apt-get install chromium chromium-driver)")
    import skinfusion.demo as demo_module

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINFUSION_CACHE", str(cache))
        patch.setattr(demo_module, "TOY_CONFIG", demo_module._merge(demo_module.TOY_CONFIG, TINY_TOY))
        port = free_port()
        app = demo_module.launch(host="127.0.0.1", port=port, device="cpu", block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture
def page(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                accept_downloads=True,
                viewport={"width": 1280, "height": 900},
            )
        except Exception as error:  # e.g. a chromium too old or too new for this playwright
            pytest.skip(f"chromium at {CHROMIUM} does not start under playwright: {error}")
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.set_default_timeout(120_000)  # a loaded CI machine
        page.goto(served)
        page.wait_for_selector("#sf-upload input[type=file]", state="attached")
        yield page
        browser.close()


def test_browser_upload_shows_mask_probabilities_and_downloads_isic_mask(page, tmp_path):
    assert "Toy model, for trying the app only" in page.locator("#sf-model-info").inner_text()
    page.locator("#sf-upload input[type=file]").set_input_files(str(REAL_IMAGE))
    page.wait_for_selector("#sf-status .sf-ok")
    assert "ISIC_0024951" in page.locator("#sf-status").inner_text()
    for panel in ("#sf-contour", "#sf-heat", "#sf-mask"):
        image = page.locator(f"{panel} img").first
        image.wait_for(state="visible")
        page.wait_for_function(
            "sel => { const img = document.querySelector(sel); return img && img.complete && img.naturalWidth > 0; }",
            arg=f"{panel} img",
        )
    probabilities = page.locator("#sf-probs").inner_text()
    for name in ISIC_CLASSES:
        assert name in probabilities
    assert "%" in probabilities
    link = page.locator("#sf-download a[download]").first
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.suggested_filename == "ISIC_0024951_segmentation.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert_isic_mask(read_mask(saved), (200, 150))
    # the Heat map choice re-analyses the image with Grad-CAM of the top class
    page.locator("#sf-method").get_by_text("Grad-CAM", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#sf-status .sf-ok')?.innerText.includes('heat map: Grad-CAM of')"
    )
    # The new heat map replaces the old one: wait until the browser has decoded it (a fresh <img> may be
    # attached before its pixels arrive, on a loaded machine).
    page.wait_for_function(
        "sel => { const img = document.querySelector(sel); return img && img.complete && img.naturalWidth > 0; }",
        arg="#sf-heat img",
    )
    # The page says which inputs the prediction used; the toy model reads age, sex and site when given.
    assert "inputs used: the image only (no age, sex or site given)" in page.locator("#sf-status").inner_text()
    page.locator("#sf-age input").fill("70")
    page.locator("#sf-run").click()
    page.wait_for_function(
        "() => document.querySelector('#sf-status .sf-ok')?.innerText.includes('inputs used: the image, age 70')"
    )


def test_browser_non_image_upload_shows_the_error_and_no_result(page, tmp_path):
    fake = tmp_path / "report.pdf"
    fake.write_bytes(b"%PDF-1.4 this is not a picture\n")
    page.locator("#sf-upload input[type=file]").set_input_files(str(fake))
    error = page.locator("#sf-status .sf-error")
    error.wait_for(state="visible")
    assert "report.pdf is not an image this demo can read" in error.inner_text()
    assert page.locator("#sf-mask img").count() == 0
    assert page.locator("#sf-download a[download]").count() == 0
    # the app is still alive: a real image after the bad one is analysed
    page.locator("#sf-upload button[aria-label='Clear']").click()
    page.locator("#sf-upload input[type=file]").set_input_files(str(REAL_IMAGE))
    page.wait_for_selector("#sf-status .sf-ok")


def test_analyse_reads_age_sex_site_and_says_which_inputs_were_used(tmp_path):
    """A network with a metadata branch: the patient fields change the prediction, and the summary and
    ``inputs`` name what was used (an unrecognised site is said to be so); a network without one says it reads
    the image only."""
    from skinfusion.data.dataset import META_DIM

    reader = Predictor(make_module(seed=3, meta_dim=META_DIM), image_size=IMAGE_SIZE, progress=False)
    blind = analyse(reader, REAL_IMAGE, out_dir=tmp_path / "a")
    given = analyse(reader, REAL_IMAGE, out_dir=tmp_path / "b", age=70, sex="male", site="back")
    assert blind.inputs == {"image": True, "metadata_branch": True, "age": None, "sex": None, "site": None}
    assert "inputs used: the image only (no age, sex or site given)" in blind.summary
    assert given.inputs == {"image": True, "metadata_branch": True, "age": 70.0, "sex": "male", "site": "back"}
    assert "inputs used: the image, age 70, sex male, site back" in given.summary
    assert blind.probabilities != given.probabilities
    odd = analyse(reader, REAL_IMAGE, out_dir=tmp_path / "c", sex="female", site="elbow")
    assert odd.inputs["site"] is None
    assert "not recognised: site" in odd.summary
    assert "between 0 and 120" in analyse(reader, REAL_IMAGE, out_dir=tmp_path / "d", age=-3).error
    assert "between 0 and 120" in analyse(reader, REAL_IMAGE, out_dir=tmp_path / "e", age="seventy").error
    plain = analyse(Predictor(make_module(), image_size=IMAGE_SIZE, progress=False), REAL_IMAGE, age=50)
    assert plain.inputs["metadata_branch"] is False
    assert "this model reads no clinical metadata (age, sex and site given are not read by it)" in plain.summary


def test_prediction_json_names_the_inputs_used(tmp_path):
    from skinfusion.data.dataset import META_DIM
    from skinfusion.data.records import Record

    reader = Predictor(make_module(seed=3, meta_dim=META_DIM), image_size=IMAGE_SIZE, progress=False)
    records = [Record(image=REAL_IMAGE, meta={"age": "45", "sex": "female"})]
    reader.write(reader.predict_records(records), tmp_path, json=True)
    doc = json.loads(next((tmp_path / "json").glob("*.json")).read_text())
    assert doc["inputs"] == {"image": True, "metadata_branch": True, "age": 45.0, "sex": "female", "site": None}


class CornerNet(ColourNet):
    """ColourNet whose classifier attention is a fixed 4x4 map, hot in one cell only: row 0, column 3 (top right)."""

    def forward(self, image, meta=None):
        output = super().forward(image, meta)
        corner = torch.zeros(image.shape[0], 1, 4, 4)
        corner[:, :, 0, 3] = 1.0
        return type(output)(output.mask_logits, output.class_logits, {"classifier": corner})


def test_heat_map_path_keeps_a_known_2d_map_in_place(tmp_path):
    """A network map with 2-D structure (one hot cell, top right) comes out in the same corner of heat_map's
    output and of the page's overlay, on a wide non-square image: not transposed (bottom left stays cold), not
    broadcast along an axis (bottom right and top left stay cold). docs/images/demo.png's vertical stripes are the
    toy model's: its 48 px input gives a 2x2 classifier map whose two rows are nearly equal."""
    image_path = tmp_path / "wide.png"
    save(image_path, np.full((80, 160, 3), 128, np.uint8))
    predictor = Predictor(CornerNet(), image_size=64, normalization="unit", progress=False)
    prediction = next(iter(predictor.predict_paths([image_path])))
    heat = heat_map(predictor, prediction, "attention")
    assert heat.shape == (80, 160)
    quarter = {
        "top right": heat[:20, 120:],
        "top left": heat[:20, :40],
        "bottom right": heat[60:, 120:],
        "bottom left": heat[60:, :40],
    }
    assert quarter["top right"].mean() > 0.5
    for name in ("top left", "bottom right", "bottom left"):
        assert quarter[name].max() < 0.05, name
    page = analyse(predictor, image_path, "attention", out_dir=tmp_path / "out")
    assert page.heat.shape == (80, 160, 3)
    red_minus_blue = page.heat[..., 0].astype(int) - page.heat[..., 2].astype(int)  # JET: hot red, cold blue
    assert red_minus_blue[:20, 120:].mean() > 50
    for rows, cols in ((slice(0, 20), slice(0, 40)), (slice(60, 80), slice(120, 160)), (slice(60, 80), slice(0, 40))):
        assert red_minus_blue[rows, cols].mean() < -50
