"""``skinfusion study``: statistics against known answers, variant parsing, and a tiny study end to end."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from skinfusion.cli import main
from skinfusion.evaluation.intervals import balanced_accuracy_statistic
from skinfusion.evaluation.study import (
    StudyError,
    Variant,
    _check_resume,
    _spec_differences,
    _study_spec,
    bootstrap_difference,
    budget_overrides,
    classification_summary,
    parse_variant,
    per_class_table,
    run_study,
    study_main,
    summarize_study,
)

# ---------------------------------------------------------------- statistics


def test_paired_bootstrap_matches_the_normal_interval_of_a_mean_difference():
    """Paired differences d_i = a_i - b_i: the interval is mean(d) +- 1.96 sd(d) / sqrt(n), whatever a and b vary by."""
    rng = np.random.default_rng(1)
    n = 3000
    shared = rng.normal(0.0, 10.0, n)  # large per-image variation that pairing cancels
    a = shared + rng.normal(0.0, 0.5, n)
    b = shared - 0.1 + rng.normal(0.0, 0.5, n)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    estimate, low, high = bootstrap_difference(lambda i: a[i].mean(), lambda i: b[i].mean(), n, n_resamples=4000)
    assert estimate == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.1 * half)
    # An unpaired interval would be ~sqrt(2) * 10 / 0.7 = 20x wider; this one excludes 0 (the effect is +0.1).
    assert low > 0


def test_bootstrap_of_identical_statistics_is_exactly_zero_without_a_warning():
    values = np.random.default_rng(0).random(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy calls every resample being equal "degenerate": not the user's fault
        assert bootstrap_difference(lambda i: values[i].mean(), lambda i: values[i].mean(), 50) == (0.0, 0.0, 0.0)


PROBS = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
TRUTH = np.array([0, 0, 1, 1, 2])  # argmax predictions 0, 1, 1, 1, 0


def test_classification_summary_hand_computed():
    got = classification_summary(TRUTH, PROBS)
    # recall 1/2, 2/2, 0/1; precision 1/2, 2/3, 0 (class 2 never predicted); F1 1/2, 4/5, 0.
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert got["precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert got["f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    # One-vs-rest AUC by counting pairs: class 0 5/6, class 1 6/6, class 2 (one tie at 0.3) 3.5/4.
    assert got["auc"] == pytest.approx((5 / 6 + 1 + 3.5 / 4) / 3)


def test_classification_summary_equals_sklearn_on_random_data():
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    got = classification_summary(truth, probs)
    predicted = probs.argmax(1)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert got["precision"] == pytest.approx(precision_score(truth, predicted, average="macro", zero_division=0))
    assert got["f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert got["auc"] == pytest.approx(roc_auc_score(truth, probs, multi_class="ovr", average="macro"))


def test_classification_summary_weights_equal_repeating_the_images():
    """A bootstrap resample as weights (image i drawn w_i times) gives the figures of the repeated images, AUC
    ties included."""
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 3, 200)
    probs = np.round(rng.dirichlet(np.ones(3), 200), 1)  # coarse: many tied scores
    weights = rng.integers(0, 4, 200)
    repeated = np.repeat(np.arange(200), weights)
    assert classification_summary(truth, probs, weights) == pytest.approx(
        classification_summary(truth[repeated], probs[repeated])
    )


def test_per_class_table_hand_computed():
    table = per_class_table(TRUTH, PROBS, ["A", "B", "C"])
    assert table["A"] == pytest.approx({"support": 2, "accuracy": 3 / 5, "precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert table["B"] == pytest.approx({"support": 2, "accuracy": 4 / 5, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert table["C"] == pytest.approx({"support": 1, "accuracy": 4 / 5, "precision": 0.0, "recall": 0.0, "f1": 0.0})


# ---------------------------------------------------------------- the study's intervals, on finished runs


def _run_probabilities(accuracies, truth, k, rng):
    """(runs, N, K) class probabilities: run r's argmax is the truth with probability accuracies[r], else the next
    class."""
    runs = []
    for accuracy in accuracies:
        predicted = np.where(rng.random(len(truth)) < accuracy, truth, (truth + 1) % k)
        p = rng.dirichlet(np.ones(k), len(truth)) * 0.5
        p[np.arange(len(truth)), predicted] += 1.0
        runs.append(p / p.sum(1, keepdims=True))
    return np.stack(runs)


def _finished_study(out, probabilities, truth, names, groups=None, segmentation=None):
    """A study folder whose runs have finished: spec.json and runs/<variant>-seed<s>/result.json, from (V,S,N,K)
    probabilities, optional lesion ids and (V,S,N) segmentation scores (None for a variant without a decoder)."""
    n_variants, n_seeds, n, k = probabilities.shape
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    groups = ids if groups is None else [f"lesion{g}" for g in groups]
    variants = [{"name": name, "config": None, "config_sha1": None, "overrides": []} for name in names]
    spec = {"name": "synthetic", "base_configs": [], "variants": variants, "seeds": list(range(n_seeds))}
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({**spec, "split": "test", "overrides": []}))
    for v, name in enumerate(names):
        for s in range(n_seeds):
            per_image = {
                "ids": ids,
                "group": dict(zip(ids, groups, strict=True)),
                "class_names": [f"C{c}" for c in range(k)],
                "label": dict(zip(ids, truth.tolist(), strict=True)),
                "probabilities": dict(zip(ids, probabilities[v, s].tolist(), strict=True)),
            }
            if segmentation is not None and segmentation[v] is not None:
                for key in ("threshold_jaccard", "dice"):
                    per_image[key] = dict(zip(ids, segmentation[v][s].tolist(), strict=True))
            run = out / "runs" / f"{name}-seed{s}"
            run.mkdir(parents=True)
            result = {"steps": 10, "checkpoint_step": 10, "fit_seconds": 60.0, "per_image": per_image}
            (run / "result.json").write_text(json.dumps(result))


def _primary_row(md: str, variant: str, against: str) -> str:
    primary = md.split("## Primary metric")[1].split("## Secondary")[0]
    return next(line for line in primary.splitlines() if line.startswith(f"| {variant} | {against} |"))


def test_seed_noise_is_not_a_difference_although_an_image_only_bootstrap_calls_it_one(tmp_path):
    """Two variants trained by one procedure (same expected accuracy 0.75; a seed moves a run by about +-0.1):
    their seed means differ by 0.10 by chance. The image-only bootstrap of the seed-averaged predictions excludes
    0 (it cannot see the seeds); the study's two-level interval holds 0, and the study marks no difference."""
    rng = np.random.default_rng(0)
    n, k = 2000, 2
    truth = np.arange(n) % k
    accuracies = [[0.60, 0.70, 0.80], [0.70, 0.80, 0.90]]  # one population of seeds, split 3 / 3
    probabilities = np.stack([_run_probabilities(a, truth, k, rng) for a in accuracies])
    _finished_study(tmp_path / "study", probabilities, truth, ["a", "b"])

    summary = summarize_study(tmp_path / "study", n_resamples=500)
    estimate, low, high = summary["comparisons"][0]["balanced_accuracy"]
    assert low < 0 < high, (low, high)

    correct = probabilities.argmax(-1) == truth  # (variants, seeds, images)
    every_seed = [np.arange(3)]

    def seed_mean(v):
        return lambda i: balanced_accuracy_statistic(correct[v], truth, k)(every_seed, i)

    image_only = bootstrap_difference(seed_mean(1), seed_mean(0), n, n_resamples=1000)
    assert image_only[0] == pytest.approx(estimate)  # the same difference: only the interval differs
    assert image_only[0] == pytest.approx(0.10, abs=0.02)
    assert image_only[1] > 0, image_only  # images alone: a "significant" difference
    assert not _primary_row((tmp_path / "study" / "study.md").read_text(), "b", "a").endswith("* |")


