"""Experiment loggers: Lightning's ``WandbLogger`` that falls back to offline mode by itself.

Without an API key or without a connection to the W&B server, :class:`WandbLogger` writes an
offline run under ``{save_dir}/wandb/offline-run-*`` (``wandb sync`` uploads it later) instead of
failing or hanging, and says so once in the log. ``WANDB_MODE`` (``online``, ``offline``,
``disabled``), when the user sets it, is obeyed as it is and no check is made.
"""

from __future__ import annotations

import logging
import netrc
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

__all__ = ["DEFAULT_BASE_URL", "WandbLogger", "find_wandb_api_key", "resolve_wandb_mode", "server_reachable"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def find_wandb_api_key(base_url: str | None = None) -> str | None:
    """Find W&B credentials the way ``wandb`` does, without prompting or touching the network.

    Looks at ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` and the netrc file (``NETRC``, else
    ``~/.netrc`` or ``~/_netrc``) entry of the server's host (``wandb login`` writes it there).

    Args:
        base_url: the W&B server; default ``WANDB_BASE_URL`` or https://api.wandb.ai.

    Returns:
        The API key (or the identity token file's path), or ``None`` when there is none.
    """
    if key := os.environ.get("WANDB_API_KEY", "").strip():
        return key
    token_file = os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip()
    if token_file and Path(token_file).expanduser().is_file():
        return token_file
    host = urlsplit(base_url or _base_url()).hostname
    if not host:
        return None
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return None
        return entry[2] if entry and entry[2] else None
    return None


def server_reachable(base_url: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the W&B server answers an HTTP request within ``timeout`` seconds.

    Requests ``{base_url}/healthz`` (through the ``HTTPS_PROXY``/``HTTP_PROXY`` proxies, as wandb
    would); any HTTP answer counts, even an error status. A TCP connection alone is not enough:
    sandboxes and captive networks often accept every connection and then never answer. The request
    runs in a daemon thread, so neither a slow name lookup nor a silent peer blocks past ``timeout``.
    """
    url = (base_url or _base_url()).rstrip("/") + "/healthz"
    if urlsplit(url).scheme not in ("http", "https"):
        return False
    result: list[bool] = []

    def request() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server is there, it answered
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=request, name="skinfusion-wandb-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve_wandb_mode(offline: bool = False, timeout: float = 2.0) -> tuple[str | None, str | None]:
    """Decide how a W&B run starts.

    Returns:
        ``(mode, reason)``: ``mode`` is ``"offline"`` when the run must fall back to offline mode
        (``reason`` says why), else ``None`` (wandb decides: ``WANDB_MODE``, or online).
    """
    if offline or os.environ.get("WANDB_MODE", "").strip():
        return None, None
    base_url = _base_url()
    if find_wandb_api_key(base_url) is None:
        return "offline", "no API key found (set WANDB_API_KEY or run `wandb login`)"
    if not server_reachable(base_url, timeout):
        return "offline", f"cannot reach {base_url} within {timeout:g} s"
    return None, None


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that runs offline by itself when W&B cannot be reached.

    Before the run starts it looks for credentials (:func:`find_wandb_api_key`) and makes one short
    HTTP request to the server (:func:`server_reachable`); when either fails the run is created
    offline, with one log line saying why and how to upload it later (``wandb sync``). Checkpoint
    uploads (``log_model``) are switched off in that case. A ``WANDB_MODE`` set by the user, or
    ``offline=True``, is obeyed without any check (``WANDB_MODE=online`` without a key then fails
    in ``wandb.init``, as the user asked). Only the process of global rank 0 checks
    (other ranks never create a run).

    Each saved checkpoint's path is written to the run summary (``checkpoints/best``,
    ``checkpoints/last``, ``checkpoints/best_score``, ``checkpoints/monitor``), uploaded or not.

    Args:
        name: display name of the run.
        save_dir: folder of the local run files (``{save_dir}/wandb/``).
        project: W&B project.
        version: id of a run to resume.
        offline: force offline mode.
        log_model: upload checkpoints as artifacts (``True``: at the end, ``"all"``: every save).
        prefix: prefix of every metric key.
        connect_timeout: seconds the connectivity check may take.
        **kwargs: passed on to Lightning's ``WandbLogger`` and ``wandb.init`` (``entity``, ``tags``, ``group``...).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "skinfusion",
        version: str | None = None,
        offline: bool = False,
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        connect_timeout: float = 2.0,
        **kwargs: Any,
    ) -> None:
        # LightningCLI passes every wandb.init argument, unset ones as None; drop those so wandb's
        # and Lightning's own defaults (e.g. resume="allow") apply.
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        self.fallback_reason: str | None = None
        if rank_zero_only.rank == 0 and "mode" not in kwargs:
            mode, self.fallback_reason = resolve_wandb_mode(offline, connect_timeout)
            if mode is not None:
                # mode= rather than offline=True: Lightning's offline flag rewrites os.environ["WANDB_MODE"].
                kwargs["mode"] = mode
                log_model = False
                run_dir = Path(save_dir) / "wandb"
                log.warning(
                    "W&B: %s; logging offline to %s (upload later with `wandb sync %s`)",
                    self.fallback_reason,
                    run_dir,
                    run_dir / "offline-run-*",
                )
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            version=version,
            offline=offline,
            log_model=log_model,
            prefix=prefix,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # wandb >= 0.19 warns about any explicit `anonymous`, even None.
            self._wandb_init.pop("anonymous", None)

    @property
    def offline_mode(self) -> bool:
        """Whether the run is (or will be) written offline only."""
        mode = self._wandb_init.get("mode") or os.environ.get("WANDB_MODE", "")
        return self._offline or mode in ("offline", "dryrun")

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        summary = getattr(self.experiment, "summary", None)
        if summary is None:
            return
        values = {
            "checkpoints/best": getattr(checkpoint_callback, "best_model_path", "") or None,
            "checkpoints/last": getattr(checkpoint_callback, "last_model_path", "") or None,
            "checkpoints/monitor": getattr(checkpoint_callback, "monitor", None),
        }
        score = getattr(checkpoint_callback, "best_model_score", None)
        if score is not None:
            values["checkpoints/best_score"] = float(score)
        for key, value in values.items():
            if value is not None:
                summary[key] = value
