"""Make ``docs/images/demo.png``: the web demo, as ``skinfusion demo`` starts it, with a result shown.

Starts the demo with its default toy model (trained on synthetic lesions on the first run, then cached),
opens it in the system chromium through playwright, clicks a synthetic example and saves a screenshot of the
page, quantised to stay small::

    python docs/make_demo_screenshot.py [--example synthetic_MEL.png] [--out docs/images/demo.png]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browserutil import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="synthetic_MEL.png")
    parser.add_argument("--out", default=str(Path(__file__).parent / "images" / "demo.png"))
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from skinfusion.demo import launch

    port = free_port()
    app = launch(host="127.0.0.1", port=port, device="cpu", block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text(args.example, exact=True).first.click()
            page.wait_for_selector("#sf-status .sf-ok")
            page.locator("#sf-download a[download]").first.wait_for()
            page.wait_for_timeout(1000)  # let the images finish fading in
            png = page.screenshot(full_page=True)
            browser.close()
    finally:
        app.close()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