def test_a_difference_beyond_the_seed_spread_is_marked_and_the_comparisons_are_counted(tmp_path):
    """Four variants (5 comparisons): one clear gain is marked in the primary table (95 % and Bonferroni 99 %);
    the markdown names the number of comparisons, the Bonferroni level and the secondary intervals' number; the
    segmentation metrics are compared only between the two variants that segment; lesions are counted."""
    rng = np.random.default_rng(1)
    n, k = 600, 3
    truth = np.arange(n) % k
    accuracies = [[0.50, 0.52], [0.85, 0.86], [0.84, 0.86], [0.49, 0.53]]
    probabilities = np.stack([_run_probabilities(a, truth, k, rng) for a in accuracies])
    segmentation = [None, None, rng.random((2, n)), rng.random((2, n))]
    names = ["baseline", "attention", "fusion", "full"]
    out = tmp_path / "study"
    _finished_study(out, probabilities, truth, names, groups=np.arange(n) // 3, segmentation=segmentation)

    summary = summarize_study(out, n_resamples=400)
    assert summary["intervals"]["primary"] == "balanced_accuracy"
    assert summary["intervals"]["primary_comparisons"] == 5
    assert summary["intervals"]["bonferroni_level"] == pytest.approx(0.99)
    assert summary["intervals"]["secondary_intervals"] == 5 * 4 + 2  # 4 more diagnosis metrics; Jaccard, Dice once
    assert summary["lesions"] == 200
    md = (out / "study.md").read_text()
    gain = _primary_row(md, "attention", "baseline")
    assert " * |" in gain
    assert gain.endswith(" † |")
    assert " * |" not in _primary_row(md, "fusion", "attention")
    assert "600 labelled images of 200 lesions" in md
    assert "5 comparison(s) of the primary metric" in md
    assert "Bonferroni 99 % interval" in md
    assert "22 more 95 % intervals" in md
    assert md.index("## Primary metric: balanced accuracy") < md.index("## Secondary metrics")
    by_pair = {(c["variant"], c["against"]): c for c in summary["comparisons"]}
    assert not math.isnan(by_pair["full", "fusion"]["threshold_jaccard"][0])
    assert all(math.isnan(by_pair[pair]["dice"][0]) for pair in by_pair if pair != ("full", "fusion"))

    from PIL import Image

    width, height = Image.open(out / "study.png").size
    assert 800 <= width <= 1000  # README width: one readable panel, not a row of seven
    assert height < width


def _cv_study(out, probabilities, blind, truth, folds, names, groups):
    """A finished cross-validated study: runs/<variant>-seed<s>-fold<k>/result.json, fold k holding the images
    with ``folds == k``; ``blind`` (V,S,N,K): the image-only probabilities (None: the run recorded none)."""
    n_variants, n_seeds, n, k = probabilities.shape
    ids = np.array([f"ISIC_{i:07d}" for i in range(n)])
    variants = [{"name": name, "config": None, "config_sha1": None, "overrides": []} for name in names]
    spec = {"name": "cv", "base_configs": [], "variants": variants, "seeds": list(range(n_seeds)), "split": "cv"}
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({**spec, "cv": {"folds": int(folds.max()) + 1, "seed": 0}}))
    for v, name in enumerate(names):
        for s in range(n_seeds):
            for fold in range(int(folds.max()) + 1):
                at = np.flatnonzero(folds == fold)
                per_image = {
                    "ids": ids[at].tolist(),
                    "group": {ids[i]: f"lesion{groups[i]}" for i in at},
                    "class_names": [f"C{c}" for c in range(k)],
                    "label": {ids[i]: int(truth[i]) for i in at},
                    "probabilities": {ids[i]: probabilities[v, s, i].tolist() for i in at},
                }
                if blind is not None:
                    per_image["probabilities_image_only"] = {ids[i]: blind[v, s, i].tolist() for i in at}
                run = out / "runs" / f"{name}-seed{s}-fold{fold}"
                run.mkdir(parents=True)
                result = {"steps": 10, "checkpoint_step": 10, "fit_seconds": 60.0, "per_image": per_image}
                (run / "result.json").write_text(json.dumps(result))


