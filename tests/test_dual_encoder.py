"""Dual encoder: shapes, loss sanity, clamp, checkpoint round-trip, learning, the noise control,
its linear read-outs and the image prior behind the receptive-field posterior."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from miyawaki_dataset_loader import (CheckpointError, RidgeBaseline, identification_scores,
                                     pearson_matrix, splits)
import miyawaki_dataset_loader as L
import miyawaki_dual_encoder as D
from miyawaki_dual_encoder import (DualEncoderConfig, EncodingReadout, MiyawakiDualEncoder,
                                   PixelReadout, contrastive_loss, identify, inner_folds, main, mixup,
                                   pair_loss, posterior_weights,
                                   score_settings, select_setting,
                                   setting_name, split_validation, train_dual_encoder,
                                   train_dual_encoders)
from helpers import unit

FAST = DualEncoderConfig(epochs=25, mixup=32, val_fraction=0.0)


def test_shapes_and_unit_norm():
    model = MiyawakiDualEncoder(fmri_dim=50, latent_dim=32).eval()
    ef = model.encode_fmri(torch.randn(7, 50))
    ei = model.encode_image(torch.rand(5, 1, 28, 28))
    assert ef.shape == (7, 32) and ei.shape == (5, 32)
    assert torch.allclose(ef.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(ei.norm(dim=1), torch.ones(5), atol=1e-5)
    assert {"fmri_encoder", "stimulus_encoder", "clip_correlation"} <= dict(model.named_children()).keys()


def test_aligned_pairs_have_lower_loss_than_shuffled():
    e = unit(8)
    pos = torch.eye(8, dtype=torch.bool)
    aligned = contrastive_loss(e, e, pos, torch.tensor(10.0))
    shuffled = contrastive_loss(e, e[torch.roll(torch.arange(8), 1)], pos, torch.tensor(10.0))
    assert aligned < shuffled


def test_infonce_is_the_mean_of_both_directions():
    """Symmetric InfoNCE, by hand: the fMRI -> image cross-entropy over each fMRI row's images
    and the image -> fMRI one over each image's trials, averaged, each against the uniform
    distribution over the positives (4 trials of 3 images: the two directions differ)."""
    fmri, img, scale = unit(4, seed=1), unit(3, seed=2), 7.0
    pos = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    logits = scale * fmri @ img.T
    rows = -(torch.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    cols = -(torch.log_softmax(logits.T, 1) * (pos / pos.sum(0)).T).sum(1).mean()
    torch.testing.assert_close(contrastive_loss(fmri, img, pos, torch.tensor(scale)),
                               0.5 * (rows + cols))


def test_loss_curves_are_read_against_their_own_chance(sim):
    """chance_loss is pair_objective at uniform scores (ln C + ln R: the training batches' mixup
    rows and columns put it far above validation's), and the curves figure draws both levels."""
    y = torch.as_tensor(sim.trials.images[:30])
    mixed = torch.cat([y, y[:8] * 0.3 + y[8:16] * 0.7])          # 8 mixup rows after 30 trials
    for images, n_mixed in ((y, 0), (mixed, 8)):
        _, pos = D.pair_batch(images, n_mixed)
        same = {k: torch.ones(n, 4) / 2 for k, n in (("fmri", len(pos)), ("image", pos.shape[1]),
                                                     ("fmri_latent", len(pos)), ("image_latent", pos.shape[1]))}
        assert D.pair_objective(same, pos, torch.tensor(10.0)).item() == pytest.approx(
            D.chance_loss(images, n_mixed), rel=1e-6)
    _, hist = train_dual_encoder(sim.s1().train, replace(FAST, epochs=2, val_fraction=0.1), "cpu",
                                 progress=False)
    ax = D.plot_training_curves(hist, 0.05).axes[0]
    levels = sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert levels == pytest.approx(sorted([hist["val_chance_loss"], hist["train_chance_loss"]]))
    assert hist["val_chance_loss"] < hist["train_chance_loss"]


def test_repeats_are_positives_not_negatives():
    """Two trials of the same image: marking both as positives must lower the loss when the
    fMRI embeddings are close to that image, compared with treating the repeat as a negative."""
    img = unit(3)                                 # 3 distinct images
    fmri = img[[0, 0, 1, 2]]                      # trials 0 and 1 both saw image 0
    own = torch.tensor([0, 0, 1, 2])
    multi = own[:, None] == torch.arange(3)[None]
    loss_multi = contrastive_loss(fmri, img, multi, torch.tensor(20.0))
    # the same data written as 4 separate "images" with only the diagonal positive
    loss_diag = contrastive_loss(fmri, img[own], torch.eye(4, dtype=torch.bool), torch.tensor(20.0))
    assert loss_multi < loss_diag
    # its floor is the entropy of the soft target: image 0 -> {trial 0, trial 1} at 1/2 each,
    # i.e. ln 2 in one of 3 image rows, in one of the 2 directions
    assert loss_multi < math.log(2) / 6 + 0.01


def test_mixup_of_one_image_is_that_image_and_counts_as_its_positive(monkeypatch):
    """Mixing two trials of one image gives back exactly that image. pair_loss encodes the distinct
    real images once plus every mixed image (a fixed count), and a mixed image equal to a real one
    is a positive of all that image's trials, never a negative."""
    y = (torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    y = y[[0, 0, 1]]                                           # trials 0 and 1 saw image 0
    x = torch.randn(3, 10)
    _, same = mixup(x[:2], y[:2], 5, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(same, y[:1].expand(5, -1, -1, -1))
    blend = 0.3 * y[:1] + 0.7 * y[2:]                          # a mix of two different images
    xb, yb = torch.cat([x, torch.randn(6, 10)]), torch.cat([y, same, blend])
    seen = {}

    def spy(emb_fmri, emb_image, positives, scale):
        seen["pos"] = positives
        return emb_fmri.sum() * 0

    monkeypatch.setattr("miyawaki_dual_encoder.contrastive_loss", spy)
    pair_loss(MiyawakiDualEncoder(fmri_dim=10, latent_dim=8), xb, yb, n_mixed=6)
    pos = seen["pos"]
    assert pos.shape == (9, 2 + 6)                             # 2 distinct real images + 6 mixed
    # image 0 fills 1 + 5 columns, all positives of its 2 + 5 rows; image 1 and the blend: 1 each
    assert pos.sum(1).tolist() == [6, 6, 1, 6, 6, 6, 6, 6, 1]
    assert all(torch.equal(pos[r], pos[0]) for r in (1, 3, 4, 5, 6, 7))
    assert not (pos[2] & pos[0]).any() and not (pos[8] & (pos[0] | pos[2])).any()


def test_non_finite_loss_raises():
    model = MiyawakiDualEncoder(fmri_dim=10, latent_dim=8)
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        pair_loss(model, torch.randn(4, 10), torch.rand(4, 1, 28, 28))


def test_logit_scale_is_clamped_at_ln100():
    model = MiyawakiDualEncoder(fmri_dim=10, latent_dim=8)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model.clamped_scale().item(), 100.0, rel_tol=1e-5)
    assert math.isclose(MiyawakiDualEncoder(10, 8).clamped_scale().item(), 1 / 0.07, rel_tol=1e-5)


def _fold(sim):
    name, tr, te = splits("s2", sim)[0]
    return sim.fold(tr, te, name)


def test_training_lowers_loss_and_identifies_above_chance(sim):
    fold = _fold(sim)
    model, hist = train_dual_encoder(fold.train, FAST, "cpu", fold.unique_images, progress=False)
    assert hist["train_loss"][-1] < 0.7 * hist["train_loss"][0]
    ranks = identify(model, torch.as_tensor(fold.test.fmri), torch.as_tensor(fold.unique_images),
                     fold.test.image_ids)
    assert (ranks == 1).mean() >= 0.4          # chance 0.05


@pytest.mark.parametrize("readout_model", D.READOUT_MODELS)
def test_score_fuses_embeddings_readout_and_encoding_model_of_the_fitted_trials_only(sim, readout_model):
    """The identification score is the z-scored embedding cosine beside the z-scored Pearson r of
    a pixel read-out (fMRI -> pixels: the receptive-field posterior or ridge) and of an encoding
    model (pixels -> voxels), both fitted on the trials the networks were fitted on (not the
    validation trials); the encoding model scores with the voxels it predicts best for held-out
    images of those trials."""
    fold = _fold(sim)
    cfg = replace(FAST, epochs=3, val_fraction=0.1, readout_weight=0.25, encoding_weight=0.5,
                  readout_model=readout_model)
    model, hist = train_dual_encoder(fold.train, cfg, "cpu", fold.unique_images, progress=False)
    fit_idx, _ = split_validation(fold.train, 0.1, cfg.seed)
    fitted = fold.train.subset(fit_idx)
    assert hist["n_train"] == len(fit_idx) < len(fold.train)
    x, cand = torch.as_tensor(fold.test.fmri), torch.as_tensor(fold.unique_images)
    if readout_model == "ridge":
        readout = RidgeBaseline().fit(fitted.fmri, fitted.images).predict(fold.test.fmri)
    else:
        weight, bias = posterior_weights(fitted.fmri, fitted.images)
        readout = fold.test.fmri @ weight.T + bias
    readout_scores = identification_scores(readout.reshape(-1, 1, 28, 28), fold.unique_images)
    from sklearn.linear_model import Ridge
    predicted = Ridge(alpha=cfg.encoding_alpha).fit(fitted.images.reshape(len(fitted), -1),
                                                    fitted.fmri).predict(fold.unique_images.reshape(20, -1))
    keep = model.encoding.voxels.numpy()
    assert keep.sum() == hist["encoding_voxels"] == round(cfg.encoding_voxels * sim.n_voxels)
    encoding_scores = pearson_matrix(fold.test.fmri[:, keep], predicted[:, keep])
    with torch.no_grad():
        cosine = (model.encode_fmri(x) @ model.encode_image(cand).T).numpy()
    z = lambda s: (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(model.score_candidates(x, cand),
                               0.25 * z(cosine) + 0.25 * z(readout_scores) + 0.5 * z(encoding_scores),
                               atol=1e-4)
    np.testing.assert_allclose(model.score_candidates(x, cand, 0.0, 0.0), z(cosine), atol=1e-4)
    # the voxels kept are those predicted best for held-out images, not all voxels, and the
    # model's encoding alone identifies the simulated test trials well above chance (0.05)
    assert 0 < keep.sum() < sim.n_voxels
    assert (encoding_scores.argmax(1) == fold.test.image_ids).mean() > 0.5
    with pytest.raises(ValueError, match="<= 1"):
        model.score_candidates(x, cand, 0.75, 0.5)


def test_augmentation_ops_are_the_square_symmetries_and_shifts():
    index = D.augmentation_ops(3)
    assert len(index) == 72
    img = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    moved = D.apply_ops(img, torch.zeros(72, dtype=torch.long), torch.arange(72), index)
    assert torch.equal(moved[0], img[0])                                  # op 0: identity
    expected = [np.rot90(img[0, 0].numpy(), k) for k in range(4)]
    for k in range(4):                                                   # unshifted rotations
        np.testing.assert_array_equal(moved[18 * k, 0].numpy(), expected[k])
        np.testing.assert_array_equal(moved[18 * k + 9, 0].numpy(), expected[k][:, ::-1])
    # op 1 shifts down by 3 px (the first nonzero move), zero filling the rows it uncovers
    assert torch.equal(moved[3, 0, 3:], img[0, 0, :-3]) and moved[3, 0, :3].abs().sum() == 0


def test_validation_takes_one_trial_of_images_shown_at_least_three_times():
    """The validation curves' trials (``--val-fraction``): one trial each of images shown 3 times
    or more, so every validation image keeps at least 2 training trials; an image of 1 or 2 trials
    is never held out (any image passed every other test)."""
    ids = np.repeat(np.arange(8), [1, 2, 3, 4, 1, 2, 3, 5])
    trials = L.Trials(np.zeros((len(ids), 3), np.float32), np.zeros((len(ids), 1, 28, 28), np.float32),
                      np.ones(len(ids), int), ids)
    for seed in range(5):
        fit, val = split_validation(trials, 1.0, seed)
        assert sorted(ids[val]) == [2, 3, 6, 7] and sorted(np.concatenate([fit, val])) == list(range(len(ids)))
        assert all((ids[fit] == k).sum() >= 2 for k in ids[val])
    # round(fraction x N) trials, one each of that many images
    many = np.repeat(np.arange(10), 3)
    trials = L.Trials(np.zeros((30, 3), np.float32), np.zeros((30, 1, 28, 28), np.float32), np.ones(30, int), many)
    assert len(split_validation(trials, 0.1, 0)[1]) == 3


def test_image_prior_never_produces_an_excluded_image():
    """An image the fold must not see (here the mirror image of a training figure, which the prior
    would otherwise make) never comes out of the prior, also when other images are excluded beside
    it (a sample dropped only where it equals every excluded image passed with one); the check can
    fail: it was hit."""
    grids, _ = L.figure_images()
    images = torch.as_tensor(L.upsample_grid(grids[5:10]))[:, None]     # n e u r o
    banned = torch.flip(images[3], dims=[-1])                           # a mirrored "r"
    assert not (banned == images).flatten(1).all(1).any()
    other = torch.as_tensor(L.upsample_grid(grids[:1]))                 # a shape, also excluded
    prior, anchor, rejected = D.image_prior(images, images, torch.Generator().manual_seed(0), 3000,
                                            3, 0.0, torch.stack([banned, other]))
    assert not ((prior.flatten(1) > 0.5) == (banned.flatten() > 0.5)).all(1).any()
    assert rejected > 0 and len(prior) == len(anchor) == 3000 - rejected
    assert torch.equal(anchor, prior)                 # the anchors had the images' transformations


def test_image_prior_compares_grey_images_as_they_are():
    """Grey images are compared as they are, not binarised: on a low-contrast set (pixels 0 or
    0.4, all of which binarise to a blank image) the prior drops the excluded image's copies only,
    and an image one grey level (1/255) away from them on one pixel excludes nothing."""
    grids, _ = L.figure_images()
    images = 0.4 * torch.as_tensor(L.upsample_grid(grids[5:10]))[:, None]   # n e u r o, dim
    banned = torch.flip(images[3], dims=[-1])[None]                         # a mirrored "r"
    draw = lambda exclude: D.image_prior(images, None, torch.Generator().manual_seed(0), 3000, 3,  # noqa: E731
                                         0.0, exclude)
    prior, _, rejected = draw(banned)
    assert 0 < rejected < 3000 // 5 and len(prior) == 3000 - rejected
    assert not (prior == banned).flatten(1).all(1).any()
    near = banned.clone()
    near[0, 0, 14, 14] += 1 / 255
    assert draw(near)[2] == 0


def test_posterior_readout_is_the_gaussian_posterior_mean():
    """The receptive-field anchor's read-out equals the brute-force posterior mean in information
    form, (W^T R^-1 W + (sS)^-1)^-1 (W^T R^-1 (y - b) + (sS)^-1 m), on a small problem."""
    rng = np.random.default_rng(0)
    n_voxels, keep = 12, np.arange(12) % 3 != 0
    encoding = D.EncodingReadout(n_voxels)
    encoding.weight.copy_(torch.as_tensor(rng.normal(0, 0.1, (n_voxels, L.N_PIXELS))))
    encoding.bias.copy_(torch.as_tensor(rng.normal(0, 1, n_voxels)))
    encoding.voxels.copy_(torch.as_tensor(keep))
    images, prior = rng.random((40, L.N_PIXELS)), rng.random((2000, L.N_PIXELS))
    fmri = images @ encoding.weight.double().numpy().T + rng.normal(0, 1, (40, n_voxels))
    weight, bias = D.posterior_readout(encoding, fmri, images, prior, noise_shrink=0.3, prior_scale=2.0)
    w, b = encoding.weight.double().numpy()[keep], encoding.bias.double().numpy()[keep]
    r = np.cov(fmri[:, keep] - images @ w.T - b, rowvar=False)
    r = 0.7 * r + 0.3 * np.diag(np.diag(r))
    s_inv = np.linalg.inv(2.0 * np.cov(prior, rowvar=False))
    y = rng.normal(0, 1, (3, n_voxels))
    brute = np.linalg.solve(w.T @ np.linalg.solve(r, w) + s_inv,
                            (w.T @ np.linalg.solve(r, (y[:, keep] - b).T)) + (s_inv @ prior.mean(0))[:, None]).T
    np.testing.assert_allclose(y @ weight.T + bias, brute, atol=1e-6)
    assert not weight[:, ~keep].any()


def test_receptive_field_readout_reads_out_never_seen_images_better_than_ridge(sim):
    """Ridge's weights lie in the span of the training images, so it reads out a never-seen image
    as a mix of seen ones; the receptive-field posterior reaches outside that span. Over 5 images,
    each held out of the fit (all its trials), the posterior's read-out of the held-out trials
    correlates better with their image (simulated set: 0.890 against 0.833; data seeds 1 and 2:
    +0.040, +0.052) and identifies more of them among the 20 figures (1.00 against 0.58; seeds 1
    and 2: 0.98 / 0.93 against 0.40 / 0.55)."""
    r, top1 = {m: [] for m in D.READOUT_MODELS}, {m: [] for m in D.READOUT_MODELS}
    ids = sim.trials.image_ids
    for k in (0, 5, 9, 13, 17):
        fold = sim.fold(np.where(ids != k)[0], np.where(ids == k)[0])
        for m in D.READOUT_MODELS:
            readout = PixelReadout(sim.n_voxels)
            readout.fit(fold.train.fmri, fold.train.images, m)
            out = readout(torch.as_tensor(fold.test.fmri)).numpy()
            scores = identification_scores(out, fold.unique_images)
            r[m].append(scores[:, k].mean())
            top1[m].append((scores.argmax(1) == k).mean())
    assert np.mean(r["receptive-field"]) > np.mean(r["ridge"]) + 0.03
    assert np.mean(top1["receptive-field"]) > np.mean(top1["ridge"]) + 0.3


def test_with_setting_refits_only_the_linear_part_whose_fields_change(sim):
    """The benchmark's ablations rescore the same networks: another read-out model refits the
    pixel read-out on the model's trials, another encoding alpha the encoding model alone; the
    networks (and the other part) are copied unchanged."""
    fold = _fold(sim)
    model, _ = train_dual_encoder(fold.train, replace(FAST, epochs=1), "cpu", fold.unique_images,
                                  progress=False)
    ridge = D.with_setting(model, fold.train, {"readout_model": "ridge"}, fold.unique_images)
    other = D.with_setting(model, fold.train, {"encoding_alpha": 100.0})
    expected = PixelReadout(sim.n_voxels)
    expected.fit(fold.train.fmri, fold.train.images, "ridge")
    assert torch.equal(ridge.readout.weight, expected.weight)
    assert not torch.equal(ridge.readout.weight, model.readout.weight)
    assert not torch.equal(other.encoding.weight, model.encoding.weight)
    assert torch.equal(other.readout.weight, model.readout.weight)
    for copy_ in (ridge, other):
        for name, value in model.state_dict().items():
            if not name.startswith(("readout.", "encoding.")):
                assert torch.equal(copy_.state_dict()[name], value), name
    assert ridge.config.readout_model == "ridge" and model.config.readout_model == "receptive-field"


def test_readout_image_prior_never_holds_a_candidate_no_training_trial_showed(sim, monkeypatch):
    """The read-out's image prior excludes exactly the candidates absent from the training trials
    (a never-seen test image the prior's transformations might otherwise make), none when every
    candidate was shown."""
    seen = []
    monkeypatch.setattr(D, "posterior_weights",
                        lambda fmri, images, exclude=None: seen.append(exclude) or (
                            np.zeros((784, fmri.shape[1])), np.zeros(784)))
    ids = sim.trials.image_ids
    fold = sim.fold(np.where(~np.isin(ids, [3, 7]))[0], np.where(np.isin(ids, [3, 7]))[0])
    model = MiyawakiDualEncoder(sim.n_voxels, config=FAST)
    D.fit_linear_parts(model, fold.train, fold.unique_images)
    np.testing.assert_array_equal(seen[-1], fold.unique_images[[3, 7]])
    D.fit_linear_parts(model, fold.train, fold.unique_images[[0, 1, 2]])
    assert len(seen[-1]) == 0


def test_encoding_model_keeps_the_voxels_it_predicts_for_new_images(sim):
    """The encoding model keeps the voxels it predicts best for held-out *images*: 50 voxels
    driven linearly by the image (noisy) against 50 that answer each image with a value of their
    own (a look-up, nearly noiseless, predictable only for images seen in training)."""
    train = sim.s1().train
    rng = np.random.default_rng(0)
    drive = train.images.reshape(len(train), -1) @ rng.standard_normal((784, 50))
    linear = (drive - drive.mean(0)) / drive.std(0) + 0.3 * rng.standard_normal((len(train), 50))
    lookup = rng.standard_normal((20, 50))[train.image_ids] + 0.1 * rng.standard_normal((len(train), 50))
    enc = EncodingReadout(100)
    assert enc.fit(np.hstack([linear, lookup]), train.images, train.image_ids, 30.0, 0.5) == 50
    assert enc.voxels[:50].sum() >= 45        # the 20 figures overlap: a look-up is partly linear


def test_consistency_step_moves_images_towards_the_fmri_under_the_encoding_model(sim):
    """The decoders' likelihood step: with weight 1 and a small ridge it moves an image until the
    encoding model's prediction of it (kept voxels) matches the given fMRI, by the least-norm
    change; weight 0 or an unfitted model changes nothing, and a larger ridge moves it less."""
    fold = _fold(sim)
    enc = EncodingReadout(sim.n_voxels)
    enc.fit(fold.train.fmri, fold.train.images, fold.train.image_ids, 30.0, 0.1)
    keep = enc.voxels
    start = torch.as_tensor(fold.train.images.mean(0, keepdims=True)).repeat(4, 1, 1, 1)
    target = enc(torch.as_tensor(fold.unique_images[:4]))           # fMRI some images would give
    misfit = lambda img: ((enc(img) - target)[:, keep] ** 2).sum().item()  # noqa: E731
    moved = {reg: enc.consistency_step(target, reg)(start, 1.0) for reg in (1e-6, 1.0)}
    assert misfit(moved[1e-6]) < 1e-3 * misfit(start)
    assert misfit(moved[1e-6]) < misfit(moved[1.0]) < misfit(start)
    # least norm: the change lies in the row space of the kept voxels' weights
    w = enc.weight[keep]
    delta = (moved[1e-6] - start).flatten(1)
    np.testing.assert_allclose((delta @ torch.linalg.pinv(w) @ w).numpy(), delta.numpy(), atol=1e-4)
    assert torch.equal(enc.consistency_step(target, 1.0)(start, 0.0), start)
    assert torch.equal(EncodingReadout(sim.n_voxels).consistency_step(target, 1.0)(start, 1.0), start)


def test_nested_grid_and_its_tie_rule():
    settings = score_settings()
    assert all(c["readout_weight"] + c["encoding_weight"] <= 0.9 for c in settings)
    default = {"readout_weight": 0.9, "encoding_weight": 0.0, "encoding_alpha": 30.0,
               "readout_model": "receptive-field"}
    assert default in settings and {**default, "readout_model": "ridge"} in settings
    # 11 weight pairs: both read-outs for the 7 with a read-out weight, both alphas for the 6 with
    # an encoding weight: 1 + 3 * 2 + 4 * 2 + 3 * 4 (an unused part's alternatives are duplicates)
    assert len(settings) == 27 == len({setting_name(c) for c in settings})
    assert all(c["readout_model"] == "receptive-field" for c in settings if c["readout_weight"] == 0)
    assert all(c["encoding_alpha"] == 30.0 for c in settings if c["encoding_weight"] == 0)
    assert settings[0] == {"readout_weight": 0.0, "encoding_weight": 0.0, "encoding_alpha": 30.0,
                           "readout_model": "receptive-field"}
    inner = {setting_name(c): 0.5 for c in settings}
    inner[setting_name(settings[5])] = inner[setting_name(settings[3])] = 0.7
    assert select_setting(inner, settings) == settings[3]
    inner[setting_name(default)] = inner[setting_name({**default, "readout_model": "ridge"})] = 0.9
    assert select_setting(inner, settings) == default            # a tie: the default read-out


def test_inner_cv_scores_each_setting_with_its_own_readout(sim, monkeypatch):
    """The inner CV refits the pixel read-out for a setting that names the other read-out model:
    with the read-out weighted 0.9 the two settings' inner MRRs differ (sharing the default
    read-out's fit, as when refits were keyed on the encoding model's fields alone, makes them
    equal). Every linear part, refits included, is fitted on its inner fold's training trials,
    never on the validation trials it scores (refitting on them passed every other test), and the
    scores are the means over the inner folds of top-1 and of the reciprocal ranks."""
    fitted, ranked = [], []
    for part in (D.PixelReadout, D.EncodingReadout):
        fit = part.fit
        monkeypatch.setattr(part, "fit", lambda self, fmri, *a, fit=fit, **k: fitted.append(fmri)
                            or fit(self, fmri, *a, **k))
    ranks = D.identification_ranks
    monkeypatch.setattr(D, "identification_ranks", lambda *a: ranked.append(ranks(*a)) or ranked[-1])
    ridge, rf = ({"readout_weight": 0.9, "encoding_weight": 0.0, "readout_model": m}
                 for m in ("ridge", "receptive-field"))
    inner = D.inner_cv_scores(sim, np.arange(60), replace(FAST, epochs=2), "seen", [rf, ridge])
    assert inner["mrr"][setting_name(rf)] != inner["mrr"][setting_name(ridge)]
    folds = [sim.fold(tr, va) for tr, va in D.inner_folds(sim.trials.image_ids[:60], "seen")]
    # per inner fold: the default fit's two parts, then the ridge setting's read-out refit
    assert len(fitted) == 3 * len(folds) and len(ranked) == 2 * len(folds)
    for i, fold in enumerate(folds):
        for fmri in fitted[3 * i:3 * i + 3]:
            np.testing.assert_array_equal(fmri, fold.train.fmri)
    for j, name in enumerate(map(setting_name, (rf, ridge))):
        r = ranked[j::2]
        assert inner["top1"][name] == pytest.approx(np.mean([np.mean(x == 1) for x in r]))
        assert inner["mrr"][name] == pytest.approx(np.mean([np.mean(1 / x) for x in r]))


def test_inner_cv_of_several_seeds_scores_their_fits_as_one_model(sim, monkeypatch):
    """``seeds``: every inner fold fits one model per seed and scores them together (the
    ensemble's inner CV, benchmarks/tune_dual_encoder.py --ensemble), not the first fit alone."""
    scored, parts = [], D.ensemble_parts
    monkeypatch.setattr(D, "ensemble_parts",
                        lambda models, *args: scored.append(len(models)) or parts(models, *args))
    setting = {"readout_weight": 0.9, "encoding_weight": 0.0, "readout_model": "ridge"}
    D.inner_cv_scores(sim, np.arange(60), replace(FAST, epochs=1, readout_model="ridge"), "seen",
                      [setting], seeds=(0, 1))
    assert scored == [2] * 5


@pytest.mark.filterwarnings("ignore:The least populated class")   # inner_folds silences it too
def test_repeated_inner_folds_validate_every_trial_once_per_repeat(sim):
    """Repeat 0 is the single inner CV (so --inner-repeats 1 keeps its numbers); each further
    repeat is a new partition of the same kind: seen validates images also in training, unseen
    holds whole images out."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold
    ids = sim.s1().train.image_ids
    x = np.zeros(len(ids))
    single = {"seen": StratifiedKFold(5, shuffle=True, random_state=0).split(x, ids),   # the
              "unseen": GroupKFold(5).split(x, ids, groups=ids)}                  # releases' folds
    for scheme in ("seen", "unseen"):
        one, two = inner_folds(ids, scheme), inner_folds(ids, scheme, repeats=2)
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(one, single[scheme]))
        assert len(one) == 5 and len(two) == 10
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(one, two[:5]))
        assert any(not np.array_equal(a[1], b[1]) for a, b in zip(two[:5], two[5:]))
        for r in (two[:5], two[5:]):
            assert np.array_equal(np.sort(np.concatenate([va for _, va in r])), np.arange(len(ids)))
        for tr, va in two:
            shared = np.isin(ids[va], ids[tr])
            assert shared.all() if scheme == "seen" else not shared.any(), scheme
    with pytest.raises(ValueError, match="repeats 0"):
        inner_folds(ids, "seen", repeats=0)


def test_same_seed_same_numbers(sim):
    fold = _fold(sim)
    cfg = replace(FAST, epochs=3)
    a, ha = train_dual_encoder(fold.train, cfg, "cpu", progress=False)
    b, hb = train_dual_encoder(fold.train, cfg, "cpu", progress=False)
    assert ha["train_loss"] == hb["train_loss"]
    x = torch.as_tensor(fold.test.fmri)
    assert torch.equal(a.encode_fmri(x), b.encode_fmri(x))


def test_noise_control_sits_at_chance(tmp_path, monkeypatch):
    """The script's --noise-control trains on Gaussian noise instead of fMRI (its networks and its
    linear parts): it cannot identify the real S1 test trials (12 of them, chance 0.05). Its
    training-curve figure and summary.md say it is the control (they read like a real run's)."""
    figures, plot = [], D.plot_training_curves
    monkeypatch.setattr(D, "plot_training_curves", lambda *a: figures.append(plot(*a)) or figures[-1])
    metrics = main(["--data", "simulated", "--noise-control", "--epochs", str(FAST.epochs), "--mixup",
                    str(FAST.mixup), "--out-dir", str(tmp_path), "--device", "cpu"])
    assert metrics["noise_control"] and metrics["n_test"] == 12
    assert metrics["top1"] <= 0.25               # at most 3 of 12 (0.6 expected by chance; 4+: p < 0.003)
    assert metrics["mean_rank"] > 6              # chance mean rank 10.5 of 20
    [figure] = figures
    assert figure._suptitle.get_text().startswith("NOISE CONTROL (--noise-control): trained on Gaussian noise")
    summary = (tmp_path / "summary.md").read_text()
    assert "**Noise control**: this dual encoder was trained on Gaussian noise" in summary
    assert "| dual encoder **noise control** identification top-1 (20-way) |" in summary
    assert "; 12 test trials." in summary      # the data line, also without the evaluation's result


def test_script_checkpoint_round_trip(tmp_path):
    metrics = main(["--data", "simulated", "--epochs", "4", "--mixup", "8", "--out-dir", str(tmp_path),
                    "--device", "cpu"])
    path = tmp_path / "miyawaki_dual_encoder.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "dual_encoder" and ckpt["config"]["epochs"] == 4
    model, _ = MiyawakiDualEncoder.from_checkpoint(path)
    trained = MiyawakiDualEncoder(ckpt["n_voxels"], 512)
    trained.load_state_dict(ckpt["state"])
    x = torch.randn(3, ckpt["n_voxels"])
    assert torch.equal(model.encode_fmri(x), trained.eval().encode_fmri(x))
    assert (tmp_path / "miyawaki_training_curves.png").stat().st_size > 0
    assert 0 <= metrics["top1"] <= 1 and metrics["n_candidates"] == 20
    # trained on every S1 training trial (no validation set unless --val-fraction asks for one)
    assert (metrics["n_train"], metrics["n_validation"], metrics["n_test"]) == (107, 0, 12)
    saved = json.loads((tmp_path / "miyawaki_dual_encoder.json").read_text())
    assert saved["n_train"] == 107
    # the options of the run beside its results, in the JSON and the checkpoint
    for config in (saved["config"], ckpt["script_config"]):
        assert (config["epochs"], config["mixup"], config["out_dir"]) == (4, 8, str(tmp_path))


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
    main(["--data", "simulated", "--epochs", "1", "--mixup", "0", "--out-dir", str(tmp_path),
          "--device", "cpu"])
    path = tmp_path / "miyawaki_dual_encoder.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["config"]["latent_dim"] = 64           # state dict no longer fits the rebuilt model
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="miyawaki_dual_encoder.py"):
        MiyawakiDualEncoder.from_checkpoint(path)
    if not torch.cuda.is_available():   # a device this machine lacks is not a bad checkpoint
        with pytest.raises(ValueError, match="no CUDA device here; load with map_location='cpu'"):
            MiyawakiDualEncoder.from_checkpoint(path, map_location="cuda")


BATCHED = DualEncoderConfig(epochs=4, dropout=0.0, bf16=False, val_fraction=0.0, latent_dim=32,
                            fmri_hidden=(64,), cnn_channels=(8, 16), head_hidden=(64,), mixup=8)


def test_batched_fits_equal_separate_fits(sim):
    """Three seeds trained as one vmapped model (the GPU path of the benchmark) end with the
    weights, BatchNorm statistics and loss curves of three separate fits (dropout 0, float32: float
    rounding only), from a logit scale above CLIP's clamp at ln 100, which both paths apply."""
    fold = sim.s1()
    x, y = torch.as_tensor(fold.test.fmri), torch.as_tensor(fold.unique_images)
    configs = [replace(BATCHED, seed=s, logit_scale_init=5.0) for s in (0, 1, 2)]
    models, histories = train_dual_encoders(fold.train, configs)
    for cfg, model, history in zip(configs, models, histories):
        ref, ref_history = train_dual_encoder(fold.train, cfg, progress=False)
        np.testing.assert_allclose(history["train_loss"], ref_history["train_loss"], rtol=1e-5)
        state = model.state_dict()
        for name, value in ref.state_dict().items():
            # a conv bias just before BatchNorm has no effect in training and a zero gradient up
            # to rounding, which Adam's normalisation blows up to full-size steps: it (and the
            # running mean that absorbs it) is compared through the embeddings below
            if not (name.startswith("stimulus_encoder.conv.") and name.endswith(("bias", "running_mean"))):
                torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            (fmri, image), (ref_fmri, ref_image) = ((m.encode_fmri(x), m.encode_image(y)) for m in (model, ref))
        torch.testing.assert_close(fmri, ref_fmri, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(image, ref_image, rtol=0, atol=2e-3)   # the eval-time bias above
        assert np.array_equal(identify(model, x, y, fold.test.image_ids),
                              identify(ref, x, y, fold.test.image_ids))
    first = models[0].state_dict()["fmri_encoder.skip.weight"]
    assert not torch.allclose(first, models[1].state_dict()["fmri_encoder.skip.weight"])  # seeds differ


def test_bf16_runs_only_where_the_device_has_native_bfloat16(sim, monkeypatch):
    """``bf16`` asks for bfloat16 autocast where the device runs it natively: where it is only
    emulated (AVX2-only CPUs, over 10x slower) the fit is the float32 fit, bit for bit; where it is
    native, autocast is on and the fit differs from the float32 one."""
    import miyawaki_dataset_loader as loader
    train = sim.s1().train
    fp32 = train_dual_encoder(train, BATCHED, progress=False)[0].state_dict()

    def bf16_fit(native: bool) -> dict:
        monkeypatch.setattr(loader, "native_bf16", lambda device: native)
        return train_dual_encoder(train, replace(BATCHED, bf16=True), progress=False)[0].state_dict()

    emulated, native = bf16_fit(False), bf16_fit(True)
    assert all(torch.equal(emulated[k], fp32[k]) for k in fp32)
    assert not torch.equal(native["fmri_encoder.skip.weight"], fp32["fmri_encoder.skip.weight"])


def test_batched_fits_refuse_configs_they_cannot_batch(sim):
    train = sim.s1().train
    with pytest.raises(ValueError, match="differ in seed only"):
        train_dual_encoders(train, [BATCHED, replace(BATCHED, seed=1, lr=1e-2)])
    with pytest.raises(ValueError, match="full batch"):
        train_dual_encoders(train, [replace(BATCHED, val_fraction=0.1)])


def test_the_model_is_built_from_its_config_and_latent_dim_is_said_once():
    cfg = DualEncoderConfig(latent_dim=16, fmri_hidden=(32,), head_hidden=(32,), cnn_channels=(4, 8))
    assert MiyawakiDualEncoder(10, config=cfg).clip_correlation.net[-1].out_features == 16
    assert MiyawakiDualEncoder(fmri_dim=10, latent_dim=8).config.latent_dim == 8   # the seed's call
    with pytest.raises(ValueError, match="latent_dim 8 disagrees with config.latent_dim 16"):
        MiyawakiDualEncoder(10, 8, cfg)


def test_an_ensemble_is_scored_as_one_model_from_its_fits(sim, monkeypatch):
    """``ensemble_parts``: the fits' embedding cosines averaged, the (seed-free) linear parts of the
    first; one fit is that fit. ``ensemble_fold_metrics`` ranks by that score, at the models' own
    setting or another, and votes the condition among the concatenated embeddings."""
    import miyawaki_evaluation as E
    fold = sim.s1()
    models = [D.train_dual_encoder(fold.train, replace(FAST, epochs=2, seed=s), "cpu", fold.unique_images,
                                   progress=False)[0] for s in (0, 1)]
    x, cand = torch.as_tensor(fold.test.fmri), torch.as_tensor(fold.unique_images)
    one, two = (m.score_parts(x, cand) for m in models)
    both = D.ensemble_parts(models, x, cand)
    np.testing.assert_allclose(both["embedding"], (one["embedding"] + two["embedding"]) / 2, atol=1e-7)
    for part in ("readout", "encoding"):
        np.testing.assert_array_equal(both[part], one[part])
        np.testing.assert_allclose(two[part], one[part], atol=1e-6)    # the same closed-form fit
    for name, p in D.ensemble_parts(models[:1], x, cand).items():
        np.testing.assert_array_equal(p, one[name])
    only = {"readout_weight": 0.0, "encoding_weight": 0.0}
    votes, knn = [], E.knn_condition
    monkeypatch.setattr(E, "knn_condition", lambda *a, **k: votes.append(a) or knn(*a, **k))
    rows = E.ensemble_fold_metrics(models, fold.train, fold, {"own": {}, "embeddings": only})
    for name, weights in (("own", (models[0].config.readout_weight, models[0].config.encoding_weight)),
                          ("embeddings", (0.0, 0.0))):
        ranks = L.identification_ranks(D.fused_scores(both, *weights), fold.test.image_ids)
        np.testing.assert_array_equal(rows[name]["rank"], ranks)
    emb = [E.extract_latent_representations(m, t)["correlation"] for t in (fold.train, fold.test) for m in models]
    (train_emb, _, test_emb, *_), = votes         # one vote, among the concatenated embeddings
    np.testing.assert_array_equal(train_emb, np.hstack(emb[:2]))
    np.testing.assert_array_equal(test_emb, np.hstack(emb[2:]))
    vote = knn(train_emb, fold.train.labels, test_emb)
    np.testing.assert_array_equal(rows["own"]["condition"], vote == fold.test.labels)
    # the two rows differ, so the settings reach the score
    assert not np.array_equal(rows["own"]["rank"], rows["embeddings"]["rank"])


def test_a_validation_share_it_cannot_hold_out_is_said(sim, capsys):
    """--val-fraction holds out at most one trial of each image shown 3 times or more (so that
    every validation image is still seen in training) and says so when that is fewer than asked."""
    fold = _fold(sim)
    _, hist = train_dual_encoder(fold.train, replace(FAST, epochs=1, val_fraction=0.5), "cpu",
                                 fold.unique_images, progress=True)
    line = f"validation: {hist['n_validation']} trials held out, not the {round(0.5 * len(fold.train))}"
    assert hist["n_validation"] <= len(fold.unique_images) and line in capsys.readouterr().out
    assert hist["n_validation_asked"] == round(0.5 * len(fold.train))     # for the figure's caption


def test_public_methods_take_what_a_notebook_holds(sim):
    """encode_fmri / encode_image / score_candidates give the same numbers for a float32 torch
    batch, a float64 numpy batch, one trial, and flat or 28 x 28 candidates; a wrong shape, or
    images outside [0, 1], is a ValueError naming what is expected."""
    fold = _fold(sim)
    model, _ = train_dual_encoder(fold.train, replace(FAST, epochs=1), "cpu", fold.unique_images,
                                  progress=False)
    x, cand = fold.test.fmri, fold.unique_images
    ref = model.score_candidates(torch.as_tensor(x), torch.as_tensor(cand))
    np.testing.assert_allclose(model.score_candidates(x.astype(np.float64), cand.reshape(len(cand), -1)), ref)
    np.testing.assert_allclose(model.score_candidates(x[0], cand[:, 0]), ref[:1], atol=1e-5)
    torch.testing.assert_close(model.encode_fmri(x[3]), model.encode_fmri(torch.as_tensor(x))[3:4])
    torch.testing.assert_close(model.encode_image(cand[2, 0].astype(np.float64)),
                               model.encode_image(torch.as_tensor(cand))[2:3])
    with pytest.raises(ValueError, match=f"expected N x {sim.n_voxels}"):
        model.encode_fmri(x[:, :-1])
    with pytest.raises(ValueError, match="expected N x 1 x 28 x 28"):
        model.encode_image(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ValueError, match=r"values in \[0, 255\]; expected \[0, 1\]"):
        model.score_candidates(x, 255 * cand)                      # a file's 0..255 images as they are
    bad = x.copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.score_candidates(bad, cand)                          # a NaN row would score NaN
    with pytest.raises(ValueError, match="complex fMRI"):
        model.encode_fmri(x.astype(np.complex64))
    with pytest.raises(ValueError, match="readout_weight must be >= 0"):
        model.score_candidates(x, cand, readout_weight=-0.5)
    # the evaluation's embedding helper takes and checks the same inputs
    from miyawaki_evaluation import extract_latent_representations
    flat = extract_latent_representations(model, x, cand[:, 0])           # N x 28 x 28 images
    with torch.no_grad():
        np.testing.assert_allclose(flat["image_correlation"], model.encode_image(cand).numpy(), atol=1e-6)
        np.testing.assert_allclose(flat["correlation"], model.encode_fmri(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"values in \[0, 255\]"):
        extract_latent_representations(model, images=255 * cand)
    with pytest.raises(ValueError, match=f"expected N x {sim.n_voxels}"):
        extract_latent_representations(model, x[:, :-1])
    # and a config out of its option's range stops a fit before any work, as on the command line
    with pytest.raises(L.OptionError, match="--epochs must be >= 1, got 0"):
        train_dual_encoder(fold.train, replace(FAST, epochs=0), "cpu", progress=False)
    with pytest.raises(L.OptionError, match="--epochs must be >= 1, got 0"):
        D.train_dual_encoders(fold.train, [replace(BATCHED, epochs=0)])


def test_encoding_model_fits_a_file_of_one_voxel(sim):
    """A file may have any voxel count: with one voxel sklearn returns 1-D predictions, which the
    voxel ranking's out-of-fold fill once refused (a traceback from the dual encoder and S3)."""
    fold = sim.s1()
    enc = EncodingReadout(1)
    assert enc.fit(fold.train.fmri[:, :1], fold.train.images, fold.train.image_ids, 30.0, 0.4) == 1
    assert enc(torch.as_tensor(fold.test.images)).shape == (12, 1)


def test_training_curves_title_fits_the_figure_without_validation():
    """Without validation trials the figure is one panel wide, and its one-line caption was wider
    than the figure: the tight save then widened it and left the plot beside a blank strip. Where
    --val-fraction asked for trials that no image could give (each shown fewer than 3 times), the
    caption says so (it advised --val-fraction to the user who had passed it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    hist = {"train_loss": [3.0, 2.5], "val_loss": [], "val_top1": [], "n_train": 270,
            "train_chance_loss": 3.5, "n_validation_asked": 27}
    fig = D.plot_training_curves(hist, 0.05)
    renderer = FigureCanvasAgg(fig).get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width
    assert fig.get_suptitle() == ("Fitted on all 270 training trials, none held out\n(--val-fraction "
                                  "asked for 27: no image is shown the 3 times validation needs)")
    hist.update(n_train=107, n_validation_asked=0)
    fig = D.plot_training_curves(hist, 0.05)
    title = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width
    assert fig.get_suptitle() == ("Fitted on all 107 training trials, none held out\n(--val-fraction "
                                  "holds some out for validation curves)")
    # one dashed line (the training loss at uniform scores), and the panel's title speaks of one
    assert fig.axes[0].get_title() == "Contrastive loss (dashed: its value at uniform scores)"


# --------------------------------------------------------------------------- formulas (mutation round 7)
def test_mixup_mixes_a_pair_s_fmri_and_image_with_the_same_weight():
    """A mixed trial's fMRI and image are one convex mix of the same two trials: with trial i's
    fMRI and image both the constant i, every mixed pair holds a single value on both sides (the
    weight applied to the other image of the pair passed every test)."""
    torch.manual_seed(0)                                  # mixup's Beta weights: torch's stream
    x = torch.arange(6.0)[:, None].repeat(1, 4)
    y = torch.arange(6.0)[:, None, None, None].repeat(1, 1, 28, 28)
    xm, ym = mixup(x, y, 50, 0.4, torch.Generator().manual_seed(0))
    value = xm[:, :1]
    assert torch.allclose(xm, value.expand_as(xm))
    assert torch.allclose(ym.flatten(1), value.expand(-1, 784), atol=1e-5)
    assert not torch.allclose(value, value.round())       # weights strictly between 0 and 1 occur


def test_the_optimiser_is_adamw_on_a_one_cycle_over_every_step(sim, monkeypatch):
    """AdamW with the config's (decoupled) weight decay, its one-cycle schedule over epochs x steps
    per epoch, mini-batches included (a schedule over the epochs alone crashed a --batch-size run;
    Adam's L2 decay instead of AdamW's passed every test)."""
    seen, one_cycle = {}, D.one_cycle
    monkeypatch.setattr(D, "one_cycle", lambda opt, lr, total: seen.update(opt=opt, total=total)
                        or one_cycle(opt, lr, total))
    train = sim.s1().train
    cfg = replace(FAST, epochs=2, batch_size=16, mixup=4)
    train_dual_encoder(train, cfg, "cpu", progress=False)
    assert seen["total"] == 2 * math.ceil(len(train) / 16)
    assert type(seen["opt"]) is torch.optim.AdamW and cfg.weight_decay > 0
    assert seen["opt"].defaults["weight_decay"] == cfg.weight_decay


def test_the_fmri_encoder_is_its_mlp_plus_its_linear_skip():
    """encoder(x) = mlp(x) + skip(x) (dropping the skip was caught only by chance, by a precision
    test that happened to probe the skip's weight)."""
    enc = D.FMRIEncoder(12, latent_dim=8, hidden=(16,)).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.allclose(enc(x), enc.mlp(x) + enc.skip(x))
        assert not torch.allclose(enc(x), enc.mlp(x))


def test_image_prior_pastes_boxes_into_image_and_anchor_alike_at_rate_mix():
    """With probability ``mix`` a box of a second pair is pasted into a sample, into its image and
    its anchor alike: with constant images (no transform changes them) a pasted sample is the one
    holding two values, and an anchor of half the image stays half of it (the anchor's box taken
    from the pasted image, or pasting at 1 - mix, passed every test)."""
    images = (torch.arange(1.0, 11.0) / 10)[:, None, None, None].repeat(1, 1, 28, 28)  # 10 values
    gen = torch.Generator().manual_seed(0)
    new, anchor, _ = D.image_prior(images, 0.5 * images, gen, 4096, 0, 0.25)
    assert torch.equal(anchor, 0.5 * new)
    two_values = (new.flatten(1).amax(1) > new.flatten(1).amin(1)).float().mean()
    assert abs(float(two_values) - 0.25 * 0.9) < 0.03        # a paste of the same image shows nothing


def test_random_boxes_span_7_to_21_px_anywhere_in_the_image():
    """Sides uniform in 7..21 px, every box inside the 28 x 28 image, and every row and column
    reachable (a start range one short never reached the last row and column)."""
    boxes = D.random_boxes(20000, torch.Generator().manual_seed(0), torch.device("cpu"))[:, 0].bool()
    rows, cols = boxes.any(2), boxes.any(1)                    # N x 28 each
    for covered in (rows, cols):
        side = covered.sum(1)
        assert side.min() == 7 and side.max() == 21
        assert covered.any(0).all()                            # rows 0 .. 27 all reached
    # one box each: its covered rows are contiguous
    assert ((rows[:, 1:].int() - rows[:, :-1].int()) == 1).sum(1).le(1).all()


# --------------------------------------------------------------------------- mutation round 8
# each test below failed against a one-line bug that had passed every test (docs/TESTS.md)
def test_a_read_out_refitted_for_a_setting_keeps_never_seen_candidates_out_of_its_prior(sim, monkeypatch):
    """``with_setting`` refitting a ridge model's read-out as the receptive-field one (a library
    call; a checkpoint saved without ``readout_model`` is a ridge model) excludes the candidates
    no training trial shows, as the fit does: an S3 fold's held-out image."""
    fold = sim.fold(*L.splits("s3", sim)[7][1:])
    model = D.MiyawakiDualEncoder(sim.n_voxels, config=D.DualEncoderConfig(
        readout_model="ridge", latent_dim=8, fmri_hidden=(8,), cnn_channels=(4,), head_hidden=(8,)))
    D.fit_linear_parts(model, fold.train, fold.unique_images)
    banned, prior = [], D.image_prior

    def spy(images, anchor, generator, size, shift, mix, exclude=None):
        banned.append(exclude)
        return prior(images, anchor, generator, size, shift, mix, exclude)

    monkeypatch.setattr(D, "image_prior", spy)
    D.with_setting(model, fold.train, {"readout_model": "receptive-field"}, fold.unique_images)
    [exclude] = banned
    assert np.array_equal(exclude.numpy(), fold.never_seen_images)
    # a setting of the encoding model's voxel fraction alone refits it too
    refitted = D.with_setting(model, fold.train, {"encoding_voxels": 0.2})
    assert int(refitted.encoding.voxels.sum()) == round(0.2 * sim.n_voxels) != int(model.encoding.voxels.sum())


def test_inner_cv_repeats_draw_other_partitions():
    """Repeated inner CV (``--inner-repeats``) reshuffles every repeat, seen and unseen: repeats 1
    and 2 of the unseen scheme were one split twice."""
    ids = L.make_simulated_dataset().trials.image_ids
    for scheme in ("seen", "unseen"):
        folds = D.inner_folds(ids, scheme, repeats=3)
        parts = [frozenset(frozenset(va.tolist()) for _, va in folds[5 * r:5 * r + 5]) for r in range(3)]
        assert len(set(parts)) == 3, scheme


def test_posterior_read_out_draws_its_prior_from_its_seed(sim):
    """The receptive-field posterior's image prior comes from ``seed``: the same seed, the same
    weights; another seed, others (ignored, every --seeds run had one anchor)."""
    train = sim.s1().train
    fit = lambda seed: D.posterior_weights(train.fmri, train.images, seed, prior_size=64)[0]  # noqa: E731
    assert np.array_equal(fit(0), fit(0)) and not np.allclose(fit(0), fit(1))

