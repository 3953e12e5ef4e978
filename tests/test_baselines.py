"""Classic baselines on small synthetic arrays, plus ridge on the real file's S1 ($MIYAWAKI_DATA)."""

import numpy as np
import pytest

import miyawaki_dataset_loader as L
import miyawaki_evaluation as E


def grid_images(rng, n):
    """n random binary 10 x 10 grids upsampled like the data -> (n x 1 x 28 x 28, n x 100)."""
    grids = (rng.random((n, 10, 10)) < 0.4).astype(float)
    up = np.repeat(np.repeat(grids, 3, axis=1), 3, axis=2)[:, 1:29, 1:29]
    return up[:, None], grids.reshape(n, 100)


def correlated_fmri(sims, v=40, seed=0):
    """A test pattern t (v) and train patterns (len(sims) x v) with corr(t, train_j) = sims[j]."""
    rng = np.random.default_rng(seed)
    t, u = rng.normal(size=(2, v))
    t -= t.mean()
    u -= u.mean()
    u -= (u @ t) / (t @ t) * t
    t, u = t / np.linalg.norm(t), u / np.linalg.norm(u)
    sims = np.asarray(sims)
    return t[None], sims[:, None] * t + np.sqrt(1 - sims ** 2)[:, None] * u


def test_all_baselines_predict_n_by_784():
    rng = np.random.default_rng(0)
    images, _ = grid_images(rng, 30)
    fmri = rng.normal(size=(30, 50))
    ids, labels = np.arange(30) % 6, 2 + np.arange(30) % 4
    for model in (E.MeanImageBaseline(), E.RidgeBaseline(), E.MultiscaleLocalDecoder(),
                  E.MultiscaleLocalDecoder(only_1x1=True)):
        assert model.fit(fmri[:25], images[:25]).predict(fmri[25:]).shape == (5, 784)
    knn = E.KNNBaseline(k=5).fit(fmri[:25], images[:25], ids[:25], labels[:25])
    assert knn.predict(fmri[25:]).shape == (5, 784)
    assert knn.candidate_scores(fmri[25:], 6).shape == (5, 6)
    assert knn.predict_labels(fmri[25:]).shape == (5,)
    np.testing.assert_allclose(E.MeanImageBaseline().fit(fmri, images).predict(fmri[:2]),
                               np.tile(images.reshape(30, -1).mean(0), (2, 1)))


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20))
    y = x @ rng.normal(size=(20, 784)) + 0.5
    model = E.RidgeBaseline().fit(x[:250], y[:250])
    assert model.alpha_ == E.RIDGE_ALPHAS[0]
    np.testing.assert_allclose(model.predict(x[250:]), y[250:], atol=0.05)


def test_grid_layout_and_basis_counts():
    rng = np.random.default_rng(2)
    images, grids = grid_images(rng, 3)
    np.testing.assert_array_equal(grids[:, E.grid_cell_of_pixel()], images.reshape(3, 784))
    sizes = E.multiscale_bases().sum(axis=1)
    assert len(sizes) == 361 and list(np.bincount(sizes.astype(int))[[1, 2, 4]]) == [100, 180, 81]
    assert E.MultiscaleLocalDecoder().n_bases == 361
    assert E.MultiscaleLocalDecoder(only_1x1=True).n_bases == 100
    # 1x1 contrasts are the grid cells; a 2x2 contrast is the mean of its four cells
    contrast = E.MultiscaleLocalDecoder().contrast_
    np.testing.assert_allclose(images.reshape(3, 784) @ contrast[:100].T, grids)
    np.testing.assert_allclose(images.reshape(3, 784) @ contrast[-1], grids[:, [88, 89, 98, 99]].mean(1))


def test_local_decoder_decodes_a_linear_grid_code_and_keeps_constant_bases():
    rng = np.random.default_rng(3)
    images, grids = grid_images(rng, 180)
    grids[:, 0] = 1.0  # cell 0 (pixels [0:2, 0:2]) always on: its 1x1 basis is constant
    images[:, 0, :2, :2] = 1.0
    # more voxels than training trials: RidgeCV's fast eigen mode
    fmri = grids @ rng.normal(size=(100, 200)) + 0.01 * rng.normal(size=(180, 200))
    recon = E.MultiscaleLocalDecoder(only_1x1=True).fit(fmri[:150], images[:150]).predict(fmri[150:])
    np.testing.assert_allclose(recon, images[150:].reshape(30, 784), atol=0.15)
    np.testing.assert_allclose(recon.reshape(30, 28, 28)[:, :2, :2], 1.0, atol=1e-12)
    multi = E.MultiscaleLocalDecoder().fit(fmri[:150], images[:150]).predict(fmri[150:])
    assert L.pearson_rows(multi, images[150:].reshape(30, 784)).mean() > 0.8


def brute_knn_order(sim, train_ids, k, n_images):
    """Candidate images best first: votes among the k nearest, then best similarity; absent last."""
    nn = np.argsort(-sim)[:k]
    present = sorted(set(train_ids))
    key = {c: (sum(train_ids[nn] == c), max(sim[train_ids == c])) for c in present}
    return sorted(present, key=lambda c: key[c], reverse=True) + \
        [c for c in range(n_images) if c not in present]


