"""Profile the dual-encoder stage: where its CPU time goes (torch.profiler, by operator) and where
its peak memory comes from (resident memory after each step, and the tensors' own peak by kind).

    python benchmarks/profile_dual_encoder.py --data data/miyawaki_structured_28x28.mat
    python benchmarks/profile_dual_encoder.py --data simulated --epochs 10 --rows 20

The numbers explain benchmarks/pipeline_speed.py's dual-encoder row; they are not a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path


def rss_mib() -> dict:
    """Current and peak resident memory of this process, MiB (Linux /proc)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def main(argv=None) -> dict:
    """Fit on S1 for memory and time, again under the profiler for operator times and tensor
    memory; print the tables; returns them as a dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=argparse.SUPPRESS, help="as the scripts' --data (default: theirs)")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the profiled fit")
    p.add_argument("--rows", type=int, default=12, help="operators listed")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.rows < 1:
        p.error(f"--epochs and --rows must be >= 1, got {args.epochs} and {args.rows}")

    memory = {"python start": rss_mib()}
    import torch
    from torch.profiler import ProfilerActivity, profile
    memory["import torch"] = rss_mib()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import miyawaki_dual_encoder as de
    from miyawaki_dataset_loader import DataError, resolve_data
    memory["import the repository's modules"] = rss_mib()
    try:
        fold = resolve_data(getattr(args, "data", None)).s1()   # SUPPRESS: no "(default: None)"
    except DataError as e:           # one line, as the scripts' run_cli (imported late: see above)
        raise SystemExit(f"error: {e}") from None
    memory["load the data"] = rss_mib()

    cfg = de.DualEncoderConfig(epochs=args.epochs)
    t0 = time.perf_counter()
    de.train_dual_encoder(fold.train, cfg, "cpu", fold.unique_images, progress=False)
    seconds = time.perf_counter() - t0
    memory[f"train {args.epochs} epochs"] = rss_mib()

    # operator times: a second, identical fit under the profiler (operators only: recording
    # Python stacks would add the interpreter's own waits to the table)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        de.train_dual_encoder(fold.train, cfg, "cpu", fold.unique_images, progress=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total_us} for e in events[:args.rows]]

    # tensor memory by kind: a 2-epoch fit reaches the same peak (full batches, fixed shapes)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:  # the memory timeline needs shapes and stacks
        de.train_dual_encoder(fold.train, replace(cfg, epochs=2), "cpu", fold.unique_images,
                              progress=False)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # the timeline export is still the CPU one
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(tmp, "timeline.json").read_text())
    kinds = ["parameter", "optimizer state", "input", "temporary", "activation", "gradient",
             "autograd detail", "unknown"]
    at_peak = max(sizes, key=sum)
    tensors = {k: v / 2**20 for k, v in zip(kinds, at_peak[1:]) if v}

    print(f"train {args.epochs} epochs: {seconds:.1f} s (without the profiler), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n\n| operator | calls | self CPU s | share |\n|---|---|---|---|")
    for o in ops:
        print(f"| {o['op']} | {o['calls']} | {o['self_cpu_s']:.2f} | {o['share']:.0%} |")
    print("\n| after | resident MiB | peak MiB |\n|---|---|---|")
    for step, m in memory.items():
        print(f"| {step} | {m['VmRSS']:.0f} | {m['VmHWM']:.0f} |")
    print(f"\ntensors at their peak: {sum(tensors.values()):.0f} MiB ("
          + ", ".join(f"{k} {v:.0f}" for k, v in tensors.items()) + ")")
    return {"seconds": seconds, "ops": ops, "memory_mib": memory, "tensor_peak_mib": tensors}


if __name__ == "__main__":
    main()