def _balanced_accuracy(truth, probabilities):
    predicted = probabilities.argmax(-1)
    return np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)])


def test_cross_validated_study_joins_the_folds_and_scores_both_ways(tmp_path):
    """Three folds of 3 classes: every image counted once, the image-only balanced accuracy computed from the
    image-only predictions (hand-computed here from the arrays), each class's images and lesions counted."""
    rng = np.random.default_rng(3)
    n, k = 300, 3
    truth = np.arange(n) % k
    groups = np.arange(n) // 2  # two images a lesion, both in one fold
    folds = groups % 3
    probabilities = np.stack([_run_probabilities(a, truth, k, rng) for a in ([0.6, 0.65], [0.8, 0.85])])
    blind = np.stack([_run_probabilities(a, truth, k, rng) for a in ([0.4, 0.45], [0.5, 0.55])])
    _cv_study(tmp_path / "cv", probabilities, blind, truth, folds, ["a", "b"], groups)

    summary = summarize_study(tmp_path / "cv", n_resamples=200)
    a, b = summary["rows"]
    assert a["balanced_accuracy_n"] == n
    assert summary["lesions"] == n // 2
    for row, v in ((a, 0), (b, 1)):
        assert row["balanced_accuracy_seeds"] == pytest.approx([_balanced_accuracy(truth, p) for p in probabilities[v]])
        assert row["balanced_accuracy_image_only_seeds"] == pytest.approx(
            [_balanced_accuracy(truth, p) for p in blind[v]]
        )
        assert row["per_class"]["C1"]["support"] == n // k
        assert row["per_class"]["C1"]["lesions"] == len(set(groups[truth == 1]))
    recall = np.mean([np.mean(p.argmax(-1)[truth == 2] == 2) for p in blind[1]])
    assert b["per_class"]["C2"]["recall_image_only"] == pytest.approx(recall)
    md = (tmp_path / "cv" / "study.md").read_text()
    assert "3-fold cross-validation" in md
    assert "the test split is not used" in md
    assert "recall, images alone" in md
    assert "balanced accuracy, images alone" in md


