"""Choose the decoders' low-level anchor by inner cross-validation on the S1 *training* trials only.

The anchor is a linear read-out of the image from fMRI, fitted in closed form (``fit_anchor``), so
every candidate of the grid is scored in seconds, without training a network. The inner folds
are those of ``tune_dual_encoder.py`` and ``tune_decoders.py`` (the 12 S1 test trials are never
read): ``unseen`` holds out all trials of 4 images per fold (like S3; the image prior also
excludes them), ``seen`` is stratified by image (like S1/S2). The rule is the decoders': the mean
of the unseen and seen PixCorr. Scores are docs/PROTOCOL.md's (20-way identification among all
unique images).

    python benchmarks/tune_anchor.py                       # the default grid (49 settings)
    python benchmarks/tune_anchor.py --ridge-weight 0.3 0.5 0.7 --noise-shrink 0.5
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miyawaki_dataset_loader import (check_options, reconstruction_metrics,  # noqa: E402
                                     resolve_data, run_cli, save_json)
from miyawaki_dual_encoder import inner_folds  # noqa: E402
from miyawaki_generative_backend import GenerativeConfig, fit_anchor  # noqa: E402
from tune_dual_encoder import check_out, tuning_parser  # noqa: E402

METRICS = ("pixcorr", "ssim", "mse", "two_way", "top1")


def run(data, candidates: list[GenerativeConfig], schemes: list[str]) -> dict:
    """{scheme: [mean metrics over inner folds, one per candidate]} (candidates' anchors only)."""
    s1 = data.s1()
    out = {}
    for scheme in schemes:
        rows = [[] for _ in candidates]
        for tr, va in inner_folds(s1.train.image_ids, scheme):
            fold = data.fold(s1.train_idx[tr], s1.train_idx[va])
            alpha = None
            for row, cfg in zip(rows, candidates):
                weight, bias, alpha = fit_anchor(fold.train, cfg, alpha,
                                                 exclude=fold.never_seen_images)
                row.append(reconstruction_metrics(fold.test.fmri @ weight.T + bias, fold.test.images,
                                                  fold.test.image_ids, fold.unique_images))
        out[scheme] = [{m: float(np.mean([r[m] for r in row])) for m in METRICS} for row in rows]
    return out


def main(argv=None) -> dict:
    """Score each anchor setting by inner CV; print a line each (best rule last) and save the JSON."""
    p = tuning_parser(__doc__, "tune_anchor.json")
    p.add_argument("--voxels", "--rf-voxels", type=float, nargs="+", default=[0.4, 1.0],
                   help="fractions of voxels the receptive-field model keeps")
    p.add_argument("--noise-shrink", "--rf-noise-shrink", type=float, nargs="+", default=[0.2, 0.5, 0.8],
                   help="shrinkage of the residual covariance towards its diagonal")
    p.add_argument("--prior-scale", "--rf-prior-scale", type=float, nargs="+", default=[1.0, 3.0],
                   help="scale of the image prior's covariance")
    p.add_argument("--ridge-weight", "--rf-ridge-weight", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7],
                   help="weight of ridge in the anchor (the rest: the receptive-field posterior)")
    p.add_argument("--seed", type=int, default=0, help="seed of the anchor's image prior")
    args = p.parse_args(argv)
    base = GenerativeConfig(seed=args.seed)
    # each checked before the data load and any fit; an error names the config's flag, which this
    # script takes as well (--rf-voxels for --voxels)
    candidates = [check_options(replace(base, anchor_model="ridge"))] + [
        check_options(replace(base, anchor_model="receptive-field", rf_voxels=v, rf_noise_shrink=s,
                              rf_prior_scale=c, rf_ridge_weight=r))
        for v, s, c, r in itertools.product(args.voxels, args.noise_shrink, args.prior_scale,
                                            args.ridge_weight)]
    check_out(args.out)
    data = resolve_data(args.data)
    t0 = time.perf_counter()
    results = run(data, candidates, ["unseen", "seen"])
    names = ["ridge"] + [f"rf_voxels={c.rf_voxels:g},rf_noise_shrink={c.rf_noise_shrink:g},"
                         f"rf_prior_scale={c.rf_prior_scale:g},rf_ridge_weight={c.rf_ridge_weight:g}"
                         for c in candidates[1:]]
    rule = [(u["pixcorr"] + s["pixcorr"]) / 2 for u, s in zip(results["unseen"], results["seen"])]
    for k in np.argsort(rule, kind="stable"):
        u, s = results["unseen"][k], results["seen"][k]
        print(f"{names[k]:72s} | rule {rule[k]:.4f} | unseen PixCorr {u['pixcorr']:.3f} SSIM "
              f"{u['ssim']:.3f} MSE {u['mse']:.4f} top-1 {u['top1']:.3f} | seen PixCorr "
              f"{s['pixcorr']:.3f} top-1 {s['top1']:.3f}")
    print(f"{time.perf_counter() - t0:.0f} s")
    out = {"data": data.source, "seed": args.seed, "rule": "mean of unseen and seen PixCorr",
           "results": {n: {"unseen": u, "seen": s, "rule": r} for n, u, s, r in
                       zip(names, results["unseen"], results["seen"], rule)}}
    save_json(out, args.out)
    return out


if __name__ == "__main__":
    run_cli(main)
