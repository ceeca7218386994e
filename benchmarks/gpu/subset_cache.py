"""Copy a size-budgeted subset of a prepared cache: the real data that travels to the GPU machine.

    python benchmarks/gpu/subset_cache.py .gpu-prepared/isic2018-128 .gpu-cache --budget-mib 30

Whole lesion groups (HAM10000 ``lesion_id``; else the image alone) are taken with their split unchanged, so no
lesion is in two splits: first every group holding an image of a rare class (under 5% of the labelled pool, so
that all seven classes reach the training and test splits), then the others in a seeded random order, as long as
the images, masks and manifest stay within the budget. The manifest loses its ``orig_*`` columns: they point at
the full-size pool on this machine, which does not travel, so ``skinfusion evaluate`` scores the cached masks.
``subset.json`` records what was taken.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

DROPPED = ("orig_image", "orig_mask", "orig_width", "orig_height")
MARKER = "subset.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a `skinfusion prepare` output folder")
    parser.add_argument("out", type=Path, help="output folder (replaced if it holds an earlier subset)")
    parser.add_argument("--budget-mib", type=float, default=30.0, help="images + masks + manifest, MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rare", type=float, default=0.05, help="classes under this share of the labelled pool")
    args = parser.parse_args()

    with open(args.prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c not in DROPPED]
    counts = Counter(r["label"] for r in rows if r["label"])
    rare = {c for c, n in counts.items() if n < args.rare * sum(counts.values())}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["lesion_id"] or row["id"]].append(row)
    order = sorted(groups)
    random.Random(args.seed).shuffle(order)
    order.sort(key=lambda g: not any(r["label"] in rare for r in groups[g]))  # stable: rare first, then random

    def row_bytes(row: dict) -> int:
        return len(",".join(row[c] for c in columns)) + 1

    def file_bytes(row: dict) -> int:
        return sum((args.prepared / row[key]).stat().st_size for key in ("image", "mask") if row[key])

    budget = int(args.budget_mib * 2**20)
    used = len(",".join(columns)) + 1
    chosen: list[dict] = []
    for group in order:
        size = sum(file_bytes(r) + row_bytes(r) for r in groups[group])
        if used + size <= budget:
            chosen.extend(groups[group])
            used += size
    chosen.sort(key=lambda r: r["id"])

    if args.out.exists():
        if not (args.out / MARKER).is_file():
            raise SystemExit(f"{args.out} exists and holds no {MARKER}: not replacing it")
        shutil.rmtree(args.out)
    for row in chosen:
        for key in ("image", "mask"):
            if row[key]:
                target = args.out / row[key]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(args.prepared / row[key], target)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(chosen)
    (args.out / "manifest.csv").write_text(buffer.getvalue())
    per_split = {
        split: dict(sorted(Counter(r["label"] or "(none)" for r in chosen if r["split"] == split).items()))
        for split in ("train", "val", "test")
    }
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    summary = {
        "source": str(args.prepared),
        "images": len(chosen),
        "of": len(rows),
        "lesion_groups": len({r["lesion_id"] or r["id"] for r in chosen}),
        "rare_classes_taken_whole": sorted(rare),
        "budget_mib": args.budget_mib,
        "seed": args.seed,
        "per_split": per_split,
    }
    (args.out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    total += (args.out / MARKER).stat().st_size
    print(f"{args.out}: {len(chosen)} of {len(rows)} images, {total / 2**20:.1f} MiB")
    for split, classes in per_split.items():
        print(f"  {split:5s} {sum(classes.values()):5d}: " + ", ".join(f"{c} {n}" for c, n in classes.items()))


if __name__ == "__main__":
    main()