def test_cross_validated_study_without_image_only_predictions_has_no_image_only_column(tmp_path):
    rng = np.random.default_rng(4)
    n, k = 60, 2
    truth, groups = np.arange(n) % k, np.arange(n)
    probabilities = np.stack([_run_probabilities([0.7, 0.75], truth, k, rng)] * 2)
    _cv_study(tmp_path / "cv", probabilities, None, truth, groups % 2, ["a", "b"], groups)
    summary = summarize_study(tmp_path / "cv", n_resamples=50)
    assert "balanced_accuracy_image_only" not in summary["metrics"]
    assert "images alone" not in (tmp_path / "cv" / "study.md").read_text()


def test_folds_that_score_an_image_twice_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    n, k = 40, 2
    truth, groups = np.arange(n) % k, np.arange(n)
    probabilities = np.stack([_run_probabilities([0.7], truth, k, rng)])
    _cv_study(tmp_path / "cv", probabilities, None, truth, groups % 2, ["a"], groups)
    fold0 = tmp_path / "cv" / "runs" / "a-seed0-fold0" / "result.json"
    fold1 = json.loads((tmp_path / "cv" / "runs" / "a-seed0-fold1" / "result.json").read_text())
    result = json.loads(fold0.read_text())
    stray = fold1["per_image"]["ids"][0]
    result["per_image"]["ids"].append(stray)
    fold0.write_text(json.dumps(result))
    with pytest.raises(StudyError, match=f"scored by two folds.*{stray}"):
        summarize_study(tmp_path / "cv", n_resamples=50)


def test_an_unfinished_fold_is_named(tmp_path):
    rng = np.random.default_rng(6)
    n, k = 40, 2
    truth, groups = np.arange(n) % k, np.arange(n)
    _cv_study(
        tmp_path / "cv", np.stack([_run_probabilities([0.7], truth, k, rng)]), None, truth, groups % 2, ["a"], groups
    )
    (tmp_path / "cv" / "runs" / "a-seed0-fold1" / "result.json").unlink()
    with pytest.raises(StudyError, match="run a, seed 0, fold 1 has not finished"):
        summarize_study(tmp_path / "cv", n_resamples=50)


# ---------------------------------------------------------------- the study's definition (spec.json) and resuming


