"""``skinfusion prepare``: read sources, validate every file, build a resized cache, split, write a manifest.

The output folder holds ``manifest.csv`` (the columns of ``MANIFEST_COLUMNS``), ``images/<id>.jpg``
(downscaled so that the shorter side is ``size``, never upscaled), ``masks/<id>.png`` (8-bit {0,255}
at the cached image's size), ``report.json`` (counts, and every rejected file with its reason) and
``.prepare-state.json`` (what was built from which input, for incremental runs).

* **All or nothing**: without ``skip_bad`` a single bad file (or unknown class) fails the run, listing
  every problem, before anything in the output folder changes (new files are staged first).
* **Incremental**: a record whose files (path, size, ``mtime_ns``) and cache parameters are unchanged
  is not decoded again.
* **Atomic**: the manifest, report and state file are replaced with ``os.replace``.
* **Fast**: files are decoded in a process pool, large JPEGs at reduced DCT scale; a JPEG that needs
  no resizing and no rotation is copied byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from skinfusion.allocator import tune_malloc
from skinfusion.data.imageio import DEFAULT_MAX_PIXELS
from skinfusion.data.readers import Reader, apply_labels, combine, create_reader
from skinfusion.data.records import ISIC_CLASSES, MANIFEST_COLUMNS, META_KEYS, Record
from skinfusion.data.split import SPLITS, assign_splits, check_no_leakage
from skinfusion.data.validate import check_label, load_record
from skinfusion.errors import DataError, config_errors
from skinfusion.io import atomic_write

__all__ = ["MANIFEST_COLUMNS", "PrepareReport", "Source", "parse_source", "prepare", "prepare_main", "read_sources"]

STATE_FILE = ".prepare-state.json"
_STATE_VERSION = 1


@dataclass
class Source:
    """One input source: a reader kind, its path, and keyword options for the reader."""

    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.path}" + (f":{opts}" if opts else "")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_source(spec: str) -> Source:
    """Parse ``KIND:PATH[:key=val,key=val]`` (e.g. ``isic_task3:/data/isic2018:masks=none``).

    Raises:
        ValueError: no ``KIND:`` prefix or a malformed option.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ValueError(f"source must look like KIND:PATH[:key=val,...], got {spec!r}")
    path, options = rest, {}
    head, sep, tail = rest.rpartition(":")
    if sep and head and "=" in tail:
        path = head
        for item in tail.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"bad option {item!r} in source {spec!r} (expected key=val)")
            options[key.strip()] = _parse_value(value.strip())
    return Source(kind, path, options)


