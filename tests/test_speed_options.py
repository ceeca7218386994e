"""Every speed option gives the same results as the plain path (within float tolerance).

Options: ``channels_last`` and ``compile`` (SkinFusionModule), bf16 autocast (``trainer.precision``),
``normalize_on_device`` (SkinFusionDataModule: uint8 batches normalised after transfer), and the
inference mode of validate/predict (Lightning's ``Trainer(inference_mode=True)``).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from modelutil import capability_forced_down, tiny_net
from pytorch_lightning.plugins.precision import MixedPrecision

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, normalize_tensor
from skinfusion.training.losses import MultiTaskLoss
from skinfusion.training.module import SkinFusionModule

NET = {"decoder_channels": [32, 16, 16, 8, 8]}
SIZE = 64


def _module(seed: int = 0, **options) -> SkinFusionModule:
    return SkinFusionModule(tiny_net(seed, **NET), **options)


def _batch(n: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, SIZE, SIZE, generator=generator),
        "mask": (torch.rand(n, 1, SIZE, SIZE, generator=generator) > 0.5).float(),
        "has_mask": torch.tensor([True, False, True, True][:n]),
        "label": torch.tensor([0, 3, -1, 6][:n]),
    }


def _datamodule(**kwargs) -> SkinFusionDataModule:
    return SkinFusionDataModule(
        synthetic_samples=24, synthetic_size=64, image_size=48, batch_size=4, num_workers=0, **kwargs
    )


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


# ---------------------------------------------------------------- uint8 path, normalisation on the device


def test_normalize_tensor_matches_hand_computed_values():
    image = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    unit = normalize_tensor(image, "unit")
    assert unit.dtype == torch.float32
    assert unit[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 128 / 255])
    imagenet = normalize_tensor(image, "imagenet")
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 255, 128), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert imagenet[0, :, 1, 1].tolist() == pytest.approx(expected, abs=1e-6)


def test_normalize_tensor_rejects_bad_input():
    with pytest.raises(ValueError, match="normalization"):
        normalize_tensor(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "zscore")
    with pytest.raises(ValueError, match="3,H,W"):
        normalize_tensor(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("stage", ["train", "val"])
def test_uint8_pipeline_then_normalize_equals_float_pipeline(stage):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    mask = (rng.random((70, 90)) > 0.5).astype(np.uint8)
    float_out = build_transforms(stage, 48, seed=5)(image=image, mask=mask)
    uint8_out = build_transforms(stage, 48, seed=5, normalize=False)(image=image, mask=mask)
    assert uint8_out["image"].dtype == torch.uint8
    assert uint8_out["image"].shape == (3, 48, 48)
    assert uint8_out["mask"].dtype == torch.uint8
    assert uint8_out["mask"].shape == (1, 48, 48)
    torch.testing.assert_close(normalize_tensor(uint8_out["image"]), float_out["image"], atol=1e-5, rtol=0)
    assert torch.equal(uint8_out["mask"].float(), float_out["mask"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_normalize_on_device_batches_equal_the_float_batches(split):
    plain, fast = _datamodule(), _datamodule(normalize_on_device=True)
    for dm in (plain, fast):
        dm.prepare_data()
        dm.setup("fit")
    loader = f"{split}_dataloader"
    expected = next(iter(getattr(plain, loader)()))
    raw = next(iter(getattr(fast, loader)()))
    assert raw["image"].dtype == torch.uint8
    assert raw["mask"].dtype == torch.uint8
    got = fast.on_after_batch_transfer(raw, 0)
    assert got["image"].dtype == torch.float32
    assert got["mask"].dtype == torch.float32
    torch.testing.assert_close(got["image"], expected["image"], atol=1e-5, rtol=0)
    assert torch.equal(got["mask"], expected["mask"])
    assert torch.equal(got["label"], expected["label"])
    assert got["id"] == expected["id"]
    # The plain DataModule leaves float batches alone.
    assert plain.on_after_batch_transfer(expected, 0)["image"] is expected["image"]


# ---------------------------------------------------------------- module options


def test_channels_last_gives_the_same_outputs_and_state_dict_keys():
    plain, fast = _module(), _module(channels_last=True)
    fast.configure_model()
    kernels = [p for p in fast.net.parameters() if p.ndim == 4]
    assert kernels
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert list(plain.state_dict()) == list(fast.state_dict())
    batch = _batch()
    plain.eval()
    fast.eval()
    with torch.no_grad():
        a, b = plain(batch["image"]), fast(batch["image"])
    torch.testing.assert_close(b.mask_logits, a.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.class_logits, a.class_logits, atol=1e-4, rtol=1e-4)


def _loss_and_gradients(module: SkinFusionModule, batch: dict, dtype: torch.dtype = torch.float32):
    module.to(dtype).train()
    torch.manual_seed(1)  # same dropout mask
    cast = {**batch, "image": batch["image"].to(dtype), "mask": batch["mask"].to(dtype)}
    loss = module.loss(module(cast["image"]), cast)["loss"]
    loss.backward()
    return loss.detach().double(), [p.grad.double() for p in module.parameters()]


def _module_with_live_blocks(**options) -> SkinFusionModule:
    """``_module`` with every BatchNorm scale 1: timm zero-inits the last one of each residual block, which
    leaves the block's other weights without a gradient at initialisation (nothing to compare)."""
    module = _module(**options)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.fill_(1.0)
    return module


