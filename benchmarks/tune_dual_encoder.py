"""Choose dual-encoder settings by inner cross-validation on the S1 *training* trials only.

Two inner schemes, both inside the file's 107 training trials (the 12 test trials are never
read): ``seen`` = stratified 5-fold by image id (every held-out image also in training, like
S1/S2) and ``unseen`` = 5 folds that each hold out all trials of 4 images (like S3)
(``miyawaki_dual_encoder.inner_folds``). Identification ranks all 20 unique images by the
model's score, once per setting of the score's grid (``SCORE_GRID``: the weights of the pixel
read-out and of the encoding model, the read-out's model, the encoding model's alpha; they need
no network refit).

    python benchmarks/tune_dual_encoder.py --seeds 0 1            # the score's settings
    python benchmarks/tune_dual_encoder.py --set skip=False --set skip=True
    python benchmarks/tune_dual_encoder.py --set mixup=0 --set mixup=64 --seeds 0 1
    python benchmarks/tune_dual_encoder.py --seeds 0 1 2 3 4 --ensemble   # the 5 fits as one model
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miyawaki_dataset_loader import (DEFAULT_OUT, DefaultsHelpFormatter, OptionError,  # noqa: E402
                                     ScriptOptions, ScriptParser, check_options, check_seeds,
                                     prepare_out_dir, resolve_data, resolve_device, run_cli, save_json)
from miyawaki_dual_encoder import SCORE_GRID, DualEncoderConfig, inner_cv_scores, score_settings  # noqa: E402


def parse_overrides(spec: str) -> dict:
    """``"a=1,b=False,c=name,d=[64,32]"`` -> {"a": 1, "b": False, "c": "name", "d": [64, 32]}
    (JSON values, Python's True/False accepted, anything else a string; commas inside brackets
    belong to a list)."""
    def value(v: str):
        try:
            return json.loads(v.replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            return v
    items = re.split(r",(?![^\[]*\])", spec)
    bad = [kv for kv in items if kv and "=" not in kv]
    if bad:
        raise OptionError(f"--set {spec}: {bad[0]!r} is not KEY=VALUE")
    return {k: value(v) for k, v in (kv.split("=", 1) for kv in items if kv)}


def same_kind(value, default) -> bool:
    """Whether a ``--set`` value fits a field whose default is ``default`` (None: anything)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return number and (isinstance(default, float) or float(value).is_integer())
    if isinstance(default, tuple):
        return isinstance(value, tuple) and all(same_kind(v, d) for v, d in zip(value, default * len(value)))
    if isinstance(default, Path):
        return isinstance(value, str)
    return default is None or isinstance(value, type(default))


def as_kind(value, default):
    """A ``--set`` value that ``same_kind`` accepted, as the field's type: 3.0 for an int field is
    3, [64.0] for a tuple of ints (64,), a path string a Path."""
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, (int, float)):
        return type(default)(value)
    if isinstance(default, tuple) and default:
        return tuple(as_kind(v, default[0]) for v in value)
    return Path(value) if isinstance(default, Path) else value


GRID_REASON = "is varied by this script's own grid, which sets it at every point"


def candidates(specs: list[str], base, ignored: dict[str, str] | None = None) -> dict:
    """``--set`` specs -> {spec or "default": ``base`` with the spec's fields}, each checked before
    any fitting: an unknown field, a value of another type or out of its range, or a field the
    script sets itself or never reads (``ignored``: {field: why}, e.g. its own grid's, set at every
    grid point), so that a ``--set`` of it would be ignored, is an OptionError naming it."""
    names = {f.name for f in fields(base)}
    out = {}
    for spec in specs or [""]:
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in parse_overrides(spec).items()}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise OptionError(f"--set {spec}: {type(base).__name__} has no field {', '.join(unknown)}")
        unread = [k for k in overrides if k in (ignored or {})]
        if unread:
            raise OptionError(f"--set {spec}: {unread[0]} {ignored[unread[0]]}, so --set would be "
                              f"ignored (--help)")
        for k, v in overrides.items():
            if not same_kind(v, getattr(base, k)):
                raise OptionError(f"--set {spec}: {k} takes values like {getattr(base, k)!r}, got {v!r}")
            overrides[k] = as_kind(v, getattr(base, k))
        try:
            out[spec or "default"] = check_options(replace(base, **overrides))
        except OptionError as e:   # the config's flag (--epochs) is the main script's, not ours
            raise OptionError(f"--set {spec}: {e}") from None
    return out


def score(data, cfg: DualEncoderConfig, scheme: str, seeds: list[int], settings, device,
          ensemble: bool = False) -> dict:
    """Inner-CV identification on the S1 training trials, mean over folds and seeds (``ensemble``:
    the seeds' fits of every inner fold scored as one model, ``ensemble_parts``) ->
    {"top1" | "mrr": {setting name: value}}."""
    train_idx = data.s1().train_idx
    runs = ([inner_cv_scores(data, train_idx, cfg, scheme, settings, device, seeds=tuple(seeds))]
            if ensemble else
            [inner_cv_scores(data, train_idx, replace(cfg, seed=seed), scheme, settings, device)
             for seed in seeds])
    return {m: {name: float(np.mean([r[m][name] for r in runs])) for name in runs[0][m]}
            for m in ("top1", "mrr")}


