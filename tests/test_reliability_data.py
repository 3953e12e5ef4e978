"""The simulated data set (structure, determinism, decodability), the S1-S3 splits and the
train-only z-scoring of folds."""

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

import miyawaki_dataset_loader as L


def test_simulated_structure_matches_real_file(sim):
    t = sim.trials
    assert (len(t), sim.n_file_train, sim.n_voxels, len(sim.unique_images)) == (119, 107, 967, 20)
    # trials per condition and per image as in the real file
    assert {c: int((t.labels == c).sum()) for c in (2, 3, 4, 5)} == {2: 40, 3: 19, 4: 20, 5: 40}
    counts = np.bincount(t.image_ids, minlength=20)
    assert counts.min() == 3 and counts.max() == 8
    assert set(t.image_ids[107:]) <= set(t.image_ids[:107])
    # the 20 distinct drawn figures, upright (the file's column-major rows read back correctly)
    grids, _ = L.figure_images()
    drawn = sorted(img.tobytes() for img in L.upsample_grid(grids).astype(np.float32))
    assert sorted(img[0].tobytes() for img in sim.unique_images) == drawn
    assert len(set(drawn)) == 20
    np.testing.assert_array_equal(sim.unique_images[t.image_ids], t.images)
    np.testing.assert_array_equal(sim.unique_labels[t.image_ids], t.labels)


def test_random_image_session_is_miyawakis_protocol():
    """--data simulated-random: random patterns, each shown once, in Miyawaki's condition 1
    ("random"), as the training split; the 20 figures, each once, as the test split."""
    data = L.make_simulated_dataset(random_images=30)
    t, n = data.trials, data.n_file_train
    assert (n, len(t), len(data.unique_images)) == (30, 50, 50)
    assert set(t.labels[:n]) == {1} and L.condition_name(1, data.unique_labels) == "random"
    assert set(t.labels[n:]) == {2, 3, 4, 5} and np.bincount(t.image_ids).max() == 1


def test_simulated_is_deterministic_per_seed(sim):
    again, other = L.make_simulated_dataset(seed=0), L.make_simulated_dataset(seed=1)
    for a, b in zip(dataclasses.astuple(sim.trials), dataclasses.astuple(again.trials)):
        np.testing.assert_array_equal(a, b)
    assert other.trials.fmri.shape == sim.trials.fmri.shape
    assert not np.allclose(other.trials.fmri, sim.trials.fmri)


@pytest.mark.parametrize("shuffle", [False, True], ids=["decoder", "shuffled-control"])
def test_ridge_decoder_identifies_simulated_images(sim, shuffle):
    """fMRI -> pixels ridge regression on two S2 folds; rank the 20 images by Pearson r.
    Chance is 0.05; training pairs shuffled must stay near it."""
    rng = np.random.default_rng(0)
    candidates = sim.unique_images.reshape(20, -1)
    for name, tr, te in L.splits("s2", sim)[:2]:
        fold = sim.fold(tr, te, name)
        x, y = fold.train.fmri, fold.train.images.reshape(len(tr), -1)
        if shuffle:
            y = y[rng.permutation(len(y))]
        pred = RidgeCV(alphas=np.logspace(-1, 3, 5)).fit(x, y).predict(fold.test.fmri)
        r = np.corrcoef(pred, candidates)[: len(te), len(te):]
        top1 = np.mean(r.argmax(1) == fold.test.image_ids)
        assert top1 <= 0.25 if shuffle else top1 >= 0.5, f"{name}: top-1 {top1:.2f}"


# --------------------------------------------------------------------------- splits
def test_s1_is_the_file_split(sim):
    [(name, tr, te)] = L.splits("s1", sim)
    np.testing.assert_array_equal(tr, np.arange(107))
    np.testing.assert_array_equal(te, np.arange(107, 119))
    fold = sim.s1()
    assert (len(fold.train), len(fold.test)) == (107, 12)


def test_s2_tests_each_trial_once_per_seed(sim):
    folds = L.splits("s2", sim)
    assert len(folds) == 15
    for seed in range(3):
        tests = [te for _, _, te in folds[5 * seed: 5 * seed + 5]]
        np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(119))
    for _, tr, te in folds:
        assert not set(tr) & set(te) and len(tr) + len(te) == 119
    assert not np.array_equal(folds[0][2], folds[5][2])  # the seeds give different splits


def test_s2_folds_are_stratified_by_image(sim):
    """Each S2 fold tests every image in proportion to its trials (stratified: each image's trials
    spread over the 5 folds of a seed within one of each other), so every image of a fold's test
    trials that is shown 5 times or more is also in its training trials."""
    ids = sim.trials.image_ids
    counts = np.bincount(ids)
    for _, tr, te in L.splits("s2", sim):
        per_fold = np.bincount(ids[te], minlength=len(counts))
        assert np.all(per_fold >= counts // 5) and np.all(per_fold <= -(-counts // 5))
        assert np.isin(ids[te][counts[ids[te]] >= 5], ids[tr]).all()


def test_s3_holds_out_each_image_entirely(sim):
    folds = L.splits("s3", sim)
    assert len(folds) == 20
    ids = sim.trials.image_ids
    for k, (_, tr, te) in enumerate(folds):
        np.testing.assert_array_equal(te, np.where(ids == k)[0])
        assert k not in ids[tr] and len(tr) + len(te) == 119


# --------------------------------------------------------------------------- fold z-scoring
def _with_fmri(data, fmri):
    t = data.trials
    return dataclasses.replace(data, trials=L.Trials(fmri, t.images, t.labels, t.image_ids))


def test_fold_statistics_come_from_training_rows_only(sim):
    _, tr, te = L.splits("s2", sim)[0]
    fold = sim.fold(tr, te)
    np.testing.assert_allclose(fold.fmri_mean, sim.trials.fmri[tr].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fold.train.fmri.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(fold.train.fmri.std(0), 1, atol=1e-4)
    fmri = sim.trials.fmri.copy()
    fmri[te] += 100.0
    changed = _with_fmri(sim, fmri).fold(tr, te)
    np.testing.assert_array_equal(changed.fmri_mean, fold.fmri_mean)
    np.testing.assert_array_equal(changed.fmri_std, fold.fmri_std)
    np.testing.assert_array_equal(changed.train.fmri, fold.train.fmri)
    # the test rows z-scored with the training statistics: the shift shows, 100 / SD per voxel
    np.testing.assert_allclose(fold.test.fmri, (sim.trials.fmri[te] - fold.fmri_mean) / fold.fmri_std,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(changed.test.fmri - fold.test.fmri,
                               np.broadcast_to(100.0 / fold.fmri_std, fold.test.fmri.shape), rtol=1e-3)


def test_constant_voxel_gets_unit_std(sim):
    fmri = sim.trials.fmri.copy()
    fmri[:, 0] = 5.0
    fold = _with_fmri(sim, fmri).s1()
    assert fold.fmri_std[0] == 1.0
    assert np.all(fold.train.fmri[:, 0] == 0) and np.all(np.isfinite(fold.test.fmri))
