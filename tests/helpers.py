"""Plain helpers the tests import (fixtures live in conftest.py): the file layout of a data set
and seeded unit vectors."""

import numpy as np
import torch

import miyawaki_dataset_loader as L


def file_arrays(data: L.MiyawakiData) -> dict:
    """The six docs/PROTOCOL.md keys of a data set in the file's layout: fmri ``N x V``, stim ``N x 784``
    (MATLAB column-major rows), labels ``N x 1``; the file's split at ``data.n_file_train``."""
    t, n = data.trials, data.n_file_train
    stim = t.images[:, 0].transpose(0, 2, 1).reshape(len(t), -1).astype(np.float64)
    fmri, labels = t.fmri.astype(np.float64), t.labels[:, None].astype(np.uint16)
    return {"fmriTrn": fmri[:n], "stimTrn": stim[:n], "labelTrn": labels[:n],
            "fmriTest": fmri[n:], "stimTest": stim[n:], "labelTest": labels[n:]}


def unit(n, d=16, seed=0):
    """``n x d`` random unit vectors (torch), seeded."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


# the decoders' anchor set-up at a test's size: an image prior of 256 samples and 3 out-of-fold
# anchors, not 4096 and 10 (about 5 s less per generative run), for tests of what a run writes and
# prints rather than of its numbers
SMALL_ANCHOR_ARGS = ["--prior-size", "256", "--anchor-folds", "3"]