def best_by_mean(per_scheme: dict[str, dict[str, float]]) -> dict:
    """The selection rule of the tuning scripts: the candidate with the highest mean over the
    inner schemes (``per_scheme``: {scheme: {candidate: score}}, candidates in the order they
    were scored; a tie goes to the first) -> {"rule", "best", "score", "means"}."""
    schemes = list(per_scheme)
    names = [n for n in per_scheme[schemes[0]] if all(n in per_scheme[s] for s in schemes)]
    means = {n: float(np.mean([per_scheme[s][n] for s in schemes])) for n in names}
    top = max(means.values())
    best = next(n for n in names if means[n] >= top - 1e-12)   # equal up to rounding: the first
    return {"rule": f"highest mean over the {' and '.join(schemes)} inner schemes",
            "best": best, "score": means[best], "means": means}


SCHEMES_HELP = ("inner folds (inner_folds, 5 per scheme): seen = stratified by image, unseen = a "
                "fifth of the images held out per fold")


def option_help(name: str) -> str:
    """The scripts' --help text of a shared option (``ScriptOptions``: data, device)."""
    return ScriptOptions.__dataclass_fields__[name].metadata["help"]


def tuning_parser(doc: str, out_name: str, what: str | None = None) -> argparse.ArgumentParser:
    """The options the tuning scripts share, with the scripts' one-line errors: ``--data``,
    ``--out`` (default ``outputs/<out_name>``; ``check_out``) and, given ``what`` (a config class
    name), repeatable ``--set`` candidates of it (``candidates``)."""
    p = ScriptParser(description=doc.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data", default=None, help=option_help("data"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / out_name, help="the result JSON")
    if what:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                       help=f"one candidate setting of {what} (repeat the flag for several)")
    return p


def check_out(path: Path) -> None:
    """OptionError before any work unless ``--out`` ``path`` can take the result JSON: not a
    folder, and in a folder that can be written (created if need be)."""
    if path.is_dir():
        raise OptionError(f"--out {path} is a folder; give the result file's path")
    prepare_out_dir(path.parent, "--out's folder")


def main(argv=None) -> dict:
    """Score each ``--set`` candidate by inner CV; print a line each and save the JSON; returns it."""
    p = tuning_parser(__doc__, "tune_dual_encoder.json", "DualEncoderConfig")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="the networks' seeds (each fits every inner fold)")
    p.add_argument("--schemes", nargs="+", default=["seen", "unseen"], choices=["seen", "unseen"],
                   help=SCHEMES_HELP)
    p.add_argument("--ensemble", action="store_true",
                   help="score the seeds' fits of every inner fold as one model (their embeddings' "
                        "cosine averaged) instead of averaging the seeds' scores")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help=option_help("device"))
    args = p.parse_args(argv)
    check_seeds(args.seeds)                                         # all before the data load
    if args.ensemble and len(args.seeds) < 2:
        raise OptionError("--ensemble scores the --seeds' fits as one model; give two seeds or more")
    configs = candidates(args.set, DualEncoderConfig(), {
        "seed": "is set by --seeds", "log_every": "only spaces the fits' progress lines",
        "val_fraction": "is 0 in the inner CV, which fits on every inner training trial",
        **dict.fromkeys(SCORE_GRID, GRID_REASON)})
    check_out(args.out)
    device = resolve_device(args.device)
    data = resolve_data(args.data)
    results = {}
    settings = score_settings()
    for key, cfg in configs.items():
        t0 = time.perf_counter()
        results[key] = {s: score(data, cfg, s, args.seeds, settings, device, args.ensemble)
                        for s in args.schemes}
        for name in results[key][args.schemes[0]]["top1"]:
            line = []
            for m in ("top1", "mrr"):
                values = [results[key][s][m][name] for s in args.schemes]
                line.append(f"{m} " + " ".join(f"{s} {v:.3f}" for s, v in zip(args.schemes, values))
                            + f" mean {np.mean(values):.3f}")
            print(f"{key:20s} {name:60s} " + " | ".join(line), flush=True)
        print(f"{key}: {time.perf_counter() - t0:.0f} s", flush=True)
    selection = best_by_mean({s: {f"{key} | {name}": v for key, r in results.items()
                                  for name, v in r[s]["top1"].items()} for s in args.schemes})
    print(f"best by the {selection['rule']}' top-1 (the first of ties): {selection['best']} "
          f"({selection['score']:.3f})")
    save_json({"data": data.source, "seeds": args.seeds, "ensemble": args.ensemble,
               "device": str(device), "results": results,
               "selection": {k: v for k, v in selection.items() if k != "means"}}, args.out)
    return results


if __name__ == "__main__":
    run_cli(main)