def test_spec_stores_config_paths_relative_to_the_folder_the_command_runs_in(tmp_path, tmp_path_factory):
    (tmp_path / "experiments").mkdir()
    base = tmp_path / "experiments" / "base.yaml"
    base.write_text("trainer: {}\n")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "other.yaml"  # outside the working folder: kept absolute
    elsewhere.write_text("model: {}\n")
    variant = parse_variant("experiments/base.yaml")
    spec = _study_spec("s", [str(base), str(elsewhere)], [variant], [0], "test", [])
    assert [path for path, _ in spec["base_configs"]] == ["experiments/base.yaml", str(elsewhere.resolve())]
    assert spec["variants"][0]["config"] == "experiments/base.yaml"
    assert variant.config == str(base.resolve())  # the fit commands themselves get absolute paths
    # The stored spec (JSON) of the same command is the same study: resuming is allowed.
    stored = json.loads(json.dumps(spec))
    _check_resume(tmp_path, stored, spec, None)


def test_resuming_with_a_changed_config_is_refused_and_names_the_config(tmp_path):
    (tmp_path / "experiments").mkdir()
    base, variant = tmp_path / "experiments" / "base.yaml", tmp_path / "experiments" / "full.yaml"
    base.write_text("trainer: {}\n")
    variant.write_text("model: {}\n")
    out = tmp_path / "study"
    out.mkdir()
    spec = _study_spec("study", [str(base)], [parse_variant(str(variant))], [0, 1], "test", [])
    (out / "spec.json").write_text(json.dumps(spec))
    base.write_text("trainer: {max_steps: 3}\n")
    variant.write_text("model: {x: 1}\n")
    with pytest.raises(StudyError, match="different study") as error:
        run_study(out, [str(base)], [str(variant)], seeds=[0, 1])
    message = str(error.value)
    assert "experiments/base.yaml has changed" in message
    assert "variant 'full': experiments/full.yaml has changed" in message
    assert "seeds" not in message  # only what differs is named


def test_resuming_with_other_folds_is_refused(tmp_path):
    (tmp_path / "experiments").mkdir()
    base = tmp_path / "experiments" / "base.yaml"
    base.write_text("trainer: {}\n")
    variant = parse_variant(str(base))
    spec = _study_spec("s", [str(base)], [variant], [0], "cv", [], {"folds": 3, "seed": 0})
    stored = json.loads(json.dumps(spec))
    _check_resume(tmp_path, stored, spec, None)  # the same folds: resumes
    other = _study_spec("s", [str(base)], [variant], [0], "cv", [], {"folds": 5, "seed": 0})
    with pytest.raises(StudyError, match="cv: .*'folds': 3.* when it started, .*'folds': 5"):
        _check_resume(tmp_path, stored, other, None)


#: README's study commands ("The paper's ablation, measured"), as arguments: (out, extra base configs, seeds).
README_STUDIES = {"docs/study-cpu": ([], [0, 1, 2]), "docs/study-cpu-3class": (["three_class.yaml"], [0, 1])}
README_FIT = [
    "--data.manifest=isic2018-cache/manifest.csv",
    "--trainer.max_time=null",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize("folder", sorted(README_STUDIES))
def test_readme_study_command_resumes_the_committed_study(folder, repo_root, monkeypatch):
    """The committed spec.json is what README's command defines today (configs inside the project with their
    current hashes, variants, seeds, folds, overrides): the command resumes into it, and a config edited while the
    study runs fails here, not hours later on resume."""
    spec_path = repo_root / folder / "spec.json"
    if not spec_path.is_file():
        pytest.skip(f"{folder} has not been started yet")
    readme = (repo_root / "README.md").read_text()
    assert f"--out {folder} " in readme
    assert "--max-steps 1000 --cv-folds 3" in readme
    extra, seeds = README_STUDIES[folder]
    monkeypatch.chdir(repo_root)  # README's commands run from the project root
    paper = ["experiments/base.yaml", "experiments/paper/paper.yaml", "experiments/paper/cpu.yaml"]
    configs = [*paper, *(f"experiments/paper/{c}" for c in extra)]
    variants = [parse_variant(f"experiments/paper/{v}.yaml") for v in ("baseline", "attention", "fusion", "full")]
    overrides = [*budget_overrides(1000, None, cv_folds=3), *README_FIT]
    stored = json.loads(spec_path.read_text())
    now = _study_spec(Path(folder).name, configs, variants, seeds, "cv", overrides, {"folds": 3, "seed": 0})
    assert _spec_differences(stored, json.loads(json.dumps(now))) == []
    paths = [path for path, _ in stored["base_configs"]] + [v["config"] for v in stored["variants"]]
    assert all(not path.startswith("/") and (repo_root / path).is_file() for path in paths), paths
    assert not [arg for arg in stored["overrides"] if "=/" in arg or "/work" in arg]  # nothing outside the project


# ---------------------------------------------------------------- variants


def test_parse_variant_forms(tmp_path):
    config = tmp_path / "full.yaml"
    config.write_text("model: {}\n")
    assert parse_variant(str(config)) == Variant("full", str(config))
    assert parse_variant(f"mine={config}") == Variant("mine", str(config))
    got = parse_variant(
        "cbam:model.net.init_args.attention=cbam,model.net.init_args.attention_placement=[skip,classifier]"
    )
    assert got == Variant(
        "cbam",
        None,
        (("model.net.init_args.attention", "cbam"), ("model.net.init_args.attention_placement", "[skip,classifier]")),
    )
    assert parse_variant(f"la={config}:model.loss.init_args.logit_adjustment=1").overrides == (
        ("model.loss.init_args.logit_adjustment", "1"),
    )
    assert got.arguments() == [
        "--model.net.init_args.attention=cbam",
        "--model.net.init_args.attention_placement=[skip,classifier]",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.yaml", "config file not found"),
        ("name-only", "neither a config file nor overrides"),
        ("x:novalue", "is not KEY=VALUE"),
        ("bad name:a=1", "give it a name"),
    ],
)
def test_parse_variant_errors(spec, message):
    with pytest.raises(StudyError, match=message):
        parse_variant(spec)


