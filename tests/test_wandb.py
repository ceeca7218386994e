"""Weights & Biases: the offline fallback, and what a `fit` run writes to its local (offline) run folder.

wandb >= 0.20 writes an offline run only as its transaction log (``run-<id>.wandb``, the LevelDB log
format of protobuf ``Record``s) plus media files; ``files/config.yaml`` and ``files/wandb-summary.json``
appear only once the run is synced. The tests read the log back with a small reader of that format.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from modelutil import TINY_CLI

from skinfusion.training import wandb as sf_loggers
from skinfusion.training.wandb import (
    WandbLogger,
    WandbPanels,
    denormalize,
    panel_indices,
    resolve_wandb_mode,
    server_reachable,
    wandb_credentials_configured,
)

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"
NUM_IMAGES = 8  # WandbPanels' num_images in base.yaml
EPOCHS = 2


@pytest.fixture(scope="module", autouse=True)
def _fresh_wandb_afterwards():
    """These tests run wandb with and without WANDB_MODE and credentials; wandb keeps the settings of its first
    setup for the whole process, so reset it for the test files that come after (test_study's summary run)."""
    yield
    import wandb

    wandb.teardown()


# ---------------------------------------------------------------------- reading an offline run
def _log_records(path: Path):
    """Yield the payloads of a W&B transaction log (LevelDB log format: 32 KiB blocks of 7-byte-headed chunks)."""
    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, header = 32768, 7
    pos, data = header, b""
    while pos + header <= len(raw):
        if block - pos % block < header:  # block trailer padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack_from("<IHB", raw, pos)
        chunk = raw[pos + header : pos + header + length]
        if checksum != zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF:
            raise ValueError(f"bad checksum at byte {pos} of {path}")
        pos += header + length
        data += chunk
        if kind in (1, 4):  # FULL or LAST
            yield data
            data = b""


def _items(updates) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """History rows, config and summary of an offline run folder."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("*.wandb")
    history, config, summary = [], {}, {}
    for payload in _log_records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "run":
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return {"history": history, "config": config, "summary": summary}


# ---------------------------------------------------------------------- one shared fit run
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory) -> dict[str, Any]:
    """`skinfusion fit` with base.yaml's loggers and callbacks, tiny network, W&B falling back to offline by itself."""
    import wandb

    from skinfusion.cli import main
    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("wandb_fit")
    # Few training images (one step per epoch), a validation split larger than the panel.
    write_synthetic(root / "synthetic", n=40, seed=1, size=64, fractions=(0.25, 0.6, 0.15))
    manifest = root / "synthetic" / "manifest.csv"
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("NETRC", str(root / "no-netrc"))  # no credentials anywhere: the fallback must kick in
        mp.setenv("WANDB_CONFIG_DIR", str(root / "no-config"))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("SKINFUSION_CACHE", str(root / "cache"))
        logging.getLogger("skinfusion.training.wandb").addHandler(handler)
        wandb.teardown()  # an open run or settings loaded by an earlier test would otherwise be reused
        start = time.perf_counter()
        try:
            main(
                [
                    "fit",
                    *TINY_CLI,
                    f"--trainer.max_epochs={EPOCHS}",
                    "--trainer.log_every_n_steps=1",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.num_sanity_val_steps=0",
                    f"--data.manifest={manifest}",
                    "--data.image_size=64",
                    "--data.batch_size=8",
                    "--data.num_workers=0",
                ]
            )
        finally:
            wandb.finish()
            logging.getLogger("skinfusion.training.wandb").removeHandler(handler)
        seconds = time.perf_counter() - start  # noqa: F841  (handy when debugging)
        runs = sorted((root / "runs" / "wandb").glob("offline-run-*"))
        datamodule = SkinFusionDataModule(manifest=str(manifest), image_size=64, num_workers=0, augment=False)
        datamodule.setup("fit")
    assert len(runs) == 1, f"expected one offline run under {root / 'runs' / 'wandb'}, found {runs}"
    return {
        "dir": runs[0],
        "root": root,
        **read_offline_run(runs[0]),
        "messages": messages,
        "seconds": seconds,
        "val": datamodule.datasets["val"],
        "class_names": list(datamodule.class_names),
    }


def _rows_with(history: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [row for row in history if key in row or any(k.startswith(key + "/") for k in row)]


def test_fit_falls_back_to_offline_with_one_message(fit_run):
    fallback = [m for m in fit_run["messages"] if "offline" in m]
    assert len(fallback) == 1, fit_run["messages"]
    assert "no API key" in fallback[0]
    assert "wandb sync" in fallback[0]


def test_history_has_validation_metrics_each_epoch(fit_run):
    rows = [row for row in fit_run["history"] if "val/dice" in row]
    assert len(rows) == EPOCHS
    steps = [row["trainer/global_step"] for row in rows]
    assert steps == sorted(steps)
    assert len(set(steps)) == EPOCHS
    for row in rows:
        assert 0.0 <= row["val/dice"] <= 1.0
        assert "val/loss" in row
        assert "val/f1/MEL" in row


def test_panel_has_mask_overlays_of_the_same_images_every_epoch(fit_run):
    from PIL import Image

    val = fit_run["val"]
    indices = panel_indices(len(val), NUM_IMAGES)
    assert len(val) > NUM_IMAGES  # the selection is a true subset here
    expected_ids = [val[i]["id"] for i in indices]
    rows = _rows_with(fit_run["history"], "val/panel")
    assert len(rows) == EPOCHS
    for row in rows:
        assert row["val/panel/_type"] == "images/separated"
        assert row["val/panel/count"] == NUM_IMAGES
        captions = row["val/panel/captions"]
        assert [c.split(",")[0] for c in captions] == expected_ids
        assert all("true " in c and "pred " in c for c in captions)
        for name in row["val/panel/filenames"]:
            assert (fit_run["dir"] / "files" / name).is_file()
        masks = row["val/panel/all_masks"]
        assert len(masks) == NUM_IMAGES
        for index, entry in zip(indices, masks, strict=True):
            assert set(entry) == {"prediction", "ground_truth"}
            truth = np.asarray(Image.open(fit_run["dir"] / "files" / entry["ground_truth"]["path"]))
            expected = (val[index]["mask"][0] > 0.5).numpy().astype(np.uint8)
            np.testing.assert_array_equal(truth, expected)
            prediction = np.asarray(Image.open(fit_run["dir"] / "files" / entry["prediction"]["path"]))
            assert prediction.shape == expected.shape
            assert set(np.unique(prediction)) <= {0, 1}
    media = fit_run["dir"] / "files" / "media" / "images"
    assert len(list((media / "val").glob("panel_*.png"))) >= NUM_IMAGES
    assert list((media / "mask").rglob("*.mask.png"))


def test_attention_heat_maps_are_logged(fit_run):
    (row,) = _rows_with(fit_run["history"], "val/attention/skip.0")[-1:]
    for level in range(5):  # attention_placement: [skip] gives one map per skip level
        key = f"val/attention/skip.{level}"
        assert row[f"{key}/count"] == NUM_IMAGES
        for name in row[f"{key}/filenames"]:
            assert (fit_run["dir"] / "files" / name).is_file()


def test_gradcam_panel_beside_the_attention_maps(fit_run):
    (row,) = _rows_with(fit_run["history"], "val/gradcam")[-1:]
    assert row["val/gradcam/count"] == NUM_IMAGES
    for name in row["val/gradcam/filenames"]:
        assert (fit_run["dir"] / "files" / name).is_file()
    # Logged with the attention maps, at the same validation steps.
    steps = [r["_step"] for r in _rows_with(fit_run["history"], "val/gradcam")]
    assert steps == [r["_step"] for r in _rows_with(fit_run["history"], "val/attention/skip.0")]
    assert len(steps) == EPOCHS


def test_gradcam_panel_under_inference_mode(tiny_net, caplog):
    """`skinfusion validate` runs under torch.inference_mode: the Grad-CAM panel still computes (no warning)."""
    from skinfusion.training.wandb import WandbPanels

    panels = WandbPanels(explain="gradcam")
    net = tiny_net().eval()
    with torch.inference_mode():
        batch = {"image": torch.rand(2, 3, 64, 64)}
        with caplog.at_level(logging.WARNING, logger="skinfusion.training.wandb"):
            cams = panels._gradcam(net, batch, torch.float32)
    assert not caplog.records
    assert panels.explain == "gradcam"
    assert cams.shape == (2, 64, 64)
    assert cams.max() > 0


def test_confusion_matrix_and_per_class_table(fit_run):
    val, classes = fit_run["val"], fit_run["class_names"]
    labelled = sum(int(val[i]["label"]) >= 0 for i in range(len(val)))
    row = _rows_with(fit_run["history"], "val/per_class")[-1]
    metrics = next(r for r in reversed(fit_run["history"]) if "val/dice" in r)
    table = json.loads((fit_run["dir"] / "files" / row["val/per_class/path"]).read_text())
    assert table["columns"] == ["class", "precision", "recall", "f1", "support"]
    assert [r[0] for r in table["data"]] == classes
    for name, precision, recall, f1, _ in table["data"]:
        assert precision == pytest.approx(metrics[f"val/precision/{name}"])
        assert recall == pytest.approx(metrics[f"val/recall/{name}"])
        assert f1 == pytest.approx(metrics[f"val/f1/{name}"])
    assert sum(r[4] for r in table["data"]) == labelled
    confmat = json.loads((fit_run["dir"] / "files" / row["val/confusion_matrix_table/path"]).read_text())
    assert confmat["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert len(confmat["data"]) == len(classes) ** 2
    assert sum(r[2] for r in confmat["data"]) == labelled
    support = {name: sum(r[2] for r in confmat["data"] if r[0] == name) for name in classes}
    assert support == {r[0]: r[4] for r in table["data"]}


def test_config_and_checkpoints_are_recorded(fit_run):
    config = fit_run["config"]
    net = config["model"]["net"]
    assert net["class_path"] == "skinfusion.nn.SkinFusionNet"
    assert net["init_args"]["encoder"] == "test_resnet"
    assert net["init_args"]["decoder_channels"] == [16, 16, 8, 8, 8]
    assert config["data"]["image_size"] == 64
    assert config["trainer"]["max_epochs"] == EPOCHS
    assert config["encoder_lr_mult"] == 1.0  # the module's own hyperparameters, logged by Lightning
    summary = fit_run["summary"]
    for key in ("checkpoints/best", "checkpoints/last"):
        assert (fit_run["root"] / summary[key]).is_file(), summary[key]
    assert summary["checkpoints/monitor"] == "val/loss"
    assert "best" in Path(summary["checkpoints/best"]).name


# ---------------------------------------------------------------------- the offline fallback
NO_KEY = "no API key found (set WANDB_API_KEY or run `wandb login`)"


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No W&B credentials, settings or proxies anywhere wandb looks, and a fresh wandb (it loads its settings and
    credentials once per process) that is torn down again afterwards, its service process with it."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "absent-config"))
    wandb.teardown()
    yield
    wandb.teardown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_netrc(path: Path, base_url: str, key: str) -> None:
    """An entry as `wandb login` writes it: the server URL's host and port, login ``user``, the key."""
    path.write_text(f"machine {urlsplit(base_url).netloc}\n  login user\n  password {key}\n")


@pytest.fixture
def http_server():
    """A local HTTP server that answers every GET with 200 (a stand-in for the W&B server)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _assert_left_to_wandb(caplog) -> None:
    """A WandbLogger built now keeps wandb's own mode, with no fallback and no message."""
    with caplog.at_level(logging.WARNING, logger="skinfusion.training.wandb"):
        logger = WandbLogger()
    assert "mode" not in logger._wandb_init
    assert logger.fallback_reason is None
    assert not caplog.records


def test_fallback_without_api_key(no_credentials, caplog):
    assert wandb_credentials_configured() is False
    with caplog.at_level(logging.WARNING, logger="skinfusion.training.wandb"):
        logger = WandbLogger(save_dir="runs")
    assert logger._wandb_init["mode"] == "offline"
    assert logger.offline_mode
    assert logger.fallback_reason == NO_KEY
    assert len(caplog.records) == 1
    assert "runs/wandb" in caplog.records[0].getMessage()


def test_fallback_when_server_unreachable(no_credentials, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    base_url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", base_url)
    assert wandb_credentials_configured() is True
    with caplog.at_level(logging.WARNING, logger="skinfusion.training.wandb"):
        logger = WandbLogger(log_model=True)
    assert logger._wandb_init["mode"] == "offline"
    assert logger.fallback_reason == f"cannot reach {base_url} within 2 s"
    assert logger._log_model is False  # no checkpoint uploads from an offline run
    assert len(caplog.records) == 1


def test_online_when_key_and_server_are_there(no_credentials, http_server, monkeypatch, tmp_path, caplog):
    _write_netrc(tmp_path / "netrc", http_server, "k" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", http_server)
    assert wandb_credentials_configured() is True
    assert server_reachable(http_server, timeout=2.0)
    _assert_left_to_wandb(caplog)


def test_netrc_key_for_the_installed_wandbs_default_server(no_credentials, monkeypatch, tmp_path):
    """`wandb login` writes the key under the host of wandb's default server, which moved between releases."""
    import wandb

    _write_netrc(tmp_path / "netrc", wandb.Settings().base_url, "d" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_credentials_configured() is True


@pytest.mark.parametrize("where", ["global", "workspace"])
def test_self_hosted_server_of_a_settings_file(no_credentials, monkeypatch, tmp_path, where):
    """`wandb login --host URL` stores URL in a settings file (a project's ``wandb/settings`` overrides the global
    one) and the key under URL's host: the key is found and URL is the server that is checked."""
    base_url = f"http://127.0.0.1:{_closed_port()}"
    folder = tmp_path / ("config" if where == "global" else "wandb")
    folder.mkdir()
    (folder / "settings").write_text(f"[default]\nbase_url = {base_url}\n")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    _write_netrc(tmp_path / "netrc", base_url, "s" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode(timeout=0.5) == ("offline", f"cannot reach {base_url} within 0.5 s")


def test_key_of_another_server_is_not_used(no_credentials, monkeypatch, tmp_path):
    """A netrc key is for its server only: with WANDB_BASE_URL elsewhere, wandb has no credentials."""
    _write_netrc(tmp_path / "netrc", f"http://127.0.0.1:{_closed_port()}", "o" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    assert resolve_wandb_mode() == ("offline", NO_KEY)


def test_an_error_from_wandb_counts_as_no_credentials(no_credentials, monkeypatch, caplog):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("broken settings")

    monkeypatch.setattr(wandb, "login", broken)
    with caplog.at_level(logging.DEBUG, logger="skinfusion.training.wandb"):
        assert wandb_credentials_configured() is False
        assert resolve_wandb_mode() == ("offline", NO_KEY)
    assert any("broken settings" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("mode", ["online", "disabled", "offline"])
def test_user_wandb_mode_is_obeyed_without_checks(no_credentials, monkeypatch, caplog, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    for name in ("wandb_credentials_configured", "server_reachable"):
        monkeypatch.setattr(sf_loggers, name, lambda *a, **k: pytest.fail("no check expected"))
    _assert_left_to_wandb(caplog)


def test_explicit_offline_has_no_message(no_credentials, caplog):
    with caplog.at_level(logging.WARNING, logger="skinfusion.training.wandb"):
        logger = WandbLogger(offline=True)
    assert logger.offline_mode
    assert not caplog.records


def test_connectivity_check_does_not_hang_on_a_silent_peer(no_credentials):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.perf_counter()
        assert server_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) is False
        assert time.perf_counter() - start < 1.5


# ---------------------------------------------------------------------- the panel callback's parts
def test_panels_noop_without_wandb_logger(caplog):
    from pytorch_lightning.loggers import CSVLogger

    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, loggers=[CSVLogger("runs")])
    callback = WandbPanels()
    with caplog.at_level(logging.DEBUG, logger="skinfusion.training.wandb"):
        callback.on_validation_end(trainer, SimpleNamespace())
        callback.on_validation_end(trainer, SimpleNamespace())
    assert len(caplog.records) == 1
    assert "no WandbLogger" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("size", "count", "expected"),
    [(10, 4, [0, 3, 6, 9]), (5, 8, [0, 1, 2, 3, 4]), (7, 1, [0]), (9, 3, [0, 4, 8]), (0, 3, []), (5, 0, [])],
)
def test_panel_indices(size, count, expected):
    assert panel_indices(size, count) == expected


def test_denormalize():
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixel = torch.tensor([0.2, 0.5, 1.0])
    image = ((pixel - mean) / std).view(3, 1, 1).expand(3, 2, 2)
    np.testing.assert_array_equal(denormalize(image, "imagenet")[0, 0], [51, 128, 255])
    np.testing.assert_array_equal(denormalize(torch.full((3, 1, 1), 2.0), "unit")[0, 0], [255, 255, 255])
    with pytest.raises(ValueError, match="normalization"):
        denormalize(image, "zscore")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": -1}, {"every_n_epochs": 0}, {"normalization": "zscore"}, {"mask_threshold": 1.0}],
)
def test_panels_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WandbPanels(**kwargs)


# ---------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys
from skinfusion.cli import main

main(["fit", "--config", sys.argv[1], *sys.argv[2:]])
"""


@pytest.mark.slow
def test_ddp_two_processes_log_one_run(tmp_path, monkeypatch):
    """Two CPU processes (gloo): one offline run, written by rank 0 alone, with a panel each epoch; no deadlock."""
    import subprocess
    import sys

    from skinfusion.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "synthetic", n=40, seed=1, size=64, fractions=(0.25, 0.6, 0.15))
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    monkeypatch.delenv("WANDB_MODE")
    # An earlier test's wandb service (this process) must not be shared: its log would be flushed after we read it.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = [
        "--model.net.init_args.encoder=test_resnet",
        "--model.net.init_args.decoder_channels=[16,16,8,8,8]",
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--data.manifest={tmp_path / 'synthetic' / 'manifest.csv'}",
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.num_workers=0",
    ]
    done = subprocess.run(
        [sys.executable, str(script), str(BASE), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("logging offline to") == 1  # said once, by rank 0
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    panels = [row["val/panel/count"] for row in run["history"] if "val/panel/count" in row]
    assert panels == [NUM_IMAGES] * EPOCHS
    assert (tmp_path / run["summary"]["checkpoints/last"]).is_file()
