"""The Hugging Face layout: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`SkinFusionNet`.

A saved folder (or Hub repository) holds::

    config.json         the model's InferenceSettings: {"format": "skinfusion.net", "net_config": {...},
                        "class_names": [...], "image_size": S, "normalization": "imagenet"|"unit"}
    model.safetensors   the network's state dict
    README.md           a model card: task, classes, training data and its licence, metrics, intended use

``config.json`` is the record that checkpoints and exports also carry (:class:`~skinfusion.io.InferenceSettings`),
so ``predict``, ``evaluate`` and ``export`` take such a folder wherever they take a checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin

from skinfusion.errors import DataError, WeightsError
from skinfusion.io import InferenceSettings, load_state_dict, save_safetensors

if TYPE_CHECKING:
    from skinfusion.nn.net import SkinFusionNet

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "SkinFusionHubMixin", "load_pretrained", "read_metrics"]

#: ``format`` of a skinfusion ``config.json`` (and of ``skinfusion export --format safetensors`` files).
FORMAT = "skinfusion.net"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Licence of weights trained on HAM10000 / ISIC 2018 (CC BY-NC 4.0): they inherit its non-commercial term.
LICENSE = "cc-by-nc-4.0"
DEFAULT_DATASET = "ISIC 2018 Challenge (Tasks 1 and 3; HAM10000)"

ISIC_DESCRIPTIONS = {
    "MEL": "melanoma",
    "NV": "melanocytic nevus",
    "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "SCC": "squamous cell carcinoma (ISIC AKIEC)",
    "BKL": "benign keratosis-like lesion",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
}

MODEL_CARD = """---
{{ card_data }}
---

# {{ model_name }}

> **Research software, not a medical device.** This model has not been cleared or approved by any regulator
> (FDA, CE/MDR or other) and must not be used to diagnose, screen, triage or treat anyone.

A skinfusion `SkinFusionNet` for dermoscopic images: one
`{{ encoder }}` encoder shared by {{ parts }}.

## Task

{% if has_decoder %}* **Lesion segmentation**: a lesion probability map (ISIC 2018 Task 1), thresholded to a mask.
{% endif %}{% if has_classifier %}* **Diagnosis**: probabilities over {{ classes | length }} classes (ISIC 2018 Task 3).
{% endif %}* Input: an RGB dermoscopic image resized to {{ image_size }}x{{ image_size }}, normalised
  `{{ normalization }}` (`imagenet`: ImageNet mean/std; `unit`: [0, 1]); skinfusion reads both from `config.json`.
* Attention: `{{ attention }}` at {{ placement }}; its spatial maps come with every prediction.

{% if has_classifier %}## Classes

| index | name | meaning |
| --- | --- | --- |
{% for name, meaning in classes %}| {{ loop.index0 }} | {{ name }} | {{ meaning }} |
{% endfor %}
{% endif %}## Training data and licence

Trained on: {{ dataset }}.

The HAM10000 and ISIC 2018 Challenge data are licensed
[CC BY-NC 4.0](https://creativecommons.org/licenses/by-nc/4.0/) (attribution, **non-commercial**). These
weights are derived from them and are released under the same terms: research and non-commercial use only,
crediting the ISIC Archive and Tschandl et al., *The HAM10000 dataset*, Sci. Data 5, 180161 (2018).
The skinfusion code itself is Apache-2.0.

## Evaluation

{% if metrics %}Metrics of this checkpoint's own evaluation{% if metrics_source %} (`{{ metrics_source }}`){% endif %}:

| metric | value |
| --- | --- |
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}
{% else %}No evaluation was supplied with this model. `skinfusion evaluate --ckpt MODEL --truth MANIFEST --out DIR`
writes the official ISIC metrics to `DIR/metrics.json`; `skinfusion export --format hf --metrics DIR/metrics.json`
puts them here.
{% endif %}
## Intended use

