"""One prepared GPU check: versions, the default pipeline on CUDA stage by stage, a short S3
benchmark, and one seed's CPU-vs-CUDA identification, written to one JSON + markdown file.

It installs nothing and reads no network (a GPU machine may reach no package registry): it runs
with the torch found there. Data: the real file when ``data/`` (or ``--data``) holds it, else the
simulated set (the check says which). Every step has its own time limit, so the whole check stays
under ``--budget`` seconds (default 280); a step that runs out is recorded, not fatal.

    python benchmarks/gpu_check.py                      # writes outputs/gpu_check/gpu_check.{json,md}
    python benchmarks/gpu_check.py --out-dir "$OUT"     # on the lent device machine
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from miyawaki_dataset_loader import (DEFAULT_DATA, DefaultsHelpFormatter, ScriptParser,  # noqa: E402
                                     rank_summary, resolve_data)
from miyawaki_dual_encoder import DualEncoderConfig, identify, train_dual_encoder, train_dual_encoders  # noqa: E402

STAGES = ["miyawaki_dataset_loader.py", "miyawaki_dual_encoder.py", "miyawaki_evaluation.py",
          "miyawaki_generative_backend.py"]
# CPU and CUDA fits differ in float rounding (and bf16 kernels), which can flip a near-tie between
# two candidates: identification must agree within one S1 test trial and 0.25 in mean rank.
TOP1_TOLERANCE = 1 / 12 + 1e-9
MEAN_RANK_TOLERANCE = 0.25


def versions() -> dict:
    """Python, torch, CUDA and the GPU found (no installs)."""
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cuda_available": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version() if cuda else None}


def timed(cmd: list[str], limit: float) -> dict:
    """Run ``cmd`` in the repository with a time limit -> {wall_s, rc, timed_out, tail}."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, limit))
        rc, out = proc.returncode, proc.stdout + proc.stderr
        timed_out = False
    except subprocess.TimeoutExpired as e:
        rc, out, timed_out = None, (e.stdout or b"").decode() + (e.stderr or b"").decode(), True
    return {"cmd": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - t0, 2), "rc": rc,
            "timed_out": timed_out, "tail": out[-1500:]}


def identification_on(device: str, data, seed: int) -> dict:
    """One seed's S1 dual-encoder fit on ``device`` -> top-1, mean rank, ranks, seconds."""
    fold = data.s1()
    t0 = time.perf_counter()
    model, _ = train_dual_encoder(fold.train, DualEncoderConfig(seed=seed), device, fold.unique_images,
                                  progress=False)
    ranks = identify(model, torch.as_tensor(fold.test.fmri, device=device),
                     torch.as_tensor(fold.unique_images, device=device), fold.test.image_ids)
    summary = rank_summary(ranks, len(fold.unique_images))
    return {"top1": summary["top1"], "mean_rank": summary["mean_rank"], "ranks": ranks.tolist(),
            "fit_s": round(time.perf_counter() - t0, 2)}


def batched_vs_separate(device: str, data, seeds=(0, 1, 2)) -> dict:
    """Three seeds' S1 fits (dropout 0, float32, 30 epochs) as one batched model and one by one on
    ``device``: the largest difference of their fMRI embeddings, whether the ranks agree, seconds."""
    fold = data.s1()
    cfg = DualEncoderConfig(epochs=30, dropout=0.0, bf16=False, val_fraction=0.0)
    configs = [DualEncoderConfig(**{**cfg.__dict__, "seed": s}) for s in seeds]
    x = torch.as_tensor(fold.test.fmri, device=device)
    cand = torch.as_tensor(fold.unique_images, device=device)
    t0 = time.perf_counter()
    batched, _ = train_dual_encoders(fold.train, configs, device)
    t1 = time.perf_counter()
    separate = [train_dual_encoder(fold.train, c, device, progress=False)[0] for c in configs]
    t2 = time.perf_counter()
    diffs, same = [], []
    with torch.no_grad():
        for a, b in zip(batched, separate):
            diffs.append(float((a.encode_fmri(x) - b.encode_fmri(x)).abs().max()))
            ranks = [identify(m, x, cand, fold.test.image_ids) for m in (a, b)]
            same.append(bool(np.array_equal(*ranks)))
    return {"max_abs_embedding_diff": max(diffs), "same_ranks": same,
            "batched_s": round(t1 - t0, 2), "separate_s": round(t2 - t1, 2)}


