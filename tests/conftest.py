"""Shared fixtures: the simulated data set, the real file ($MIYAWAKI_DATA, else data/), a writer of
.mat files with the docs/PROTOCOL.md schema for the bad-input tests (plain helpers: helpers.py)."""

import os
import sys
from pathlib import Path

# The tests' models and matrices are small: one thread is as fast on idle cores, and on a machine
# shared with another job it is many times faster (a busy core stalls every step of a 2-thread
# pool). `make test` runs one pytest process per core (pytest-xdist) to use the other cores. Set
# before numpy and torch load, so their BLAS and OpenMP pools and the scripts and benchmark
# workers the tests start get one thread too (docs/TESTS.md: 318 s -> 208 s).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import scipy.io  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, whatever the cwd

import miyawaki_dataset_loader as L  # noqa: E402
from helpers import file_arrays  # noqa: E402

torch.set_num_threads(1)  # where OMP_NUM_THREADS was set to more by the caller


@pytest.fixture(scope="session")
def sim() -> L.MiyawakiData:
    return L.make_simulated_dataset()


def _find_real_data() -> tuple[Path | None, str]:
    """The real file ($MIYAWAKI_DATA, else the scripts' default data/miyawaki_structured_28x28.mat)
    and one line saying which file the real-data tests use, or why they skip."""
    value = os.environ.get("MIYAWAKI_DATA")
    path = Path(value) if value else L.DEFAULT_DATA
    if path.is_file():
        return path, f"real-data tests: {path}"
    why = (f"MIYAWAKI_DATA={value} is not a file" if value else
           f"no {L.DEFAULT_DATA.relative_to(L.REPO_DIR)} and MIYAWAKI_DATA is not set")
    return None, f"real-data tests skipped: {why} (`python miyawaki_dataset_loader.py --download`)"


REAL_PATH, REAL_STATUS = _find_real_data()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(REAL_STATUS)


@pytest.fixture(scope="session")
def real_path() -> Path:
    """The real file; tests using it skip (saying why) without it."""
    if REAL_PATH is None:
        pytest.skip(REAL_STATUS)
    return REAL_PATH


@pytest.fixture(scope="session")
def real(real_path) -> L.MiyawakiData:
    return L.load_miyawaki(real_path)


@pytest.fixture
def mat_arrays(sim) -> dict:
    """A fresh, editable copy of the simulated set's arrays in the file's layout."""
    return {k: v.copy() for k, v in file_arrays(sim).items()}


def _write_mat(path: Path, arrays: dict) -> Path:
    """Save ``arrays`` (keys as in docs/PROTOCOL.md) as a MATLAB v5 file at ``path``."""
    scipy.io.savemat(path, arrays)
    return Path(path)


@pytest.fixture
def write_mat():
    """``write_mat(path, arrays) -> path``: write a .mat file with the docs/PROTOCOL.md schema."""
    return _write_mat
