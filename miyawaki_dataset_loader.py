"""Miyawaki et al. (2008) data: loading, validation, simulation, splits and protocol metrics.

The one module every script of this repository imports. It states the data convention once:

* images: ``N x 1 x 28 x 28`` float32 in [0, 1], upright (the .mat rows are MATLAB
  column-major, so they are reshaped in Fortran order);
* fMRI: ``N x V`` float32, z-scored per voxel with the statistics of the training fold only.

Usage::

    python miyawaki_dataset_loader.py                       # summary + figures (real file or simulated)
    python miyawaki_dataset_loader.py --download            # fetch the public file into data/
    python miyawaki_dataset_loader.py --data simulated --out-dir /tmp/sim
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import operator
import os
import random
import signal
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.io
import torch
import matplotlib
from matplotlib.figure import Figure
from skimage.metrics import structural_similarity

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_DATA = REPO_DIR / "data" / "miyawaki_structured_28x28.mat"
DEFAULT_OUT = REPO_DIR / "outputs"
DATA_URL = ("https://raw.githubusercontent.com/braindecoding/prepromiyawaki/main/"
            "data/miyawaki_conditions_2to5_combined_sharp.mat")
DATA_SHA256 = "3ae3d618d919cf51ccc2649f60362400b44b87014e0c42afb31a74d5cb60e31e"
IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
GRID = 10  # the stimuli are 10 x 10 binary grids, upsampled 3x and cropped to 28 x 28
CONDITION_NAMES = {1: "random", 2: "shapes", 3: "letters (thin)", 4: "letters (long)",
                   5: "letters (regular)"}
DECODER_NAMES = {"diffusion": "diffusion decoder", "gan": "GAN decoder"}   # in tables and figures
# the parts of the dual encoder's identification score (its SCORE_PARTS) and their names in text
SCORE_PART_NAMES = {"embedding": "embeddings", "readout": "linear read-out", "encoding": "encoding model"}
SIM_RANDOM_IMAGES = 440  # Miyawaki's random-image session: 440 trials
REQUIRED_KEYS = ("fmriTrn", "stimTrn", "labelTrn", "fmriTest", "stimTest", "labelTest")
# the largest value a key may hold: its squares and sums stay finite in float32, and a label stays
# a whole number in float64 (above 2**53 a float has no unit digit)
LARGEST_VALUE = 1e15
# 2: one layout, a model's {config, state} beside the script_config; 3: the data fingerprint
# covers the images and labels too (a format-2 checkpoint of other images passed as this data's)
CHECKPOINT_FORMAT = 3
GET_DATA_HINT = ("get the real file with `python miyawaki_dataset_loader.py --download` "
                 "or run on the built-in simulated set with `--data simulated`")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or from another run; the message names the fix."""


class OptionError(ValueError):
    """A setting out of its range, or a device this machine lacks; the message names the option."""


def miyawaki_labels(labels) -> bool:
    """Whether every label of a data set (``labels``, e.g. its unique labels) is one of Miyawaki's
    conditions (1 random, 2 shapes, 3-5 letters), so that they are named by ``condition_name``."""
    return all(int(c) in CONDITION_NAMES for c in np.asarray(labels).ravel())


def condition_name(label, labels=()) -> str:
    """The name of a condition ``label``: Miyawaki's (``miyawaki_labels``) when every label of the
    data set (``labels``) is one of his, else "label <label>" (a file with its own labels keeps
    them)."""
    theirs = miyawaki_labels(labels) and int(label) in CONDITION_NAMES
    return CONDITION_NAMES[int(label)] if theirs else f"label {label}"


