"""Choose dual-encoder settings by inner cross-validation on the S1 *training* trials only.

Two inner schemes, both inside the file's 107 training trials (the 12 test trials are never
read): ``seen`` = stratified 5-fold by image id (every held-out image also in training, like
S1/S2) and ``unseen`` = 5 folds that each hold out all trials of 4 images (like S3).
Identification ranks all 20 unique images by cosine similarity of fMRI-only embeddings.

    python benchmarks/tune_dual_encoder.py --set skip=False --set skip=True
    python benchmarks/tune_dual_encoder.py --set mixup=0 --set mixup=64 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GroupKFold, StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miyawaki_dataset_loader import DEFAULT_OUT, resolve_data, resolve_device, run_cli, save_json  # noqa: E402
from miyawaki_dual_encoder import DualEncoderConfig, config_from_dict, identify, train_dual_encoder  # noqa: E402


def inner_folds(ids: np.ndarray, scheme: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner folds over training trials with image ids ``ids``."""
    x = np.zeros(len(ids))
    if scheme == "seen":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, ids))
    return list(GroupKFold(5).split(x, ids, groups=ids))


def parse_overrides(spec: str) -> dict:
    """``"a=1,b=False"`` -> {"a": 1, "b": False} (JSON values, Python's True/False accepted)."""
    pairs = (kv.split("=", 1) for kv in spec.split(",") if kv)
    return {k: json.loads(v.replace("True", "true").replace("False", "false")) for k, v in pairs}


def score(data, cfg: DualEncoderConfig, scheme: str, seeds: list[int],
          device: torch.device) -> tuple[float, float]:
    """Mean inner-CV top-1 over folds and seeds, ranking by the correlation embeddings and by the
    encoder latents."""
    s1 = data.s1()
    top1, top1_latent = [], []
    for tr, va in inner_folds(s1.train.image_ids, scheme):
        fold = data.fold(s1.train_idx[tr], s1.train_idx[va])
        for seed in seeds:
            model, _ = train_dual_encoder(fold.train, replace(cfg, seed=seed, val_fraction=0.0),
                                          device, fold.unique_images, progress=False)
            x, images = (torch.as_tensor(a, device=device) for a in (fold.test.fmri, fold.unique_images))
            ranks = identify(model, x, images, fold.test.image_ids)
            top1.append((ranks == 1).mean())
            with torch.no_grad():
                out = model.latents(x, images)
            scores = (out["fmri_latent"] @ out["image_latent"].T).cpu().numpy()
            top1_latent.append((scores.argmax(1) == fold.test.image_ids).mean())
    return float(np.mean(top1)), float(np.mean(top1_latent))


def tuning_parser(doc: str, what: str) -> argparse.ArgumentParser:
    """The options both tuning scripts share: ``--data`` and repeatable ``--set`` candidates of
    ``what`` (a config class name)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help=f"one candidate setting of {what} (repeat the flag for several)")
    return p


def main(argv=None) -> dict:
    """Score each ``--set`` candidate by inner CV; print a line each and save the JSON; returns it."""
    p = tuning_parser(__doc__, "DualEncoderConfig")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--schemes", nargs="+", default=["seen", "unseen"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "tune_dual_encoder.json")
    args = p.parse_args(argv)
    data = resolve_data(args.data)
    device = resolve_device(args.device)
    base = DualEncoderConfig()
    results = {}
    for spec in args.set or [""]:
        cfg = config_from_dict({**vars(base), **parse_overrides(spec)})
        t0 = time.perf_counter()
        results[spec or "default"] = {s: score(data, cfg, s, args.seeds, device) for s in args.schemes}
        print(f"{spec or 'default':40s} " + " ".join(f"{s} {v[0]:.3f} (latent {v[1]:.3f})" for s, v in results[spec or 'default'].items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json({"data": data.source, "seeds": args.seeds, "device": str(device), "results": results},
              args.out)
    return results


if __name__ == "__main__":
    run_cli(main)
