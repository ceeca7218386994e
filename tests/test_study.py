"""``skinfusion study``: statistics against known answers, variant parsing, and a tiny study end to end."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings

import numpy as np
import pytest

from skinfusion.cli import main
from skinfusion.evaluation.study import (
    StudyError,
    Variant,
    bootstrap_difference,
    classification_summary,
    parse_variant,
    per_class_table,
    run_study,
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


def test_per_class_table_hand_computed():
    table = per_class_table(TRUTH, PROBS, ["A", "B", "C"])
    assert table["A"] == pytest.approx({"support": 2, "accuracy": 3 / 5, "precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert table["B"] == pytest.approx({"support": 2, "accuracy": 4 / 5, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert table["C"] == pytest.approx({"support": 1, "accuracy": 4 / 5, "precision": 0.0, "recall": 0.0, "f1": 0.0})


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


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes(tmp_path, repo_root, capsys):
    configs = _configs(tmp_path, repo_root)
    args = [
        "study",
        *[arg for config in configs for arg in ("--config", config)],
        "--variant",
        # The paper's baseline form: no attention and no decoder (scored on diagnosis alone).
        "plain:model.net.init_args.attention=null,model.net.init_args.decoder=false,model.net.init_args.fusion=none",
        "--variant",
        "cbam:model.net.init_args.attention=cbam",
        "--max-steps",
        "2",
        "--resamples",
        "100",
        "--out",
        str(tmp_path / "study"),
    ]
    main([*args, "--jobs", "2"])  # two runs at once, one thread each
    out = tmp_path / "study"
    for name in ("study.md", "study.csv", "study.json", "study.png", "spec.json"):
        assert (out / name).is_file(), name
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