# --------------------------------------------------------------------------- data containers
@dataclass(frozen=True)
class Trials:
    """A set of trials. fmri ``N x V`` float32; images ``N x 1 x 28 x 28`` float32 in [0, 1];
    labels ``N`` condition (2..5); image_ids ``N`` index into the unique images."""

    fmri: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray

    def __post_init__(self):
        """fMRI and images as float32 (a notebook's arrays may be float64); ValueError, before any
        model sees them, for other shapes, complex or non-finite fMRI, or images outside [0, 1]
        (0..255 ones train without an error, and badly)."""
        if np.iscomplexobj(self.fmri) or np.iscomplexobj(self.images):
            raise ValueError("Trials of complex values; expected real fMRI and images")
        fmri, images = np.asarray(self.fmri, np.float32), np.asarray(self.images, np.float32)
        n = len(fmri)
        if (fmri.ndim != 2 or images.shape != (n, 1, IMAGE_SIDE, IMAGE_SIDE)
                or np.shape(self.labels) != (n,) or np.shape(self.image_ids) != (n,)):
            raise ValueError(f"Trials of fMRI {fmri.shape}, images {images.shape}, labels "
                             f"{np.shape(self.labels)} and image ids {np.shape(self.image_ids)}; expected "
                             f"N x V, N x 1 x {IMAGE_SIDE} x {IMAGE_SIDE}, N and N")
        if not np.isfinite(fmri).all():
            raise ValueError("Trials with NaN or infinite fMRI values")
        if images.size:
            check_unit_range(float(images.min()), float(images.max()))
        object.__setattr__(self, "fmri", fmri)
        object.__setattr__(self, "images", images)

    def __len__(self) -> int:
        return len(self.fmri)

    def __repr__(self) -> str:
        """A notebook's one line (the default printed every array in full)."""
        return (f"Trials({len(self)} trials, {self.fmri.shape[1]} voxels, "
                f"{len(np.unique(self.image_ids))} distinct images)")

    @property
    def fingerprint(self) -> str:
        """Short hash of the trials' fMRI, images and labels (``MiyawakiData.fingerprint`` of the
        raw trials; a model's ``training_fingerprint`` of the z-scored ones it was fitted on)."""
        digest = hashlib.sha256()
        for values in (self.fmri, self.images, self.labels):
            digest.update(np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()[:16]

    def subset(self, idx: np.ndarray) -> "Trials":
        """The trials at indices ``idx`` (``M``), in that order."""
        return Trials(self.fmri[idx], self.images[idx], self.labels[idx], self.image_ids[idx])


@dataclass(frozen=True)
class Fold:
    """One train/test split with fMRI z-scored by the training trials' statistics.

    unique_images ``K x 1 x 28 x 28`` and unique_labels ``K`` are the identification candidates;
    fmri_mean / fmri_std ``V`` are the training statistics (stored in checkpoints)."""

    train: Trials
    test: Trials
    unique_images: np.ndarray
    unique_labels: np.ndarray
    fmri_mean: np.ndarray
    fmri_std: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Fold({self.meta.get('split') or 'unnamed'}: train {self.train!r}, test {self.test!r}, "
                f"{len(self.unique_images)} candidate images)")

    @property
    def unseen_test(self) -> np.ndarray:
        """``N`` bool: the test trials whose image no training trial shows (S3's held-out image)."""
        return ~np.isin(self.test.image_ids, self.train.image_ids)

    @property
    def never_seen_images(self) -> np.ndarray:
        """``E x 1 x 28 x 28``: the distinct images of the ``unseen_test`` trials, in test order,
        which no image prior fitted on the fold may hold."""
        unseen = self.unseen_test
        _, first = np.unique(self.test.image_ids[unseen], return_index=True)
        return self.test.images[unseen][np.sort(first)]


@dataclass(frozen=True)
class MiyawakiData:
    """All trials of a data set in file order (the file's training rows first), raw fMRI."""

    trials: Trials
    n_file_train: int
    unique_images: np.ndarray
    unique_labels: np.ndarray
    source: str

    def __repr__(self) -> str:
        return (f"MiyawakiData({self.source}: {len(self.trials)} trials ({self.n_file_train} in the "
                f"file's training split), {self.n_voxels} voxels, {len(self.unique_images)} images)")

    @property
    def n_voxels(self) -> int:
        """V, the number of fMRI features per trial."""
        return self.trials.fmri.shape[1]

    @property
    def fingerprint(self) -> str:
        """Short hash of the trials' fMRI, images and labels, so a checkpoint can tell which data it
        was fitted on (the same fMRI beside other images is other data)."""
        return self.trials.fingerprint

    def fold(self, train_idx: np.ndarray, test_idx: np.ndarray, name: str = "") -> Fold:
        """Split by trial indices or boolean masks (disjoint: ValueError otherwise); z-score fMRI
        with the training rows only (std 0 -> 1)."""
        train_idx, test_idx = (np.flatnonzero(i) if np.asarray(i).dtype == bool else np.asarray(i)
                               for i in (train_idx, test_idx))            # masks as indices
        if np.intersect1d(train_idx, test_idx).size:
            raise ValueError("train and test indices overlap: a test trial would be a training trial")
        train, test = self.trials.subset(train_idx), self.trials.subset(test_idx)
        mean, std = voxel_stats(train.fmri)
        train = Trials(standardize(train.fmri, mean, std), train.images, train.labels, train.image_ids)
        test = Trials(standardize(test.fmri, mean, std), test.images, test.labels, test.image_ids)
        meta = {"source": self.source, "fingerprint": self.fingerprint, "n_voxels": self.n_voxels,
                "split": name}
        return Fold(train, test, self.unique_images, self.unique_labels, mean, std,
                    train_idx, test_idx, meta)

    def s1(self) -> Fold:
        """The file's own split (protocol S1); DataError when one side of it is empty."""
        [(name, train_idx, test_idx)] = splits("s1", self)
        return self.fold(train_idx, test_idx, name)


def voxel_stats(fmri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and SD ``V`` of fMRI ``N x V`` (SD 0 -> 1): the z-scoring (``standardize``)
    of every model and figure."""
    std = fmri.std(0)
    return fmri.mean(0), np.where(std > 0, std, 1.0).astype(np.float32)


def standardize(fmri: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """z-score ``N x V`` fMRI with given per-voxel statistics; float32."""
    return ((fmri - mean) / std).astype(np.float32)


class MiyawakiTorchDataset(torch.utils.data.Dataset):
    """Per-trial view: (fmri ``V``, image ``1 x 28 x 28``, label, image_id) as tensors."""

    def __init__(self, trials: Trials):
        self.trials = trials

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, i: int):
        t = self.trials
        return (torch.from_numpy(t.fmri[i]), torch.from_numpy(t.images[i]),
                int(t.labels[i]), int(t.image_ids[i]))


def make_dataloaders(data: "MiyawakiData | Fold | None" = None, batch_size: int = 32,
                     shuffle_train: bool = False) -> tuple[torch.utils.data.DataLoader,
                                                            torch.utils.data.DataLoader]:
    """(train_loader, test_loader) over ``MiyawakiTorchDataset`` for a fold (default: the S1 split
    of ``data``, itself by default ``resolve_data()``), fMRI z-scored by the training trials. Each
    batch is (fmri ``B x V``, image ``B x 1 x 28 x 28``, label ``B``, image id ``B``)."""
    fold = data if isinstance(data, Fold) else (data or resolve_data()).s1()
    return (torch.utils.data.DataLoader(MiyawakiTorchDataset(fold.train), batch_size, shuffle=shuffle_train),
            torch.utils.data.DataLoader(MiyawakiTorchDataset(fold.test), batch_size, shuffle=False))


# --------------------------------------------------------------------------- loading
def _assemble(fmri: np.ndarray, stim: np.ndarray, labels: np.ndarray, n_file_train: int,
              source: str) -> MiyawakiData:
    """Build a MiyawakiData from validated arrays: fmri ``N x V``, stim ``N x 784`` column-major
    rows in [0, 1], labels ``N``. Unique images are ordered by condition, then first occurrence."""
    images = stim.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, order="F")[:, None].astype(np.float32)
    _, first, inverse = np.unique(stim, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    order = sorted(range(len(first)), key=lambda k: (labels[first[k]], first[k]))
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    image_ids = remap[inverse]
    reps = first[order]
    trials = Trials(fmri.astype(np.float32), images, labels.astype(np.int64), image_ids)
    return MiyawakiData(trials, n_file_train, images[reps], labels[reps].astype(np.int64), source)


def load_miyawaki(path: str | os.PathLike) -> MiyawakiData:
    """Read and validate a .mat file with the schema of docs/PROTOCOL.md.

    Any voxel count; images stored as 0/1 or 0..255. Raises DataError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; {GET_DATA_HINT}")
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; re-save it with "
                        "`save(..., '-v7')` or scipy.io.savemat") from None
    except Exception as e:  # scipy raises several types for non-MAT or truncated files
        raise DataError(f"{path} is not a readable MATLAB .mat file ({type(e).__name__}: {e}); "
                        f"{GET_DATA_HINT}") from None
    missing = [k for k in REQUIRED_KEYS if k not in mat]
    if missing:
        raise DataError(f"{path} lacks the key(s) {', '.join(missing)}; expected "
                        f"{', '.join(REQUIRED_KEYS)} (see docs/PROTOCOL.md)")
    parts, scaled = {}, {}
    for part in ("Trn", "Test"):
        fmri, stim = np.asarray(mat["fmri" + part]), np.asarray(mat["stim" + part])
        labels = np.asarray(mat["label" + part])
        if labels.dtype.kind in "biuf" and labels.ndim == 2 and min(labels.shape) > 1:
            raise DataError(f"{path}: label{part} has shape {labels.shape}; expected one label per "
                            "trial (N x 1 or 1 x N)")
        labels = labels.ravel()
        if fmri.ndim != 2 or stim.ndim != 2:
            raise DataError(f"{path}: fmri{part} and stim{part} must be 2-D (trials x features), "
                            f"got {fmri.shape} and {stim.shape}")
        if not (len(fmri) == len(stim) == len(labels)):
            raise DataError(f"{path}: row counts differ: fmri{part} {len(fmri)}, stim{part} "
                            f"{len(stim)}, label{part} {len(labels)}; each needs one row per trial")
        if stim.shape[1] != N_PIXELS:
            raise DataError(f"{path}: stim{part} has {stim.shape[1]} columns; expected {N_PIXELS} "
                            f"(28 x 28 images, one per row)")
        for key, values in (("fmri" + part, fmri), ("stim" + part, stim), ("label" + part, labels)):
            if values.dtype.kind not in "biuf":           # bool, integers, floats
                raise DataError(f"{path}: {key} holds {values.dtype} values; expected real numbers")
            if not np.all(np.isfinite(values)):
                raise DataError(f"{path}: {key} contains NaN or Inf values; impute or drop those "
                                "voxels/trials before loading")
            largest = np.abs(values).max(initial=0)
            if largest > LARGEST_VALUE:
                raise DataError(f"{path}: {key} holds values up to {largest:g} in size; "
                                f"expected at most {LARGEST_VALUE:g} (float32 arithmetic and "
                                "whole-number labels): rescale or renumber them")
        stim = stim.astype(np.float64)
        if len(stim) and (stim.min() < 0 or stim.max() > 255):
            raise DataError(f"{path}: stim{part} values span [{number_text(stim.min())}, "
                            f"{number_text(stim.max())}]; expected 0/1 (or grey levels in [0, 1]) "
                            "or 0..255")
        scaled[part] = stim.max(initial=0) > 1    # 0..255 images, per key: the two may differ
        if scaled[part] and stim.max() < 128:     # another range (e.g. 0..16) read as 0..255
            print(f"note: {path}: stim{part} peaks at {number_text(stim.max())} and was read as "
                  f"0..255, so its images are dark (at most {stim.max() / 255:.2f}); if the file "
                  "uses another range, rescale it in the file to 0..255 or [0, 1]")
        parts[part] = (fmri.astype(np.float64), stim / 255.0 if scaled[part] else stim, labels)
    if parts["Trn"][0].shape[1] != parts["Test"][0].shape[1]:
        raise DataError(f"{path}: fmriTrn has {parts['Trn'][0].shape[1]} voxels but fmriTest has "
                        f"{parts['Test'][0].shape[1]}")
    if scaled["Trn"] != scaled["Test"] and all(len(parts[p][1]) for p in parts):
        wide, narrow = ("Trn", "Test") if scaled["Trn"] else ("Test", "Trn")
        print(f"note: {path}: stim{wide} is on a 0..255 scale and stim{narrow} within [0, 1]; each "
              f"key was scaled by its own range (if stim{narrow} is 0..255 too, its images are "
              f"nearly black: rescale it in the file)")
    fmri = np.vstack([parts["Trn"][0], parts["Test"][0]])
    stim = np.vstack([parts["Trn"][1], parts["Test"][1]])
    if len(np.unique(stim, axis=0)) < 2:
        raise DataError(f"{path} shows one distinct image in all its trials; identification and "
                        f"decoding need at least two")
    blank = np.ptp(stim, axis=1) == 0
    if blank.any():
        print(f"note: {path}: {int(blank.sum())} trial(s) show an image of one grey level (e.g. "
              "blank), with which every Pearson r is undefined: the protocol's scores count it as "
              "r = 0, so such an image scores PixCorr 0 and is never identified")
    if not np.ptp(fmri.astype(np.float32), axis=0).any():     # as the models see it (float32)
        raise DataError(f"{path}: no voxel's fMRI varies across the trials in float32, as the models "
                        "read it; there is nothing to decode (rescale values that vary only far "
                        "below their size)")
    labels = np.concatenate([parts["Trn"][2], parts["Test"][2]])
    fractional = labels[labels != np.round(labels)]
    if len(fractional):
        raise DataError(f"{path}: labelTrn/labelTest hold non-integer values (e.g. {fractional[0]:g}); "
                        "labels must be whole numbers, one condition id per trial (Miyawaki's: 2 "
                        "shapes, 3-5 letters)")
    return _assemble(fmri, stim, labels.astype(np.int64), len(parts["Trn"][0]), str(path))


SIMULATED = ("simulated", "simulated-random")   # --data values that name the built-in sets
ENCODER_CHECKPOINT_NAME = "miyawaki_dual_encoder.pth"   # in an output folder (write_summary reads it)
DATASET_JSON = "miyawaki_dataset.json"   # this script's result: its data and figures (write_summary)


def resolve_data(arg: str | os.PathLike | None = None) -> MiyawakiData:
    """``--data`` handling: a path, ``"simulated"``, ``"simulated-random"``, or None for the
    default path, falling back to the simulated set (with a one-line notice) when the default file
    is absent."""
    if arg is not None and str(arg) == SIMULATED[0]:
        print("data: built-in simulated data set (--data simulated)")
        return make_simulated_dataset()
    if arg is not None and str(arg) == SIMULATED[1]:
        print(f"data: built-in simulated random-image session (--data simulated-random: "
              f"{SIM_RANDOM_IMAGES} random patterns to train on, the 20 figures to test on)")
        return make_simulated_dataset(random_images=SIM_RANDOM_IMAGES)
    path = Path(arg) if arg is not None else DEFAULT_DATA
    if arg is None and not path.is_file():
        print(f"data: no file at {path}; using the built-in SIMULATED data set "
              f"(to use the real one, {GET_DATA_HINT.split(' or ')[0]})")
        return make_simulated_dataset()
    data = load_miyawaki(path)
    print(f"data: {path} ({len(data.trials)} trials, {data.n_voxels} voxels)")
    return data


def download(url: str = DATA_URL, dest: Path = DEFAULT_DATA, sha256: str = DATA_SHA256,
             timeout: float = 60.0) -> Path:
    """Fetch the public preprocessed file, verify its sha256 and move it into place atomically.

    A failed or corrupted download leaves nothing behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    finish_stopped_saves(dest.parent)
    fd, tmp = _temp_file(dest)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise DataError(f"download from {url} has sha256 {digest.hexdigest()[:12]}..., expected "
                            f"{sha256[:12]}...; nothing was saved, try again or copy the file by hand")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as e:  # network errors, cut-off transfers
        raise DataError(f"could not download {url} ({e}); copy the file to {dest} by hand "
                        "or use `--data simulated`") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


# --------------------------------------------------------------------------- simulated data
_LETTER_STROKES = {"n": "TLR", "e": "TLMBh", "u": "LRB", "r": "TL", "o": "TLRB"}
# condition -> (x0, y0, width, height, stroke thickness) of the letter box on the 10 x 10 grid
_LETTER_BOXES = {3: (2, 2, 6, 6, 1), 4: (2, 1, 6, 8, 2), 5: (3, 2, 4, 5, 1)}
# trials per image of each condition (as in the real file: 119 trials in all)
_SIM_TRIALS = {2: [8] * 5, 3: [4, 4, 4, 4, 3], 4: [4] * 5, 5: [8] * 5}


def _letter(strokes: str, x0: int, y0: int, w: int, h: int, t: int) -> np.ndarray:
    """A letter on the 10 x 10 grid from strokes: Top, Bottom, Left, Right, Middle bar, right
    half-height bar (h)."""
    img = np.zeros((GRID, GRID), np.float32)
    box = img[y0:y0 + h, x0:x0 + w]
    mid = (h - t) // 2
    for s in strokes:
        if s == "T":
            box[:t] = 1
        elif s == "B":
            box[h - t:] = 1
        elif s == "L":
            box[:, :t] = 1
        elif s == "R":
            box[:, w - t:] = 1
        elif s == "M":
            box[mid:mid + t] = 1
        elif s == "h":
            box[:mid + t, w - t:] = 1
    return img


def figure_images() -> tuple[np.ndarray, np.ndarray]:
    """The 20 simulated stimuli on the 10 x 10 grid: ``20 x 10 x 10`` float32 and labels ``20``.

    5 geometric shapes (square, small frame, plus, X, large frame) and the letters n e u r o in
    three variants, drawn in the style of the real stimuli."""
    g = np.zeros((5, GRID, GRID), np.float32)
    g[0, 3:7, 3:7] = 1                                        # square
    g[1, 3:7, 3:7] = 1
    g[1, 4:6, 4:6] = 0                                        # small frame
    g[2, 1:9, 4:6] = 1
    g[2, 4:6, 1:9] = 1                                        # plus
    i = np.arange(1, 9)
    g[3, i, i] = g[3, i, 9 - i] = g[3, i, np.clip(i + 1, 1, 8)] = g[3, i, np.clip(8 - i, 1, 8)] = 1  # X
    g[4, 1:9, 1:9] = 1
    g[4, 3:7, 3:7] = 0                                        # large frame
    letters = [_letter(_LETTER_STROKES[c], *_LETTER_BOXES[cond]) for cond in (3, 4, 5) for c in "neuro"]
    images = np.concatenate([g, np.stack(letters)])
    labels = np.repeat([2, 3, 4, 5], 5).astype(np.int64)
    return images, labels


def upsample_grid(img10: np.ndarray) -> np.ndarray:
    """``... x 10 x 10`` grid -> ``... x 28 x 28``: repeat each cell 3 x 3, crop 1 px per edge."""
    return np.repeat(np.repeat(img10, 3, -2), 3, -1)[..., 1:29, 1:29]


def make_simulated_dataset(seed: int = 0, snr: float = 1.5, n_voxels: int = 967,
                           shared_noise: float = 0.3, random_images: int = 0) -> MiyawakiData:
    """A data set shaped like the real file (119 trials: 107 train / 12 test, 20 images).

    fMRI comes from a retinotopic V1 model: each voxel has a Gaussian receptive field on the
    10 x 10 grid whose size grows with eccentricity, responds linearly to the stimulus contrast in
    it, and carries noise with a shared (global) component. ``snr`` is signal variance over noise
    variance per voxel. Deterministic per seed.

    ``random_images > 0`` gives Miyawaki's own protocol instead (``--data simulated-random``): a
    *random-image session* of that many random 10 x 10 patterns (condition 1, each shown once) as
    the file's training split, and the 20 figures, each shown once, as its test split, so that
    every test image is new to a decoder trained on the file's split."""
    rng = np.random.default_rng(seed)
    grids, labels10 = figure_images()
    if random_images:
        density = rng.uniform(0.2, 0.6, (random_images, 1, 1))
        patterns = (rng.random((random_images, GRID, GRID)) < density).astype(np.float32)
        grids = np.concatenate([patterns, grids])
        labels10 = np.concatenate([np.ones(random_images, np.int64), labels10])
        ids = np.arange(len(grids))                      # patterns first (train), figures last
        train_rows = np.arange(random_images)
    else:
        counts = np.concatenate([_SIM_TRIALS[c] for c in (2, 3, 4, 5)])
        ids = np.repeat(np.arange(20), counts)
        # the file's test split holds 12 trials: 3 per condition, one trial each of different images
        test_pick = np.concatenate([rng.choice(np.where(labels10 == c)[0], 3, replace=False)
                                    for c in (2, 3, 4, 5)])
        test_rows = np.array([np.where(ids == k)[0][0] for k in test_pick])
        train_rows = rng.permutation(np.setdiff1d(np.arange(len(ids)), test_rows))
        ids = np.concatenate([ids[train_rows], ids[test_rows]])

    yy, xx = np.mgrid[0:GRID, 0:GRID] + 0.5
    centres = rng.uniform(0, GRID, size=(n_voxels, 2))
    ecc = np.linalg.norm(centres - GRID / 2, axis=1)
    sigma = 0.5 + 0.25 * ecc
    d2 = (xx.ravel()[None] - centres[:, :1]) ** 2 + (yy.ravel()[None] - centres[:, 1:]) ** 2
    rf = np.exp(-d2 / (2 * sigma[:, None] ** 2))
    rf /= rf.sum(1, keepdims=True)
    gain = rng.lognormal(0, 0.3, n_voxels)
    signal = (grids.reshape(len(grids), -1) @ rf.T) * gain    # K x V
    signal = signal[ids]
    noise_sd = signal.std(0).mean() / np.sqrt(snr)
    loading = rng.normal(1.0, 0.3, n_voxels)
    noise = (np.sqrt(1 - shared_noise) * rng.normal(size=signal.shape)
             + np.sqrt(shared_noise) * rng.normal(size=(len(ids), 1)) * loading)
    fmri = signal + noise_sd * noise + rng.normal(0, 1, n_voxels)   # plus a per-voxel baseline
    stim = upsample_grid(grids[ids]).transpose(0, 2, 1).reshape(len(ids), -1)  # column-major rows
    return _assemble(fmri, stim, labels10[ids], len(train_rows),
                     SIMULATED[1] if random_images else SIMULATED[0])


# --------------------------------------------------------------------------- splits (docs/PROTOCOL.md)
S2_FOLDS = 5


def splits(protocol: str, data: MiyawakiData, seeds=(0, 1, 2)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Folds of a protocol as (name, train_idx, test_idx) over ``data.trials``.

    s1: the file's split. s2: stratified 5-fold by image id, one repeat per seed (DataError when no
    image is shown 5 times: images shown once are never seen in training; S3 is their protocol).
    s3: leave-one-stimulus-out, one fold per unique image."""
    n, ids = len(data.trials), data.trials.image_ids
    if protocol == "s1":
        if not 0 < data.n_file_train < n:
            part = "test" if data.n_file_train == n else "training"
            raise DataError(f"{data.source} has no {part} trials in its own split, so S1 cannot be "
                            "run on it; use the cross-validated benchmark (`python miyawaki_evaluation.py "
                            "--protocol s2` or `s3`), which splits all trials itself")
        if data.n_file_train < 2:     # z-scoring and every fit need two; one trial ended in NaN scores
            raise DataError(f"{data.source} has one training trial in its own split; S1's models need "
                            "at least 2 (the cross-validated benchmark, `--protocol s3`, splits all "
                            "trials itself)")
        return [("s1", np.arange(data.n_file_train), np.arange(data.n_file_train, n))]
    if protocol == "s2":
        if np.bincount(ids).max() < S2_FOLDS:
            raise DataError(f"no image of {data.source} is shown {S2_FOLDS} times or more, so S2's "
                            f"{S2_FOLDS}-fold CV stratified by image cannot be made (S2 tests images "
                            "also seen in training); use `--protocol s3` (every image held out once)")
        # imported here: sklearn adds ~60 MiB, and of this module only the S2 splits need it
        from sklearn.model_selection import StratifiedKFold
        folds = []  # one image has 3 trials, fewer than 5 folds: sklearn's warning is expected
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for seed in seeds:
                skf = StratifiedKFold(n_splits=S2_FOLDS, shuffle=True, random_state=seed)
                folds += [(f"s2-seed{seed}-fold{k}", tr, te)
                          for k, (tr, te) in enumerate(skf.split(np.zeros(n), ids))]
        return folds
    if protocol == "s3":
        return [(f"s3-image{k}", np.where(ids != k)[0], np.where(ids == k)[0])
                for k in range(len(data.unique_images))]
    raise ValueError(f"unknown protocol {protocol!r}; use s1, s2 or s3")


# --------------------------------------------------------------------------- protocol metrics
TIE_TOL = 1e-9  # correlations closer than this are ties (float rounding of exact ties)


def _flat_clip(x):
    """N x ... (numpy or torch; N may be 0) -> N x P float64 clipped to [0, 1]."""
    x = as_numpy(x).astype(np.float64)
    return np.clip(x.reshape(len(x), math.prod(x.shape[1:])), 0.0, 1.0)


def as_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (a torch tensor on any device, with or without gradient, or any
    array-like), so that the metrics take what a notebook holds."""
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _unit_rows(x):
    """N x P -> N x P rows centred and scaled to unit norm; constant rows become 0."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    # ptp, not the norm, detects constant rows: centring can leave rounding residue.
    x[np.ptp(x, axis=1) == 0] = 0.0
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def pearson_matrix(a, b):
    """Pearson r of every row of a (N x P) with every row of b (M x P) -> N x M.

    A constant row has r = 0 with everything.
    """
    return _unit_rows(a) @ _unit_rows(b).T


def pearson_rows(a, b):
    """Pearson r of row i of a with row i of b, both N x P -> N (constant row -> 0)."""
    return np.sum(_unit_rows(a) * _unit_rows(b), axis=1)


def identification_ranks(scores, true_ids):
    """Rank of the true candidate: scores N x K (higher = better), true_ids N -> N ints.

    Rank 1 = best. Ties count pessimistically: rank = number of candidates scoring
    >= the true one, so a constant reconstruction (r = 0 with every candidate) ranks
    last instead of first; -inf ranks a candidate last (the kNN baselines' never-seen images). A
    NaN or +inf score raises FloatingPointError (NaN compares false with everything: it would rank
    first).
    """
    scores = np.asarray(scores, dtype=np.float64)
    check_finite_array(scores, "identification scores", allow_neg_inf=True)
    true_scores = scores[np.arange(len(scores)), np.asarray(true_ids)]
    return np.sum(scores >= true_scores[:, None], axis=1)


def topk_accuracy(ranks, k):
    """Fraction of ranks (N) that are <= k."""
    return float(np.mean(np.asarray(ranks) <= k))


def mean_rank(ranks):
    """Mean of ranks (N); 1 is perfect."""
    return float(np.mean(ranks))


def chance_levels(k: int) -> dict:
    """The protocol's chance levels among ``k`` candidates: top-1 1/k, top-5 min(5, k)/k, mean
    rank (k + 1)/2 and 2-way identification 0.5."""
    return {"top1": 1 / k, "top5": min(5, k) / k, "mean_rank": (k + 1) / 2, "two_way": 0.5}


def rank_summary(ranks, k: int) -> dict:
    """Top-1, top-5 and mean rank of ranks (N) among ``k`` candidates, each beside its chance."""
    chance = chance_levels(k)
    return {"n_candidates": k, "chance_top1": chance["top1"], "chance_top5": chance["top5"],
            "top1": topk_accuracy(ranks, 1), "top5": topk_accuracy(ranks, 5),
            "mean_rank": mean_rank(ranks), "chance_mean_rank": chance["mean_rank"]}


def uncalibrated_gate_note(anchor_blend: float, output_stretch: bool) -> str:
    """What the decoders output where their training trials show no image twice (e.g. a
    random-image session): their novelty gate has no seen examples to be calibrated on and reads
    every test trial as new (g = 1), so at ``anchor_blend`` 1 the output is their anchor (clipped,
    and contrast-stretched with ``output_stretch``); one sentence, on the console and in
    summary.md."""
    text = ("The decoders' novelty gate: no training image is shown twice, so it has no seen "
            "examples to be calibrated on and reads every test trial as new (g = 1)")
    if anchor_blend != 1:
        return text + "."
    return (text + "; at --anchor-blend 1 both decoders' output is then their linear anchor, "
            + ("clipped and contrast-stretched" if output_stretch else "clipped")
            + ", on every test trial: the networks' samples are blended away (a lower "
            "--anchor-blend mixes them in).")


def score_parts_text(parts: dict) -> str:
    """A result's ``score_parts`` ({part: {"top1", "weight"}}, the dual encoder's
    ``score_part_summary``) as one phrase: "embeddings 0.60 (weight 0.1), linear read-out 0.87
    (weight 0.9), encoding model 0.67 (weight 0)" (top-1 of each part alone)."""
    return ", ".join(f"{SCORE_PART_NAMES[name]} {p['top1']:.2f} (weight {p['weight']:g})"
                     for name, p in parts.items())


def cosine_scores(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of queries ``N x D`` with every row of items ``M x D``."""
    q = np.asarray(queries, np.float64)
    v = np.asarray(items, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return q @ v.T


def retrieval_ranks(scores, query_ids, item_ids) -> np.ndarray:
    """Rank of the first match for each query: scores ``N x M`` (higher = better), query_ids ``N``,
    item_ids ``M``; item j matches query i when their ids are equal (several may match).

    rank = 1 + number of non-matching items scoring >= the best match (ties pessimistic, as in
    identification_ranks, which this equals when every query has exactly one match)."""
    scores = np.asarray(scores, np.float64)
    match = np.asarray(query_ids)[:, None] == np.asarray(item_ids)[None, :]
    if not match.any(axis=1).all():
        raise ValueError("every query needs at least one matching item")
    best = np.where(match, scores, -np.inf).max(axis=1)
    return 1 + np.sum(~match & (scores >= best[:, None]), axis=1)


def identification_summary(scores, true_ids) -> dict:
    """fMRI -> image identification from scores ``N x K``: ranks, top1, top5, mean_rank, chance."""
    ranks = identification_ranks(scores, true_ids)
    return {**rank_summary(ranks, np.shape(scores)[1]), "ranks": ranks}


def image_to_fmri_summary(image_emb, image_ids, trial_emb, trial_ids) -> dict:
    """Reverse direction: each unique image that has test trials (image_emb ``Q x D`` with ids
    ``Q``) ranks the test trials (trial_emb ``N x D``, ids ``N``); a hit is any trial of that image.

    top1: share of images whose most similar test trial shows them; chance_top1 = mean over the
    images of (its trials / N). Undefined (nan) when the test trials show a single image."""
    present = np.isin(image_ids, trial_ids)
    image_emb, image_ids = np.asarray(image_emb)[present], np.asarray(image_ids)[present]
    if len(image_ids) < 2:
        return {"n_queries": int(len(image_ids)), "n_items": int(len(trial_ids)),
                "top1": float("nan"), "mean_rank": float("nan"), "chance_top1": float("nan")}
    ranks = retrieval_ranks(cosine_scores(image_emb, trial_emb), image_ids, trial_ids)
    hits = np.array([np.mean(trial_ids == k) for k in image_ids])
    return {"n_queries": int(len(image_ids)), "n_items": int(len(trial_ids)),
            "top1": topk_accuracy(ranks, 1), "mean_rank": mean_rank(ranks),
            "chance_top1": float(hits.mean())}


def two_way_identification(recon, true, image_ids, pool_true=None, pool_ids=None):
    """Per-trial 2-way identification -> N floats in [0, 1] (nan if no rival exists).

    recon, true: N images; image_ids: N. For trial i, the rivals are the pool trials
    j whose image id differs from image_ids[i]; a win is
    corr(recon_i, true_i) > corr(recon_i, pool_true_j), a tie counts 0.5.
    The pool defaults to the test trials themselves (S1/S2); S3 passes all trials.
    """
    if pool_true is None:
        pool_true, pool_ids = true, image_ids
    recon = _flat_clip(recon)
    own = pearson_rows(recon, _flat_clip(true))
    rival = pearson_matrix(recon, _flat_clip(pool_true))             # N x M
    valid = np.asarray(image_ids)[:, None] != np.asarray(pool_ids)[None, :]
    # equal in exact arithmetic (binary images share pixel counts) != equal in floats
    tie = np.abs(own[:, None] - rival) <= TIE_TOL
    wins = np.where(tie, 0.5, own[:, None] > rival)
    n_valid = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, (wins * valid).sum(axis=1) / n_valid, np.nan)


def ssim_rows(recon, true, shape=(28, 28)):
    """skimage SSIM (data_range=1, default 7x7 window) per pair of N images -> N."""
    recon, true = _flat_clip(recon), _flat_clip(true)
    return np.array([structural_similarity(r.reshape(shape), t.reshape(shape), data_range=1.0)
                     for r, t in zip(recon, true)])


def identification_scores(recon, candidates) -> np.ndarray:
    """The protocol's 20-way scores: Pearson r of each clipped reconstruction (N images) with each
    candidate (K images) -> N x K."""
    return pearson_matrix(_flat_clip(recon), _flat_clip(candidates))


RECON_SCALE_MAX = 10.0  # above this a reconstruction looks like another scale (0..255): a warning


def check_scored_images(recon, true, image_ids, candidates, pool_true=None) -> None:
    """ValueError unless N reconstructions and N true images of the candidates' size (any shape
    that flattens to N x P, as the candidates ``K x ...`` to K x P) have N image ids and the true
    images, the candidates and the 2-way pool's images lie in [0, 1] (numpy would broadcast one
    image over N without an error; 0..255 candidates of binary images would score as if right,
    being clipped, and grey ones wrongly); a warning
    where reconstructions go above ``RECON_SCALE_MAX``, as 0..255 ones do (the protocol clips
    predictions to [0, 1], so they score as near white; a diverged linear read-out does too, and
    is scored so)."""
    shapes = [np.shape(a) for a in (recon, true, image_ids, candidates)]
    sizes = [np.size(a) // max(len(a), 1) for a in (recon, true, candidates)]
    if not (len(recon) == len(true) == len(image_ids) and sizes[0] == sizes[1] == sizes[2]
            and np.ndim(image_ids) == 1):
        raise ValueError(f"reconstructions {shapes[0]}, true images {shapes[1]}, image ids {shapes[2]} "
                         f"and candidates {shapes[3]}; expected N images, N images and N ids, the "
                         f"images of the candidates' size")
    if not (np.issubdtype(np.asarray(image_ids).dtype, np.integer)
            and np.all((0 <= np.asarray(image_ids)) & (np.asarray(image_ids) < len(candidates)))):
        raise ValueError(f"image ids {np.unique(image_ids).tolist()[:10]}; expected whole numbers that "
                         f"index the {len(candidates)} candidates (0 to {len(candidates) - 1})")
    for images, what in ((true, "true images"), (candidates, "candidate images"),
                         (pool_true, "the 2-way pool's images")):
        images = np.asarray(images if images is not None else [])
        if images.size:
            check_unit_range(float(images.min()), float(images.max()), what)
    if np.max(recon) > RECON_SCALE_MAX:
        warnings.warn(f"reconstructions with values up to {np.max(recon):g}, far off the images' [0, 1] "
                      f"scale (0..255 ones: divide by 255); scored clipped to [0, 1], as the protocol says",
                      stacklevel=3)


def per_trial_metrics(recon, true, image_ids, candidates, pool_true=None, pool_ids=None,
                      scores=None):
    """Per-trial metrics -> dict of N arrays: mse, pixcorr, ssim, two_way, rank.

    recon, true: N images; image_ids: N ints indexing candidates (K images).
    The 20-way rank uses Pearson r of the clipped reconstruction with each candidate,
    unless scores (N x K, higher = better) are given (e.g. kNN votes).
    pool_true/pool_ids: the 2-way rival pool (see two_way_identification).
    """
    recon, true, image_ids, candidates = map(as_numpy, (recon, true, image_ids, candidates))
    check_finite_array(recon, "reconstructions")
    check_scored_images(recon, true, image_ids, candidates, pool_true)
    if scores is None:
        scores = identification_scores(recon, candidates)
    recon, true = _flat_clip(recon), _flat_clip(true)
    return {
        "mse": np.mean((recon - true) ** 2, axis=1),
        "pixcorr": pearson_rows(recon, true),
        "ssim": ssim_rows(recon, true),
        "two_way": two_way_identification(recon, true, image_ids, pool_true, pool_ids),
        "rank": identification_ranks(scores, image_ids),
    }


def reconstruction_metrics(recon, true, image_ids, candidates, pool_true=None, pool_ids=None,
                           scores=None):
    """Means over the N trials -> dict: mse, pixcorr, ssim, two_way, top1, top5, mean_rank.

    Arguments as in per_trial_metrics; flat images are rows in C order (a .mat file's stim rows
    are column-major: ``load_miyawaki`` turns them, and a Fold's images are ready). On one S3
    fold the test trials show one image, so 2-way has no rival (nan) unless the pool is all
    trials, as the benchmark's: ``pool_true=data.trials.images, pool_ids=data.trials.image_ids``.
    """
    m = per_trial_metrics(recon, true, image_ids, candidates, pool_true, pool_ids, scores)
    out = {k: float(np.mean(m[k])) for k in ("mse", "pixcorr", "ssim", "two_way")}
    out.update(top1=topk_accuracy(m["rank"], 1), top5=topk_accuracy(m["rank"], 5),
               mean_rank=mean_rank(m["rank"]))
    return out


METRICS = ("top1", "top5", "two_way", "mse", "pixcorr", "ssim", "condition")
# condition_top1: the dual encoder's condition as the † baselines define it; closer_than_train:
# docs/PROTOCOL.md's nearest-training-image check, on test trials whose image is absent from training;
# novelty_gate: the decoders' P(new image) per test trial (not a score: what their output leaned on)
EXTRA_METRICS = ("condition_top1", "closer_than_train", "novelty_gate")


def score_reconstructions(recon, fold: Fold, pool=None, scores=None, cond=None) -> dict:
    """Per-trial protocol metrics of reconstructions ``N x 784`` of ``fold.test`` -> dict of N
    arrays: top1, top5, two_way, mse, pixcorr, ssim, condition, rank.

    scores ``N x K`` replace the Pearson ranking (kNN votes, ridge_snap's ridge ranking); cond
    ``N`` predicted conditions, else the condition of the top-1 identified image (docs/BASELINES.md †);
    pool (images, image ids): the 2-way rivals (S3: all trials)."""
    test = fold.test
    pool_true, pool_ids = pool if pool is not None else (None, None)
    if scores is None:
        scores = identification_scores(recon, fold.unique_images)
    m = per_trial_metrics(recon, test.images, test.image_ids, fold.unique_images, pool_true,
                          pool_ids, scores)
    if cond is None:
        cond = identified_labels(scores, fold.unique_labels)
    m.update(top1=(m["rank"] <= 1).astype(float), top5=(m["rank"] <= 5).astype(float),
             condition=(np.asarray(cond) == test.labels).astype(float))
    unseen = fold.unseen_test
    if unseen.any():
        m["closer_than_train"] = np.where(unseen, nearest_training_check(recon, fold)[0], np.nan)
    return m


def nearest_training_check(recon, fold: Fold) -> tuple[np.ndarray, np.ndarray]:
    """docs/PROTOCOL.md's nearest-training-image check (after Shirakawa et al. 2024) of reconstructions
    ``N x ...`` of ``fold.test``: (N floats, 1 where PixCorr with the true image exceeds the largest
    PixCorr with any image of the fold's training trials; N indices into ``fold.unique_images`` of
    that most similar training image)."""
    seen = np.unique(fold.train.image_ids)
    recon = np.asarray(recon).reshape(len(recon), -1)
    r_true = pearson_rows(np.clip(recon, 0, 1), fold.test.images.reshape(len(recon), -1))
    r_train = identification_scores(recon, fold.unique_images[seen])
    return (r_true > r_train.max(1)).astype(float), seen[r_train.argmax(1)]


def fold_means(per_trial: dict) -> dict:
    """{metric: N array} -> {metric: mean} for the (EXTRA_)METRICS present (nan entries ignored;
    nan where every entry is: a 2-way score without rivals)."""
    def mean(v):
        v = np.asarray(v)
        return float(np.nan) if np.isnan(v).all() else float(np.nanmean(v))
    return {m: mean(per_trial[m]) for m in (*METRICS, *EXTRA_METRICS) if m in per_trial}


# --------------------------------------------------------------------------- the reference read-out
RIDGE_ALPHAS = np.logspace(-1, 5, 25)


class MeanImageBaseline:
    """Predicts the mean training image for every trial (the information-free floor)."""

    def fit(self, fmri, images):
        """fmri ``N x V`` (unused), images ``N x ...`` -> self."""
        self.mean_ = np.asarray(images, dtype=np.float64).reshape(len(images), -1).mean(axis=0)
        return self

    def predict(self, fmri):
        """fmri ``N x V`` -> ``N x 784`` copies of the mean training image."""
        return np.tile(self.mean_, (len(fmri), 1))


class RidgeBaseline:
    """Ridge fMRI ``N x V`` -> 784 pixels (docs/BASELINES.md's ridge); one alpha shared by all pixels,
    chosen by efficient leave-one-out. Also the decoders' low-level anchor."""

    def fit(self, fmri, images):
        """fmri ``N x V``, images ``N x ...`` -> self."""
        from sklearn.linear_model import RidgeCV  # imported here: sklearn costs ~60 MiB
        images = np.asarray(images, dtype=np.float64)
        self.model_ = RidgeCV(alphas=RIDGE_ALPHAS).fit(fmri, images.reshape(len(images), -1))
        self.alpha_ = float(self.model_.alpha_)
        return self

    def predict(self, fmri):
        """fmri ``N x V`` -> ``N x 784`` pixels (not clipped)."""
        return self.model_.predict(fmri)


def identified_labels(scores, candidate_labels):
    """Condition of each trial's top-1 candidate: scores N x K, candidate_labels K -> N.

    A tie at the top takes the first candidate (np.argmax).
    """
    return np.asarray(candidate_labels)[np.argmax(scores, axis=1)]


def condition_accuracy(pred_labels, true_labels):
    """Fraction of equal entries of two N label arrays (4-way condition accuracy)."""
    return float(np.mean(np.asarray(pred_labels) == np.asarray(true_labels)))


def majority_rate(labels):
    """Share of the most frequent label in labels (N): the 4-way majority-class rate."""
    return float(np.max(np.unique(labels, return_counts=True)[1]) / len(labels))


def uniform_condition_chance(labels) -> float:
    """1 / the number of conditions among trials' ``labels`` (N), the uniform chance of the
    condition accuracy: counted over trials, not over the unique images, whose label is their
    first trial's (a file may show one image under several conditions)."""
    return 1 / len(np.unique(labels))


# --------------------------------------------------------------------------- plumbing (seeding, device, options, files)
def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) and, where CUDA is there, ask torch for
    deterministic kernels."""
    # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA first starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Only with CUDA: on a CPU-only host the request changes no number of these scripts (their
    # outputs on the real file are the same bit for bit without it) and imports torch's compiler,
    # about 1 s in every process that seeds (docs/SPEED.md)
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
              pct_start: float = 0.1) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's one-cycle schedule (cosine warm-up over ``pct_start`` of ``total_steps``, then
    cosine annealing), well defined for any ``total_steps`` >= 1: torch divides by zero where
    ``pct_start x total_steps`` is 1 (10 steps at 0.1), so runs under 20 steps warm up over half
    of at least 4 steps instead (the dual encoder's and the diffusion decoder's schedule)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=max(total_steps, 4),
                                               pct_start=pct_start if total_steps >= 20 else 0.5)


def fmri_batch(fmri, n_voxels: int, device) -> torch.Tensor:
    """z-scored fMRI, numpy or torch of any real dtype, ``N x V`` or one trial ``V``, or the fMRI
    of a ``Trials`` -> float32
    ``N x V`` on ``device`` (the models' public methods take what a notebook holds); ValueError
    naming what is expected for another shape, complex or non-finite values."""
    if isinstance(fmri, Trials):          # its fMRI only: the trials' images are never read
        fmri = fmri.fmri
    x = torch.as_tensor(fmri, device=device)
    if x.is_complex():
        raise ValueError("complex fMRI; expected real z-scored voxels")
    x = x.to(torch.float32)
    if x.dim() not in (1, 2) or x.shape[-1] != n_voxels:
        raise ValueError(f"fMRI of shape {tuple(x.shape)}; expected N x {n_voxels} z-scored voxels "
                         f"(or one trial of {n_voxels})")
    if not torch.isfinite(x).all():
        raise ValueError("fMRI with NaN or infinite values; expected finite z-scored voxels")
    return x.reshape(-1, n_voxels)


def image_batch(images, device) -> torch.Tensor:
    """Images in [0, 1], numpy or torch of any real dtype, ``N x 1 x 28 x 28``, ``N x 28 x 28``,
    ``N x 784`` (rows in C order, as ``images.reshape(N, -1)`` gives; the .mat file's rows are
    MATLAB's column-major ones, which ``load_miyawaki`` turns upright) or one image -> float32
    ``N x 1 x 28 x 28`` on ``device``; ValueError naming what is expected otherwise."""
    y = torch.as_tensor(images, device=device).to(torch.float32)
    grid = tuple(y.shape[-2:]) == (IMAGE_SIDE, IMAGE_SIDE) and (y.dim() < 4 or y.shape[1] == 1)
    if not (grid and y.dim() <= 4 or y.dim() <= 2 and y.shape[-1] == N_PIXELS):
        raise ValueError(f"images of shape {tuple(y.shape)}; expected N x 1 x 28 x 28, N x 28 x 28 "
                         f"or N x {N_PIXELS} rows in C order (or one image)")
    if y.numel():
        check_unit_range(y.min().item(), y.max().item())
    return y.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


def check_unit_range(low: float, high: float, what: str = "images") -> None:
    """ValueError unless [low, high], the range of some images' values, lies in [0, 1] (to 1e-4;
    NaN fails too): 0..255 images would be used, and scored, without an error."""
    if not (low >= -1e-4 and high <= 1 + 1e-4):
        raise ValueError(f"{what} with values in [{number_text(low)}, {number_text(high)}]; expected "
                         "[0, 1] (0..255 images: divide by 255, as load_miyawaki does)")


def generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, else ``device``."""
    return generator.device if generator is not None else device


def randn_on(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal draws made on the generator's device (so a CPU generator gives the same
    numbers whatever the model's device), then moved to ``device``."""
    return torch.randn(shape, generator=generator, device=generator_device(generator, device)).to(device)


def rand_on(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws, as ``randn_on``."""
    return torch.rand(shape, generator=generator, device=generator_device(generator, device)).to(device)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an OptionError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu "
                          "or auto")
    return torch.device(name)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    bfloat16 instructions (AMX, or AVX-512 BF16) under torch's oneDNN. Elsewhere torch converts
    or emulates: 4.4x slower than float32 for a matrix product on an AVX-512 CPU without BF16
    (Ice Lake), over 10x on an AVX2-only one."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        cpu = torch.cpu
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and (cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported()))
    except (AttributeError, RuntimeError):     # a build without these checks: float32
        return False


def uses_bf16(device: torch.device | str, enabled: bool) -> bool:
    """Whether a config's ``bf16`` (``enabled``) trains in bfloat16 on ``device``: only where it
    is native (``native_bf16``); a config's ``bf16`` asks for speed, and emulated bfloat16 is
    the slower path."""
    return enabled and native_bf16(device)


def bf16_autocast(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on ``device`` where ``uses_bf16``; else a disabled autocast (float32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, enabled))


MAX_SEED = 2**32 - 1   # numpy's legacy seeding and scikit-learn's random_state take 32 bits
SEED_METADATA = {"min": 0, "max": MAX_SEED, "help": "random seed"}   # every config's seed field


def check_seeds(seeds) -> None:
    """OptionError for a ``--seeds`` list with a value out of range or one given twice (its fit
    would count twice)."""
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise OptionError(f"--seeds must be >= 0 and <= {MAX_SEED}, got {bad[0]}")
    if len(set(seeds)) < len(seeds):
        raise OptionError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; give each once")


def out_dir_path(text: str) -> Path:
    """``--out-dir`` as a Path; an empty one (which would write into the current folder) is an
    argparse type error: one line, exit code 2."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder would put the outputs in the current "
                                         "one; give a folder ('.' for the current one)")
    return Path(text)


@dataclass
class ScriptOptions:
    """The settings every script shares (``add_common_args``); each script's config extends it."""

    data: str | None = field(default=None, metadata={
        "help": f"a .mat file, 'simulated' or 'simulated-random'; default "
                f"{DEFAULT_DATA.relative_to(REPO_DIR)}, falling back to the simulated set when that "
                f"file is absent"})
    out_dir: Path = field(default=DEFAULT_OUT, metadata={"type": out_dir_path,
                                                         "help": "where outputs go"})
    seed: int = field(default=0, metadata=SEED_METADATA)
    device: str = field(default="auto", metadata={
        "choices": ("auto", "cpu", "cuda"), "help": "auto = CUDA when available, else the CPU"})


# metadata key of a config field -> (test the value must pass, its sign in messages); a tuple
# field's "max_items" caps how many values it takes
BOUNDS = {"min": (operator.ge, ">="), "max": (operator.le, "<="), "above": (operator.gt, ">"),
          "below": (operator.lt, "<")}


def number_text(x) -> str:
    """A bound or a value in messages: integers in full, floats in the fewest significant digits
    (6 at least, as %g) that read back as the value, in float32 where it is a float32 value (%g
    read 255.00002 as "255" beside the bound 255; float32's 1.001 reads 1.001, not
    1.0010000467300415)."""
    if isinstance(x, (int, np.integer)):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return f"{x:g}"
    single = abs(x) <= float(np.finfo(np.float32).max) and float(np.float32(x)) == x
    for digits in range(6, 17):
        text = f"{x:.{digits}g}"
        if float(text) == x or (single and np.float32(text) == np.float32(x)):
            return text
    return repr(x)


def check_options(cfg):
    """Return the config dataclass ``cfg`` after checking every field against its metadata:
    ``min`` / ``max`` (inclusive), ``above`` / ``below`` (exclusive), each item of a tuple, a
    tuple's ``max_items``, and ``choices``; every float must be finite (NaN and inf are refused
    where no bound would catch them). Raises OptionError naming the first option out of range."""
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
            raise OptionError(f"{flag} {value!r} is not one of {', '.join(map(str, f.metadata['choices']))}")
        if isinstance(value, tuple) and len(value) > f.metadata.get("max_items", len(value)):
            raise OptionError(f"{flag} takes at most {f.metadata['max_items']} values, got {len(value)}")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise OptionError(f"{flag} must be a finite number, got {item:g}")
            for key, (ok, sign) in BOUNDS.items():
                if key in f.metadata and not ok(item, f.metadata[key]):
                    raise OptionError(f"{flag} must be {sign} {number_text(f.metadata[key])}, "
                                      f"got {number_text(item)}")
    return cfg


def chance_text(p: float) -> str:
    """A chance level for a log line or a title, to two significant digits (0.05, 0.25, 0.005,
    0.0022): two fixed decimals would read 0.01 for 200 candidates and 0.00 for 460."""
    return f"{p:.2g}"


def value_text(v: float, digits: int = 3) -> str:
    """A number for a log line, "undefined" where it is NaN (a 2-way score without rivals; the
    image -> fMRI retrieval of test trials that show one image), as the JSONs' null."""
    return "undefined" if np.isnan(v) else f"{v:.{digits}f}"


def check_unused(cfg, names, where: str) -> None:
    """OptionError for the first field of ``names`` that ``cfg`` sets away from its class's default
    although it has no effect in this run (``where``: when it applies), naming the flag as typed
    (``--no-x`` for a switch turned off): such a value would be ignored and still recorded in the
    output's config as if it had been used."""
    default = type(cfg)()
    for name in names:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            raise OptionError(f"--{'no-' * (value is False)}{name.replace('_', '-')} applies only {where}")


def bounds_text(metadata) -> str:
    """The range of a field's metadata for ``--help``, e.g. ``>= 1`` or ``>= 0, < 1``."""
    parts = [f"{sign} {number_text(metadata[k])}" for k, (_, sign) in BOUNDS.items() if k in metadata]
    if "max_items" in metadata:
        parts.append(f"at most {metadata['max_items']} values")
    return ", ".join(parts)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but for the empty ones (None, ""), whose help says what
    they stand for ("default OUT_DIR/...")."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``, exit code 2), no usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI options of ScriptOptions: --data, --out-dir, --seed, --device."""
    for f in fields(ScriptOptions):
        _add_field_option(parser, f)
    return parser


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser (one-line errors): the first paragraph of its docstring ``doc``,
    defaults shown in ``--help``, and the common options."""
    parser = ScriptParser(description=" ".join(doc.strip().split("\n\n")[0].split()),
                          formatter_class=DefaultsHelpFormatter)
    return add_common_args(parser)


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> argparse.ArgumentParser:
    """One option ``--field-name`` per field of the dataclass ``config_cls`` except ScriptOptions'
    ones: the field's default, ``help``, ``choices`` and (for a None default) ``type`` from its
    metadata (its bounds, which parse_config checks, appended to the help); a bool becomes
    ``--x/--no-x``, a tuple takes one or more values of its first item's type."""
    common = {f.name for f in fields(ScriptOptions)}
    for f in fields(config_cls):
        if f.name not in common:
            _add_field_option(parser, f)
    return parser


def _add_field_option(parser: argparse.ArgumentParser, f) -> None:
    """The option ``--field-name`` of one dataclass field (see add_config_args)."""
    default = f.default if f.default is not MISSING else f.default_factory()
    flag, bounds = "--" + f.name.replace("_", "-"), bounds_text(f.metadata)
    help_ = " ".join(filter(None, (f.metadata.get("help"), bounds and f"({bounds})"))) or None
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
    elif isinstance(default, tuple):
        parser.add_argument(flag, type=type(default[0]), nargs="+", default=default, help=help_)
    else:
        type_ = f.metadata.get("type", str if default is None else type(default))
        parser.add_argument(flag, type=type_, default=default, choices=f.metadata.get("choices"),
                            help=help_)


def parse_config(parser: argparse.ArgumentParser, config_cls: type, argv: list[str] | None = None):
    """Parse ``argv`` (None: the command line) into ``config_cls``; lists become tuples. A value
    outside its field's bounds (check_options) is a parser error: one line, exit code 2."""
    ns = vars(parser.parse_args(argv))
    cfg = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()})
    try:
        return check_options(cfg)
    except OptionError as e:
        parser.error(str(e))


def config_dict(cfg) -> dict:
    """A config dataclass as plain values (paths as strings), for checkpoints and JSON files."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


@contextmanager
def evaluating(*models: torch.nn.Module):
    """A block with ``models`` in eval mode and without gradients; each model's mode is restored
    after (the one way this project runs a model for scores or samples)."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def check_finite_array(values, name: str, allow_neg_inf: bool = False) -> None:
    """Raise FloatingPointError where an array (numpy or torch) to be scored holds NaN or Inf
    (-inf allowed with ``allow_neg_inf``: a score that ranks a candidate last): a diverged decoder
    must not be scored (NaN ranks first and the means skip it)."""
    values = np.asarray(values, dtype=np.float64)
    bad = int((~np.isfinite(values) & ~(allow_neg_inf & np.isneginf(values))).sum())
    if bad:
        raise FloatingPointError(f"{name} hold {bad} NaN or Inf values; not scored")


def check_finite(loss: torch.Tensor, name: str) -> torch.Tensor:
    """Return the scalar ``loss``; raise FloatingPointError on NaN or Inf instead of training on it."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{name} loss is {loss.item()}; lower the learning rate")
    return loss


def check_out_dir(out_dir: Path, flag: str = "--out-dir") -> None:
    """OptionError (naming the option ``flag``) for an ``out_dir`` that is a file or lies under
    one: each script checks it first, before it reads any data (``prepare_out_dir`` then creates
    the folder and tries a write)."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise OptionError(f"{flag} {out_dir} cannot be a folder: {existing} is a file; choose a folder")


def prepare_out_dir(out_dir: Path, flag: str = "--out-dir") -> Path:
    """Create ``out_dir`` and check it is writable before any work is done (OptionError naming
    the option ``flag``, exit code 2 in ``run_cli``, if not)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, flag)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OptionError(f"cannot write to {flag} {out_dir} ({e.strerror}); "
                          "choose a writable folder") from None
    finish_stopped_saves(out_dir)
    return out_dir


def _temp_file(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path`` (``tempfile.mkstemp``'s descriptor and name), hidden and
    named after its process, ``.<name>.<pid>.<random>.tmp``, so that a later run can tell one
    that a killed process left (``finish_stopped_saves``)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")


_JOURNAL = ".staged-outputs.{pid}.json"   # staged_outputs' list of renames, while it makes them


def _ended(pid: str) -> bool:
    """Whether no process ``pid`` (digits from a temp file's or journal's name) is running."""
    if os.name != "posix" or not pid.isdigit():
        return False                      # os.kill would end a process on Windows
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:                       # another user's process, or a pid out of range
        return False
    return False


def finish_stopped_saves(folder: Path) -> None:
    """Tidy ``folder`` after a run killed during its saves (SIGKILL: nothing of it ran to clean
    up): renames it had started (its journal, ``staged_outputs``) are completed, since
    all its outputs were written by then, and its other temp files removed, so that the folder
    holds either its outputs or the earlier ones, never a mix. Files of running processes are left
    alone. One line says what was done. Looks in ``folder`` and its subfolders (the decoders'
    sample grids), not deeper."""
    finished = removed = 0
    folders = [Path(folder), *sorted(p for p in Path(folder).iterdir() if p.is_dir())]
    for journal in (j for f in folders for j in sorted(f.glob(_JOURNAL.format(pid="*")))):
        if _ended(journal.name.split(".")[-2]):
            finished += _apply_journal(journal)
    for tmp in (t for f in folders for t in sorted(f.glob(".*.*.????????.tmp"))):   # _temp_file's
        if _ended(tmp.name.rsplit(".", 3)[-3]):
            tmp.unlink(missing_ok=True)
            removed += 1
    done = ([f"renamed the {finished} output(s) it had written into place"] if finished else []) + (
        [f"removed {removed} unfinished file(s); the earlier outputs stay"] if removed else [])
    if done:
        print(f"{folder}: a run was killed during its saves; " + "; ".join(done))


_staged: list[tuple[str | None, Path]] | None = None   # inside staged_outputs: (temp file, path)


@contextmanager
def staged_outputs():
    """A script's saves as one step: inside the block every output is written to its temp file
    (``_atomic_write``), and the renames over the earlier outputs (and the removals of
    ``remove_output``) wait for the block's end, so that a run stopped during its saves (kill,
    Ctrl-C, an error) leaves the earlier outputs as they were, not new figures beside an old
    result. The temp files of a stopped block are removed. At the end the renames are listed in a
    journal before they are made: a run killed among them (SIGKILL, where nothing cleans up) has
    them finished by the next run in that folder (``finish_stopped_saves``)."""
    global _staged
    _staged, journals, committed = [], [], False
    try:
        yield
        renames: dict[Path, list] = {}
        for tmp, path in _staged:
            renames.setdefault(path.parent, []).append([tmp and Path(tmp).name, path.name])
        for folder, entries in renames.items():
            journals.append(folder / _JOURNAL.format(pid=os.getpid()))
            _atomic_write(journals[-1], lambda f: f.write(json.dumps(entries).encode()), staged=False)
        committed = True        # from here on the outputs are this run's, whatever stops it
        for journal in journals:
            _apply_journal(journal)
    finally:
        if not committed:
            for tmp, _ in _staged:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
            for journal in journals:
                journal.unlink(missing_ok=True)
        _staged = None


def _apply_journal(journal: Path) -> int:
    """Make the renames and removals a ``staged_outputs`` journal lists (those not yet made), then
    remove it; returns how many outputs it renamed into place."""
    folder, renamed = journal.parent, 0
    for tmp, name in json.loads(journal.read_text()):
        if tmp is None:
            (folder / name).unlink(missing_ok=True)
        elif (folder / tmp).exists():
            os.replace(folder / tmp, folder / name)
            renamed += 1
    journal.unlink()
    return renamed


def remove_output(path: Path) -> None:
    """Inside ``staged_outputs``: remove an earlier output that this run does not replace, at the
    block's end."""
    _staged.append((None, Path(path)))


def _atomic_write(path: Path, write, digest: bool = False, staged: bool = True) -> str | None:
    """Write via ``write(file_object)`` to a temp file beside ``path``, then rename over it (inside
    ``staged_outputs``, unless not ``staged``: at the block's end); with ``digest``, returns the
    written bytes' sha256."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        sha256 = file_sha256(Path(tmp)) if digest else None
        if _staged is None or not staged:
            os.replace(tmp, path)
        else:
            _staged.append((tmp, path))
            tmp = None
        return sha256
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_cli(main) -> None:
    """Run a script's ``main()``; a data or checkpoint problem, a diverged training (a
    non-finite loss, ``check_finite``) or memory running out (exit code 1) or a bad option (exit
    code 2) ends it with its one-line message on stderr, before anything is written, and Ctrl-C
    with one line too (exit code 130). SIGTERM (``kill``) ends it as an exception, exit code 143,
    so that what it started is cleaned up as on an error: the benchmark's worker processes are
    terminated with it (by default they would outlive it and run their folds to the end)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        main()
    except (DataError, CheckpointError, OptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, OptionError) else 1)
    except FloatingPointError as e:
        print(f"error: training diverged: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)                                # 128 + SIGINT, as a shell reports it
    except (MemoryError, RuntimeError) as e:     # torch's CPU allocator raises a RuntimeError
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        print("error: out of memory: the settings need more memory than this machine has; "
              "choose smaller sizes (outputs left as they were)", file=sys.stderr)
        sys.exit(1)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(obj: dict, path: Path) -> str:
    """Atomically save a dict of tensors and plain Python values (loadable with weights_only);
    returns the file's sha256 (hex)."""
    return _atomic_write(path, lambda f: torch.save(obj, f), digest=True)


def one_line(err: Exception | str, limit: int = 160) -> str:
    """An exception's message (or a message) as one short line: its first line or, under a header
    that ends in ":" (as load_state_dict's "Error(s) in loading state_dict for ...:"), the first
    item listed; a line longer than ``limit`` is cut after its last whole sentence that fits."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[:end + 1] if end > 0 else line[:limit - 1] + "…"


class FromCheckpointHint:
    """Mixin of the models: ``load_state_dict`` of a state saved from a differently configured
    model fails naming the call that rebuilds it, ``<Class>.from_checkpoint(path)``."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict, assign)
        except RuntimeError as e:
            name = type(self).__name__
            raise RuntimeError(f"{one_line(e)}: that state is of a differently configured {name}; "
                               f"use {name}.from_checkpoint(path)") from None


def rerun_command(script: str, path: Path) -> str:
    """The command that writes a checkpoint ``path`` again: ``python <script>``, with ``--out-dir``
    where the checkpoint's folder is not the default one."""
    folder = Path(path).parent
    return f"python {script}" + ("" if folder.resolve() == DEFAULT_OUT.resolve() else f" --out-dir {folder}")


def load_checkpoint(path: Path, kind: str, script: str, map_location="cpu",
                    fields: dict | None = None) -> dict:
    """Load a checkpoint of this project with ``weights_only=True``.

    Raises CheckpointError naming ``script`` (the one that writes it) when the file is missing,
    corrupt, holds pickled objects, is of another kind or format version, or lacks one of
    ``fields`` ({key: type or tuple of types}, the entries its readers use) or holds it as
    another type (a damaged file); a ValueError for a CUDA ``map_location`` where there is no CUDA
    device (rather than "rerun the script")."""
    path = Path(path)
    run = rerun_command(script, path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; run `{run}` first")
    if (isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cuda"
            and not torch.cuda.is_available()):
        raise ValueError(f"map_location {str(map_location)!r}, but torch sees no CUDA device here; "
                         f"load with map_location='cpu'")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickled objects refused by weights_only, ...
        # weights_only's refusal opens with advice to load unsafely; its reason comes after it
        _, refused, reason = str(e).partition("WeightsUnpickler error:")
        why = (f"torch.load(weights_only=True) refuses it: "
               f"{one_line(reason.split('Check the documentation')[0])}" if refused else
               f"not a torch file, or a damaged one: torch.load raised {type(e).__name__} {one_line(e)}")
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({why}); "
                              f"rerun `{run}`") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("kind"), str) and ckpt["kind"] != kind:
        raise CheckpointError(f"{path} is a {ckpt['kind']} checkpoint, not a {kind} one (another script's "
                              f"output): give it to its own loader, or give this one the file "
                              f"`{run}` writes")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint; rerun `{run}`")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format version {ckpt.get('format_version')}, this code "
                              f"reads {CHECKPOINT_FORMAT}; rerun `{run}`")
    for key, types in (fields or {}).items():
        if not isinstance(ckpt.get(key), types):
            found = "lacks" if key not in ckpt else f"holds a {type(ckpt[key]).__name__} as"
            raise CheckpointError(f"{path} is damaged: it {found} its {key!r} entry; "
                                  f"rerun `{run}`")
    return ckpt


