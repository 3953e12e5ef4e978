"""Loading, validation, CLI errors, download, output dir and checkpoints."""

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import scipy.io
import torch

import miyawaki_dataset_loader as L


# --------------------------------------------------------------------------- the real file
def test_real_file_structure(real):
    t = real.trials
    assert (real.n_file_train, len(t) - real.n_file_train, real.n_voxels) == (107, 12, 967)
    assert len(real.unique_images) == 20
    counts = np.bincount(t.image_ids, minlength=20)
    assert counts.min() == 3 and counts.max() == 8 and counts.sum() == 119
    assert set(np.unique(t.labels)) == {2, 3, 4, 5}
    # every test image also occurs in training (docs/PROTOCOL.md)
    assert set(t.image_ids[107:]) <= set(t.image_ids[:107])


def test_real_images_upright_and_test_scaled_with_train_stats(real, real_path):
    mat = scipy.io.loadmat(real_path)
    stim = np.vstack([mat["stimTrn"], mat["stimTest"]])
    for i in range(len(stim)):
        np.testing.assert_array_equal(real.trials.images[i, 0], stim[i].reshape(28, 28, order="F"))
    fold = real.s1()
    np.testing.assert_allclose(fold.train.fmri.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(fold.train.fmri.std(0), 1, atol=1e-4)
    raw_train, raw_test = mat["fmriTrn"], mat["fmriTest"]
    expected = (raw_test - raw_train.mean(0)) / raw_train.std(0)
    np.testing.assert_allclose(fold.test.fmri, expected, rtol=1e-4, atol=1e-4)


def test_a_file_loads_back_trial_for_trial(tmp_path, mat_arrays, write_mat, sim):
    """The simulated set written in the file's layout loads back as it was, trial for trial: the
    training rows first, each trial's fMRI, image and label together."""
    data = L.load_miyawaki(write_mat(tmp_path / "sim.mat", mat_arrays))
    assert data.n_file_train == sim.n_file_train
    for key in ("fmri", "images", "labels"):
        np.testing.assert_array_equal(getattr(data.trials, key), getattr(sim.trials, key), err_msg=key)
    np.testing.assert_array_equal(data.unique_images[data.trials.image_ids], sim.trials.images)


def test_other_voxel_count_and_uint8_images_load(tmp_path, mat_arrays, write_mat, sim):
    rng = np.random.default_rng(0)
    arrays = {**mat_arrays, "fmriTrn": rng.normal(size=(107, 3092)),
              "fmriTest": rng.normal(size=(12, 3092))}
    for k in ("stimTrn", "stimTest"):
        arrays[k] = (arrays[k] * 255).astype(np.uint8)
    data = L.load_miyawaki(write_mat(tmp_path / "big.mat", arrays))
    assert data.n_voxels == 3092 and len(data.trials) == 119
    assert data.trials.images.min() == 0 and data.trials.images.max() == 1
    np.testing.assert_array_equal(data.trials.images, sim.trials.images)


def test_each_image_key_is_scaled_as_it_is_stored(tmp_path, mat_arrays, write_mat, sim):
    """stimTrn in [0, 1] beside stimTest in 0..255 (and the other way round) loads as the file
    with both in [0, 1]: each key is scaled by its own range, not by the two stacked."""
    for key in ("stimTrn", "stimTest"):
        arrays = {**mat_arrays, key: mat_arrays[key] * 255.0}
        data = L.load_miyawaki(write_mat(tmp_path / f"{key}.mat", arrays))
        np.testing.assert_array_equal(data.trials.images, sim.trials.images)


def test_a_file_with_its_own_labels_keeps_them_in_summaries_and_titles(tmp_path, mat_arrays, write_mat):
    """Labels that are not Miyawaki's (here 0-3, as a digits file has 0-9) are named "label k",
    never "random" / "shapes" / "letters", even those that are also his numbers (1, 2, 3);
    Miyawaki's keep their names."""
    arrays = {**mat_arrays, "labelTrn": mat_arrays["labelTrn"] - 2, "labelTest": mat_arrays["labelTest"] - 2}
    data = L.load_miyawaki(write_mat(tmp_path / "own.mat", arrays))
    text = L.summary(data)
    assert "label 2" in text and not any(w in text for w in ("random", "shapes", "letters"))
    assert "shapes" in L.summary(L.make_simulated_dataset())
    fig = L.plot_fmri_correlation(data.trials.fmri, data.trials.image_ids, data.unique_labels)
    assert fig.axes[0].get_yticklabels()[0].get_text() == "#0 label 0"


def test_data_figures_of_many_images_show_40_spread_over_the_conditions():
    """A random-image session has 460 images: the figures show 40 (20 random patterns and the 20
    figures), each named, and say so, rather than an unlabelled 460 x 460 matrix; a file of 300
    digits shown once each shows each digit's first four (the last 40 were all 8s and 9s: a
    generality review), and a panel of an image shown once says "1 trial"."""
    data = L.make_simulated_dataset(random_images=L.SIM_RANDOM_IMAGES)
    k = len(data.unique_images)
    fig = L.plot_fmri_correlation(data.trials.fmri, data.trials.image_ids, data.unique_labels)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ax.images[0].get_array().shape == (40, 40) and len(ticks) == 40
    assert ticks[:20] == [f"#{i} random" for i in range(20)] and ticks[20] == f"#{k - 20} shapes"
    assert ticks[-1] == f"#{k - 1} letters (regular)"
    assert f"40 of {k} images, each condition's first" in fig.get_suptitle()
    digits = np.repeat(np.arange(10), 30)
    assert np.array_equal(L.shown_images(digits, 40), (np.arange(10)[:, None] * 30 + np.arange(4)).ravel())
    assert np.array_equal(L.shown_images(digits[:12], 40), np.arange(12))
    fig = L.plot_unique_images(np.zeros((300, 1, 28, 28)), digits, np.ones(300, int))
    assert [ax.get_title() for ax in fig.axes[:5]] == [f"#{i} label {0}\n1 trial" for i in range(4)] + [
        "#30 label 1\n1 trial"]
    assert fig.get_suptitle() == "Unique stimuli (upright), 40 of 300, each condition's first"


def test_fmri_correlation_figure_z_scores_each_voxel(sim):
    """Raw fMRI with a baseline per voxel gives the same pattern correlations as the z-scored
    trials (the figure z-scores each voxel): the baselines alone would correlate every pair."""
    fmri = sim.trials.fmri * 3 + np.random.default_rng(0).normal(0, 5, sim.n_voxels)
    corr = [L.plot_fmri_correlation(f, sim.trials.image_ids, sim.unique_labels).axes[0].images[0]
            .get_array() for f in (sim.trials.fmri, fmri)]
    np.testing.assert_allclose(corr[1], corr[0], atol=1e-5)
    assert np.abs(corr[0][~np.eye(len(corr[0]), dtype=bool)]).mean() < 0.5


def test_fmri_correlation_figure_shows_split_half_reliability_on_its_diagonal(sim):
    """The diagonal was 1 by construction; it shows each image's split-half reliability (its odd
    against its even trials, by brute force here), grey (NaN) for an image shown once, and the
    title says so and that all trials are used."""
    ids = sim.trials.image_ids.copy()
    once = np.where(ids == 19)[0]
    ids[once[1:]] = 18                     # image 19 shown once now
    fig = L.plot_fmri_correlation(sim.trials.fmri, ids, sim.unique_labels, which="trials, all")
    corr = fig.axes[0].images[0].get_array()
    z = L.standardize(sim.trials.fmri, *L.voxel_stats(sim.trials.fmri))
    rows = z[ids == 3]
    half = np.corrcoef(rows[::2].mean(0), rows[1::2].mean(0))[0, 1]
    assert corr[3, 3] == pytest.approx(2 * half / (1 + half), abs=1e-5) and 0 < corr[3, 3] < 0.999
    assert np.ma.is_masked(corr[19, 19]) or np.isnan(corr[19, 19])
    bad = fig.axes[0].images[0].cmap.get_bad()                  # grey, not the map's white middle
    assert tuple(bad) == matplotlib.colors.to_rgba("lightgrey")
    title = " ".join(fig.get_suptitle().split())
    assert f"({len(ids)} trials, all, each voxel" in title and "Spearman-Brown corrected" in title
    assert "grey: an image shown once" in title      # only where there is one: its cell's legend
    assert "grey" not in L.plot_fmri_correlation(sim.trials.fmri, sim.trials.image_ids,
                                                 sim.unique_labels).get_suptitle()
    from matplotlib.backends.backend_agg import FigureCanvasAgg     # the title fits the figure
    extent = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert extent.x0 >= 0 and extent.x1 <= fig.bbox.width
    # halves that anti-correlate: r stays r (2r / (1 + r) would leave [-1, 1])
    rng = np.random.default_rng(1)
    p = rng.standard_normal(30)
    fmri = np.stack([p, -p, p, -p, *rng.standard_normal((4, 30))]) + 0.1 * rng.standard_normal((8, 30))
    ids2 = np.repeat([0, 1], 4)
    z = L.standardize(fmri, *L.voxel_stats(fmri))[:4]
    r = np.corrcoef(z[::2].mean(0), z[1::2].mean(0))[0, 1]
    diagonal = L.plot_fmri_correlation(fmri, ids2, np.array([2, 3])).axes[0].images[0].get_array()[0, 0]
    assert r < -0.5 and diagonal == pytest.approx(r, abs=1e-5)


# --------------------------------------------------------------------------- bad input
def _mutated(edit):
    """A bad-file maker that edits the simulated arrays before writing them."""
    def make(path, arrays, write_mat):
        edit(arrays)
        write_mat(path, arrays)
    return make


def _truncated(path, arrays, write_mat):
    write_mat(path, arrays)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set(key, value):
    def edit(arrays):
        arrays[key][3, 5] = value
    return edit


BAD_FILES = {  # name -> (maker(path, arrays, write_mat), words the message must contain)
    "missing": (lambda p, a, w: None, ["not found", "--download", "--data simulated"]),
    "random bytes": (lambda p, a, w: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                     ["not a readable"]),
    "text file": (lambda p, a, w: p.write_text("fmriTrn,stimTrn\n1,2\n"), ["not a readable"]),
    "truncated": (_truncated, ["not a readable"]),
    **{f"missing {key}": (_mutated(lambda a, key=key: a.pop(key)), ["lacks the key(s) " + key])
       for key in L.REQUIRED_KEYS},
    "row counts": (_mutated(lambda a: a.update(stimTrn=a["stimTrn"][:-1])), ["row counts"]),
    "pixel count": (_mutated(lambda a: a.update(stimTest=a["stimTest"][:, :783])), ["784"]),
    # two images per row would reshape into twice the images, each trial paired with a wrong one
    "two images per row": (_mutated(lambda a: a.update(stimTrn=np.hstack([a["stimTrn"]] * 2))),
                           ["stimTrn has 1568 columns; expected 784"]),
    "voxel counts": (_mutated(lambda a: a.update(fmriTest=a["fmriTest"][:, :-1])),
                     ["fmriTrn has", "voxels but fmriTest has"]),
    "more test voxels": (_mutated(lambda a: a.update(fmriTrn=a["fmriTrn"][:, :-1])),
                         ["fmriTrn has 966 voxels but fmriTest has 967"]),
    "inf label": (_mutated(lambda a: a.update(labelTrn=np.where(np.arange(107)[:, None] == 3, np.inf,
                                                                  a["labelTrn"].astype(float)))),
                  ["labelTrn", "NaN or Inf"]),
    "nan fmri": (_mutated(_set("fmriTrn", np.nan)), ["NaN or Inf"]),
    # finite in float64, infinite or all zero in float32 (the models' precision)
    "fmri beyond float32": (_mutated(lambda a: a.update(fmriTrn=a["fmriTrn"] * 1e39)),
                            ["fmriTrn holds values up to", "expected at most 1e+15"]),
    "fmri below float32": (_mutated(lambda a: a.update(fmriTrn=a["fmriTrn"] * 1e-300,
                                                       fmriTest=a["fmriTest"] * 1e-300)),
                           ["no voxel's fMRI varies"]),
    "label 1e20": (_mutated(lambda a: a.update(labelTrn=a["labelTrn"] * 1e20)),
                   ["labelTrn holds values up to", "renumber"]),
    "inf fmri": (_mutated(_set("fmriTest", np.inf)), ["NaN or Inf"]),
    "negative image": (_mutated(_set("stimTrn", -1.0)), ["stimTrn values span [-1, 1]"]),
    "image over 255": (_mutated(lambda a: a.update(stimTest=a["stimTest"] * 256.0)),
                       ["stimTest values span [0, 256]"]),
    # just over: the range in full, not rounded by %g to the bound it is over ("[0, 255]")
    "image just over 255": (_mutated(lambda a: a.update(stimTest=a["stimTest"] * 255.00002)),
                            ["stimTest values span [0, 255.00002]"]),
    "two label columns": (_mutated(lambda a: a.update(labelTrn=np.hstack([a["labelTrn"]] * 2))),
                          ["labelTrn has shape (107, 2)", "one label per trial"]),
    "nan image": (_mutated(_set("stimTrn", np.nan)), ["stimTrn", "NaN or Inf"]),
    "text labels": (_mutated(lambda a: a.update(labelTest=np.array([f"c{v}" for v in a["labelTest"].ravel()]))),
                    ["labelTest", "expected real numbers"]),
    "complex fmri": (_mutated(lambda a: a.update(fmriTest=a["fmriTest"] * 1j)), ["fmriTest", "complex"]),
    "fractional label": (_mutated(lambda a: a.update(labelTest=a["labelTest"] + 0.5)),
                         ["non-integer", "labelTrn/labelTest"]),
    # schema-valid but nothing to decode: these ended in LinAlgError / KFold tracebacks
    "one distinct image": (_mutated(lambda a: a.update(stimTrn=a["stimTrn"] * 0, stimTest=a["stimTest"] * 0)),
                           ["one distinct image", "at least two"]),
    "constant fmri": (_mutated(lambda a: a.update(fmriTrn=a["fmriTrn"] * 0 + 1, fmriTest=a["fmriTest"] * 0 + 1)),
                      ["no voxel's fMRI varies"]),
    # every voxel constant over the trials, different voxels at different levels
    "voxels each constant": (_mutated(lambda a: a.update(fmriTrn=a["fmriTrn"] * 0 + np.arange(967.0),
                                                         fmriTest=a["fmriTest"] * 0 + np.arange(967.0))),
                             ["no voxel's fMRI varies"]),
}


def test_messages_give_values_neither_rounded_to_a_bound_nor_with_float32_noise():
    """A value in a message reads as the value: %g gave 255.00002 as "255" (the bound it breaks),
    and a float64 repr gives a float32 1.001 as 1.0010000467300415."""
    assert L.number_text(255.00002) == "255.00002" and L.number_text(0.5) == "0.5"
    assert L.number_text(float(np.float32(1.001))) == "1.001"
    assert L.number_text(1.0000000001) == "1.0000000001"        # beyond float32: in full
    assert L.number_text(np.int64(1234567)) == "1234567" and L.number_text(float("inf")) == "inf"
    with pytest.raises(ValueError, match=r"values in \[-0.1, 1.001\]; expected \[0, 1\]"):
        L.check_unit_range(float(np.float32(-0.1)), float(np.float32(1.001)))


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_raises_one_line_data_error(case, tmp_path, mat_arrays, write_mat):
    make, words = BAD_FILES[case]
    path = tmp_path / "bad.mat"
    make(path, mat_arrays, write_mat)
    with pytest.raises(L.DataError) as err:
        L.load_miyawaki(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for word in words:
        assert word in msg


def test_cli_bad_data(tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_text("not a mat file")
    with pytest.raises(L.DataError, match="bad.mat"):
        L.main(["--data", str(bad), "--out-dir", str(tmp_path / "out")])
    proc = subprocess.run([sys.executable, str(L.REPO_DIR / "miyawaki_dataset_loader.py"),
                           "--data", str(bad), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]


# --------------------------------------------------------------------------- download
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback HTTP server over ``tmp_path/"srv"``; yields (folder, base url)."""
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "srv"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data.mat"


def test_download_verifies_and_places_file(server, tmp_path):
    root, url = server
    good = root / "good.mat"
    good.write_bytes(np.random.default_rng(1).bytes(300_000))
    dest = tmp_path / "dl" / "data.mat"
    assert L.download(f"{url}/good.mat", dest, _sha256(good)) == dest
    assert _sha256(dest) == _sha256(good)
    assert os.listdir(dest.parent) == ["data.mat"]


@pytest.mark.parametrize("source", ["corrupted", "unreachable"])
def test_failed_download_leaves_nothing(source, server, tmp_path):
    root, url = server
    good = np.random.default_rng(1).bytes(300_000)
    (root / "bad.mat").write_bytes(good[:-10] + bytes(10))
    src = f"{url}/bad.mat" if source == "corrupted" else _closed_port_url()
    dest = tmp_path / "dl" / "data.mat"
    with pytest.raises(L.DataError, match=re.escape(src)):
        L.download(src, dest, hashlib.sha256(good).hexdigest(), timeout=10)
    assert os.listdir(dest.parent) == []


def test_cli_download_real_file(server, real_path, tmp_path):
    root, url = server
    (root / "real.mat").write_bytes(real_path.read_bytes())
    dest = tmp_path / "dl" / "miyawaki.mat"
    result = L.main(["--download", "--url", f"{url}/real.mat", "--data", str(dest),
                     "--out-dir", str(tmp_path / "out")])
    assert _sha256(dest) == L.DATA_SHA256
    assert result["n_trials"] == 119 and result["data_source"] == str(dest)


# --------------------------------------------------------------------------- outputs
def test_out_dir_not_writable_or_empty_is_a_bad_option(tmp_path, capsys):
    """An --out-dir that cannot be written (here: under a file) ends the run as a bad option does
    (one line, exit code 2), and so does an empty one, which would put the outputs in the current
    folder."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(L.OptionError, match="--out-dir .*a_file/out cannot be a folder: .*a_file is a file"):
        L.prepare_out_dir(blocker / "out")
    with pytest.raises(SystemExit) as exc:
        L.run_cli(lambda: L.prepare_out_dir(blocker / "out"))
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        L.main(["--data", "simulated", "--out-dir", ""])
    assert exc.value.code == 2 and "an empty folder would put the outputs" in capsys.readouterr().err


def test_torch_dataset_items(sim):
    ds = L.MiyawakiTorchDataset(sim.s1().train)
    assert len(ds) == 107
    fmri, image, label, image_id = ds[0]
    assert fmri.shape == (967,) and fmri.dtype == torch.float32
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label in {2, 3, 4, 5} and 0 <= image_id < 20
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert [tuple(b.shape) for b in batch] == [(4, 967), (4, 1, 28, 28), (4,), (4,)]


# --------------------------------------------------------------------------- checkpoints
class _Custom:  # a pickled custom object: weights_only loading must refuse it
    pass


def _ckpt(**extra):
    return {"kind": "dual_encoder", "format_version": L.CHECKPOINT_FORMAT,
            "weights": torch.arange(6.0).reshape(2, 3), "config": {"lr": 1e-3}, **extra}


def _load(path):
    return L.load_checkpoint(path, kind="dual_encoder", script="make_it.py")


def test_checkpoint_round_trip_and_atomic_save(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    L.save_checkpoint(_ckpt(), path)
    loaded = _load(path)
    assert torch.equal(loaded["weights"], _ckpt()["weights"]) and loaded["config"] == {"lr": 1e-3}

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        L.save_checkpoint(_ckpt(weights=torch.zeros(2)), path)
    assert torch.equal(_load(path)["weights"], _ckpt()["weights"])
    assert os.listdir(tmp_path) == ["model.pth"]


BAD_CHECKPOINTS = {  # name -> (writer(path), words the message must contain)
    "missing": (lambda p: None, ["not found"]),
    "truncated": (lambda p: (torch.save(_ckpt(), p),
                             p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
                  ["cannot be loaded"]),
    # a legacy-format read of other bytes said "(101)", a key torch's unpickler missed
    "one byte": (lambda p: p.write_bytes(b"e"), ["cannot be loaded safely (not a torch file, or a "
                                                 "damaged one: torch.load raised IndexError pop from"]),
    "pickled object": (lambda p: torch.save(_ckpt(obj=_Custom()), p),
                       ["cannot be loaded", "torch.load(weights_only=True) refuses it: Unsupported global"]),
    # not a checkpoint: the reason, without torch's advice to load it unsafely
    "text file": (lambda p: p.write_text("not a checkpoint\n"),
                  ["cannot be loaded safely (torch.load(weights_only=True) refuses it: Unsupported operand"]),
    # a rerun of the script would not turn another script's checkpoint into its own
    "wrong kind": (lambda p: torch.save(_ckpt(kind="generative"), p),
                   ["is a generative checkpoint, not a dual_encoder one (another script's output): give "
                    "it to its own loader, or give this one the file `python make_it.py"]),
    "no kind": (lambda p: torch.save({"weights": torch.zeros(2)}, p), ["is not a dual_encoder checkpoint"]),
    "wrong version": (lambda p: torch.save(_ckpt(format_version=0), p), ["format version"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_refused(case, tmp_path):
    write, words = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.pth"
    write(path)
    with pytest.raises(L.CheckpointError) as err:
        _load(path)
    msg = str(err.value)
    assert str(path) in msg and "python make_it.py" in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg and "PyTorch 2.6" not in msg
    for word in words:
        assert word in msg


def test_result_json_is_strict_with_undefined_numbers_as_null(tmp_path):
    """NaN / Inf (an undefined score, e.g. a 2-way score with one test trial) are written as null:
    strict JSON readers refuse Python's bare NaN."""
    def refuse(constant):
        raise ValueError(f"{constant} in JSON")
    obj = {"two_way": float("nan"), "per_trial": np.array([[0.5, np.inf]]), "top1": np.float32(1),
           "n": np.int64(3), "ok": np.bool_(True), "out": Path("x"), "seeds": (0, 1)}
    L.save_json(obj, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {
        "two_way": None, "per_trial": [[0.5, None]], "top1": 1.0, "n": 3, "ok": True, "out": "x",
        "seeds": [0, 1]}


def test_atomic_writes_get_the_usual_file_mode(tmp_path, monkeypatch):
    """The usual mode, and the temp file beside its target: a rename within one folder is atomic
    (one in /tmp would fail for an --out-dir on another file system, after all the work)."""
    import stat
    from miyawaki_dataset_loader import save_json
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((src, dst)) or replace(src, dst))
    umask = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "m.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    [(src, dst)] = renames
    assert Path(src).parent == Path(dst).parent == tmp_path


def test_interrupted_figure_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    fig = Figure()
    fig.subplots().plot([0, 1])
    L.save_figure(fig, tmp_path / "f.png", "simulated")
    png = (tmp_path / "f.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    def broken(self, f, **kwargs):
        f.write(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        L.save_figure(fig, tmp_path / "f.png", "simulated")
    assert (tmp_path / "f.png").read_bytes() == png
    assert os.listdir(tmp_path) == ["f.png"]


def test_checkpoint_refusals_name_the_command_that_writes_the_checkpoint_there(tmp_path, sim):
    """The command to rerun writes where the refused checkpoint is: with --out-dir outside the
    default outputs/ folder (it said `python <script>`, which writes into outputs/)."""
    assert L.rerun_command("s.py", L.DEFAULT_OUT / "x.pth") == "python s.py"
    assert L.rerun_command("s.py", tmp_path / "x.pth") == f"python s.py --out-dir {tmp_path}"
    ckpt = {"n_voxels": sim.n_voxels, "data_fingerprint": "0" * 16, "data_source": "other.mat"}
    with pytest.raises(L.CheckpointError, match=f"rerun `python s.py --out-dir {tmp_path} --data simulated`"):
        L.check_same_data(ckpt, sim, tmp_path / "x.pth", "s.py")


def test_every_saved_figure_names_its_data(tmp_path):
    """A saved figure says which data it shows in its corner, so that one copied out of its folder
    cannot pass a simulated result off as the real file's (a reviewer's worry: the simulated set's
    near-perfect figures looked like results)."""
    from matplotlib.figure import Figure
    stamps = {}
    for source in ("simulated", "simulated-random", "data/miyawaki_structured_28x28.mat"):
        fig = Figure()
        fig.subplots().plot([0, 1])
        L.save_figure(fig, tmp_path / "f.png", source)
        [text] = fig.texts
        stamps[source] = (text.get_text(), text.get_color())
        # hanging from the drawn area's lower right corner
        assert text.get_position()[0] > 0.5 and (text.get_ha(), text.get_va()) == ("right", "top")
    assert stamps == {
        "simulated": ("data: simulated (the built-in simulated set, not fMRI)", "firebrick"),
        "simulated-random": ("data: simulated-random (the built-in simulated set, not fMRI)", "firebrick"),
        "data/miyawaki_structured_28x28.mat": ("data: data/miyawaki_structured_28x28.mat", "0.4")}


def test_one_line_keeps_error_messages_short_and_whole():
    long = "failed finding central directory. This is an internal error. " + "If you see this " * 20
    assert L.one_line(RuntimeError(long)) == "failed finding central directory. This is an internal error."
    assert L.one_line(RuntimeError("x" * 200)) == "x" * 159 + "…"
    header = "Error(s) in loading state_dict for M:\n\tsize mismatch for fc.weight: copying a param"
    assert L.one_line(RuntimeError(header)) == "size mismatch for fc.weight: copying a param"
    assert L.one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, False, True), (False, True, True),
                                                      (False, False, False)])
def test_native_bf16_needs_bfloat16_instructions(monkeypatch, amx, avx512_bf16, native):
    """A CPU has native bfloat16 when oneDNN runs it and the CPU has AMX or AVX-512 BF16; an
    AVX-512 CPU without them (Ice Lake: oneDNN says yes, but converts, 4.4x slower than float32)
    trains in float32. A build whose check is missing or fails counts as without, never as an
    error in training."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert L.native_bf16("cpu") == native and not L.native_bf16("meta")
    with L.bf16_autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu") == native
        assert not native or torch.get_autocast_dtype("cpu") == torch.bfloat16
    with L.bf16_autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")

    def missing():
        raise RuntimeError("no such op")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert not L.native_bf16("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not L.native_bf16("cpu")
    with L.bf16_autocast("cpu", True):
        assert not torch.is_autocast_enabled("cpu")


def test_keys_on_two_scales_load_with_a_note(tmp_path, mat_arrays, write_mat, capsys):
    """stimTrn 0..255 beside a stimTest within [0, 1] is loaded key by key, and says so: dark test
    images of a 0..255 file (all at most 1) would otherwise be read as white without a word."""
    L.load_miyawaki(write_mat(tmp_path / "two.mat", {**mat_arrays, "stimTrn": mat_arrays["stimTrn"] * 255.0}))
    note = capsys.readouterr().out
    assert "stimTrn is on a 0..255 scale and stimTest within [0, 1]" in note and note.count("\n") == 1
    L.load_miyawaki(write_mat(tmp_path / "one.mat", mat_arrays))
    assert capsys.readouterr().out == ""


def test_images_on_a_narrower_range_than_0_255_load_with_a_note(tmp_path, mat_arrays, write_mat, capsys):
    """Digits stored 0..16 are read as 0..255 (all a file may say is its values) and load nearly
    black: loading says so in one line per key (a review's file loaded without a word); a dim
    0..255 key whose brightest pixel is 128 does not."""
    dim = {**mat_arrays, "stimTrn": mat_arrays["stimTrn"] * 16.0, "stimTest": mat_arrays["stimTest"] * 16.0}
    L.load_miyawaki(write_mat(tmp_path / "digits.mat", dim))
    note = capsys.readouterr().out
    assert "stimTrn peaks at 16 and was read as 0..255, so its images are dark (at most 0.06)" in note
    assert "stimTest peaks at 16" in note and note.count("\n") == 2
    L.load_miyawaki(write_mat(tmp_path / "dim.mat", {k: v * 128.0 if k.startswith("stim") else v
                                                      for k, v in mat_arrays.items()}))
    assert capsys.readouterr().out == ""


def test_a_blank_image_loads_with_a_note(tmp_path, mat_arrays, write_mat, capsys):
    """A trial showing one grey level (a blank screen) is a valid trial, but every Pearson r with
    its image is undefined, which the protocol's scores count as 0: loading says so in one line
    (it was scored PixCorr 0 and ranked last without a word)."""
    stim = mat_arrays["stimTest"].copy()
    stim[0], stim[1] = 0, 1                          # a black screen and a white one
    L.load_miyawaki(write_mat(tmp_path / "blank.mat", {**mat_arrays, "stimTest": stim}))
    note = capsys.readouterr().out
    assert "2 trial(s) show an image of one grey level" in note and note.count("\n") == 1


def test_the_data_fingerprint_covers_images_and_labels(sim):
    """A checkpoint names its data by this fingerprint: the same fMRI beside other images (or other
    labels) is other data, refused, not scored with the first file's encoder."""
    t = sim.trials
    others = [replace(t, images=t.images[::-1].copy()), replace(t, labels=t.labels[::-1].copy()),
              replace(t, fmri=t.fmri[::-1].copy())]
    prints = {replace(sim, trials=o).fingerprint for o in others}
    assert len(prints) == 3 and sim.fingerprint not in prints
    assert replace(sim, trials=replace(t)).fingerprint == sim.fingerprint


# --------------------------------------------------------------------------- input checks
def test_trials_are_float32_and_refuse_what_would_train_badly(sim):
    """Trials built in a notebook: float64 arrays become float32 (what the models compute in);
    0..255 images, images without their channel axis, NaN or complex fMRI are a ValueError naming
    what is expected (0..255 images trained without an error and identified at 0.33 not 0.92)."""
    t = sim.trials
    made = L.Trials(t.fmri.astype(np.float64), t.images.astype(np.float64), t.labels, t.image_ids)
    assert made.fmri.dtype == made.images.dtype == np.float32
    np.testing.assert_array_equal(made.fmri, t.fmri)
    with pytest.raises(ValueError, match=r"values in \[0, 255\]; expected \[0, 1\]"):
        replace(t, images=t.images * 255)
    with pytest.raises(ValueError, match="expected N x V, N x 1 x 28 x 28, N and N"):
        replace(t, images=t.images[:, 0])
    with pytest.raises(ValueError, match="expected N x V, N x 1 x 28 x 28, N and N"):
        replace(t, labels=t.labels[:-1])
    fmri = t.fmri.copy()
    fmri[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite fMRI"):
        replace(t, fmri=fmri)
    with pytest.raises(ValueError, match="complex"):
        replace(t, fmri=t.fmri.astype(np.complex64))


def test_a_fold_refuses_test_trials_that_are_also_training_trials(sim):
    with pytest.raises(ValueError, match="overlap"):
        sim.fold(np.arange(len(sim.trials)), np.arange(12))
    mask = np.arange(len(sim.trials)) < sim.n_file_train            # masks are indices too
    fold = sim.fold(mask, ~mask)
    np.testing.assert_array_equal(fold.test_idx, sim.s1().test_idx)
    np.testing.assert_array_equal(fold.test.fmri, sim.s1().test.fmri)


def test_metrics_refuse_reconstructions_of_another_count_or_scale(sim):
    """One reconstruction against 12 true images was broadcast over them (and SSIM scored one
    pair): a ValueError now. 0..255 reconstructions are clipped to white and scored, as a diverged
    read-out's are (a tuning grid may hold one), now with a warning; 0..255 true, candidate or
    2-way pool images are a ValueError; N x 784 rows and an overshooting linear read-out (the
    protocol clips it) score as before."""
    fold = sim.s1()
    true, ids, cand = fold.test.images, fold.test.image_ids, fold.unique_images
    score = lambda recon: L.reconstruction_metrics(recon, true, ids, cand)  # noqa: E731
    assert score(true.reshape(len(true), -1))["pixcorr"] == pytest.approx(1.0)
    assert score(1.5 * true - 0.25)["top1"] == 1.0
    for recon in (true[:1], true[0, 0], true[:, :, :14]):
        with pytest.raises(ValueError, match="expected N images, N images and N ids"):
            score(recon)
    with pytest.warns(UserWarning, match=r"up to 255, far off the images' \[0, 1\] scale"):
        score(255 * true)
    with pytest.raises(ValueError, match=r"true images with values in \[0, 255\]"):
        L.reconstruction_metrics(true, 255 * true, ids, cand)
    # 0..255 candidates of binary images scored as if right (clipped), and grey ones wrongly
    with pytest.raises(ValueError, match=r"candidate images with values in \[0, 255\]"):
        L.reconstruction_metrics(true, true, ids, 255 * cand)
    with pytest.raises(ValueError, match=r"the 2-way pool's images with values in \[0, 255\]"):
        L.reconstruction_metrics(true, true, ids, cand, 255 * true, ids)
    # a torch reconstruction (what the decoders' sample gives) scores as its numpy copy (it was a
    # TypeError from np.size); image ids that index no candidate are named (a bare IndexError)
    recon = 0.8 * true + 0.1
    assert L.reconstruction_metrics(torch.as_tensor(recon), true, ids, cand) == score(recon)
    with pytest.raises(ValueError, match="expected whole numbers that index the 20 candidates"):
        L.reconstruction_metrics(recon, true, ids + 20, cand)


def test_seed_everything_asks_for_deterministic_kernels_where_cuda_is(monkeypatch):
    """With CUDA, torch is asked for deterministic kernels (warn-only); on a CPU-only host the
    request is skipped, as it changes no number there and costs about 1 s of imports."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for cuda in (False, True):
            torch.use_deterministic_algorithms(False)
            monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
            L.seed_everything(0)
            assert torch.are_deterministic_algorithms_enabled() == cuda
            assert torch.is_deterministic_algorithms_warn_only_enabled() == cuda
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_seed_everything_seeds_python_numpy_and_torch_with_the_seed():
    """After seed_everything(s) each global stream draws what a fresh generator seeded with s
    draws (torch seeded with a constant passed every test: each fit's own generator still made
    seeds differ)."""
    import random
    for seed in (0, 7):
        L.seed_everything(seed)
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(seed)))
        assert np.array_equal(np.random.rand(3), np.random.RandomState(seed).rand(3))
        assert random.random() == random.Random(seed).random()


def test_simulated_snr_is_signal_over_noise_variance():
    """``snr`` divides the noise variance, not its SD: with the same seed (the same signal, noise
    draws and baselines) the within-image variance at snr 1.5 is 4 / 1.5 times that at snr 4 (the
    SD divided by snr, not its square root, passed every test: they check margins only)."""
    def within(snr):
        t = L.make_simulated_dataset(snr=snr).trials
        f = t.fmri.astype(np.float64)
        return sum(((f[t.image_ids == k] - f[t.image_ids == k].mean(0)) ** 2).sum()
                   for k in np.unique(t.image_ids))
    assert within(1.5) / within(4.0) == pytest.approx(4 / 1.5, rel=1e-4)


def test_data_objects_show_as_one_line_in_a_notebook(sim):
    """A notebook displaying the data, a fold or its trials sees their sizes on one line (the
    dataclasses' default repr printed every array in full)."""
    fold = sim.s1()
    shown = [repr(sim), repr(fold), repr(fold.train)]
    assert shown == ["MiyawakiData(simulated: 119 trials (107 in the file's training split), 967 voxels, "
                     "20 images)",
                     "Fold(s1: train Trials(107 trials, 967 voxels, 20 distinct images), test Trials(12 "
                     "trials, 967 voxels, 12 distinct images), 20 candidate images)",
                     "Trials(107 trials, 967 voxels, 20 distinct images)"]


def test_a_temp_file_of_a_live_process_of_another_user_is_not_tidied(monkeypatch):
    """A process the signal may not reach (another user's, EPERM) is alive: its temp files in a
    shared output folder stay; only a pid no process has counts as ended (mutation round 8)."""
    def kill(error):
        def raise_(pid, sig):
            raise error
        return raise_
    monkeypatch.setattr(L.os, "kill", kill(PermissionError()))
    assert L._ended("123") is False
    monkeypatch.setattr(L.os, "kill", kill(ProcessLookupError()))
    assert L._ended("123") is True


def test_an_out_dir_of_blanks_is_refused():
    """``--out-dir " "`` wrote into a folder named " " (mutation round 8): blanks are no folder."""
    for text in ("", "  "):
        with pytest.raises(argparse.ArgumentTypeError, match="an empty folder"):
            L.out_dir_path(text)