def test_channels_last_gives_the_same_loss_and_gradients():
    """channels_last computes the same function: as close to the exact gradients as the default layout.

    Both layouts are float32 sums in different orders, so they differ by rounding, and how much depends on
    the CPU's kernels (on AVX2-only CPUs oneDNN's NCHW backward is ~10x less accurate than on AVX-512). So
    each is compared with a float64 run of the same network, batch and dropout mask, and channels_last must
    be no further from it than the default layout (times 4), or within 1 % of the gradient's norm (float32
    rounding through a deep network; a layout bug is off by the order of the gradient itself).
    """
    batch = _batch()
    exact_loss, exact = _loss_and_gradients(_module_with_live_blocks(), batch, torch.float64)
    plain_loss, plain = _loss_and_gradients(_module_with_live_blocks(), batch)
    fast = _module_with_live_blocks(channels_last=True)
    fast.configure_model()
    fast_loss, fast_grads = _loss_and_gradients(fast, batch)
    assert abs(fast_loss - exact_loss) <= max(4 * abs(plain_loss - exact_loss), 1e-6 * abs(exact_loss))
    names = [name for name, _ in _module().named_parameters()]
    for name, a, b, ref in zip(names, plain, fast_grads, exact, strict=True):
        scale = ref.norm()
        assert scale > 0, name  # every parameter gets a gradient, so the comparison is not vacuous
        plain_error, fast_error = (a - ref).norm(), (b - ref).norm()
        assert fast_error <= max(4 * plain_error, 1e-2 * scale), (
            f"{name}: channels_last gradient error {fast_error / scale:.2e} of its norm, default layout"
            f" {plain_error / scale:.2e}"
        )