def check_same_data(ckpt: dict, data: MiyawakiData, path: Path, script: str) -> None:
    """Refuse a checkpoint fitted on other data (other voxel count, or other fMRI, images or
    labels: ``MiyawakiData.fingerprint``)."""
    if ckpt["n_voxels"] != data.n_voxels or ckpt["data_fingerprint"] != data.fingerprint:
        other = (f"({ckpt['n_voxels']} voxels), not on {data.source} ({data.n_voxels} voxels)"
                 if ckpt["n_voxels"] != data.n_voxels else
                 f"whose fMRI, images or labels differ from those of {data.source}")
        raise CheckpointError(f"{path} was trained on {ckpt['data_source']} {other}; "
                              f"rerun `{rerun_command(script, path)} --data {data.source}`")


def json_ready(obj):
    """``obj`` with numpy scalars and arrays as Python values, paths as text, and NaN / Inf as
    None (null): strict JSON has no NaN, so an undefined number (e.g. a 2-way score without a
    rival) reads as null in every JSON reader."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return str(obj) if isinstance(obj, Path) else obj


def save_json(obj: dict, path: Path) -> None:
    """Atomically write ``obj`` as strict JSON (``json_ready``)."""
    save_text(json.dumps(json_ready(obj), indent=2, allow_nan=False), path)


def write_summary(out: Path) -> Path:
    """``out/summary.md``: the headline S1 numbers of the result JSONs present in ``out`` (dual
    encoder, evaluation, decoders), each beside its chance and ridge, and the figures there.
    Every script calls it last, so after ``make run`` it covers the whole pipeline. A result (and
    the figures it lists) of another dual-encoder checkpoint (sha256) than the one in ``out`` (or,
    without one, of another checkpoint or data set than the first result present) is left out,
    and named; so are the data figures of this script (``DATASET_JSON``) when they show other data
    than the results kept."""
    out = Path(out)

    def read(name):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    names = [f"miyawaki_{n}.json" for n in ("dual_encoder", "evaluation", "generation")]
    results = dict(zip(names, map(read, names)))
    # each result names the dual encoder it comes from (sha256) and its data; the reference is the
    # checkpoint in the folder, else the first result present
    encoder = lambda r: r.get("checkpoint_sha256", r.get("encoder_sha256"))  # noqa: E731
    checkpoint = out / ENCODER_CHECKPOINT_NAME
    if checkpoint.is_file():
        reference, key = ENCODER_CHECKPOINT_NAME, encoder
        ref_key = file_sha256(checkpoint)
    else:
        reference = next((n for n, r in results.items() if r), None)
        key = lambda r: (r["data_source"], encoder(r))  # noqa: E731
        ref_key = key(results[reference]) if reference else None
    stale = [name for name, r in results.items() if r and key(r) != ref_key]
    de, ev, gen = (None if name in stale else r for name, r in results.items())
    kept, loader = next((r for r in (de, ev, gen) if r), None), read(DATASET_JSON)
    other_data = bool(kept and loader and not same_data(loader, kept))
    lines = ["# Results (S1: the file's split, fMRI only at test time)", ""]
    if any(r and r.get("noise_control") for r in (de, ev, gen)):
        lines += ["**Noise control**: this dual encoder was trained on Gaussian noise instead of fMRI "
                  "(`--noise-control`), and the evaluation's kNN and ridge and the decoders with their "
                  "anchor were fitted on the same noise, so every number here should sit at chance "
                  "(the decoders' at the mean-image floor).", ""]
    if kept:                             # every result records its data (and, but older ones, test trials)
        trials = f"; {kept['n_test']} test trials" if "n_test" in kept else ""
        lines += [f"Data: {kept['data_source']}{trials}.", ""]
    header = ["| what | value | chance | ridge |", "|---|---|---|---|"]
    lines += header
    ridge = (ev or {}).get("baselines", {}).get("ridge", {})
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    m = de or (ev or {}).get("identification")   # the same score; the evaluation's alone where it
    if m:                                       # evaluated a checkpoint kept elsewhere
        what = "dual encoder **noise control**" if (de or ev).get("noise_control") else "dual encoder"
        lines.append(f"| {what} identification top-1 ({m['n_candidates']}-way) | {fmt(m['top1'])} | "
                     f"{fmt(m['chance_top1'])} | {fmt(ridge.get('top1'))} |")
    if ev:
        c = ev["condition_accuracy"]
        flag = " (by construction: below)" if c.get("note") else ""
        lines.append(f"| condition from the fMRI-only embedding (kNN) | {fmt(c['correlation'])}{flag} | "
                     f"{fmt(c['uniform_chance'])} (majority {fmt(c['majority_rate'])}) | "
                     f"{fmt(ridge.get('condition'))} (its top-1 image's) |")
    if gen:
        for name, title in DECODER_NAMES.items():
            g = gen[name]
            lines.append(f"| {title} reconstruction PixCorr / top-1 | {fmt(g['pixcorr'])} / "
                         f"{fmt(g['top1'])} | floor {fmt(gen['mean_image_floor']['pixcorr'])} / "
                         f"{fmt(gen['chance']['top1'])} | {fmt(ridge.get('pixcorr'))} / "
                         f"{fmt(ridge.get('top1'))} |")
    if lines[-2:] == header:
        lines[-2:] = ["No results yet: run `miyawaki_dual_encoder.py`, then `miyawaki_evaluation.py` "
                      "and `miyawaki_generative_backend.py` (`make run` runs all four scripts)."]
    if m and m.get("score_parts"):        # (results written before it lack it)
        lines += ["", "The identification score is a weighted sum of three parts (their weights "
                  f"below); each part alone identifies: {score_parts_text(m['score_parts'])}."]
    if ev and ev["condition_accuracy"].get("note"):
        lines += ["", f"The condition from the embedding: {ev['condition_accuracy']['note']}."]
    if gen and gen.get("novelty_gate") and gen["novelty_gate"].get("calibrated") is False:
        lines += ["", uncalibrated_gate_note(gen["config"]["anchor_blend"], gen["config"]["output_stretch"])]
    elif gen and gen.get("novelty_gate"):
        gate = np.asarray(gen["novelty_gate"]["per_trial"]) > 0.5
        lines += ["", f"The decoders' novelty gate read {int(gate.sum())} of {len(gate)} test "
                  "trials as new images (g > 0.5: their output leans on the linear anchor; g per trial "
                  "under `novelty_gate` in `miyawaki_generation.json` and in the decoders' figures)."]
        # what g estimates, per trial
        new = np.asarray(gen["novelty_gate"].get("image_unseen_in_training", []), dtype=bool)
        if len(new) == len(gate) and not new.any():     # (JSONs written before it lack it)
            lines[-1] += " Every test image is also shown in training, so " + (
                f"all {int(gate.sum())} are false alarms." if gate.any() else "none is a false alarm.")
        elif len(new) == len(gate):
            lines[-1] += (f" {int((gate & ~new).sum())} of those show an image seen in training (false "
                          f"alarms); of the {int(new.sum())} trial{'s' * int(new.sum() != 1)} whose "
                          f"image no training trial shows, it read {int((gate & new).sum())} as new.")
    if stale:
        lines += ["", f"Left out: {', '.join(f'`{n}`' for n in stale)} and their figures, from another "
                  f"data set or dual-encoder checkpoint than `{reference}`; rerun the scripts in order "
                  "to include them."]
    if other_data:
        lines += ["", f"Left out: the data figures of `{DATASET_JSON}`, which show {loader['data_source']}, "
                  "other data than the results'; rerun `miyawaki_dataset_loader.py` on their data."]
    old_figures = {f for name in stale for f in results[name].get("figures", [])}
    old_figures |= set(loader["figures"]) if other_data else set()
    figures = sorted(p.name for p in out.glob("*.png") if p.name not in old_figures)
    if gen and any((out / "diffusion_samples").glob("step_*.png")):   # the decoders' training progress
        figures.append("diffusion_samples/step_*.png")
    lines += ["", "Figures: " + (", ".join(f"`{f}`" for f in figures) if figures else "none yet") + "."]
    path = out / "summary.md"
    save_text("\n".join(lines) + "\n", path)
    return path


def same_data(a: dict, b: dict) -> bool:
    """Whether two result JSONs come from the same data: their data fingerprints where both have
    one (a path may be written two ways), else their ``data_source`` (results of older code)."""
    if a.get("data_fingerprint") and b.get("data_fingerprint"):
        return a["data_fingerprint"] == b["data_fingerprint"]
    return a["data_source"] == b["data_source"]


def save_text(text: str, path: Path) -> None:
    """Atomically write a text file (UTF-8)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(fig: Figure, path: Path, data_source: str) -> None:
    """Atomically save a Figure (dpi 150, tight; format from the suffix), stamped under its lower
    right corner with the data it shows (``MiyawakiData.source``; a built-in simulated set in red),
    so that a figure copied out of its folder still says which data it shows. Figures are built
    with ``matplotlib.figure.Figure``, not pyplot, so no GUI backend or global figure state is
    involved and nothing needs closing."""
    path = Path(path)
    simulated = data_source in SIMULATED
    drawn, (width, height) = fig.get_tightbbox(), fig.get_size_inches()   # inches
    fig.text(drawn.x1 / width, drawn.y0 / height, f"data: {data_source}"
             + (" (the built-in simulated set, not fMRI)" if simulated else ""),
             ha="right", va="top", fontsize=6, color="firebrick" if simulated else "0.4")
    _atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=150,
                                              bbox_inches="tight"))


