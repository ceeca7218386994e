"""Give a checkpoint trained without metadata the late fusion that ``meta_fusion: late`` fits when training starts.

    python experiments/metadata/attach_late_fusion.py --ckpt last.ckpt --manifest cache/manifest.csv \
        [--cv-folds 3 --cv-fold 0 --cv-seed 0] --out late.ckpt

With ``meta_fusion: late`` the network never reads metadata while it trains, so an image network trained with
``data.use_metadata=false`` plus this script's metadata model (fitted by the same function, on the same training
split: the fold's, with ``--cv-*``) is what ``skinfusion fit`` with ``meta_fusion: late`` gives, up to the training
run's random draws. Used for README's cross-validated figures, whose image networks were trained before late fusion
was wired in. Not part of the package.
"""

from __future__ import annotations

import argparse

import torch

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.data.dataset import META_DIM
from skinfusion.io import load_checkpoint
from skinfusion.nn import SkinFusionNet
from skinfusion.training.module import fit_late_fusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--cv-folds", type=int, default=0)
    parser.add_argument("--cv-fold", type=int, default=0)
    parser.add_argument("--cv-seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.ckpt, "cpu")
    inference = ckpt["hyper_parameters"]["inference"]
    config = {**inference["net_config"], "meta_dim": META_DIM, "meta_fusion": "late"}
    if inference["net_config"].get("meta_dim"):
        raise SystemExit(f"{args.ckpt}: the network already reads metadata (meta_dim > 0)")
    net = SkinFusionNet(**config)
    data = SkinFusionDataModule(
        manifest=args.manifest, cv_folds=args.cv_folds, cv_fold=args.cv_fold, cv_seed=args.cv_seed, use_metadata=True
    )
    known, total = fit_late_fusion(net.late_fusion, data.records("train"), inference["class_names"], args.manifest)
    state = dict(ckpt["state_dict"])
    state.update({f"net.late_fusion.{k}": v for k, v in net.late_fusion.state_dict().items()})
    inference["net_config"] = config
    torch.save({"state_dict": state, "hyper_parameters": ckpt["hyper_parameters"]}, args.out)
    print(f"{args.out}: late fusion fitted on {known} training images with metadata (of {total} labelled)")


if __name__ == "__main__":
    main()