# ---------------------------------------------------------------- a tiny study, end to end

TINY = """
trainer:
  accelerator: cpu
  max_epochs: 1
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
model:
  net:
    init_args:
      encoder: test_resnet
      decoder_channels: [32, 16, 16, 8, 8]
data:
  synthetic_samples: 48
  synthetic_size: 48
  image_size: 32
  batch_size: 4
  num_workers: 0
"""


def _configs(tmp_path, repo_root) -> list[str]:
    """The two config files of every study here: the repo's base.yaml and a tiny run."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    return [str(repo_root / "experiments" / "base.yaml"), str(tmp_path / "tiny.yaml")]


def _tiny_study_args(configs: list[str], *extra: str) -> list[str]:
    """`skinfusion study` of two 2-step variants on ``configs``: the paper's baseline form (no attention, no
    decoder: scored on diagnosis alone) and CBAM attention; ``extra`` arguments follow."""
    return [
        "study",
        *[arg for config in configs for arg in ("--config", config)],
        "--variant",
        "plain:model.net.init_args.attention=null,model.net.init_args.decoder=false,model.net.init_args.fusion=none",
        "--variant",
        "cbam:model.net.init_args.attention=cbam",
        "--max-steps",
        "2",
        "--resamples",
        "100",
        *extra,
    ]


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes(tmp_path, repo_root, capsys):
    configs = _configs(tmp_path, repo_root)
    args = _tiny_study_args(configs, "--out", str(tmp_path / "study"))
    main([*args, "--jobs", "2"])  # two runs at once, one thread each
    out = tmp_path / "study"
    for name in ("study.md", "study.csv", "study.json", "study.png", "spec.json"):
        assert (out / name).is_file(), name
    spec = json.loads((out / "spec.json").read_text())
    assert re.fullmatch("[0-9a-f]{40}", spec["code"]["commit"])  # the code that trained it
    summary = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["plain", "cbam"]
    assert all(r["steps"] == 2 for r in summary["rows"])  # the budget: equal optimiser steps
    assert [(c["variant"], c["against"]) for c in summary["comparisons"]] == [("cbam", "plain")]
    assert set(summary["metrics"]) >= {"balanced_accuracy", "threshold_jaccard"}
    plain = out / "runs" / "plain-seed0"
    with open(plain / "metrics.csv") as f:  # validated at the last of the 2 steps, not only at an epoch's end
        assert [r["step"] for r in csv.DictReader(f) if r["val/loss"]] == ["0", "1"]
    result = json.loads((plain / "result.json").read_text())
    assert result["checkpoint"].endswith(".ckpt")
    assert result["isic"]["task3/num_images"] == len(result["per_image"]["label"]) > 0
    plain_row, cbam_row = summary["rows"]
    assert math.isnan(plain_row["threshold_jaccard"])  # no segmentation head: not measured...
    assert 0.0 <= cbam_row["threshold_jaccard"] <= 1.0  # ...while the decoder variant is
    assert all(math.isnan(x) for x in summary["comparisons"][0]["threshold_jaccard"])
    assert not math.isnan(summary["comparisons"][0]["balanced_accuracy"][0])
    md = (out / "study.md").read_text()
    assert "| plain |" in md
    assert "—" in md
    assert "| cbam | plain |" in md

    # Resume: a deleted run is redone, the finished one is kept untouched.
    kept = (plain / "result.json").stat().st_mtime_ns
    log_lines = (plain / "fit.log").read_text().count("\n$ ")
    import shutil

    shutil.rmtree(out / "runs" / "cbam-seed0")
    capsys.readouterr()
    main(args)
    assert "run 2/2 (cbam, seed 0)" in capsys.readouterr().err
    assert "run 1/2" not in capsys.readouterr().err
    assert (plain / "result.json").stat().st_mtime_ns == kept
    assert (plain / "fit.log").read_text().count("\n$ ") == log_lines
    assert (out / "runs" / "cbam-seed0" / "result.json").is_file()

    # The same folder with another study's arguments is refused before anything runs.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the CLI's error boundary: one line, exit status 2
        main([*args[:-2], "--seeds", "1", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "different study" in capsys.readouterr().err
    with pytest.raises(StudyError, match="different study"):  # the Python API raises it
        run_study(out, configs, ["plain:model.net.init_args.attention=null"], seeds=[1])


@pytest.mark.slow
def test_a_bad_variant_fails_before_any_training(tmp_path, repo_root, capsys):
    base, tiny = _configs(tmp_path, repo_root)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "study",
                "--config",
                base,
                "--config",
                tiny,
                "--variant",
                "good:model.net.init_args.attention=null",
                "--variant",
                "typo:model.net.init_args.atention=cbam",
                "--out",
                str(tmp_path / "study"),
            ]
        )
    assert exit_info.value.code == 2
    assert re.search(r"'typo'.*does not parse", capsys.readouterr().err)
    assert not (tmp_path / "study" / "runs").exists()


@pytest.mark.slow
def test_cross_validated_study_end_to_end_keeps_only_results_in_out_and_a_rerun_trains_nothing(tmp_path, repo_root):
    """--cv-folds 2 --work W: each variant x seed is 2 runs that together score every train+val image once, by
    the last checkpoint, validated only at the last step; OUT holds result.json files and the summary, W the
    checkpoints; rerun with W gone, the study finds every run finished, trains nothing and writes the same table."""
    configs = _configs(tmp_path, repo_root)
    out, work = tmp_path / "study", tmp_path / "work"
    args = _tiny_study_args(configs, "--cv-folds", "2", "--out", str(out), "--work", str(work))
    main([*args, "--jobs", "2"])
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"{v}-seed0-fold{k}" for v in ("cbam", "plain") for k in (0, 1)
    ]
    assert [p.name for p in (out / "runs").rglob("*") if p.is_file()] == ["result.json"] * 4
    assert not list(out.rglob("*.ckpt"))
    assert list(work.rglob("*.ckpt"))
    from skinfusion.data.datamodule import SkinFusionDataModule

    data = SkinFusionDataModule(synthetic_samples=48, synthetic_size=48, image_size=32)
    pool = {r.id for r in data.records("train") + data.records("val") if r.label is not None}
    for variant in ("plain", "cbam"):
        results = [json.loads((out / "runs" / f"{variant}-seed0-fold{k}" / "result.json").read_text()) for k in (0, 1)]
        scored = [set(r["per_image"]["label"]) for r in results]
        assert not scored[0] & scored[1]
        assert scored[0] | scored[1] == pool  # every labelled train+val image once, no test image
        assert all(r["checkpoint"].endswith("last.ckpt") for r in results)
    with open(work / "cbam-seed0-fold0" / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r["val/loss"]] == ["1"]  # the last step only
    summary = json.loads((out / "study.json").read_text())
    assert summary["rows"][0]["balanced_accuracy_n"] == len(pool)
    assert "balanced_accuracy_image_only" in summary["metrics"]
    table = (out / "study.md").read_text()

    import shutil

    shutil.rmtree(work)  # what a fresh checkout has: the committed results, no checkpoints
    main(args)
    assert not work.exists()  # nothing trained
    assert (out / "study.md").read_text() == table


def test_a_run_starts_training_while_another_is_evaluated(tmp_path, monkeypatch):
    """--jobs 2: evaluations take turns, but a lane whose run finished starts its next run at once (the progress
    line must not wait for the other lane's evaluation): the second evaluation waits here until the third run trains."""
    import threading

    import skinfusion.evaluation.study as study

    (tmp_path / "base.yaml").write_text("trainer: {}\n")
    third_trains = threading.Event()

    def train(command, run_dir, config, name, threads):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "fit_seconds").write_text("1.0\n")
        if "--seed_everything=2" in command:
            third_trains.set()

    evaluations = []

    def evaluate(checkpoint, data, split, out_dir, device):
        evaluations.append(out_dir)
        if len(evaluations) == 2:  # the lane whose run was evaluated first must be training run 3 meanwhile
            assert third_trains.wait(timeout=20), "run 3 did not start while the second run was evaluated"
        return {"isic": {}, "per_image": {}}

    monkeypatch.setattr(study, "_resolved_configs", lambda commands: {v.name: {"data": {}} for v in commands})
    monkeypatch.setattr(study, "_train", train)
    monkeypatch.setattr(study, "_evaluate_run", evaluate)
    monkeypatch.setattr(study, "_pick_checkpoint", lambda run_dir: run_dir / "last.ckpt")
    monkeypatch.setattr(study, "_last_checkpoint", lambda run_dir: run_dir / "last.ckpt")
    monkeypatch.setattr(study, "_steps_of", lambda checkpoint: 1)
    monkeypatch.setattr(study, "summarize_study", lambda out, n_resamples: {})
    monkeypatch.setattr(study, "_log_to_wandb", lambda summary, out, config: None)
    run_study(tmp_path / "s", [str(tmp_path / "base.yaml")], ["a:x=1"], seeds=[0, 1, 2], jobs=2)
    assert sorted(p.parent.name for p in (tmp_path / "s" / "runs").glob("*/result.json")) == [
        "a-seed0",
        "a-seed1",
        "a-seed2",
    ]