# --------------------------------------------------------------------------- figures
def panel_title(ax, text: str, **kwargs) -> None:
    """Title an image panel (an Axes with no ticks on top) at its top edge, y = 1, which is where
    matplotlib's automatic placement puts it; a fixed y skips that placement's cost at every draw,
    about 7 ms a panel (a third of saving a grid of images). ``kwargs`` go to ``set_title``."""
    ax.set_title(text, y=1.0, **kwargs)


def shown_images(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Which of K images (conditions ``labels`` ``K``) a figure of at most ``max_images`` shows:
    all of them, or the first image of each condition in turn, then the second, ..., so that
    every condition is shown (a random-image session's 20 figures beside 20 of its patterns, a
    digits file's ten digits) -> their indices, ascending."""
    labels = np.asarray(labels)
    if len(labels) <= max_images:
        return np.arange(len(labels))
    turn = np.zeros(len(labels), int)       # the place of each image among its condition's
    for c in np.unique(labels):
        turn[labels == c] = np.arange((labels == c).sum())
    return np.sort(np.lexsort((labels, turn))[:max_images])


def plot_unique_images(images: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                       max_images: int = 40) -> Figure:
    """The K unique stimuli (``K x 1 x 28 x 28``; when there are more than ``max_images``, that
    many spread over the conditions, ``shown_images``), titled by condition and trial count."""
    shown = shown_images(labels, max_images)
    cols = 5
    rows = int(np.ceil(len(shown) / cols))
    fig = Figure(figsize=(2.0 * cols, 2.2 * rows))
    for pos, k in enumerate(shown):
        img = images[k]
        ax = fig.add_subplot(rows, cols, pos + 1)
        ax.imshow(img[0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        trials = "1 trial" if counts[k] == 1 else f"{counts[k]} trials"
        panel_title(ax, f"#{k} {condition_name(labels[k], labels)}\n{trials}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Unique stimuli (upright)" + (f", {len(shown)} of {len(images)}, each condition's "
                                               "first" if len(shown) < len(images) else ""))
    return fig


def plot_fmri_correlation(fmri: np.ndarray, image_ids: np.ndarray, labels: np.ndarray,
                          max_images: int = 40, which: str = "trials") -> Figure:
    """Pearson correlation between the mean fMRI patterns of the K images, which are ordered by
    condition (``labels`` ``K``; when there are more than ``max_images``, that many spread over
    the conditions, ``shown_images``, as in ``plot_unique_images``), from fMRI ``N x V`` z-scored
    per voxel over its N trials (raw voxel baselines would make every pair of patterns correlate).
    The diagonal, 1 by construction, shows each image's split-half reliability instead: the
    correlation r of the mean patterns of its odd and even trials, Spearman-Brown corrected
    (2r / (1 + r), for r > 0) to the mean of all its trials, which the other cells correlate (grey
    for an image shown once). ``which`` names the trials in the title."""
    fmri = standardize(fmri, *voxel_stats(fmri))
    shown = shown_images(labels, max_images)
    means = np.stack([fmri[image_ids == k].mean(0) for k in shown])
    corr = pearson_matrix(means, means)
    for i, k in enumerate(shown):
        odd, even = fmri[image_ids == k][::2], fmri[image_ids == k][1::2]
        r = (pearson_rows(odd.mean(0, keepdims=True), even.mean(0, keepdims=True))[0] if len(even)
             else np.nan)
        corr[i, i] = 2 * r / (1 + r) if r > 0 else r    # the correction is for r > 0 only
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    im = ax.imshow(corr, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ticks = [f"#{k} {condition_name(labels[k], labels)}" for k in shown]
    ax.set_xticks(range(len(shown)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), ticks, fontsize=7)
    for b in np.where(np.diff(labels[shown]) != 0)[0]:
        ax.axhline(b + 0.5, color="k", lw=0.8)
        ax.axvline(b + 0.5, color="k", lw=0.8)
    fig.colorbar(im, ax=ax, label="Pearson r (diagonal: split-half reliability)")
    fig.suptitle("Mean fMRI pattern correlation between images"
                 + (f", {len(shown)} of {len(labels)} images, each condition's first"
                    if len(shown) < len(labels) else "")
                 + f"\n({len(fmri)} {which}, each voxel z-scored over them;"
                 "\ndiagonal: split-half reliability, odd vs even trials, Spearman-Brown corrected;"
                 "\nlines separate the conditions"
                 + ("; grey: an image shown once" if np.isnan(np.diag(corr)).any() else "") + ")",
                 fontsize=10)
    fig.subplots_adjust(top=0.83)     # room for the four title lines above the matrix
    return fig


def summary(data: MiyawakiData) -> str:
    """A few lines describing the data set."""
    t = data.trials
    counts = np.bincount(t.image_ids, minlength=len(data.unique_images))
    cond = ", ".join(f"{condition_name(c, data.unique_labels)}: {int((t.labels == c).sum())}"
                     for c in np.unique(t.labels))
    return (f"source: {data.source}\n"
            f"trials: {len(t)} ({data.n_file_train} train / {len(t) - data.n_file_train} test in its own split, S1)\n"
            f"voxels: {data.n_voxels}\n"
            f"unique images: {len(data.unique_images)} (trials per image {counts.min()}-{counts.max()})\n"
            f"trials per condition: {cond}")


# --------------------------------------------------------------------------- script
@dataclass
class LoaderConfig(ScriptOptions):
    """Settings of this script; one command-line option per field (add_config_args)."""

    download: bool = field(default=False, metadata={
        "help": "fetch the public preprocessed file (sha256-checked) into --data or data/"})
    url: str = field(default=DATA_URL, metadata={"help": "download address"})


def main(argv: list[str] | LoaderConfig | None = None) -> dict:
    """Print the data summary and save the two data figures, and beside them ``DATASET_JSON``
    (which data they show, the summary numbers and this run's settings); returns that record."""
    cfg = check_options(argv) if isinstance(argv, LoaderConfig) else parse_args(argv)
    resolve_device(cfg.device)    # no model runs here, but --device is checked as by the other scripts
    check_out_dir(cfg.out_dir)
    check_unused(cfg, ("seed",), "to the scripts that train or sample (the loader draws nothing at random)")
    if not cfg.download:
        check_unused(cfg, ("url",), "with --download")
    if cfg.download:
        if urllib.parse.urlsplit(cfg.url).scheme not in ("http", "https"):
            raise OptionError(f"--url {cfg.url!r} is not an http(s) address")
        if str(cfg.data) in SIMULATED:
            raise OptionError(f"--download fetches the real file, and --data {cfg.data} names a "
                              "built-in simulated set; give --data the file's path, or leave it out")
        path = download(cfg.url, Path(cfg.data) if cfg.data else DEFAULT_DATA)
        print(f"saved {path} (sha256 verified)")
    data = resolve_data(cfg.data)
    print(summary(data))
    out = prepare_out_dir(cfg.out_dir)
    t = data.trials
    counts = np.bincount(t.image_ids, minlength=len(data.unique_images))
    figures = ["miyawaki_samples_analysis.png", "miyawaki_fmri_correlation.png"]
    result = {"data_source": data.source, "data_fingerprint": data.fingerprint, "n_trials": len(t),
              "n_file_train": data.n_file_train, "n_voxels": data.n_voxels,
              "n_unique": len(data.unique_images), "figures": figures, "config": config_dict(cfg)}
    with staged_outputs():
        save_figure(plot_unique_images(data.unique_images, data.unique_labels, counts), out / figures[0],
                    data.source)
        save_figure(plot_fmri_correlation(t.fmri, t.image_ids, data.unique_labels,
                                          which="trials, all of them: training and test"), out / figures[1],
                    data.source)
        save_json(result, out / DATASET_JSON)
    print(f"figures: {', '.join(str(out / f) for f in figures)}; saved {out / DATASET_JSON}")
    write_summary(out)
    return result


def parse_args(argv=None) -> LoaderConfig:
    """Command line (None: sys.argv) -> LoaderConfig; one option per field."""
    return parse_config(add_config_args(script_parser(__doc__), LoaderConfig), LoaderConfig, argv)


if __name__ == "__main__":
    run_cli(main)
