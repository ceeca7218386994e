"""The CUDA paths on a GPU: bf16 autocast, channels_last, torch.compile, pinned uint8 batches normalised on the
device, fused AdamW, and (through the command line) a GPU fit with the W&B panels, predict and export.

Every test here is marked ``cuda`` and skips without a CUDA device; ``benchmarks/gpu/run.sh`` runs them on a
lent GPU (``pytest -m cuda``). Comparisons run with TF32 off (PyTorch lets cuDNN convolutions use TF32 by
default), so float32 on the GPU must match float32 references to float32 rounding, not to TF32's 1e-3.

``SKINFUSION_CUDA_TESTS_ON_CPU=1`` runs the same tests on the CPU with their CUDA-only assertions left out: a dry
run of the tests' own logic for machines without a GPU. It proves nothing about CUDA.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from modelutil import capability_forced_down
from PIL import Image

from skinfusion import MultiTaskLoss, SkinFusionDataModule, SkinFusionModule, SkinFusionNet

DRY_RUN = os.environ.get("SKINFUSION_CUDA_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (HAS_CUDA or DRY_RUN), reason="CUDA is not available (a GPU runs these: benchmarks/gpu/run.sh)"
    ),
]

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"
#: test_resnet with CBAM on the skips and before the classifier, mask_pool fusion: every part of the network.
NET = {
    "encoder": "test_resnet",
    "attention": "cbam",
    "attention_placement": ["skip", "classifier"],
    "decoder_channels": [32, 16, 16, 8, 8],
    "fusion": "mask_pool",
}
SIZE = 64
EPOCHS = 2
PANEL = 8  # WandbPanels' num_images in base.yaml


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _module(seed: int = 0, dropout: float = 0.2, **options) -> SkinFusionModule:
    torch.manual_seed(seed)
    return SkinFusionModule(SkinFusionNet(**NET, dropout=dropout), loss=MultiTaskLoss(), **options)


def _batch(device: torch.device, n: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randn(n, 3, SIZE, SIZE, generator=generator),
        "mask": (torch.rand(n, 1, SIZE, SIZE, generator=generator) > 0.5).float(),
        "has_mask": torch.tensor([True, False, True, True][:n]),
        "label": torch.tensor([0, 3, -1, 6][:n]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_gradients(module: SkinFusionModule, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.train()
    module.zero_grad(set_to_none=True)
    dtype = next(module.parameters()).dtype
    cast = {**batch, "image": batch["image"].to(dtype), "mask": batch["mask"].to(dtype)}
    loss = module.loss(module(cast["image"]), cast)["loss"]
    loss.backward()
    return loss.detach().double(), [p.grad.detach().double() for p in module.parameters()]


@torch.no_grad()
def _assert_outputs_as_exact_as_the_default(option: SkinFusionModule, image: torch.Tensor, floor: float) -> None:
    """Eval-mode outputs of ``option`` are as close to a float64 run as the default path's (times 4), or within
    ``floor`` of their norm: the kernels (cuDNN's algorithm per layout, inductor's fusions) only change rounding."""
    device = image.device
    exact = _module(dropout=0.0).to(device, torch.float64).eval()(image.double())
    plain = _module(dropout=0.0).to(device).eval()(image)
    got = option.eval()(image)
    for name in ("mask_logits", "class_logits"):
        ref = getattr(exact, name)
        scale = float(ref.norm())
        plain_error = float((getattr(plain, name).double() - ref).norm())
        error = float((getattr(got, name).double() - ref).norm())
        assert error <= max(4 * plain_error, floor * scale), (
            f"{name}: error {error / scale:.2e} of its norm, default path {plain_error / scale:.2e}"
        )
    assert set(got.attention) == set(plain.attention)


def _assert_as_exact_as_the_default(
    option: SkinFusionModule, batch: dict, device: torch.device, floor: float = 1e-5, factor: float = 4.0
) -> None:
    """A training step with ``option`` (loss and every gradient) is as close to exact as the default path's.

    Both are float32 sums in some order, so they differ by rounding, and by how much depends on the kernels
    (cuDNN's algorithms, oneDNN's on AVX2 vs AVX-512). So each is compared with a float64 run of the same
    network and batch, and the option must be no further from it than the default (times ``factor``), or within
    ``floor`` of the gradient's norm, and so all gradients together. Dropout is off in
    these networks, so every run computes the same function; a wrong gradient would be off by its own norm.
    """
    exact_loss, exact = _loss_and_gradients(_module(dropout=0.0).to(device, torch.float64), batch)
    plain_loss, plain = _loss_and_gradients(_module(dropout=0.0).to(device), batch)
    loss, grads = _loss_and_gradients(option, batch)
    assert abs(loss - exact_loss) <= max(4 * abs(plain_loss - exact_loss), 1e-6 * abs(exact_loss))
    names = [name for name, _ in option.named_parameters()]
    # timm zero-initialises each residual block's last BatchNorm scale, so the convolutions before it get exactly
    # zero gradients at initialisation; every other parameter must have one, or the comparison says little.
    assert sum(bool(ref.norm() > 0) for ref in exact) >= 0.75 * len(names)

    def total(vectors) -> float:
        return sum(float(v.norm()) ** 2 for v in vectors) ** 0.5

    total_plain_error = total(a - ref for a, ref in zip(plain, exact, strict=True))
    total_error = total(b - ref for b, ref in zip(grads, exact, strict=True))
    assert total_error <= max(factor * total_plain_error, floor * total(exact))
    for name, a, b, ref in zip(names, plain, grads, exact, strict=True):
        scale = max(float(ref.norm()), 1e-30)
        plain_error, error = float((a - ref).norm()), float((b - ref).norm())
        assert error <= max(factor * plain_error, floor * scale), (
            f"{name}: gradient error {error / scale:.2e} of its norm, default path {plain_error / scale:.2e}"
        )


# ---------------------------------------------------------------- precision and memory format


def test_bf16_autocast_runs_the_network_in_bf16_and_the_loss_stays_close_to_fp32(device):
    module = _module().to(device).eval()
    batch = _batch(device)
    with torch.no_grad():
        reference = module(batch["image"])
        fp32 = module.loss(reference, batch)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output = module(batch["image"])
            bf16 = module.loss(output, batch)
    assert output.class_logits.dtype == torch.bfloat16  # autocast did run the network in bf16
    assert output.mask_logits.dtype == torch.bfloat16
    assert bf16["loss"].dtype == torch.float32  # the loss math stays float32
    for key in ("loss", "loss_seg", "loss_cls"):
        torch.testing.assert_close(bf16[key], fp32[key], atol=0.05, rtol=0.05)
    # bf16 keeps 8 bits of mantissa: logits within a few percent of float32, not bit-equal.
    assert 0 < _relative(output.mask_logits, reference.mask_logits) < 0.05
    assert _relative(output.class_logits, reference.class_logits) < 0.05


def test_channels_last_keeps_nhwc_weights_and_computes_the_same_step(device):
    fast = _module(dropout=0.0, channels_last=True).to(device)
    fast.configure_model()
    kernels = [p for p in fast.net.parameters() if p.ndim == 4]
    assert kernels
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert all(p.device.type == device.type for p in kernels)
    batch = _batch(device)
    _assert_outputs_as_exact_as_the_default(fast, batch["image"], floor=1e-5)
    _assert_as_exact_as_the_default(fast, batch, device)  # training mode: BatchNorm batch statistics


@pytest.mark.skipif(
    not HAS_CUDA and shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)
@pytest.mark.skipif(
    not HAS_CUDA and capability_forced_down(),
    reason="the CPU dry run under an ATEN_CPU_CAPABILITY override: inductor's output is garbage there (see "
    "test_speed_options' compile test)",
)
def test_compile_gives_the_same_outputs_and_gradients_and_keeps_parameter_names(device):
    plain = _module(dropout=0.0).to(device)  # no dropout: compiled code draws other random numbers
    fast = _module(dropout=0.0, compile=True).to(device)
    fast.configure_model()
    assert getattr(fast.net, "_compiled_call_impl", None) is not None
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert not any("_orig_mod" in key for key in fast.state_dict())
    _assert_outputs_as_exact_as_the_default(fast, _batch(device)["image"], floor=1e-4)
    # Inductor sums in its own order (fused reductions, BatchNorm's backward decomposed). Gradients that are sums
    # cancelling to a small value lose the most: on a CPU the stem's weight gradient came out 3.9e-3 of its norm
    # from float64 (eager 1.3e-4) and a spatial-attention bias gradient (norm 6e-4) 2.8e-2 (eager 1.5e-3): hence
    # 1e-2 and 50x here. A wrong gradient is off by its whole norm.
    _assert_as_exact_as_the_default(fast, _batch(device), device, floor=1e-2, factor=50.0)


# ---------------------------------------------------------------- data: pinned uint8 batches, normalised on the GPU


def _datamodule(**kwargs) -> SkinFusionDataModule:
    dm = SkinFusionDataModule(
        synthetic_samples=24, synthetic_size=64, image_size=48, batch_size=4, normalization="imagenet", **kwargs
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("split", ["train", "val"])
def test_pinned_uint8_batches_normalised_on_the_device_equal_the_float_batches(device, split):
    plain = _datamodule(num_workers=0, pin_memory=False)
    fast = _datamodule(num_workers=2, normalize_on_device=True)  # pin_memory=None: pinned when CUDA is there
    assert fast.pin_memory is HAS_CUDA
    expected = next(iter(getattr(plain, f"{split}_dataloader")()))
    raw = next(iter(getattr(fast, f"{split}_dataloader")()))
    assert raw["image"].dtype == torch.uint8
    assert raw["mask"].dtype == torch.uint8
    if HAS_CUDA:
        assert raw["image"].is_pinned()
        assert raw["mask"].is_pinned()
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in raw.items()}
    got = fast.on_after_batch_transfer(moved, 0)
    assert got["image"].device.type == device.type
    assert got["image"].dtype == torch.float32
    assert got["mask"].dtype == torch.float32
    torch.testing.assert_close(got["image"].cpu(), expected["image"], atol=1e-5, rtol=0)
    assert torch.equal(got["mask"].cpu(), expected["mask"])
    assert torch.equal(got["label"].cpu(), expected["label"])
    assert got["id"] == expected["id"]


# ---------------------------------------------------------------- fused AdamW


def test_default_optimizer_is_fused_adamw_on_the_device_and_steps_like_the_loop(device):
    fused_module = _module().to(device)
    fused = fused_module.configure_optimizers()
    assert isinstance(fused, torch.optim.AdamW)
    if HAS_CUDA:
        assert fused.defaults["fused"] is True
        assert all(p.is_cuda for group in fused.param_groups for p in group["params"])

    def loop(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, foreach=False)

    loop_module = _module(optimizer=loop).to(device)
    looped = loop_module.configure_optimizers()
    assert looped.defaults["fused"] in (None, False)
    initial = [p.detach().clone() for p in fused_module.parameters()]
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):  # the same gradients to both: the comparison is of the update alone
        for a, b in zip(fused_module.parameters(), loop_module.parameters(), strict=True):
            grad = torch.randn(a.shape, generator=generator).to(device)
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        looped.step()
    for a, b, start in zip(fused_module.parameters(), loop_module.parameters(), initial, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert not torch.equal(a, start)  # every weight moved


# ---------------------------------------------------------------- the command line on the GPU


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def gpu_fit(tmp_path_factory, device) -> dict:
    """`skinfusion prepare` (synthetic) then `skinfusion fit` with base.yaml on the GPU: bf16-mixed, channels_last,
    uint8 batches normalised on the device (base.yaml), fused AdamW (base.yaml), W&B offline with its panels."""
    import wandb

    from skinfusion.cli import main

    root = tmp_path_factory.mktemp("gpu_fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("SKINFUSION_CACHE", str(root / "skinfusion-cache"))
        main(["prepare", "--source", f"synthetic:{root / 'synthetic'}:n=48,size=80", "--out", "cache", "--size", "80"])
        wandb.finish()
        try:
            main(
                [
                    "fit",
                    "--config",
                    str(BASE),
                    "--model.net.init_args.encoder=test_resnet",
                    "--model.net.init_args.decoder_channels=[16,16,8,8,8]",
                    f"--trainer.accelerator={device.type if device.type == 'cpu' else 'gpu'}",
                    "--trainer.precision=bf16-mixed",
                    "--model.channels_last=true",
                    f"--trainer.max_epochs={EPOCHS}",
                    "--trainer.log_every_n_steps=1",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.num_sanity_val_steps=0",
                    "--data.manifest=cache/manifest.csv",
                    f"--data.image_size={SIZE}",
                    "--data.batch_size=8",
                    "--data.num_workers=2",
                ]
            )
        finally:
            wandb.finish()
    (run,) = (root / "runs" / "wandb").glob("offline-run-*")
    (checkpoints,) = (root / "runs" / "skinfusion").glob("version_*/checkpoints")
    return {"root": root, "run": run, "last": checkpoints / "last.ckpt", "manifest": root / "cache" / "manifest.csv"}


def test_gpu_fit_trains_on_the_device_with_fused_adamw_and_float32_weights(gpu_fit, device):
    ckpt = torch.load(gpu_fit["last"], weights_only=True)  # no map_location: tensors return to where they were
    state = ckpt["state_dict"]
    weights = [v for v in state.values() if v.is_floating_point()]
    assert weights
    assert all(v.device.type == device.type for v in weights)  # trained on the GPU
    assert all(v.dtype == torch.float32 for v in weights)  # bf16-mixed keeps float32 master weights
    assert all(torch.isfinite(v).all() for v in weights)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert all(group["fused"] is True for group in groups)
    assert ckpt["epoch"] == EPOCHS - 1
    assert ckpt["hyper_parameters"]["channels_last"] is True


def test_wandb_panels_are_logged_from_the_gpu_run(gpu_fit):
    media = gpu_fit["run"] / "files" / "media" / "images"
    panels = sorted((media / "val").glob("panel_*.png"))
    assert len(panels) >= PANEL  # a panel of 8 images per validation epoch (W&B stores an image once)
    masks = sorted((media / "mask").rglob("*.mask.png"))
    assert masks
    for path in masks:
        assert set(np.unique(np.asarray(Image.open(path)))) <= {0, 1}
    heat_maps = list((media / "val" / "attention").rglob("*.png"))
    assert len(heat_maps) >= PANEL  # attention maps of the panel images


def _predict(gpu_fit, out: Path, device: str) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    from skinfusion.cli import main

    images = [r["image"] for r in _rows(gpu_fit["manifest"]) if r["split"] == "test"]
    paths = [str(gpu_fit["manifest"].parent / image) for image in images]
    main(["predict", *paths, "--ckpt", str(gpu_fit["last"]), "--out", str(out), "--device", device])
    masks = {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}
    assert len(masks) == len(images)
    return _rows(out / "predictions.csv"), masks


def test_predict_on_the_device_equals_predict_on_the_cpu(gpu_fit, device, tmp_path):
    rows_cpu, masks_cpu = _predict(gpu_fit, tmp_path / "cpu", "cpu")
    rows_dev, masks_dev = _predict(gpu_fit, tmp_path / "dev", device.type)
    assert [r["image"] for r in rows_dev] == [r["image"] for r in rows_cpu]
    classes = [c for c in rows_cpu[0] if c != "image"]
    probs_cpu = np.array([[float(r[c]) for c in classes] for r in rows_cpu])
    probs_dev = np.array([[float(r[c]) for c in classes] for r in rows_dev])
    np.testing.assert_allclose(probs_dev, probs_cpu, atol=1e-4)
    assert masks_dev.keys() == masks_cpu.keys()
    differing = sum(int((masks_dev[k] != masks_cpu[k]).sum()) for k in masks_cpu)
    total = sum(m.size for m in masks_cpu.values())
    assert differing <= 0.001 * total  # only pixels at the threshold may flip


def test_export_of_a_gpu_trained_checkpoint_matches_the_model_on_the_device(gpu_fit, device, tmp_path):
    import onnxruntime

    from skinfusion.cli import main

    onnx_path, script_path = tmp_path / "net.onnx", tmp_path / "net.pt"
    # Each export verifies itself against PyTorch (exit status 1 beyond 1e-3).
    main(["export", "--ckpt", str(gpu_fit["last"]), "--format", "onnx", "--out", str(onnx_path)])
    main(["export", "--ckpt", str(gpu_fit["last"]), "--format", "torchscript", "--out", str(script_path)])
    module = SkinFusionModule.from_checkpoint(gpu_fit["last"]).to(device).eval()
    image = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    meta = torch.rand(3, module.net.meta_dim, generator=torch.Generator().manual_seed(6))  # base.yaml: metadata on
    with torch.no_grad():
        expected = module.net(image.to(device), meta.to(device))
        scripted = torch.jit.load(str(script_path), map_location=device)(image.to(device), meta.to(device))
    assert scripted[0].device.type == device.type
    assert expected.mask_logits.device.type == device.type
    assert _relative(scripted[0], expected.mask_logits) < 1e-4
    assert _relative(scripted[1], expected.class_logits) < 1e-4
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    mask_logits, class_logits = session.run(
        ["mask_logits", "class_logits"], {"image": image.numpy(), "meta": meta.numpy()}
    )
    assert _relative(torch.from_numpy(mask_logits), expected.mask_logits) < 1e-4
    assert _relative(torch.from_numpy(class_logits), expected.class_logits) < 1e-4


def test_a_checkpoint_loads_onto_the_device_and_a_device_resident_net_exports(gpu_fit, device, tmp_path):
    from skinfusion.inference.export import export_onnx, export_torchscript

    module = SkinFusionModule.from_checkpoint(gpu_fit["last"], map_location=device).eval()
    assert {p.device.type for p in module.parameters()} == {device.type}  # not left on the CPU
    image = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)).to(device)
    meta = torch.rand(2, module.net.meta_dim, generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        expected = module.net(image, meta)
    # Exporting the network where it lives: the example inputs follow it (they were built on the CPU).
    export_onnx(module.net, tmp_path / "net.onnx")
    export_torchscript(module.net, tmp_path / "net.pt")
    scripted = torch.jit.load(str(tmp_path / "net.pt"), map_location=device)
    with torch.no_grad():
        assert _relative(scripted(image, meta)[1], expected.class_logits) < 1e-4
