"""Choose the decoders' settings by inner cross-validation on the S1 *training* trials only.

The inner folds are those of ``tune_dual_encoder.py`` (the 12 S1 test trials are never read):
``unseen`` holds out all trials of 4 images per fold (like S3, the zero-shot case the decoders'
anchor and image prior are for) and ``seen`` is stratified by image (like S1/S2). Per inner fold
a dual encoder with the default settings is trained once; then each ``--set`` candidate trains
both decoders on its frozen embeddings, and each sampling setting (``--guidance``,
``--init-strength``, ``--blend``, ``--gate``, ``--likelihood``, ``--likelihood-reg``,
``--likelihood-gate-power``, ``--stretch``, ``--gate-shift``: no retraining needed) decodes the
held-out trials from fMRI only.
Scores are docs/PROTOCOL.md's (20-way identification among all unique images), ridge beside them.

    python benchmarks/tune_decoders.py --set anchor=False,augment_prob=0 --set augment_prob=0
    python benchmarks/tune_decoders.py --guidance 1 2 --init-strength 1 0.5 --blend 0 0.3 0.5
    python benchmarks/tune_decoders.py --blend 0.5 0.7 --gate 0 1
    python benchmarks/tune_decoders.py --blend 0.5 0.7 --likelihood 0 0.5 1 --likelihood-reg 1 3 \
        --likelihood-gate-power 1
    python benchmarks/tune_decoders.py --blend 0.5 --likelihood 1 --likelihood-gate-power 1 2 4 8
    python benchmarks/tune_decoders.py --blend 0.5 0.7 1 --stretch 0 1
    python benchmarks/tune_decoders.py --gate-shift -4 -3 -2 -1.5 -1 -0.5 0 0.5 1
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miyawaki_dataset_loader import (OptionError, RidgeBaseline, check_options,  # noqa: E402
                                     reconstruction_metrics, resolve_data, resolve_device, run_cli,
                                     save_json)
from miyawaki_dual_encoder import DualEncoderConfig, inner_folds, train_dual_encoder  # noqa: E402
from miyawaki_generative_backend import (ANCHOR_OPTIONS, GenerativeConfig, reconstruct,  # noqa: E402
                                         train_generative)
from tune_dual_encoder import (GRID_REASON, SCHEMES_HELP, best_by_mean, candidates, check_out,  # noqa: E402
                               option_help, tuning_parser)

METRICS = ("pixcorr", "ssim", "mse", "two_way", "top1")


def run(data, configs: dict, sampling: list[dict], schemes: list[str], seed: int,
        device: torch.device) -> dict:
    """{scheme: {candidate: {"ridge" | "<decoder> <sampling>": mean metrics over inner folds}}}."""
    s1 = data.s1()
    out = {}
    for scheme in schemes:
        scores: dict[str, dict[str, list]] = {}
        for tr, va in inner_folds(s1.train.image_ids, scheme):
            fold = data.fold(s1.train_idx[tr], s1.train_idx[va])
            score = lambda recon: reconstruction_metrics(  # noqa: E731
                recon, fold.test.images, fold.test.image_ids, fold.unique_images)
            ridge = RidgeBaseline().fit(fold.train.fmri, fold.train.images).predict(fold.test.fmri)
            scores.setdefault("ridge", {}).setdefault("ridge", []).append(score(ridge))
            encoder, _ = train_dual_encoder(fold, DualEncoderConfig(seed=seed, val_fraction=0.0), device,
                                            progress=False)
            for spec, cfg in configs.items():
                diffusion, gan, _ = train_generative(encoder, fold, cfg, device, progress=False)
                row = scores.setdefault(spec, {})
                fitted_gate = None if diffusion.readout is None else diffusion.readout.gate_coef.clone()
                done = set()
                for kw in sampling:
                    diffusion.config.update({k: v for k, v in kw.items() if k in diffusion.config})
                    gan.config.update({k: v for k, v in kw.items() if k in gan.config})
                    for name, dec in (("diffusion", diffusion), ("gan", gan)):
                        if fitted_gate is not None:     # the gate's logit shifted by gate_shift
                            dec.readout.gate_coef.copy_(fitted_gate + torch.tensor(
                                [0.0, kw["gate_shift"]], device=fitted_gate.device))
                        # without an anchor the anchor's settings do not apply: scored once
                        applies = kw if dec.readout is not None else {
                            k: v for k, v in kw.items() if k not in (*ANCHOR_OPTIONS, "gate_shift")}
                        key = " ".join([name, *(f"{k}={v}" for k, v in applies.items())])
                        if key in done:
                            continue
                        done.add(key)
                        recon = reconstruct(encoder, dec, fold.test.fmri, torch.Generator().manual_seed(seed))
                        row.setdefault(key, []).append(score(recon))
        out[scheme] = {spec: {key: {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
                              for key, rows in row.items()} for spec, row in scores.items()}
    return out


def main(argv=None) -> dict:
    """Score each candidate by inner CV; print a line each and save the JSON; returns it."""
    p = tuning_parser(__doc__, "tune_decoders.json", "GenerativeConfig (training)")
    def grid(*flags, default, **kw):      # an option of the sampling grid: one or more values
        p.add_argument(*flags, nargs="+", default=[default], **kw)

    grid("--guidance", "--guidance-scale", type=float, default=GenerativeConfig.guidance_scale,
         help="classifier-free guidance scales")
    grid("--init-strength", type=float, default=GenerativeConfig.init_strength,
         help="DDIM starts from the anchor noised to this fraction of the schedule (1 = from noise)")
    grid("--blend", "--anchor-blend", type=float, default=GenerativeConfig.anchor_blend,
         help="weights b of the anchor in the output blend")
    grid("--gate", "--novelty-gate", type=int, default=int(GenerativeConfig.novelty_gate), choices=[0, 1],
         help="novelty gate of the blend off / on")
    grid("--likelihood", "--likelihood-weight", type=float, default=GenerativeConfig.likelihood_weight,
         help="weights of the encoding-model data-consistency step (0 = off)")
    grid("--likelihood-reg", type=float, default=GenerativeConfig.likelihood_reg,
         help="the likelihood step's regularisation mu, in units of mean diag(W W^T)")
    grid("--likelihood-gate-power", type=float, default=GenerativeConfig.likelihood_gate_power,
         help="the likelihood step is scaled by the novelty gate to this power")
    grid("--stretch", "--output-stretch", type=int, default=int(GenerativeConfig.output_stretch),
         choices=[0, 1], help="the per-fit output contrast stretch off / on")
    grid("--gate-shift", type=float, default=0.0,
         help="added to the fitted novelty gate's logit (< 0: it opens less); not a decoder "
              "setting, a check of the gate's calibration")
    p.add_argument("--seed", type=int, default=0, help="seed of the dual encoders and decoders")
    p.add_argument("--schemes", nargs="+", default=["unseen", "seen"], choices=["unseen", "seen"],
                   help=SCHEMES_HELP)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=option_help("device"))
    args = p.parse_args(argv)
    sampling = [dict(guidance_scale=w, init_strength=s, anchor_blend=b, novelty_gate=bool(g),
                     likelihood_weight=lw, likelihood_reg=lr, likelihood_gate_power=lp,
                     output_stretch=bool(st), gate_shift=gs)
                for w, s, b, g, lw, lr, lp, st, gs in itertools.product(
                    args.guidance, args.init_strength, args.blend, args.gate, args.likelihood,
                    args.likelihood_reg, args.likelihood_gate_power, args.stretch, args.gate_shift)]
    unread = "is not read by the inner CV"
    configs = candidates(args.set, GenerativeConfig(seed=args.seed), {
        "seed": "is --seed here (it seeds the dual encoders too)",
        "encoder_checkpoint": f"{unread}, which fits its own dual encoders",
        **dict.fromkeys(("data", "out_dir", "device", "n_sample_grids", "log_every", "oracle"), unread),
        **dict.fromkeys(sampling[0], f"{GRID_REASON} (--guidance, --blend, ...)")})
    # the sampling grid's values, checked like --set ones before the data load and any fit; an
    # error names the config's flag, which this script takes as well (--anchor-blend for --blend)
    for kw in sampling:
        check_options(replace(GenerativeConfig(), **{k: v for k, v in kw.items() if k != "gate_shift"}))
    if not np.isfinite(args.gate_shift).all():
        raise OptionError(f"--gate-shift must be finite numbers, got {args.gate_shift}")
    check_out(args.out)
    device = resolve_device(args.device)
    data = resolve_data(args.data)
    t0 = time.perf_counter()
    results = run(data, configs, sampling, args.schemes, args.seed, device)
    for scheme, per_spec in results.items():
        for spec, rows in per_spec.items():
            for key, m in rows.items():
                print(f"{scheme:6s} | {spec:36s} | {key:60s} | "
                      + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
    print(f"{time.perf_counter() - t0:.0f} s")
    selection = best_by_mean({s: {f"{spec} | {key}": m["pixcorr"] for spec, rows in per_spec.items()
                                  for key, m in rows.items() if key.startswith("diffusion")}
                              for s, per_spec in results.items()})
    print(f"best by the {selection['rule']}' diffusion PixCorr (the first of ties): "
          f"{selection['best']} ({selection['score']:.4f})")
    save_json({"data": data.source, "seed": args.seed, "device": str(device),
               "base": vars(GenerativeConfig(seed=args.seed)) | {"out_dir": None}, "results": results,
               "selection": {k: v for k, v in selection.items() if k != "means"}}, args.out)
    return results


if __name__ == "__main__":
    run_cli(main)