* Research on dermoscopic image analysis: reproducing and comparing methods, studying attention maps,
  teaching. Dermoscopic images only, of the kind in the training data.
* **Out of scope**: any clinical use (diagnosis, screening, triage, treatment decisions), use by or on patients,
  and commercial use. Performance on other populations, skin types, devices or acquisition settings is unknown
  and likely lower; metrics on a held-out split of the same data over-estimate real-world performance.

## How to use

```python
{% if on_hub %}from huggingface_hub import snapshot_download
{% endif %}from skinfusion.inference.predictor import Predictor
from skinfusion.nn import SkinFusionNet

net = SkinFusionNet.from_pretrained("{{ location }}")  # the network alone
{% if on_hub %}folder = snapshot_download("{{ location }}")  # config.json, model.safetensors, README.md
{% else %}folder = "{{ location }}"
{% endif %}predictor = Predictor(folder)  # applies the stored input size, normalisation and class names
for prediction in predictor.predict_paths("images/"):
    print(prediction.id, prediction.top_k(3))
```

On the command line: `skinfusion predict --ckpt FOLDER images/ --out predictions` (also `evaluate`, `export`).

## Network config

```json
{{ net_config }}
```
"""


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_metrics(metrics: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """Scalar metrics for the model card: a mapping, or a ``metrics.json`` written by ``skinfusion evaluate``.

    Non-scalar entries (the confusion matrix) are left out; ``None`` (a metric that could not be computed) is kept.

    Raises:
        DataError: the file is missing or not a JSON object.
    """
    if metrics is None:
        return {}
    if isinstance(metrics, str | Path):
        path = Path(metrics)
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(path, f"cannot read the metrics ({type(err).__name__}: {err})") from err
        if not isinstance(metrics, Mapping):
            raise DataError(path, "metrics file is not a JSON object")
    return {str(k): v for k, v in metrics.items() if v is None or isinstance(v, bool | int | float | str)}


def settings_from_config(config: Mapping[str, Any] | None, where: str | Path) -> InferenceSettings:
    """The record stored as ``config.json``.

    Raises:
        WeightsError: no config, or one that is not a skinfusion record.
    """
    if config is None:
        raise WeightsError(
            f"{where}: no {CONFIG_NAME} (not a folder written by save_pretrained / `skinfusion export --format hf`, "
            "or a Hub repository that could not be reached)"
        )
    if not isinstance(config, Mapping) or config.get("format") != FORMAT or "net_config" not in config:
        raise WeightsError(f"{where}: {CONFIG_NAME} is not a skinfusion config (needs format={FORMAT!r}, net_config)")
    try:
        return InferenceSettings(**{k: v for k, v in config.items() if k != "format"})
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: bad {CONFIG_NAME} ({err})") from err


def _config_from_settings(settings: InferenceSettings) -> dict[str, Any]:
    return {"format": FORMAT, **settings.to_dict()}


def _card_kwargs(model_card_kwargs: dict[str, Any] | None, metrics: Any, dataset: str | None) -> dict[str, Any]:
    card = {**(model_card_kwargs or {})}
    card.update({k: v for k, v in (("metrics", metrics), ("dataset", dataset)) if v is not None})
    return card


class SkinFusionHubMixin(
    PyTorchModelHubMixin,
    library_name="skinfusion",
    license=LICENSE,
    pipeline_tag="image-classification",
    tags=["skinfusion", "dermoscopy", "skin-lesion", "image-segmentation", "image-classification", "isic-2018"],
    model_card_template=MODEL_CARD,
):
    """Hugging Face Hub support for :class:`~skinfusion.nn.SkinFusionNet` through ``huggingface_hub``'s mixin.

    Example:
        >>> net, settings = load_model("best.ckpt")
        >>> net.save_pretrained("skinfusion-ham10000", settings=settings, metrics="report/metrics.json")
        >>> net = SkinFusionNet.from_pretrained("skinfusion-ham10000")  # a folder, or a Hub repo id
        >>> net.push_to_hub("user/skinfusion-ham10000", settings=settings, metrics="report/metrics.json")

    ``push_to_hub`` (and ``save_pretrained(..., push_to_hub=True, repo_id=...)``) writes the same folder to a
    temporary place and uploads it as one commit; it needs a Hub token (``hf auth login``) and the network.
    """

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        settings: InferenceSettings | None = None,
        metrics: Mapping[str, Any] | str | Path | None = None,
        dataset: str | None = None,
        config: Mapping[str, Any] | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card (rewritten) to a folder.

        Args:
            settings: the inference settings to store. Default: those read by :meth:`from_pretrained`, else the
                network's config with the ISIC classes, 224 px and ``imagenet`` normalisation.
            metrics: the checkpoint's own evaluation for the card: a mapping, or the ``metrics.json`` of
                ``skinfusion evaluate``.
            dataset: what the network was trained on, for the card (default: ISIC 2018 / HAM10000).
            config: a stored ``config.json`` record (what :meth:`push_to_hub` passes); ``settings`` wins.
            repo_id: Hub repository for ``push_to_hub`` (default: the folder's name).
            model_card_kwargs: more values for the card template.
            push_to_hub_kwargs: passed to :meth:`push_to_hub` (``private``, ``token``, ``commit_message``...).

        Returns:
            The commit URL when pushed, else ``None``.
        """
        settings = settings or self._stored_settings(config)
        save_directory = Path(save_directory)
        (save_directory / "README.md").unlink(missing_ok=True)  # the mixin keeps an existing card: stale metrics
        return super().save_pretrained(
            save_directory,
            config=_config_from_settings(settings),
            repo_id=repo_id,
            push_to_hub=push_to_hub,
            model_card_kwargs={
                "settings": settings,
                "location": (repo_id or save_directory.name) if push_to_hub else str(save_directory),
                "on_hub": push_to_hub,
                **_card_kwargs(model_card_kwargs, metrics, dataset),
            },
            **push_to_hub_kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        settings: InferenceSettings | None = None,
        metrics: Mapping[str, Any] | str | Path | None = None,
        dataset: str | None = None,
        config: Mapping[str, Any] | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the :meth:`save_pretrained` folder to the Hub repository ``repo_id`` (created if needed).

        The other arguments as in :meth:`save_pretrained`; ``kwargs`` as in the mixin's ``push_to_hub``
        (``private``, ``token``, ``branch``, ``create_pr``, ``commit_message``...). Needs a write token.

        Returns:
            The URL of the commit.
        """
        config = _config_from_settings(settings or self._stored_settings(config))
        card = {**_card_kwargs(model_card_kwargs, metrics, dataset), "location": repo_id, "on_hub": True}
        return super().push_to_hub(repo_id, config=config, model_card_kwargs=card, **kwargs)

    def _stored_settings(self, config: Mapping[str, Any] | None) -> InferenceSettings:
        """The record given as ``config``, else the one read by ``from_pretrained``, else the default one."""
        config = config if config is not None else getattr(self, "_hub_mixin_config", None)
        if isinstance(config, Mapping) and config.get("format") == FORMAT:
            return settings_from_config(config, "config")
        return InferenceSettings.defaults_for(self)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The state dict as ``model.safetensors``, written atomically (shared storage split)."""
        save_safetensors(self.state_dict(), save_directory / WEIGHTS_NAME, metadata={"format": "pt"})

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The ``README.md``: task, classes, training data and its licence, metrics, intended use, config."""
        settings: InferenceSettings = kwargs.pop("settings", None) or self._stored_settings(None)
        metrics = read_metrics(kwargs.pop("metrics", None))
        source = kwargs.pop("metrics_source", None)
        config = settings.net_config
        parts = [
            part
            for part, on in (("a U-Net decoder (lesion mask)", self.has_decoder), ("a classifier", self.has_classifier))
            if on
        ]
        values = {
            "model_name": kwargs.pop("model_name", "SkinFusionNet"),
            "encoder": config.get("encoder", "?"),
            "parts": " and ".join(parts),
            "has_decoder": self.has_decoder,
            "has_classifier": self.has_classifier,
            "classes": [(name, ISIC_DESCRIPTIONS.get(name.upper(), "")) for name in settings.class_names],
            "image_size": settings.image_size,
            "normalization": settings.normalization,
            "attention": config.get("attention") or "none",
            "placement": ", ".join(self.attention_placement) or "nowhere",
            "dataset": kwargs.pop("dataset", None) or DEFAULT_DATASET,
            "metrics": [(name, _format_value(value)) for name, value in metrics.items()],
            "metrics_source": source,
            "location": kwargs.pop("location", "DIR"),
            "on_hub": kwargs.pop("on_hub", False),
            "net_config": json.dumps(config, indent=2),
        }
        info = self._hub_mixin_info
        card_data = ModelCardData(**info.model_card_data.to_dict())
        return ModelCard.from_template(card_data, template_str=info.model_card_template, **values, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> SkinFusionNet:
        """Rebuild a network from a :meth:`save_pretrained` folder or a Hub repository id.

        Args:
            pretrained_model_name_or_path: a local folder, or ``"user/name"`` on the Hub (with
                ``HF_HUB_OFFLINE=1`` only the Hub cache is read).
            kwargs: ``revision``, ``cache_dir``, ``force_download``, ``token``, ``local_files_only``,
                ``map_location`` (default ``"cpu"``), ``strict`` (default ``True``); any other keyword is a
                :class:`SkinFusionNet` argument that overrides the stored one (e.g. ``dropout=0.0``).

        Returns:
            The network in eval mode (:func:`load_pretrained` also returns its inference settings).

        Raises:
            WeightsError: a folder lacks ``config.json`` or ``model.safetensors``, its config is not a
                skinfusion record, or the weights do not fit it.
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():  # a clear error for a folder that lacks a file or whose config.json is not JSON
            missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
            if missing:
                raise WeightsError(f"{path}: missing {' and '.join(missing)} (a save_pretrained folder holds both)")
            try:
                json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise WeightsError(f"{path / CONFIG_NAME}: not readable JSON ({err})") from err
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: Mapping[str, Any] | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **net_kwargs: Any,
    ) -> SkinFusionNet:
        settings = settings_from_config(config, model_id)
        for key in ("proxies", "resume_download"):  # what huggingface_hub < 1.0 also passes; unused here
            net_kwargs.pop(key, None)
        if net_kwargs:  # from_pretrained(..., dropout=0.0): network arguments that override the stored ones
            settings = replace(settings, net_config={**settings.net_config, **net_kwargs})
        try:
            net = cls(**settings.net_config)
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{model_id}: {CONFIG_NAME} does not build a network ({err})") from err
        if Path(model_id).is_dir():
            weights = Path(model_id) / WEIGHTS_NAME
        else:
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        try:
            net.load_state_dict(load_state_dict(weights, map_location), strict=strict)
        except RuntimeError as err:
            raise WeightsError(f"{model_id}: weights do not match {CONFIG_NAME} ({err})") from err
        net._hub_mixin_config = _config_from_settings(settings)  # save_pretrained / push_to_hub keep the record
        return net.eval()


def load_pretrained(
    pretrained_model_name_or_path: str | Path, **kwargs: Any
) -> tuple[SkinFusionNet, InferenceSettings]:
    """:meth:`SkinFusionNet.from_pretrained <SkinFusionHubMixin.from_pretrained>` and the settings in its config.

    Returns:
        ``(net in eval mode, its record)``.
    """
    from skinfusion.nn.net import SkinFusionNet

    net = SkinFusionNet.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return net, net._stored_settings(None)