@pytest.mark.parametrize("k", [1, 5])
def test_knn_ranking_matches_brute_force(k):
    rng = np.random.default_rng(4)
    fmri, images = rng.normal(size=(40, 30)), rng.random((40, 784))
    ids = rng.integers(0, 7, 40)
    ids[ids == 6] = 5  # image 6 absent from training
    knn = E.KNNBaseline(k).fit(fmri[:30], images[:30], ids[:30], np.zeros(30, int))
    ranks = L.identification_ranks(knn.candidate_scores(fmri[30:], 7), np.zeros(10, int))
    sim = L.pearson_matrix(fmri[30:], fmri[:30])
    for i in range(10):
        order = brute_knn_order(sim[i], ids[:30], k, 7)
        assert ranks[i] == order.index(0) + 1
        assert order[-1] == 6
    assert np.all(L.identification_ranks(knn.candidate_scores(fmri[30:], 7), np.full(10, 6)) == 7)


def test_knn_votes_beat_similarity_and_label_ties_go_to_the_closest():
    # neighbours by similarity: trial 0 (image 2), then trials 1-4 (images 0,0,1,1)
    test, train = correlated_fmri([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    images = np.eye(6, 784)
    ids, labels = np.array([2, 0, 0, 1, 1, 3]), np.array([3, 2, 2, 3, 5, 4])
    knn5 = E.KNNBaseline(5).fit(train, images, ids, labels)
    scores = knn5.candidate_scores(test, 5)[0]
    # votes 2, 2, 1, 0 for images 0, 1, 2, 3; image 0 has the closer trial; image 4 absent
    assert list(np.argsort(-scores, kind="stable")) == [0, 1, 2, 3, 4] and scores[4] == -np.inf
    assert knn5.predict_labels(test)[0] == 3  # labels 3,2,2,3,5: tie 2 vs 3, trial 0 is closest
    np.testing.assert_allclose(knn5.predict(test)[0], images[:5].mean(0))
    knn1 = E.KNNBaseline(1).fit(train, images, ids, labels)
    assert np.argmax(knn1.candidate_scores(test, 5)[0]) == 2 and knn1.predict_labels(test)[0] == 3


def test_snap_to_templates_picks_the_best_correlated_candidate():
    rng = np.random.default_rng(5)
    templates = rng.random((4, 784))
    recon = templates[[2, 0]] + 0.1 * rng.normal(size=(2, 784))
    np.testing.assert_array_equal(E.snap_to_templates(recon, templates), templates[[2, 0]])


def test_template_snap_keeps_ridge_s_ranking_and_condition(sim):
    """Snapping ridge's reconstruction to its best-correlated candidate changes the picture, not
    the identification: on simulated S2 folds the snapped row ranks and names the condition as
    ridge does (docs/BASELINES.md), where ranking the snapped image itself would not."""
    for _, tr, te in L.splits("s2", sim)[:3]:
        base, _ = E.evaluate_baselines(sim.fold(tr, te))
        for metric in ("rank", "top1", "top5", "condition"):
            np.testing.assert_array_equal(base["ridge_snap"][metric], base["ridge"][metric], metric)


def test_ridge_reproduces_baselines_md_on_real_s1(real):
    fold = real.s1()
    recon = E.RidgeBaseline().fit(fold.train.fmri, fold.train.images).predict(fold.test.fmri)
    m = L.reconstruction_metrics(recon, fold.test.images, fold.test.image_ids, fold.unique_images)
    assert m["top1"] >= 0.95
    assert m["pixcorr"] == pytest.approx(0.940, abs=0.02)


# docs/BASELINES.md S1 headline means: top1, top5, two_way, mse, pixcorr, ssim, condition
S1_REFERENCE = {
    "mean_image": (0.000, 0.333, 0.506, 0.1229, 0.684, 0.356, 0.250),
    "ridge": (1.000, 1.000, 1.000, 0.0248, 0.940, 0.818, 1.000),
    "ridge_snap": (1.000, 1.000, 1.000, 0.0000, 1.000, 1.000, 1.000),
    "multiscale_local": (0.833, 1.000, 0.985, 0.0504, 0.898, 0.630, 1.000),
    "knn1": (0.333, 0.917, 0.875, 0.0651, 0.835, 0.797, 0.833),
    "knn5": (0.250, 0.917, 0.923, 0.0336, 0.913, 0.817, 0.917),
}


def test_evaluate_baselines_reproduces_the_s1_table(real):
    results, seconds = E.evaluate_baselines(real.s1())
    assert set(results) == set(S1_REFERENCE) == set(E.BASELINES) == set(seconds)
    for name, ref in S1_REFERENCE.items():
        got = L.fold_means(results[name])
        for metric, want in zip(L.METRICS, ref):
            assert got[metric] == pytest.approx(want, abs=6e-5 if metric == "mse" else 6e-4), \
                (name, metric)


def test_ridge_reproduces_the_s3_zero_shot_numbers(real):
    pool = (real.trials.images, real.trials.image_ids)
    top1, pixcorr = [], []
    for name, tr, te in L.splits("s3", real):
        fold = real.fold(tr, te, name)
        recon = E.RidgeBaseline().fit(fold.train.fmri, fold.train.images).predict(fold.test.fmri)
        m = L.score_reconstructions(recon, fold, pool)
        top1.append(m["top1"].mean())
        pixcorr.append(m["pixcorr"].mean())
    assert np.mean(top1) == pytest.approx(0.515, abs=0.0006)   # mean over the 20 LOSO folds
    assert np.mean(pixcorr) == pytest.approx(0.863, abs=0.0006)