def test_compile_must_be_bool_or_dict():
    with pytest.raises(ValueError, match="compile"):
        _module(compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
@pytest.mark.skipif(
    capability_forced_down(),
    reason="inductor's code under an ATEN_CPU_CAPABILITY override is not what an AVX2 CPU runs: with torch 2.14.1 "
    "the compiled network returns NaN there (eager is fine); CPUs that really lack AVX-512 run this test",
)
def test_compile_gives_the_same_outputs_and_keeps_parameter_names():
    plain, fast = _module(), _module(compile=True)
    fast.configure_model()
    fast.configure_model()  # idempotent: compiled once
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert not any("_orig_mod" in key for key in fast.state_dict())
    plain.eval()
    fast.eval()
    image = _batch()["image"]
    with torch.no_grad():
        a, b = plain(image), fast(image)
    torch.testing.assert_close(b.mask_logits, a.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.class_logits, a.class_logits, atol=1e-4, rtol=1e-4)
    assert set(b.attention) == set(a.attention)


def test_bf16_autocast_loss_is_close_to_fp32():
    module = _module().eval()
    batch = _batch()
    with torch.no_grad():
        fp32 = module.loss(module(batch["image"]), batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = module(batch["image"])
            bf16 = module.loss(output, batch)
    assert output.class_logits.dtype == torch.bfloat16  # autocast did run the network in bf16
    assert bf16["loss"].dtype == torch.float32  # the loss math stays float32
    for key in ("loss", "loss_seg", "loss_cls"):
        torch.testing.assert_close(bf16[key], fp32[key], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- through the Trainer


def test_all_options_together_give_the_same_validation_loss(tmp_path):
    results = []
    for options, data in (({}, {}), ({"channels_last": True}, {"normalize_on_device": True})):
        dm = _datamodule(**data)
        module = _module(**options)
        results.append(_trainer(tmp_path, limit_val_batches=2).validate(module, datamodule=dm, verbose=False)[0])
    assert results[0]["val/loss"] == pytest.approx(results[1]["val/loss"], rel=1e-4, abs=1e-5)
    assert results[0]["val/dice"] == pytest.approx(results[1]["val/dice"], abs=1e-4)


def test_bf16_mixed_fit_runs_and_keeps_float32_weights(tmp_path):
    dm = _datamodule(normalize_on_device=True)
    module = _module(channels_last=True)
    _trainer(tmp_path, precision="bf16-mixed", max_steps=2, limit_val_batches=1).fit(module, datamodule=dm)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _RecordsInferenceMode(SkinFusionModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.modes: dict[str, bool] = {}

    def validation_step(self, batch, batch_idx):
        self.modes["val"] = torch.is_inference_mode_enabled()
        return super().validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self.modes["predict"] = torch.is_inference_mode_enabled()
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_validate_and_predict_run_in_inference_mode(tmp_path):
    torch.manual_seed(0)
    module = _RecordsInferenceMode(tiny_net(**NET), loss=MultiTaskLoss())
    dm = _datamodule(predict_split="val")
    trainer = _trainer(tmp_path, limit_val_batches=1, limit_predict_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.predict(module, datamodule=dm)
    assert module.modes == {"val": True, "predict": True}


# ---------------------------------------------------------------- fused AdamW, training metrics off


def _fit_weights(tmp_path, **options) -> tuple[list[torch.Tensor], SkinFusionModule]:
    """The weights after 4 training steps of ``_module(**options)``, and the module."""
    module = _module(**options)
    _trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=_datamodule())
    return [p.detach().clone() for p in module.parameters()], module


def test_default_optimizer_is_fused_adamw_on_cpu():
    module = _module()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == pytest.approx(1e-3)
    assert optimizer.defaults["weight_decay"] == pytest.approx(1e-4)


def test_fused_adamw_trains_to_the_same_weights_as_the_loop(tmp_path):
    def loop(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, foreach=False)

    fused, _ = _fit_weights(tmp_path)
    looped, module = _fit_weights(tmp_path, optimizer=loop)
    assert module.trainer.optimizers[0].defaults["fused"] in (None, False)
    # The two kernels round differently (by an ulp), and over several steps Adam turns an ulp in a near-zero
    # gradient (its sign) into a step of the full learning rate in a few elements, how many depending on the
    # CPU's kernels (1 % of the distance moved with AVX2 kernels). So the runs must agree to 5 % of how far
    # training moved the weights; a wrong update rule moves them apart by the order of that distance itself.
    # The update itself is compared exactly in test_fused_adamw_step_equals_the_loop_step.
    initial = [p.detach() for p in _module().parameters()]
    moved = torch.cat([(a - p).flatten() for a, p in zip(fused, initial, strict=True)]).norm()
    assert moved > 0  # the runs trained, so the comparison is not vacuous
    apart = torch.cat([(a - b).flatten() for a, b in zip(fused, looped, strict=True)]).norm()
    assert apart <= 0.05 * moved, f"fused and looped AdamW {apart:.3g} apart after moving {moved:.3g}"


def test_fused_adamw_step_equals_the_loop_step():
    """One step from the same weights and gradients: the fused kernel computes the loop's update."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(7)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.AdamW(
            params, lr=1e-3, weight_decay=0.1, fused=fused, foreach=False if not fused else None
        )
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b, w in zip(*results, weights, strict=True):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_optimizer_with_fp16_gradient_clipping_is_refused_at_setup():
    def fused(params):
        return torch.optim.AdamW(params, lr=1e-3, fused=True)

    module = _module(optimizer=fused)
    # fp16 with a GradScaler (what "16-mixed" is on a GPU; on a CPU Lightning would switch to bf16).
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(accelerator="cpu", plugins=[fp16], gradient_clip_val=1.0, logger=False)
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"fused: false.*bf16-mixed"):
        module.configure_optimizers()
    # The default optimiser picks the per-parameter loop instead, which Lightning can clip.
    default = _module()
    default.trainer = trainer
    assert default.configure_optimizers().defaults["fused"] in (None, False)


def test_train_metrics_off_logs_losses_but_no_training_metrics(tmp_path):
    results = {}
    for flag in (True, False):
        module = _module(train_metrics=flag)
        trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
        trainer.fit(module, datamodule=_datamodule())
        results[flag] = set(trainer.callback_metrics)
    assert {"train/loss_epoch", "train/dice", "train/accuracy"} <= results[True]
    assert "train/loss_epoch" in results[False]
    assert not {k for k in results[False] if k.startswith("train/") and "loss" not in k}
    # Validation metrics are unaffected.
    assert {"val/dice", "val/accuracy"} <= results[False]
