"""Which int8 settings keep a real checkpoint's accuracy: each quantization option against the fp32 export.

    python experiments/quantize/int8_tradeoff.py --onnx fp32.onnx --manifest isic2018-cache/manifest.csv --out DIR

Quantizes the fp32 ONNX export once per setting (``skinfusion.inference.quantize.quantize_int8``: calibration
method, layers left in fp32, 7- or 8-bit weights), calibrated on ``--n`` images of ``--split`` (the draw of
``skinfusion export --quantize int8``), and scores each file like the export's accuracy guard on every other
image of that split (``evaluate``'s metrics at the original resolution, the manifest's metadata given):
thresholded Jaccard, Dice and balanced accuracy minus fp32's, top-1 agreement, the images per true class whose top
class changed, and int8's images/s at batch 1 and 16 as a ratio to the fp32 ONNX file's (ONNX Runtime, ``--threads``
threads, both timed in this process; a rough guide: ``benchmarks/bench_inference.py --int8`` is the benchmark).
Prints a Markdown table; writes DIR/tradeoff.json.
Choose on this split; check the chosen setting once on the test split (``skinfusion evaluate``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from skinfusion.inference.inputs import collect_records
from skinfusion.inference.onnxnet import OnnxNet
from skinfusion.inference.quantize import GUARD_METRICS, _agreement, _scores, quantize_int8, select_images

SETTINGS = {
    # Every setting leaves the stem (keep_fp32 "first") and the class head (quantize.FP32_HEADS) in fp32.
    "percentile": {},  # export --quantize int8's: percentile ranges, 7-bit weights
    "minmax": {"method": "minmax"},
    "entropy": {"method": "entropy"},
    "outputs-fp32": {"keep_fp32": "first+last"},
    "8bit-weights": {"reduce_range": False},
    "stem-int8+resize-fp32": {"keep_fp32": "none", "fp32_op_types": ["Resize"]},
}


def throughput(net: OnnxNet, size: int, batch: int, calls: int) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    feeds = {net.session.get_inputs()[0].name: x}
    for i in net.session.get_inputs()[1:]:
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.float32)
    net.session.run(None, feeds)
    t = time.perf_counter()
    for _ in range(calls):
        net.session.run(None, feeds)
    return batch * calls / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="fp32 export (skinfusion export --format onnx)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="folder for the int8 files and tradeoff.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=256, help="calibration images")
    parser.add_argument("--guard-n", type=int, default=100000, help="at most this many scored images")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = OnnxNet(args.onnx, threads=args.threads)
    names = fp32.settings.class_names
    calibration, guard, source = select_images(collect_records(args.manifest), names, args.split, args.n, args.guard_n)
    print(f"# calibration: {len(calibration)} images of {args.split}; scored: {len(guard)} images ({source})")
    counts = {c: sum(r.label == c for r in guard) for c in names}
    print("# scored images per class: " + ", ".join(f"{c} {k}" for c, k in counts.items()))
    print(
        "| setting | thresholded Jaccard | Dice | balanced accuracy | top-1 agreement | images whose class changed "
        "| int8 / fp32 ONNX, batch 1 | batch 16 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = _scores(fp32, guard, Path(tmp) / "fp32", 8)
        for name in args.settings.split(","):
            options = dict(SETTINGS[name])
            path = out / f"{name}.onnx"
            t = time.perf_counter()
            quantize_int8(args.onnx, path, calibration, **options)
            took = time.perf_counter() - t
            int8 = OnnxNet(path, threads=args.threads)
            scores = _scores(int8, guard, Path(tmp) / name, 8)
            agreement = _agreement(Path(tmp) / "fp32", Path(tmp) / name, guard, names)
            size = fp32.settings.image_size
            speed = {}
            for batch, calls in ((1, 30), (16, 4)):
                ratios = [throughput(int8, size, batch, calls) / throughput(fp32, size, batch, calls) for _ in range(3)]
                speed[batch] = float(np.median(ratios))
            results[name] = {
                "options": options,
                "quantize_s": took,
                **{k: scores[key] - base[key] for k, (key, _) in GUARD_METRICS.items()},
                **agreement,
                "speedup_vs_ort_fp32": speed,
            }
            r = results[name]
            print(
                f"| {name} | {r['threshold_jaccard']:+.4f} | {r['dice']:+.4f} | {r['balanced_accuracy']:+.4f} | "
                f"{r.get('top1_agreement', float('nan')):.4f} | "
                + ", ".join(f"{c} {k}/{n}" for c, (k, n) in r.get("top1_changed_per_class", {}).items() if k)
                + f" | {speed[1]:.2f} | {speed[16]:.2f} |",
                flush=True,
            )
    print(
        "# fp32: "
        + ", ".join(f"{label} {base[key]:.4f}" for key, label in GUARD_METRICS.values())
        + "; per class, images whose top class changed: tradeoff.json"
    )
    (out / "tradeoff.json").write_text(
        json.dumps(
            {
                "fp32": {k: base[key] for k, (key, _) in GUARD_METRICS.items()},
                "scored": len(guard),
                "per_class": counts,
                "settings": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
