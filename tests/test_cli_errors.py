"""Bad settings and unusable data are refused before any work: one line on stderr (exit code 2
for an option, 1 for data), no traceback, and the earlier outputs left byte-identical."""

import copy
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import miyawaki_dataset_loader as L
import miyawaki_dual_encoder as D
import miyawaki_evaluation as E
import miyawaki_generative_backend as G

SIM = ["--data", "simulated", "--device", "cpu"]
EARLIER = ["miyawaki_dual_encoder.pth", "miyawaki_dual_encoder.json", "miyawaki_evaluation.json",
           "miyawaki_generative_backends.pth", "miyawaki_generation.json", "benchmark_s1.json",
           "benchmark_s3.json", "benchmark_s3.md", "diffusion_samples/step_00400.png"]


@pytest.fixture
def out(tmp_path):
    """An output folder holding earlier results (stand-in bytes) of every script."""
    out = tmp_path / "out"
    for name in EARLIER:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(f"earlier {name}".encode())
    return out


def listing(folder):
    """{path: (bytes, mtime)} of everything under ``folder``."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def refused(main, argv, out, capsys) -> tuple[int, str]:
    """Run ``main(argv)`` as the command line does (run_cli); it must stop with one line on
    stderr and leave ``out`` as it was. Returns (exit code, that line)."""
    before = listing(out)
    with pytest.raises(SystemExit) as exc:
        L.run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert listing(out) == before
    return exc.value.code, err


BAD_OPTIONS = {  # name -> (script, options, words of the message)
    "download into the simulated set": (L, ["--download"], "--download fetches the real file"),
    "download from no address": (L, ["--download", "--url", "notaurl"], "--url 'notaurl' is not an http(s) address"),
    "url without download": (L, ["--url", "https://example.org/x.mat"], "--url applies only with --download"),
    "loader seed": (L, ["--seed", "3"], "--seed applies only to the scripts that train or sample"),
    "epochs 0": (D, ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    "epochs -3": (D, ["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    "validation fraction 1": (D, ["--val-fraction", "1"], "--val-fraction must be < 1"),
    "learning rate 0": (D, ["--lr", "0"], "--lr must be > 0"),
    "one pair per step": (D, ["--batch-size", "1", "--mixup", "0", "--epochs", "1"], "no negatives"),
    "hidden layer 0": (D, ["--fmri-hidden", "1024", "0"], "--fmri-hidden must be >= 1, got 0"),
    "seed -1": (D, ["--seed", "-1"], "--seed must be >= 0"),
    "seed 2**32": (D, ["--seed", "4294967296"], "--seed must be <= 4294967295, got 4294967296"),
    "five conv blocks": (D, ["--cnn-channels", *"88888"], "--cnn-channels takes at most 4 values, got 5"),
    "score weights over 1": (D, ["--readout-weight", "0.75", "--encoding-weight", "0.5"],
                             "--readout-weight + --encoding-weight must be <= 1"),
    "encoding voxels 0": (D, ["--encoding-voxels", "0"], "--encoding-voxels must be > 0"),
    "not a number": (D, ["--epochs", "ten"], "invalid int value"),
    "gan steps -1": (G, ["--gan-steps", "-1"], "--gan-steps must be >= 1"),
    # always the null condition: guidance would extrapolate an untrained conditional branch
    "condition drop 1": (G, ["--condition-drop-prob", "1"], "--condition-drop-prob must be < 1"),
    "inference steps 0": (G, ["--num-inference-steps", "0"], "--num-inference-steps must be >= 1"),
    "diffusion steps 0": (G, ["--diffusion-steps", "0"], "--diffusion-steps must be >= 1"),
    "prior of one image": (G, ["--prior-size", "1"], "--prior-size must be >= 2, got 1"),
    "augmentation shift 29": (G, ["--augment-shift", "29"], "--augment-shift must be <= 28, got 29"),
    "anchor blend without the anchor": (G, ["--no-anchor", "--anchor-blend", "0.3"],
                                        "--anchor-blend applies only with the decoders' anchor"),
    "posterior settings with the ridge anchor": (G, ["--anchor-model", "ridge", "--rf-prior-scale", "10"],
                                                 "--rf-prior-scale applies only with --anchor-model receptive-field"),
    # the voxels the receptive fields keep changed no number without them (the audit's runs)
    "receptive-field voxels without the anchor": (G, ["--no-anchor", "--rf-voxels", "0.9"],
                                                  "--rf-voxels applies only with the decoders' anchor"),
    "receptive-field voxels with the ridge anchor": (G, ["--anchor-model", "ridge", "--rf-voxels", "0.9"],
                                                     "--rf-voxels applies only with --anchor-model receptive-field"),
    # found by a sweep of every option on the simulated set: each changed no number in this mode
    "gate off at blend 1": (G, ["--no-novelty-gate"], "--no-novelty-gate at --anchor-blend 1 outputs the anchor alone"),
    "prior condition without prior samples": (G, ["--augment-prob", "0", "--prior-condition", "image"],
                                              "--prior-condition applies only with the image prior's samples"),
    "anchor model without anchor or synthetic prior": (G, ["--no-anchor", "--prior-condition", "image",
                                                           "--anchor-model", "ridge"],
                                                       "--anchor-model applies only with the decoders' anchor or a synthetic"),
    "anchor folds without anchor or prior": (G, ["--no-anchor", "--augment-prob", "0", "--anchor-folds", "5"],
                                             "--anchor-folds applies only with the decoders' anchor or a synthetic"),
    "prior size without prior or posterior": (G, ["--anchor-model", "ridge", "--augment-prob", "0", "--prior-size", "512"],
                                              "--prior-size applies only with the image prior's samples"),
    "posterior settings at ridge weight 1": (G, ["--rf-ridge-weight", "1", "--rf-prior-scale", "10"],
                                             "--rf-prior-scale applies only with --rf-ridge-weight below 1"),
    "prior shift where only a zero-weight posterior would draw it": (
        G, ["--rf-ridge-weight", "1", "--augment-prob", "0", "--augment-shift", "6"],
        "--augment-shift applies only with the image prior's samples"),
    "gate power without the gate": (G, ["--no-novelty-gate", "--likelihood-gate-power", "2"],
                                    "--likelihood-gate-power applies only with the novelty gate"),
    "ddim steps with ddpm": (G, ["--sampler", "ddpm", "--num-inference-steps", "20"],
                             "--num-inference-steps applies only with --sampler ddim"),
    "condition probability 1.5": (G, ["--fmri-condition-prob", "1.5"],
                                  "--fmri-condition-prob must be <= 1, got 1.5"),
    "max folds -19": (E, ["--protocol", "s3", "--max-folds", "-19"], "--max-folds must be >= 0"),
    "max folds 7 of S1's 1": (E, ["--protocol", "s1", "--max-folds", "7"],
                              "--max-folds 7 is more than the 1 fold of S1 on simulated"),
    "benchmark epochs -1": (E, ["--protocol", "s3", "--epochs", "-1"], "--epochs must be >= 1"),
    "workers 0": (E, ["--protocol", "s3", "--workers", "0"], "--workers must be >= 1"),
    "more workers than CPUs": (E, ["--protocol", "s3", "--workers", str((os.cpu_count() or 1) + 1)],
                               f"is more than the {os.cpu_count() or 1} CPUs here"),
    "logit scale inf": (D, ["--logit-scale-init", "inf"], "--logit-scale-init must be a finite number, got inf"),
    "encoding alpha inf": (D, ["--encoding-alpha", "inf"], "--encoding-alpha must be a finite number"),
    "guidance nan": (G, ["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    "guidance -3": (G, ["--guidance-scale=-3"], "--guidance-scale must be >= 0, got -3"),
    "t-SNE perplexity in the benchmark": (E, ["--protocol", "s3", "--tsne-perplexity", "5"],
                                          "the benchmark trains its own models, seeded by --seeds"),
    "likelihood weight -inf": (G, ["--likelihood-weight=-inf"], "--likelihood-weight must be a finite number"),
    "inner repeats 0": (E, ["--protocol", "s2", "--nested", "--inner-repeats", "0"],
                        "--inner-repeats must be >= 1"),
    "inner repeats without nested": (E, ["--protocol", "s2", "--inner-repeats", "2"],
                                     "--inner-repeats 2 needs --nested"),
    "seeds -1": (E, ["--protocol", "s3", "--seeds", "0", "-1"], "--seeds must be >= 0, got -1"),
    "seeds 0 0": (E, ["--protocol", "s3", "--max-folds", "1", "--epochs", "1", "--seeds", "0", "0"],
                  "--seeds 0 0 repeats a seed"),
    "oracle in the benchmark": (E, ["--protocol", "s1", "--epochs", "1", "--seeds", "0", "--oracle"],
                                "--oracle applies only without --protocol"),
    "generative without a protocol": (E, ["--generative"], "--generative applies only with --protocol"),
    "seeds 2**32": (E, ["--protocol", "s3", "--seeds", "0", "4294967296"], "--seeds must be <= 4294967295"),
    "batched fits of one seed": (E, ["--protocol", "s3", "--max-folds", "1", "--epochs", "1", "--seeds", "0",
                                      "--seed-fits", "batched"],
                                 "--seed-fits applies only with more than one --seeds value"),
    "evaluation seed 2**32": (E, ["--seed", "4294967296"], "--seed must be <= 4294967295"),
    "knn k 0": (E, ["--knn-k", "0"], "--knn-k must be >= 1"),
    "perplexity 0": (E, ["--tsne-perplexity", "0"], "--tsne-perplexity must be > 0"),
    "perplexity in the benchmark": (E, ["--protocol", "s3", "--max-folds", "1", "--epochs", "1",
                                        "--seeds", "0", "--tsne-perplexity", "5"],
                                    "--tsne-perplexity applies only without --protocol"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_option_is_refused_before_any_work(case, out, capsys):
    script, options, words = BAD_OPTIONS[case]
    code, line = refused(script.main, [*SIM, *options, "--out-dir", str(out)], out, capsys)
    assert code == 2 and words in line


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 400000000000 bytes.")], ids=["numpy", "torch"])
def test_running_out_of_memory_is_one_line(error, capsys):
    """Sizes too large for the machine's memory (--mixup 100000000, --prior-size 100000000) end
    with one line, exit code 1; any other RuntimeError stays a traceback (a bug to see)."""
    def main():
        raise error

    with pytest.raises(SystemExit) as exc:
        L.run_cli(main)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and err.startswith("error: out of memory")
    with pytest.raises(RuntimeError, match="a bug"):
        L.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_ctrl_c_is_one_line_and_left_to_the_benchmark_s_parent(capsys):
    """Ctrl-C ends a script with one line (exit code 130); a benchmark worker ignores it, so that
    the parent alone stops and terminates the workers (each printed its own traceback)."""
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        L.run_cli(main)
    assert exc.value.code == 130 and capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
    handler = signal.getsignal(signal.SIGINT)
    try:
        E.worker_threads(torch.get_num_threads())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)


def test_the_bounds_are_the_code_s_limits():
    """The largest values the options allow run, one more would crash: four conv blocks (the most
    --cnn-channels takes) train on a step that shows one 28 x 28 image, where a fifth's 1 x 1 map
    leaves its BatchNorm one value per channel, and the largest --seed seeds numpy, torch and
    scikit-learn where 2**32 does not."""
    blocks = D.DualEncoderConfig.__dataclass_fields__["cnn_channels"].metadata["max_items"]
    image = torch.rand(1, 1, 28, 28)
    assert torch.isfinite(D.StimulusEncoder(8, (2,) * blocks).train()(image)).all()
    assert L.check_options(D.ScriptConfig(cnn_channels=(2,) * blocks)).cnn_channels == (2,) * blocks
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        D.StimulusEncoder(8, (2,) * (blocks + 1)).train()(image)
    L.seed_everything(L.MAX_SEED)
    assert E.tsne_map(np.random.default_rng(0).standard_normal((12, 4)), L.MAX_SEED).shape == (12, 2)
    with pytest.raises(ValueError):
        np.random.seed(L.MAX_SEED + 1)


@pytest.mark.parametrize("cfg", [D.ScriptConfig(epochs=0), G.GenerativeConfig(gan_steps=-1),
                                 E.EvaluationConfig(knn_k=0),
                                 E.EvaluationConfig(protocol="s3", max_folds=-19)],
                         ids=["dual encoder", "generative", "evaluation", "benchmark"])
def test_config_object_is_checked_like_the_command_line(cfg, out, capsys):
    script = {D.ScriptConfig: D, G.GenerativeConfig: G, E.EvaluationConfig: E}[type(cfg)]
    cfg = replace(cfg, data="simulated", device="cpu", out_dir=out)
    with pytest.raises(L.OptionError, match="must be >="):
        script.main(cfg)
    assert refused(script.main, cfg, out, capsys)[0] == 2


# the loader runs no model, but checks --device as the others do (it exited 0 and recorded it)
RUNS = {"loader": (L, []), "dual encoder": (D, []), "evaluation": (E, []),
        "benchmark s1": (E, ["--protocol", "s1"]), "benchmark s3": (E, ["--protocol", "s3"]),
        "generative": (G, [])}


@pytest.mark.parametrize("run", RUNS)
def test_cuda_without_a_gpu_is_one_line(run, out, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    script, options = RUNS[run]
    code, line = refused(script.main, ["--data", "simulated", "--device", "cuda", *options,
                                       "--out-dir", str(out)], out, capsys)
    assert code == 2 and "--device cuda" in line and "--device cpu" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_from_the_shell(out):
    """The same refusal through the real command line: exit code 2, one line, no traceback."""
    before = listing(out)
    proc = subprocess.run([sys.executable, str(L.REPO_DIR / "miyawaki_generative_backend.py"),
                           "--data", "simulated", "--device", "cuda", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--device cuda" in proc.stderr
    assert listing(out) == before


def no_test_trials(arrays):
    for key in ("fmriTest", "stimTest", "labelTest"):
        arrays[key] = arrays[key][:0]


def fractional_label(arrays):
    arrays["labelTrn"] = arrays["labelTrn"].astype(np.float64)
    arrays["labelTrn"][3] = 2.5


def every_image_once(arrays):
    _, first = np.unique(arrays["stimTrn"], axis=0, return_index=True)
    for key in ("fmriTrn", "stimTrn", "labelTrn"):
        arrays[key] = arrays[key][np.sort(first)]


def one_training_trial(arrays):
    for key in ("fmriTrn", "stimTrn", "labelTrn"):
        arrays[key] = arrays[key][:1]


def one_training_image(arrays):
    arrays["stimTrn"][:] = arrays["stimTrn"][0]


def two_images(arrays):
    """Every trial shows one of two images: an S3 fold trains on one."""
    first, second = np.unique(arrays["stimTrn"], axis=0)[:2]
    for key in ("stimTrn", "stimTest"):
        arrays[key][:] = np.where(np.arange(len(arrays[key]))[:, None] % 2, second, first)


BAD_DATA = {  # name -> (edit of the file's arrays, script, options, words of the message)
    **{f"no test trials, {run}": (no_test_trials, *RUNS[run], "no test trials")
       for run in ("dual encoder", "evaluation", "benchmark s1", "generative")},
    "non-integer labels": (fractional_label, D, [], "non-integer values (e.g. 2.5)"),
    "every image shown once, benchmark s2": (every_image_once, E, ["--protocol", "s2"],
                                             "use `--protocol s3`"),
    "one training trial, dual encoder": (one_training_trial, D, [], "one training trial in its own split"),
    "one training image, generative": (one_training_image, G, [], "S1 training trials show one distinct image"),
    "two images, benchmark s3 --generative": (two_images, E, ["--protocol", "s3", "--generative", "--seeds",
                                                              "0", "--epochs", "1", "--max-folds", "1"],
                                              "training trials of S3 fold"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_unusable_data_is_refused_before_any_work(case, out, mat_arrays, write_mat, capsys):
    edit, script, options, words = BAD_DATA[case]
    edit(mat_arrays)
    path = write_mat(out.parent / "bad.mat", mat_arrays)
    code, line = refused(script.main, ["--data", str(path), "--device", "cpu", *options,
                                       "--out-dir", str(out)], out, capsys)
    assert code == 1 and str(path) in line and words in line


def test_a_diverging_training_is_one_line(out, capsys):
    """A learning rate at which the loss overflows stops the script with one line (exit code 1)
    naming the loss, and writes nothing."""
    code, line = refused(D.main, [*SIM, "--lr", "1e6", "--epochs", "5", "--out-dir", str(out)], out, capsys)
    assert code == 1 and "training diverged" in line and "lower the learning rate" in line


def test_a_file_without_test_trials_still_runs_the_s2_s3_benchmark(tmp_path, mat_arrays, write_mat):
    no_test_trials(mat_arrays)
    path = write_mat(tmp_path / "all_train.mat", mat_arrays)
    data = L.load_miyawaki(path)
    assert (len(data.trials), data.n_file_train) == (107, 107)
    assert len(L.splits("s2", data)) == 15
    result = E.main(["--data", str(path), "--device", "cpu", "--protocol", "s3", "--max-folds", "1",
                     "--seeds", "0", "--epochs", "1", "--out-dir", str(tmp_path / "out")])
    assert result["n_folds"] == 1 and result["n_trials"] == 107


def _state_and_parent(stat: "L.Path") -> tuple[str, int]:
    """(state letter, parent pid) from a /proc/<pid>/stat file; ("X", 0) once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "X", 0
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    return [int(stat.parent.name) for stat in L.Path("/proc").glob("[0-9]*/stat")
            if _state_and_parent(stat)[1] == pid and _alive(int(stat.parent.name))]