def main(argv=None) -> dict:
    """Run the check; print the markdown and write both files; returns the JSON dict."""
    p = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="a .mat file or 'simulated' (default: "
                   "the real file if present, else simulated)")
    p.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "gpu_check",
                   help="where the check writes")
    p.add_argument("--budget", type=float, default=280.0, help="seconds for the whole check")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, run the check on the CPU anyway (a dry run of this script)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be a finite number of seconds > 0, got {args.budget:g}")
    if not (torch.cuda.is_available() or args.allow_cpu):    # one line, as the scripts' errors
        print("error: torch sees no CUDA device, so there is no GPU to check (the CPU's timings are "
              "the README's Speed section); --allow-cpu runs the check on the CPU as a dry run",
              file=sys.stderr)
        sys.exit(2)
    t_start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data_arg = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else "simulated")
    result = {"versions": versions(), "data": data_arg,
              "real_file_present": DEFAULT_DATA.is_file(), "steps": {}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result["device"] = device
    print(json.dumps(result["versions"]), f"| data {data_arg} | device {device}", flush=True)

    stage_dir = args.out_dir / "pipeline"
    for sub in ("pipeline", "s3", "s3_generative"):          # no stale results from an earlier check
        shutil.rmtree(args.out_dir / sub, ignore_errors=True)
    common = ["--data", data_arg, "--device", device, "--out-dir", str(stage_dir)]
    for script in STAGES:                                   # the default pipeline, as `make run` runs it
        result["steps"][script] = timed([sys.executable, script, *common], min(90.0, left() - 120))
        print(f"{script}: {result['steps'][script]['wall_s']} s rc {result['steps'][script]['rc']}", flush=True)
    stage_json = {name: stage_dir / name for name in ("miyawaki_dual_encoder.json", "miyawaki_generation.json")}
    inner = {}
    if stage_json["miyawaki_dual_encoder.json"].is_file():
        inner["dual_encoder_train_s"] = json.loads(
            stage_json["miyawaki_dual_encoder.json"].read_text())["train_seconds"]
    if stage_json["miyawaki_generation.json"].is_file():
        gen = json.loads(stage_json["miyawaki_generation.json"].read_text())
        inner["generative_stage_s"] = gen.get("generative_stage_seconds")
    result["stage_inner_seconds"] = inner

    bench = ["miyawaki_evaluation.py", *common[:4], "--protocol", "s3"]
    result["steps"]["s3_dual_encoder"] = timed(
        [sys.executable, *bench, "--seeds", "0", "1", "2", "3", "4", "--permutation-control",
         "--max-folds", "4", "--out-dir", str(args.out_dir / "s3")], min(100.0, left() - 70))
    result["steps"]["s3_generative"] = timed(
        [sys.executable, *bench, "--seeds", "0", "--generative", "--max-folds", "2",
         "--out-dir", str(args.out_dir / "s3_generative")], min(60.0, left() - 50))
    for name, sub in (("s3_dual_encoder", "s3"), ("s3_generative", "s3_generative")):
        print(f"{name}: {result['steps'][name]['wall_s']} s rc {result['steps'][name]['rc']}", flush=True)
        saved = args.out_dir / sub / "benchmark_s3.json"
        if saved.is_file():
            bench_json = json.loads(saved.read_text())
            result["steps"][name]["summary"] = {
                "n_folds": bench_json["n_folds"], "seed_fits": bench_json.get("seed_fits"),
                "dual_encoder_seconds_per_fit": bench_json["dual_encoder_seconds_per_fit"],
                **{m: {k: v["mean"] for k, v in bench_json["methods"][m].items()}
                   for m in ("ridge", "dual_encoder", "dual_encoder_permuted", "diffusion", "gan")
                   if m in bench_json["methods"]}}

    if device == "cuda" and left() > 30:                     # one seed, CPU against CUDA
        data = resolve_data(data_arg)
        cpu, gpu = identification_on("cpu", data, 0), identification_on("cuda", data, 0)
        agree = (abs(cpu["top1"] - gpu["top1"]) <= TOP1_TOLERANCE
                 and abs(cpu["mean_rank"] - gpu["mean_rank"]) <= MEAN_RANK_TOLERANCE)
        result["cpu_vs_cuda"] = {"cpu": cpu, "cuda": gpu, "agree": bool(agree),
                                 "same_ranks": float(np.mean(np.array(cpu["ranks"]) == np.array(gpu["ranks"]))),
                                 "tolerance": {"top1": TOP1_TOLERANCE, "mean_rank": MEAN_RANK_TOLERANCE}}
    if left() > 20:                                          # batched seeds against separate fits
        data = resolve_data(data_arg)
        result["batched_vs_separate"] = batched_vs_separate(device, data)
    result["total_s"] = round(time.perf_counter() - t_start, 1)

    steps = result["steps"]
    lines = [f"GPU check: {result['versions']['gpu'] or 'no GPU'}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, data {data_arg}, device {device}.", "",
             "| step | wall s | rc |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']}{' (time limit)' if v['timed_out'] else ''} | {v['rc']} |"
              for k, v in steps.items()]
    lines.append("")
    for name in ("s3_dual_encoder", "s3_generative"):
        summ = steps[name].get("summary")
        if summ:
            lines.append(f"{name}: {summ['n_folds']} folds, seed fits {summ['seed_fits']}, "
                         f"{summ['dual_encoder_seconds_per_fit']:.2f} s per dual-encoder fit; top-1 "
                         + ", ".join(f"{m} {v['top1']:.3f}" for m, v in summ.items() if isinstance(v, dict))
                         + (f"; PixCorr diffusion {summ['diffusion']['pixcorr']:.3f}, GAN "
                            f"{summ['gan']['pixcorr']:.3f}" if "diffusion" in summ else ""))
    pipeline = sum(steps[s]["wall_s"] for s in STAGES)
    lines += ["", f"Default pipeline: {pipeline:.1f} s wall with Python start-up; inner seconds {inner}."]
    if "cpu_vs_cuda" in result:
        c = result["cpu_vs_cuda"]
        lines.append(f"CPU vs CUDA, seed 0, S1: top-1 {c['cpu']['top1']:.3f} / {c['cuda']['top1']:.3f}, "
                     f"mean rank {c['cpu']['mean_rank']:.2f} / {c['cuda']['mean_rank']:.2f}, "
                     f"agree within tolerance: {c['agree']}.")
    if "batched_vs_separate" in result:
        b = result["batched_vs_separate"]
        lines.append(f"Batched vs separate fits (3 seeds, dropout 0, float32): max |embedding diff| "
                     f"{b['max_abs_embedding_diff']:.1e}, same ranks {b['same_ranks']}, "
                     f"{b['batched_s']} s batched vs {b['separate_s']} s separate.")
    lines.append(f"Total {result['total_s']} s.")
    text = "\n".join(lines)
    print(text)
    (args.out_dir / "gpu_check.md").write_text(text + "\n")
    (args.out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
