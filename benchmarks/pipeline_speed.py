"""Time the default pipeline stage by stage: wall time, CPU time and peak memory per stage.

Each stage runs as its own process (as a user runs it), so peak memory is that stage's own.
Medians over ``--repeats`` runs; the table is printed and saved to ``<out-dir>/pipeline_speed.{md,json}``.

    python benchmarks/pipeline_speed.py --data data/miyawaki_structured_28x28.mat --repeats 3
    python benchmarks/pipeline_speed.py --data simulated --device cuda
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from miyawaki_dataset_loader import DefaultsHelpFormatter, ScriptParser  # noqa: E402

STAGES = ["miyawaki_dataset_loader.py", "miyawaki_dual_encoder.py", "miyawaki_evaluation.py",
          "miyawaki_generative_backend.py"]


def run_stage(script: str, args: list[str]) -> dict:
    """Run one script in a child process; wall s, CPU s (user + sys) and peak RSS MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_mib": usage.ru_maxrss / 1024}


def machine() -> str:
    """CPU model and count, the GPU when there is one, and the versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> dict:
    """Run every stage ``--repeats`` times; print and save the table; returns the JSON dict."""
    p = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="passed to every stage (default: the scripts' own)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="passed to every stage")
    p.add_argument("--repeats", type=int, default=3, help="runs of every stage (the table shows medians)")
    p.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "speed",
                   help="where the stages write (kept apart from the main outputs)")
    args = p.parse_args(argv)
    data = args.data
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    common = ["--out-dir", str(args.out_dir), "--device", args.device]
    common += ["--data", data] if data else []
    runs = {s: [] for s in STAGES}
    for r in range(args.repeats):
        for s in STAGES:
            runs[s].append(run_stage(s, common))
            print(f"run {r + 1}/{args.repeats} {s}: {runs[s][-1]['wall_s']:.1f} s", flush=True)
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in runs.items()}
    total = {"wall_s": statistics.median(sum(runs[s][r]["wall_s"] for s in STAGES) for r in range(args.repeats)),
             "cpu_s": statistics.median(sum(runs[s][r]["cpu_s"] for s in STAGES) for r in range(args.repeats)),
             "peak_mib": max(m["peak_mib"] for m in med.values())}
    extra = {}
    de = json.loads((args.out_dir / "miyawaki_dual_encoder.json").read_text())
    cfg, m = de["config"], de
    extra["dual_encoder_trial_epochs_per_s"] = m["n_train"] * cfg["epochs"] / m["train_seconds"]
    gen = json.loads((args.out_dir / "miyawaki_generation.json").read_text())
    extra["diffusion_sampling_s_per_image"] = gen["diffusion"]["sample_seconds_per_image"]
    host = machine()
    import torch   # the stages inherit this process's environment, so its thread count
    ran = {"device": gen["device"], "torch_threads": torch.get_num_threads(),
           "bf16_autocast": {"dual_encoder": bool(de["bf16_autocast"]),
                             "generative": bool(gen["bf16_autocast"])}}
    precision = "; ".join(f"{stage.replace('_', ' ')} {'bfloat16 autocast' if on else 'float32'}"
                          for stage, on in ran["bf16_autocast"].items())
    lines = [f"Machine: {host}; ran on {ran['device']} (--device {args.device}; {precision}), "
             f"{ran['torch_threads']} torch threads; median of {args.repeats} runs; data "
             f"{data or 'default'}.", "",
             "| stage | wall s | CPU s | peak MiB |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} | {v['peak_mib']:.0f} |" for s, v in med.items()]
    lines += [f"| **total** | **{total['wall_s']:.1f}** | {total['cpu_s']:.1f} | {total['peak_mib']:.0f} (max) |", "",
              f"Dual-encoder throughput: {extra['dual_encoder_trial_epochs_per_s']:.0f} trial-epochs/s; "
              f"diffusion sampling: {1000 * extra['diffusion_sampling_s_per_image']:.1f} ms per image."]
    text = "\n".join(lines)
    print(text)
    (args.out_dir / "pipeline_speed.md").write_text(text + "\n")
    result = {"machine": host, **ran, "device_option": args.device, "repeats": args.repeats, "stages": med,
              "total": total, **extra, "runs": runs}
    (args.out_dir / "pipeline_speed.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