def _alive(pid: int) -> bool:
    return _state_and_parent(L.Path(f"/proc/{pid}/stat"))[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_stopped_during_its_saves_leaves_the_earlier_outputs(out, monkeypatch):
    """A script's outputs are renamed into place together once all are written (staged_outputs):
    a kill after the dual encoder's checkpoint and figure were written, before its JSON, leaves
    the earlier outputs byte-identical and no temp file behind (it left a new checkpoint and
    figure beside the old JSON)."""
    before = listing(out)

    def killed(*args, **kwargs):
        raise SystemExit(143)

    monkeypatch.setattr(D, "save_json", killed)
    with pytest.raises(SystemExit):
        D.main([*SIM, "--epochs", "1", "--mixup", "8", "--out-dir", str(out)])
    assert listing(out) == before



def _killed_dual_encoder(out, when: str) -> None:
    """Run the dual encoder's script in a process that SIGKILLs itself (nothing of it can clean
    up) ``when`` = "writing" (its checkpoint and figure written, its JSON not) or "renaming" (after
    the first of its outputs' renames)."""
    code = f"""if True:
        import os, signal, sys
        sys.path.insert(0, {str(L.REPO_DIR)!r})
        import miyawaki_dual_encoder as D
        kill = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        if {when!r} == "writing":
            D.save_json = kill
        else:
            replace = os.replace
            def renamed_once(src, dst):
                replace(src, dst)
                if not os.path.basename(dst).startswith(".staged-outputs"):   # an output, not the journal
                    kill()
            os.replace = renamed_once
        D.main({[*SIM, "--epochs", "1", "--mixup", "0", "--out-dir", str(out)]!r})"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_outputs_of_a_run_killed_while_writing_them_are_removed_by_the_next_run(out, capsys):
    """SIGKILL while the outputs are written leaves their hidden temp files (nothing runs to remove
    them); the next run in the folder removes them before its work (``prepare_out_dir``), and the
    earlier outputs are as they were. A live process's temp file is left alone."""
    before = listing(out)
    _killed_dual_encoder(out, "writing")
    left = set(listing(out)) - set(before)
    assert left and all(p.name.startswith(".") and p.name.endswith(".tmp") for p in left), left
    live = out / f".figure.png.{os.getpid()}.abcdefgh.tmp"      # this process is running
    live.write_bytes(b"being written")
    L.prepare_out_dir(out)
    assert "a run was killed during its saves; removed 2 unfinished file(s)" in capsys.readouterr().out
    assert live.exists()
    live.unlink()
    assert listing(out) == before


def test_renames_of_a_run_killed_among_them_are_finished_by_the_next_run(out, capsys):
    """A run whose outputs are all written commits them: SIGKILL after the first rename leaves a
    mix of new and earlier outputs, and the next run in the folder finishes the renames from the
    run's journal, so that the checkpoint and the JSON beside it are of one run."""
    before = listing(out)
    _killed_dual_encoder(out, "renaming")
    [journal] = out.glob(".staged-outputs.*.json")
    names = [name for tmp, name in json.loads(journal.read_text()) if tmp is not None]
    def unchanged(name):     # the earlier output, or none where there was none
        return (out / name).exists() == (out / name in before) and (
            not (out / name).exists() or (out / name).read_bytes() == before[out / name][0])

    earlier = [name for name in names if unchanged(name)]
    assert 0 < len(earlier) < len(names), "the kill did not fall among the renames"
    L.prepare_out_dir(out)
    assert (f"killed during its saves; renamed the {len(earlier)} output(s) it had written into place"
            in capsys.readouterr().out)
    assert not [p for p in listing(out) if p.name.startswith(".")]
    assert not [name for name in names if unchanged(name)]
    result = json.loads((out / "miyawaki_dual_encoder.json").read_text())
    assert result["checkpoint_sha256"] == L.file_sha256(out / D.CHECKPOINT_NAME)


def test_what_a_killed_run_left_in_a_subfolder_is_tidied_too(out):
    """The decoders write their sample grids into a subfolder, where a killed run leaves its temp
    files and journal as well: the next run finishes that journal and removes those files."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                    # a process id that no process holds now
    grids = out / "diffusion_samples"
    (grids / f".step_00400.png.{dead.pid}.abcdefgh.tmp").write_bytes(b"new grid")
    (grids / f".step_00100.png.{dead.pid}.ijklmnop.tmp").write_bytes(b"half written")
    (grids / f".staged-outputs.{dead.pid}.json").write_text(json.dumps(
        [[f".step_00400.png.{dead.pid}.abcdefgh.tmp", "step_00400.png"]]))
    L.prepare_out_dir(out)
    assert sorted(p.name for p in grids.iterdir()) == ["step_00400.png"]
    assert (grids / "step_00400.png").read_bytes() == b"new grid"

DAMAGED_ENCODERS = {  # name -> (damage(checkpoint dict), words of the message)
    "entry missing": (lambda c: c.pop("fmri_mean"), "is damaged: it lacks its 'fmri_mean' entry"),
    "entry retyped": (lambda c: c.update(n_voxels="967"), "is damaged: it holds a str as its 'n_voxels' entry"),
    "config out of range": (lambda c: c["config"].update(latent_dim=-3),
                            "holds a config this code refuses (--latent-dim must be >= 1, got -3)"),
    "config retyped": (lambda c: c["config"].update(fmri_hidden=None), "does not match this code's model"),
    # without the mixin's hint to call from_checkpoint, which is the caller
    "weights missing": (lambda c: c["state"].pop("logit_scale"),
                        'match this code\'s model (Missing key(s) in state_dict: "logit_scale".); rerun'),
    "statistics of another shape": (lambda c: c.update(fmri_std=torch.ones(5)), "z-scored with other statistics"),
}


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory):
    """A small dual-encoder checkpoint of the simulated set, as the script writes it."""
    folder = tmp_path_factory.mktemp("encoder")
    D.main([*SIM, "--epochs", "1", "--mixup", "0", "--latent-dim", "8", "--fmri-hidden", "8",
            "--cnn-channels", "4", "--head-hidden", "8", "--out-dir", str(folder)])
    return torch.load(folder / D.CHECKPOINT_NAME, weights_only=True)


@pytest.mark.xdist_group("cli_small_encoder")   # shares a module fixture: one test process (make test)
@pytest.mark.parametrize("script", [E, G], ids=["evaluation", "decoders"])
@pytest.mark.parametrize("case", DAMAGED_ENCODERS)
def test_a_damaged_encoder_checkpoint_is_one_line(case, script, small_encoder, out, capsys):
    """A checkpoint edited by hand or damaged (an entry removed or of another type, a config out
    of range, missing weights) is refused in one line naming the script that rewrites it, as a
    truncated file is, where it gave a KeyError, TypeError or AttributeError traceback."""
    damage, words = DAMAGED_ENCODERS[case]
    ckpt = copy.deepcopy(small_encoder)
    damage(ckpt)
    torch.save(ckpt, out / D.CHECKPOINT_NAME)
    code, err = refused(script.main, [*SIM, "--out-dir", str(out)], out, capsys)
    # the command to rerun writes where this checkpoint is (not in the default outputs/)
    assert code == 1 and words in err and f"rerun `python miyawaki_dual_encoder.py --out-dir {out}`" in err, err


@pytest.mark.parametrize("script, options", [(L, []), (D, []), (E, []), (E, ["--protocol", "s3"]), (G, [])],
                         ids=["loader", "dual encoder", "evaluation", "benchmark", "decoders"])
def test_an_out_dir_that_is_a_file_is_refused_first(script, options, tmp_path, capsys):
    """An --out-dir that is a file (or lies under one) is named as the problem before any work:
    the loader printed the data summary first, and the evaluation and the decoders said their
    checkpoint was missing from it."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "sub", afile / "a" / "b"):
        with pytest.raises(SystemExit) as exc:
            L.run_cli(lambda: script.main([*SIM, *options, "--out-dir", str(out)]))
        printed = capsys.readouterr()
        assert exc.value.code == 2 and printed.out == "" and printed.err == (
            f"error: --out-dir {out} cannot be a folder: {afile} is a file; choose a folder\n")
    assert afile.read_text() == "keep"


def test_kill_ends_the_benchmark_with_its_workers_and_writes_nothing(out):
    """SIGTERM to a running ``--workers 2`` benchmark terminates its worker processes with it
    (they would otherwise outlive it and run their folds to the end), exits non-zero and leaves
    the earlier outputs as they were."""
    import time
    before = listing(out)
    proc = subprocess.Popen([sys.executable, str(L.REPO_DIR / "miyawaki_evaluation.py"), *SIM,
                             "--protocol", "s3", "--seeds", "0", "--workers", "2",
                             "--out-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, kids = time.monotonic() + 120, []
        while len(kids) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            kids = _children(proc.pid)
        assert len(kids) >= 2, "the benchmark never started its workers"
        time.sleep(10)                         # past their imports: the workers are fitting folds
        proc.terminate()
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(map(_alive, kids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, kids)), "worker processes outlived the killed benchmark"
        assert code == 143                                 # 128 + SIGTERM, from run_cli
    finally:
        proc.kill()
        proc.wait()
    assert listing(out) == before


def test_tuning_candidates_are_checked_before_any_fit():
    """The tuning scripts' --set candidates: an unknown field or a value out of range stops them
    with one line naming it before any fitting; a good one is the base config with its fields."""
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    from tune_dual_encoder import candidates
    good = candidates(["epochs=3,fmri_hidden=[64]", ""], D.DualEncoderConfig())
    assert good["epochs=3,fmri_hidden=[64]"] == D.DualEncoderConfig(epochs=3, fmri_hidden=(64,))
    assert good["default"] == D.DualEncoderConfig()
    with pytest.raises(L.OptionError, match="--set epoch=2: DualEncoderConfig has no field epoch"):
        candidates(["epoch=2"], D.DualEncoderConfig())
    with pytest.raises(L.OptionError, match="--gan-steps must be >= 1"):
        candidates(["gan_steps=0"], G.GenerativeConfig())
    # a list of several items (its commas are not the specs'), and values of the wrong kind
    two = candidates(["fmri_hidden=[512,256],dropout=0", "fmri_hidden=[64.0]"], D.DualEncoderConfig())
    assert two["fmri_hidden=[512,256],dropout=0"] == D.DualEncoderConfig(fmri_hidden=(512, 256), dropout=0.0)
    assert two["fmri_hidden=[64.0]"].fmri_hidden == (64,) and type(two["fmri_hidden=[64.0]"].fmri_hidden[0]) is int
    for spec in ("mixup=abc", "epochs=2.5", "skip=1"):
        with pytest.raises(L.OptionError, match=f"--set {spec}: .* takes values like"):
            candidates([spec], D.DualEncoderConfig())
    # a field the script's own grid sets at every point would be ignored silently
    with pytest.raises(L.OptionError, match="readout_weight is varied by this script's own grid"):
        candidates(["readout_weight=0.25"], D.DualEncoderConfig(), dict.fromkeys(D.SCORE_GRID, "is varied "
                                                                               "by this script's own grid"))


def test_tuning_grids_are_checked_before_any_fit_and_the_rule_names_its_choice(monkeypatch):
    """The tuning scripts' own grids (--blend, --likelihood, --voxels, ...) are checked like --set
    values before the data load and any fit (they were scored, or failed after fitting), and the
    flag an error names is one the script takes (it named the config's --rf-voxels where the
    script had only --voxels); best_by_mean is the README's rule: the highest mean over the inner
    schemes, the first of equal ones."""
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    import tune_anchor
    import tune_decoders
    import tune_dual_encoder
    from tune_dual_encoder import best_by_mean

    def work(*args):
        raise AssertionError("the data load or a fit began before the settings were checked")
    for tune in (tune_anchor, tune_decoders, tune_dual_encoder):
        monkeypatch.setattr(tune, "run" if tune is not tune_dual_encoder else "score", work)
        monkeypatch.setattr(tune, "resolve_data", work)
    for main, args, named in ((tune_decoders.main, ["--blend", "1.5"], "--anchor-blend must be <= 1"),
                              (tune_decoders.main, ["--likelihood", "-1"], "--likelihood-weight must be >= 0"),
                              (tune_decoders.main, ["--set", "guidance_scale=3"], "own grid"),
                              (tune_dual_encoder.main, ["--set", "epochs=0"], "--set epochs=0: --epochs must be >= 1"),
                              # fields the inner CV sets itself or never reads: every candidate scored
                              # the same (the "best" was the first)
                              (tune_dual_encoder.main, ["--set", "seed=5"], "seed is set by --seeds"),
                              (tune_dual_encoder.main, ["--set", "val_fraction=0.3"], "val_fraction is 0 in"),
                              (tune_decoders.main, ["--set", "oracle=True"], "oracle is not read"),
                              (tune_decoders.main, ["--gate-shift", "nan"], "--gate-shift must be finite"),
                              (tune_dual_encoder.main, ["--seeds", "0", "0"], "repeats a seed"),
                              (tune_dual_encoder.main, ["--seeds", "-1"], "--seeds must be >= 0"),
                              (tune_dual_encoder.main, ["--ensemble"], "give two seeds or more"),
                              # a folder as --out failed after all the work (IsADirectoryError)
                              (tune_anchor.main, ["--out", str(L.REPO_DIR)], "is a folder"),
                              (tune_anchor.main, ["--voxels", "1.5"], "--rf-voxels must be <= 1"),
                              (tune_anchor.main, ["--ridge-weight", "2"], "--rf-ridge-weight must be <= 1")):
        with pytest.raises(L.OptionError, match=named):
            main(["--data", "simulated", *args])
        flag = named.split()[0]
        if flag in ("--anchor-blend", "--likelihood-weight", "--rf-voxels", "--rf-ridge-weight"):
            # the named flag, given the same value: the same error
            with pytest.raises(L.OptionError, match=named):
                main(["--data", "simulated", flag, args[1]])
    chosen = best_by_mean({"unseen": {"a": 0.6, "b": 0.8, "c": 0.7}, "seen": {"a": 1.0, "b": 0.8, "c": 0.9}})
    assert (chosen["best"], chosen["score"]) == ("a", 0.8) and chosen["means"]["c"] == pytest.approx(0.8)
    # equal up to rounding (0.39999999999999997 against 0.4): still the first
    assert best_by_mean({"seen": {"a": 0.1, "b": 0.4}, "unseen": {"a": 0.7, "b": 0.4}})["best"] == "a"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_check_without_a_gpu_stops_in_one_line(capsys):
    """benchmarks/gpu_check.py on a CPU machine said "device cpu" and spent its 280 s budget
    running everything there; it now stops at once (--allow-cpu for a dry run)."""
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    import gpu_check
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize("script, options, words", [
    ("pipeline_speed", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("gpu_check", ["--budget", "-1"], "--budget must be a finite number of seconds > 0, got -1"),
    ("gpu_check", ["--budget", "0"], "--budget must be a finite number of seconds > 0, got 0"),
    ("gpu_check", ["--budget", "nan"], "--budget must be a finite number of seconds > 0, got nan")])
def test_speed_scripts_refuse_a_bad_value_in_one_line(script, options, words, capsys):
    """The speed scripts' own checks, before any work: no repeats, or a budget below 0 or NaN (it
    ran the check with negative or NaN time limits per step)."""
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    with pytest.raises(SystemExit) as stop:
        __import__(script).main(options)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("script", ["tune_dual_encoder", "tune_decoders", "tune_anchor", "pipeline_speed",
                                    "gpu_check"])
def test_benchmark_scripts_refuse_a_bad_option_in_one_line(script, capsys):
    """The benchmark scripts' parse errors are one line (exit code 2), as the scripts' are; the
    speed scripts printed argparse's usage block. (profile_dual_encoder.py keeps argparse's: it
    records the memory of importing torch, so it imports no module of the repository first.)"""
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    main = __import__(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--no-such-option"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: unrecognized arguments: --no-such-option"), err
