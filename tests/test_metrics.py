"""Protocol metrics against brute-force loops and hand-made cases."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

import miyawaki_dataset_loader as L


def brute_pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def random_images(rng, n, k=20):
    """n trial images drawn from k binary templates -> (images n x 784, ids n, templates k x 784)."""
    templates = (rng.random((k, 784)) < 0.3).astype(float)
    ids = rng.integers(0, k, n)
    return templates[ids], ids, templates


def test_pearson_matrix_matches_loop_and_constant_rows_give_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(7, 30))
    a[2], b[4] = 3.0, 0.1  # constant rows (0.1 leaves rounding residue when centred)
    got = L.pearson_matrix(a, b)
    want = np.array([[brute_pearson(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.all(got[2] == 0) and np.all(got[:, 4] == 0)
    np.testing.assert_allclose(L.pearson_rows(a, b[:5]), np.diag(want[:, :5]), atol=1e-12)


def test_identification_ranks_match_loop_and_ties_are_pessimistic():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(50, 6)).astype(float)  # many ties
    ids = rng.integers(0, 6, 50)
    want = [sum(s >= row[t] for s in row) for row, t in zip(scores, ids)]
    np.testing.assert_array_equal(L.identification_ranks(scores, ids), want)
    np.testing.assert_array_equal(L.identification_ranks([[0.9, 0.1, 0.5], [0.0, 0.0, 0.0]], [0, 1]),
                                  [1, 3])


def test_a_diverged_reconstruction_is_refused_not_scored():
    """A NaN or Inf reconstruction (a diverged decoder or sampler) raises instead of being scored:
    NaN compares false with every candidate, so it ranked first (a top-1 hit), and the fold means
    skip NaN; a NaN identification score is refused too, while -inf (never this candidate) ranks
    it last."""
    images, ids, templates = random_images(np.random.default_rng(2), 6)
    recon = images.copy()
    for bad in (np.nan, np.inf):
        recon[3, 10] = bad
        with pytest.raises(FloatingPointError, match="reconstructions hold 1 NaN or Inf"):
            L.reconstruction_metrics(recon, images, ids, templates)
    scores = L.identification_scores(images, templates)
    scores[0, 5] = np.nan
    with pytest.raises(FloatingPointError, match="identification scores hold 1 NaN"):
        L.identification_ranks(scores, ids)
    np.testing.assert_array_equal(L.identification_ranks([[0.2, -np.inf, 0.1]], [1]), [3])


def test_topk_and_mean_rank():
    ranks = np.array([1, 2, 5, 6, 20])
    assert L.topk_accuracy(ranks, 1) == 0.2 and L.topk_accuracy(ranks, 5) == 0.6
    assert L.mean_rank(ranks) == 6.8


def brute_two_way(recon, true, ids, pool_true, pool_ids):
    out = []
    for r, t, i in zip(recon, true, ids):
        own = brute_pearson(np.clip(r, 0, 1), t)
        rivals = [brute_pearson(np.clip(r, 0, 1), pt) for pt, pi in zip(pool_true, pool_ids) if pi != i]
        out.append(np.mean([1.0 if own > c else 0.5 if abs(own - c) < 1e-9 else 0.0
                            for c in rivals]) if rivals else np.nan)
    return np.array(out)


def test_two_way_matches_loop_for_fold_and_external_pool():
    rng = np.random.default_rng(2)
    true, ids, templates = random_images(rng, 12, k=5)
    recon = true + rng.normal(scale=2.0, size=true.shape)
    np.testing.assert_allclose(L.two_way_identification(recon, true, ids),
                               brute_two_way(recon, true, ids, true, ids))
    pool, pool_ids = templates[[0, 1, 1, 2, 3, 4, 4]], np.array([0, 1, 1, 2, 3, 4, 4])
    np.testing.assert_allclose(L.two_way_identification(recon, true, ids, pool, pool_ids),
                               brute_two_way(recon, true, ids, pool, pool_ids))


def test_two_way_hand_cases():
    true = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    ids = np.array([0, 1, 2])
    # perfect reconstructions win everything; a constant one ties everything (0.5)
    np.testing.assert_array_equal(L.two_way_identification(true, true, ids), [1, 1, 1])
    recon = np.vstack([true[:2], np.full(4, 0.3)])
    np.testing.assert_array_equal(L.two_way_identification(recon, true, ids), [1, 1, 0.5])
    # same-image trials are not rivals; a trial with no rival gives nan
    got = L.two_way_identification(true[:2], true[:2], np.array([0, 0]))
    assert np.all(np.isnan(got))


def test_reconstruction_metrics_match_loops_and_clip():
    rng = np.random.default_rng(3)
    true, ids, templates = random_images(rng, 10)
    recon = true + rng.normal(scale=0.4, size=true.shape)   # leaves [0, 1]: clipped first
    got = L.reconstruction_metrics(recon.reshape(10, 1, 28, 28), true.reshape(10, 1, 28, 28),
                                   ids, templates)
    c = np.clip(recon, 0, 1)
    ranks = [sum(brute_pearson(r, t) >= brute_pearson(r, templates[i]) for t in templates)
             for r, i in zip(c, ids)]
    want = {
        "mse": np.mean([np.mean((r - t) ** 2) for r, t in zip(c, true)]),
        "pixcorr": np.mean([brute_pearson(r, t) for r, t in zip(c, true)]),
        "ssim": np.mean([structural_similarity(r.reshape(28, 28), t.reshape(28, 28), data_range=1.0)
                         for r, t in zip(c, true)]),
        "two_way": np.mean(brute_two_way(c, true, ids, true, ids)),
        "top1": np.mean(np.array(ranks) <= 1), "top5": np.mean(np.array(ranks) <= 5),
        "mean_rank": np.mean(ranks),
    }
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-10), k


def test_reconstruction_metrics_scores_override_ranking():
    rng = np.random.default_rng(4)
    true, ids, templates = random_images(rng, 4, k=3)
    scores = np.zeros((4, 3))
    scores[np.arange(4), (ids + 1) % 3] = 1.0  # always ranks a wrong candidate first
    got = L.reconstruction_metrics(true, true, ids, templates, scores=scores)
    assert got["pixcorr"] == pytest.approx(1.0) and got["top1"] == 0.0


def test_nearest_training_check_scores_the_clipped_reconstruction(sim):
    """docs/PROTOCOL.md's nearest-training-image check reads a reconstruction clipped to [0, 1], as
    every protocol metric does: out-of-range spikes on the background of the never-seen image
    itself change nothing (it is closer to itself than to any training image)."""
    name, tr, te = L.splits("s3", sim)[4]
    fold = sim.fold(tr, te, name)
    true = fold.test.images
    spiked = true.copy().reshape(len(true), -1)
    background = np.flatnonzero(spiked[0] == 0)[::7]
    spiked[:, background] = -20.0                       # clipped to 0: the true image again
    spiked = spiked.reshape(true.shape)
    for got, want in zip(L.nearest_training_check(spiked, fold), L.nearest_training_check(true, fold)):
        np.testing.assert_array_equal(got, want)
    assert L.nearest_training_check(spiked, fold)[0].all()


def test_nearest_training_check_against_brute_force(sim):
    """A fold whose training trials lack images 3 and 11 while its test trials show 3, 5 and 11:
    per trial, the training image of highest Pearson r (an index into the candidates, never 3 or
    11), and 1 only where the true image's r is strictly higher (a blank reconstruction, r = 0 with
    everything, scores 0). score_reconstructions records it for the never-seen trials only."""
    ids = sim.trials.image_ids
    test = np.flatnonzero(np.isin(ids, [3, 5, 11]))[[0, 1, 5, 6, 9]]
    train = np.setdiff1d(np.flatnonzero(~np.isin(ids, [3, 11])), test)
    fold = sim.fold(train, test)
    assert sorted(set(ids[test])) == [3, 5, 11]
    rng = np.random.default_rng(0)
    recon = np.clip(fold.test.images + rng.normal(0, 0.6, fold.test.images.shape), 0, 1)
    recon[1] = fold.unique_images[0]                                 # a training image
    recon[-1] = 0.0                                                  # blank
    flat = recon.reshape(len(recon), -1)
    seen = sorted(set(fold.train.image_ids))
    r = {k: [brute_pearson(x, fold.unique_images[k].ravel()) for x in flat] for k in range(20)}
    nearest = [max(seen, key=lambda k: r[k][i]) for i in range(len(flat))]
    closer = [float(r[k][i] > max(r[j][i] for j in seen)) for i, k in enumerate(fold.test.image_ids)]
    got_closer, got_nearest = L.nearest_training_check(recon, fold)
    np.testing.assert_array_equal(got_nearest, nearest)
    np.testing.assert_array_equal(got_closer, closer)
    assert 0 < sum(closer[:-1]) < len(closer) - 1 and closer[-1] == 0
    unseen = ~np.isin(fold.test.image_ids, seen)
    recorded = L.score_reconstructions(recon, fold)["closer_than_train"]
    np.testing.assert_array_equal(recorded[unseen], np.asarray(closer)[unseen])
    assert np.isnan(recorded[~unseen]).all() and 0 < unseen.sum() < len(unseen)


def test_condition_helpers():
    scores = np.array([[0.1, 0.9, 0.2], [0.8, 0.1, 0.1], [0.5, 0.5, 0.0]])
    labels = L.identified_labels(scores, np.array([2, 3, 5]))
    np.testing.assert_array_equal(labels, [3, 2, 2])   # tie at the top: first candidate
    assert L.condition_accuracy(labels, [3, 2, 5]) == pytest.approx(2 / 3)
    assert L.majority_rate([2, 3, 3, 5]) == 0.5


def test_chance_levels_of_fewer_than_five_candidates():
    """Top-5 of 3 candidates is certain: chance min(5, k) / k, not 5 / k."""
    assert L.chance_levels(3) == {"top1": 1 / 3, "top5": 1.0, "mean_rank": 2.0, "two_way": 0.5}
    assert L.chance_levels(20)["top5"] == 0.25


def test_chance_levels_print_to_two_significant_digits():
    """A 200-way or 460-way chance level (a file of other images, the random-image session) does
    not print as 0.01 or 0.00; Miyawaki's 20-way levels print as before."""
    assert [L.chance_text(1 / k) for k in (2, 4, 20, 200, 460)] == ["0.5", "0.25", "0.05", "0.005",
                                                                     "0.0022"]
