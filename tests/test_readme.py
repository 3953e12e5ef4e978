"""The README's Python blocks run as written, in order, in one namespace (a notebook), on the
simulated set, against outputs the scripts just wrote: the notebook path cannot rot."""

import json
import re
import shutil
from pathlib import Path

import miyawaki_dataset_loader as L
import miyawaki_dual_encoder as D
import miyawaki_generative_backend as G
from helpers import SMALL_ANCHOR_ARGS

README = Path(L.__file__).with_name("README.md")
SIM = ["--data", "simulated", "--device", "cpu"]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run_on_the_simulated_set(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    D.main([*SIM, "--epochs", "2", "--out-dir", str(out)])
    G.main([*SIM, "--out-dir", str(out), "--diffusion-steps", "3", "--gan-steps", "2",
            "--num-inference-steps", "2", "--n-sample-grids", "0", *SMALL_ANCHOR_ARGS])
    assert "oracle" not in json.loads((out / "miyawaki_generation.json").read_text())  # no --oracle
    summary = (out / "summary.md").read_text()                   # what make run ends with
    for row in ("dual encoder identification top-1 (20-way)", "diffusion decoder reconstruction",
                "GAN decoder reconstruction", "miyawaki_training_curves.png"):
        assert row in summary, row
    for seed in range(5):   # the S1 loop's fits for the ensemble block (copies: it has to run)
        (tmp_path / "runs" / f"s{seed}").mkdir(parents=True)
        shutil.copy(out / D.CHECKPOINT_NAME, tmp_path / "runs" / f"s{seed}")
    monkeypatch.chdir(tmp_path)                                  # "outputs/..." as in the README
    monkeypatch.setattr(L, "DEFAULT_DATA", tmp_path / "no.mat")  # no file: the simulated set
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["images"].shape == (len(namespace["fold"].test), 1, 28, 28)
    assert namespace["gate"].shape == (len(namespace["fold"].test),)
    assert namespace["ensemble_scores"].shape == (len(namespace["fold"].test), 20)
    assert namespace["data"].source.startswith("simulated")
    assert 0 <= namespace["scores"]["identification"]["top1"] <= 1