def read_sources(
    sources: Iterable[Source | str | Reader],
    label_map: Mapping[str, str] | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """Read every source: image sources merged by id (:func:`.readers.combine`), then label-only ones applied.

    Returns the records, and for each label-only source the number of its labels that matched no image.

    Raises:
        DataError: a source's layout or CSV is wrong, or two sources conflict.
    """
    readers: list[Reader] = []
    for src in sources:
        if isinstance(src, str):
            src = parse_source(src)
        if isinstance(src, Source):
            options = dict(src.options)
            if label_map and "label_map" not in options:
                options["label_map"] = dict(label_map)
            src = create_reader(src.kind, src.path, **options)
        readers.append(src)
    image_readers = [r for r in readers if r.provides_images]
    records = combine(*(r.read() for r in image_readers))
    unused: dict[str, int] = {}
    for reader in readers:
        if reader.provides_images:
            continue
        labels = reader.read_labels()
        records, used = apply_labels(records, labels, reader.name)
        unused[f"{reader.name}:{reader.path}"] = len(labels) - used
    return records, unused


@dataclass
class PrepareReport:
    """What ``prepare`` did; also written as ``report.json``."""

    out_dir: str
    params: dict[str, Any]
    records: int = 0
    accepted: int = 0
    decoded: int = 0
    reused: int = 0
    copied: int = 0
    wall_s: float = 0.0
    per_source: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, int] = field(default_factory=dict)
    masks_per_split: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    unused_labels: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A human-readable summary."""
        lines = [
            f"prepare -> {self.out_dir}: {self.accepted}/{self.records} records accepted, "
            f"{len(self.rejected)} rejected; decoded {self.decoded}, reused {self.reused} "
            f"(copied {self.copied}) in {self.wall_s:.1f} s",
            "  per source: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_source.items())),
        ]
        for split in SPLITS:
            classes = self.per_class.get(split, {})
            lines.append(
                f"  {split:5s}: {self.per_split.get(split, 0)} images, {self.masks_per_split.get(split, 0)} masks; "
                + ", ".join(f"{k} {v}" for k, v in classes.items())
            )
        for name, n in self.unused_labels.items():
            if n:
                lines.append(f"  {name}: {n} labels matched no image")
        for rej in self.rejected:
            lines.append(f"  rejected {rej['id']} ({rej['source']}): {rej['path']}: {rej['reason']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- workers


def _file_key(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    path = os.path.abspath(path)  # not resolve(): symlink resolution costs ~100 us per file
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, st.st_size, st.st_mtime_ns]


def _is_copyable(path: Path, image_format: str, orig_size: tuple[int, int], shape: tuple[int, ...]) -> bool:
    if image_format != "jpg" or Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return False
    if (shape[1], shape[0]) != tuple(orig_size):
        return False
    with Image.open(path) as img:
        return img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1


def _init_worker(malloc_tuning: bool = False) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    if malloc_tuning:  # full-size decodes allocate tens of MB each: keep that memory instead of re-faulting it
        tune_malloc()


def _process(task: tuple[Record, str, str | None, dict[str, Any]]) -> dict[str, Any]:
    """Validate one record and write its cache files (to the staging paths); runs in a worker."""
    record, image_out, mask_out, params = task
    try:
        loaded = load_record(
            record,
            max_side=params["size"],
            side=params["side"],
            reduce=params["reduce"],
            max_pixels=params["max_pixels"],
        )
    except DataError as err:
        return {"error": [err.path or str(record.image), err.reason]}
    copied = _is_copyable(record.image, params["image_format"], loaded.orig_size, loaded.image.shape)
    if copied:
        shutil.copyfile(record.image, image_out)
    elif params["image_format"] == "jpg":
        Image.fromarray(loaded.image).save(image_out, format="JPEG", quality=95)
    else:
        Image.fromarray(loaded.image).save(image_out, format="PNG")
    if loaded.mask is not None and mask_out is not None:
        Image.fromarray((loaded.mask * np.uint8(255)), mode="L").save(mask_out, format="PNG")
    return {"error": None, "orig_size": list(loaded.orig_size), "copied": copied}


# --------------------------------------------------------------------------------------- helpers


def _load_state(out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if state.get("version") != _STATE_VERSION or state.get("params") != params:
        return {}
    return state.get("entries", {})


#: Below this many files per worker the process pool's start-up costs more than it saves.
_MIN_TASKS_PER_WORKER = 64


def _run_tasks(tasks: list, workers: int, progress: bool, malloc_tuning: bool = False) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="prepare", unit="img", disable=not progress or not tasks)
    results = []
    try:
        # A spawned worker imports the package (torch included): seconds each, so small jobs run in-process.
        if workers <= 1 or len(tasks) < _MIN_TASKS_PER_WORKER * workers:
            _init_worker(malloc_tuning)
            for task in tasks:
                results.append(_process(task))
                bar.update()
        else:
            import multiprocessing as mp

            chunk = max(1, min(32, len(tasks) // (workers * 8)))
            ctx = mp.get_context("spawn")  # safe even if the caller has threads (torch, tqdm)
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(malloc_tuning,)
            ) as pool:
                for result in pool.map(_process, tasks, chunksize=chunk):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------------------- prepare


def prepare(
    sources: Iterable[Source | str | Reader],
    out_dir: str | Path,
    *,
    size: int | None = 256,
    side: str = "shortest",
    image_format: str = "jpg",
    workers: int = 2,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_bad: bool = False,
    class_names: Sequence[str] | None = ISIC_CLASSES,
    label_map: Mapping[str, str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    reduce: bool = True,
    keep_splits: bool = True,
    progress: bool = True,
    malloc_tuning: bool = False,
) -> PrepareReport:
    """Build a validated, resized, split cache of ``sources`` in ``out_dir`` (see the module docstring).

    Args:
        sources: ``Source`` objects, ``"KIND:PATH[:k=v,...]"`` strings or reader instances.
        size: target length of the ``side`` side of cached images; ``None`` keeps the original size.
        side: ``"shortest"`` (default: the shorter side becomes ``size``, so a later square crop or
            resize to ``size`` loses no resolution) or ``"longest"`` (fit inside ``size`` x ``size``).
        image_format: ``"jpg"`` (quality 95) or ``"png"`` for cached images; masks are always PNG.
        workers: processes decoding in parallel (``<= 1``: in this process).
        fractions: (train, val, test) fractions for :func:`~skinfusion.data.split.assign_splits` (``seed``).
        skip_bad: reject bad records into the report instead of failing.
        class_names: allowed labels (after ``label_map``); ``None`` allows any.
        label_map: mapping applied to every source's labels (e.g. ``{"BCC": "SCC"}``).
        max_pixels: decompression-bomb limit per image.
        reduce: reduced-resolution JPEG decoding.
        keep_splits: keep a ``split`` given by a manifest source (its whole lesion group follows).
        malloc_tuning: apply :func:`skinfusion.allocator.tune_malloc` where the files are decoded (the worker
            processes, or this process with ``workers <= 1``); same output, faster full-size decoding.

    Returns:
        The report (also written to ``out_dir/report.json``).

    Raises:
        DataError: a source cannot be read, or (without ``skip_bad``) any record is bad; the
            message lists every problem, and the output folder is left unchanged.
    """
    start = time.perf_counter()
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if side not in ("longest", "shortest"):
        raise ValueError(f"side must be 'longest' or 'shortest', got {side!r}")
    out_dir = Path(out_dir)
    params = {
        "size": size,
        "side": side,
        "image_format": image_format,
        "reduce": reduce,
        "max_pixels": max_pixels,
        "version": _STATE_VERSION,
    }
    records, unused = read_sources(sources, label_map)
    report = PrepareReport(out_dir=str(out_dir), params={**params, "fractions": list(fractions), "seed": seed})
    report.records = len(records)
    report.unused_labels = unused

    out_dir.mkdir(parents=True, exist_ok=True)
    old_entries = _load_state(out_dir, params)
    ext = ".jpg" if image_format == "jpg" else ".png"

    existing = {
        f"{sub}/{name}" for sub in ("images", "masks") if (out_dir / sub).is_dir() for name in os.listdir(out_dir / sub)
    }
    problems: dict[str, list[str]] = {}  # id -> [path, reason]
    entries: dict[str, dict[str, Any]] = {}
    items = [(r.id, r) for r in records]  # Record.id parses the path: compute it once
    todo: list[tuple[str, Record]] = []
    for rid, record in items:
        try:
            check_label(record, class_names)
        except DataError as err:
            problems[rid] = [err.path, err.reason]
            continue
        key = [_file_key(record.image), _file_key(record.mask)]
        old = old_entries.get(rid)
        if old is not None and old.get("key") == key and key[0][1] is not None:
            outputs_exist = old.get("error") or (
                old["image"] in existing and (old["mask"] is None or old["mask"] in existing)
            )
            if outputs_exist:
                entries[rid] = old
                if old.get("error"):
                    problems[rid] = old["error"]
                report.reused += 1
                continue
        entries[rid] = {"key": key}
        todo.append((rid, record))

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        tasks = [
            (
                r,
                str(staging / "images" / f"{rid}{ext}"),
                str(staging / "masks" / f"{rid}.png") if r.mask is not None else None,
                params,
            )
            for rid, r in todo
        ]
        results = _run_tasks(tasks, workers, progress, malloc_tuning)
        report.decoded = len(results)
        for (rid, record), result in zip(todo, results, strict=True):
            entry = entries[rid]
            if result["error"]:
                entry["error"] = result["error"]
                problems[rid] = result["error"]
                continue
            report.copied += int(result["copied"])
            entry.update(
                error=None,
                image=f"images/{rid}{ext}",
                mask=f"masks/{rid}.png" if record.mask is not None else None,
                orig_size=result["orig_size"],
            )

        by_id = dict(items)
        report.rejected = [
            {"id": i, "source": by_id[i].source, "path": str(p), "reason": reason}
            for i, (p, reason) in problems.items()
        ]
        if problems and not skip_bad:
            listing = "\n".join(f"  {r['path']}: {r['reason']}" for r in report.rejected)
            raise DataError(
                None, f"{len(problems)} bad record(s); nothing was written (use --skip-bad to skip them):\n{listing}"
            )

        # Commit: move staged files in place, drop cache files nobody refers to any more.
        for sub in ("images", "masks"):
            (out_dir / sub).mkdir(exist_ok=True)
            for f in (staging / sub).iterdir():
                os.replace(f, out_dir / sub / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    accepted_items = [(rid, r) for rid, r in items if rid not in problems]
    accepted = [r for _, r in accepted_items]
    keep = {entries[rid]["image"] for rid, _ in accepted_items} | {
        entries[rid]["mask"] for rid, _ in accepted_items if entries[rid]["mask"]
    }
    for sub in ("images", "masks"):
        for f in (out_dir / sub).iterdir():
            if f"{sub}/{f.name}" not in keep:
                f.unlink()

    fixed = {rid: r.meta["split"] for rid, r in accepted_items if keep_splits and r.meta.get("split")}
    splits = assign_splits(accepted, fractions, seed, fixed=fixed)
    check_no_leakage(accepted, splits)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    per_class: dict[str, Counter] = defaultdict(Counter)
    for rid, record in accepted_items:
        entry = entries[rid]
        split = splits[rid]
        report.per_split[split] = report.per_split.get(split, 0) + 1
        report.per_source[record.source] = report.per_source.get(record.source, 0) + 1
        per_class[split][record.label or "(none)"] += 1
        if record.mask is not None:
            report.masks_per_split[split] = report.masks_per_split.get(split, 0) + 1
        writer.writerow(
            [
                rid,
                entry["image"],
                entry["mask"] or "",
                record.label or "",
                record.lesion_id or "",
                split,
                record.source,
                *(record.meta.get(key) for key in META_KEYS),  # csv writes None as "" and floats with repr
                os.path.abspath(record.image),
                os.path.abspath(record.mask) if record.mask is not None else "",
                entry["orig_size"][0],
                entry["orig_size"][1],
            ]
        )
    order = list(class_names or []) + ["(none)"]
    report.per_class = {
        s: dict(
            sorted(per_class[s].items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
        )
        for s in SPLITS
        if s in per_class
    }
    report.accepted = len(accepted)
    report.wall_s = time.perf_counter() - start

    atomic_write(out_dir / "manifest.csv", buf.getvalue())
    atomic_write(out_dir / STATE_FILE, json.dumps({"version": _STATE_VERSION, "params": params, "entries": entries}))
    atomic_write(out_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    return report


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _label_map(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"label map entries look like FROM=TO, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``skinfusion prepare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="skinfusion prepare",
        description="Validate dermoscopy datasets, build a resized cache with a lesion-grouped split and a manifest.",
        epilog="Example: skinfusion prepare --source isic_task1:/data/isic2018 "
        "--source diagnosis_csv:/data/isic2018/ISIC2018_Task1_Training_Diagnosis.csv "
        "--source isic_task3:/data/isic2018 --out /data/cache",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="KIND:PATH[:k=v,...]",
        help="an input (repeatable); KIND is one of the readers: isic_task1, isic_task3, diagnosis_csv, ph2, "
        "manifest, synthetic",
    )
    p.add_argument("--manifest", action="append", default=[], metavar="CSV", help="a generic manifest (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=256, help="cached image size in pixels of --side (0: original size)")
    p.add_argument("--side", choices=["shortest", "longest"], default="shortest", help="which side --size sets")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg", help="cached image format")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--fractions", type=_floats, default=(0.8, 0.1, 0.1), help="train,val,test fractions")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--skip-bad", action="store_true", help="reject bad files into the report instead of failing")
    p.add_argument("--classes", type=lambda s: s.split(","), default=list(ISIC_CLASSES), help="allowed class names")
    p.add_argument("--label-map", type=_label_map, default=None, help="FROM=TO,... rename labels, e.g. AKIEC=SCC")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject images above this many pixels")
    p.add_argument("--no-reduce", action="store_true", help="disable reduced-resolution JPEG decoding")
    p.add_argument("--resplit", action="store_true", help="ignore a manifest's split column")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def prepare_main(argv: list[str] | None = None) -> PrepareReport:
    """``skinfusion prepare``: build the cache and print the report.

    Raises:
        DataError: a bad source or, without ``--skip-bad``, any bad file (the message lists every problem).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sources = [parse_source(s) for s in args.source] + [Source("manifest", m) for m in args.manifest]
    except ValueError as err:
        parser.error(str(err))
    if not sources:
        parser.error("give at least one --source or --manifest")
    with config_errors():
        report = prepare(
            sources,
            args.out,
            size=args.size or None,
            side=args.side,
            image_format=args.image_format,
            workers=args.workers,
            fractions=args.fractions,
            seed=args.seed,
            skip_bad=args.skip_bad,
            class_names=args.classes,
            label_map=args.label_map,
            max_pixels=args.max_pixels,
            reduce=not args.no_reduce,
            keep_splits=not args.resplit,
            progress=not args.no_progress,
            malloc_tuning=True,  # the CLI tuned this process; the decoding processes follow
        )
    print(report.format())
    return report