def test_status_lists_every_run_of_the_spec_finished_or_not(tmp_path, capsys):
    """--status reads only OUT: every run spec.json defines, in training order, with its figures once finished."""
    rng = np.random.default_rng(7)
    n, k = 40, 2
    truth, groups = np.arange(n) % k, np.arange(n)
    probabilities = np.stack([_run_probabilities([0.7, 0.8], truth, k, rng)] * 2)
    _cv_study(tmp_path / "cv", probabilities, None, truth, groups % 2, ["a", "b"], groups)
    path = tmp_path / "cv" / "runs" / "b-seed0-fold1" / "result.json"
    result = json.loads(path.read_text())
    result["isic"] = {
        "task3/balanced_accuracy": 0.625,
        "task3_image_only/balanced_accuracy": 0.5,
        "task3/num_images": 20,
    }
    path.write_text(json.dumps(result))
    (tmp_path / "cv" / "runs" / "a-seed1-fold0" / "result.json").unlink()

    summary = study_main(["--status", "--out", str(tmp_path / "cv")])
    names = [r["run"] for r in summary["runs"]]
    assert names == [f"{v}-seed{s}-fold{f}" for s in (0, 1) for v in ("a", "b") for f in (0, 1)]
    assert [r["run"] for r in summary["runs"] if not r["finished"]] == ["a-seed1-fold0"]
    out = capsys.readouterr().out
    assert "7 of 8 runs finished" in out
    assert "| b-seed0-fold1 | 10 | 1.0 | 20 | 0.625 | 0.500 |" in out
    assert "| a-seed1-fold0 | not finished |" in out
    with pytest.raises(SystemExit):  # no study in that folder
        main(["study", "--status", "--out", str(tmp_path)])
    assert "no study here" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # running needs the configs
        main(["study", "--out", str(tmp_path / "cv")])
    assert "give the base configs" in capsys.readouterr().err
