"""Leak canaries: no test image reaches a model at test time (docs/PROTOCOL.md, "oracle").

Each path runs twice on the simulated set, the second time with the test trials' images swapped
for other images (image ids, candidates and fMRI unchanged). Every number reported as fMRI-only
must come out bit-identical; a number that changes must sit under an ``oracle`` key, score a
reconstruction against the true image, or be the labelled retrieval among the test trials' own
images. On an S3 fold the trained weights must not depend on the held-out image, and the
permutation control must sit at chance over seeds."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import miyawaki_dataset_loader as L
import miyawaki_dual_encoder as D
import miyawaki_evaluation as E
import miyawaki_generative_backend as G
from helpers import SMALL_ANCHOR_ARGS
from miyawaki_dataset_loader import make_simulated_dataset, splits

SIM = ["--data", "simulated", "--device", "cpu"]
# 10 DDIM steps: from the anchor at 15 % that is 2 steps, so the likelihood step runs once
# a 256-sample image prior and 3 out-of-fold anchors: the code paths of the defaults (4096, 10), faster
TINY_DECODERS = G.GenerativeConfig(diffusion_steps=3, gan_steps=2, num_inference_steps=10,
                                   n_sample_grids=1, prior_size=256, anchor_folds=3)
TINY_DECODER_ARGS = ["--diffusion-steps", "3", "--gan-steps", "2", "--num-inference-steps", "10",
                     "--n-sample-grids", "1", *SMALL_ANCHOR_ARGS]
# what may change with the test images without a leak: scores of a reconstruction against the
# true image, the retrieval among the test trials' own images (labelled so), and timings
AGAINST_TRUTH = {"mse", "pixcorr", "ssim", "two_way"}
IMAGE_RETRIEVAL = "retrieval_test_trials"


def swap_images(data, rows):
    """``data`` whose trials ``rows`` show another unique image (id + 1 mod K) in their images
    only: their image ids (the truth), the candidates and all fMRI unchanged."""
    t = data.trials
    images = t.images.copy()
    images[rows] = data.unique_images[(t.image_ids[rows] + 1) % len(data.unique_images)]
    return replace(data, trials=replace(t, images=images))


def numbers(tree, path=()):
    """(path, value) of every number in a JSON tree; path: the keys and indices leading to it."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, (*path, str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, (*path, str(i)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def changed_numbers(a, b) -> list[tuple]:
    """Paths of the numbers that differ between two JSON trees of one schema (NaN == NaN)."""
    na, nb = dict(numbers(a)), dict(numbers(b))
    assert na.keys() == nb.keys()
    return [p for p in na if na[p] != nb[p] and not (np.isnan(na[p]) and np.isnan(nb[p]))]


def may_use_test_images(path) -> bool:
    return (any("oracle" in k or "seconds" in k for k in path) or bool(AGAINST_TRUTH & set(path))
            or IMAGE_RETRIEVAL in path)


# --------------------------------------------------------------------------- the scripts, S1
def run_scripts(out, data):
    """Run the four scripts' mains (tiny settings) on ``data`` into ``out``. Returns (every JSON
    they wrote, by file name; the reconstructions the generative script shows as fMRI-only)."""
    shown, plot = {}, G.plot_generation

    def spy(true, recon, title, *labelling):
        shown[next(k for k, name in L.DECODER_NAMES.items() if title.startswith(name))] = recon
        return plot(true, recon, title, *labelling)

    args = [*SIM, "--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        for module in (D, E, G):
            mp.setattr(module, "resolve_data", lambda arg: data)
        mp.setattr(G, "plot_generation", spy)
        D.main([*args, "--epochs", "3", "--mixup", "8"])
        E.main([*args, "--oracle"])
        G.main([*args, *TINY_DECODER_ARGS, "--oracle"])
        E.main([*args, "--protocol", "s1", "--seeds", "0", "--epochs", "3", "--permutation-control"])
    return {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}, shown


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The scripts run on the simulated set as it is and with its S1 test images swapped."""
    data = make_simulated_dataset()
    swapped = swap_images(data, np.arange(data.n_file_train, len(data.trials)))
    assert not np.array_equal(swapped.s1().test.images, data.s1().test.images)
    return [run_scripts(tmp_path_factory.mktemp(name), d)
            for name, d in (("as_is", data), ("swapped", swapped))]


@pytest.mark.xdist_group("leaks_two_runs")   # shares a module fixture: one test process (make test)
def test_every_json_number_that_uses_a_test_image_is_an_oracle(two_runs):
    """Walks every JSON the scripts write: the numbers that change with the test images are
    oracles, scores against the true image or the labelled image retrieval; nothing else."""
    (a, _), (b, _) = two_runs
    assert set(a) == set(b) == {"miyawaki_dual_encoder.json", "miyawaki_evaluation.json",
                                "miyawaki_generation.json", "benchmark_s1.json"}
    for name in a:
        leaks = [".".join(p) for p in changed_numbers(a[name], b[name]) if not may_use_test_images(p)]
        assert leaks == [], name
    # the swap does reach the oracle inputs, so the walk would see a number computed from them
    for name in ("miyawaki_evaluation.json", "miyawaki_generation.json"):
        assert any("oracle" in p for p in changed_numbers(a[name], b[name])), name


@pytest.mark.xdist_group("leaks_two_runs")   # shares a module fixture: one test process (make test)
def test_generative_script_reconstructs_from_fmri_only(two_runs):
    (_, a), (_, b) = two_runs
    assert set(a) == set(b) == {"diffusion", "gan"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.xdist_group("leaks_two_runs")   # shares a module fixture: one test process (make test)
def test_s1_benchmark_reports_the_majority_rate_of_its_own_test_trials(two_runs):
    """The chance row beside the 4-way condition accuracy: the S1 benchmark scores the 12 S1 test
    trials, whose majority class is 0.25 on the simulated set (as on the real file), not the 0.336
    of all 119 trials; the checkpoint evaluation of the same trials says the same."""
    (runs, _), _ = two_runs
    test_labels = make_simulated_dataset().s1().test.labels
    majority = np.unique(test_labels, return_counts=True)[1].max() / len(test_labels)
    assert majority == 0.25
    assert runs["benchmark_s1.json"]["chance"]["condition_majority"] == majority
    assert runs["miyawaki_evaluation.json"]["condition_accuracy"]["majority_rate"] == majority


@pytest.mark.xdist_group("leaks_two_runs")   # shares a module fixture: one test process (make test)
def test_s1_benchmark_of_one_seed_says_its_sd_is_over_trials(two_runs):
    """With one split and one seed every ± of the S1 benchmark's table is an SD over test trials,
    the dual encoder's too (with several seeds its ± is over seeds)."""
    (runs, _), _ = two_runs
    md = E.benchmark_markdown(runs["benchmark_s1.json"])
    assert "± = SD over trials." in md and "over seeds" not in md


def test_both_decoders_of_the_benchmark_reconstruct_from_fmri_only():
    data = make_simulated_dataset()
    fold = data.s1()
    swapped = swap_images(data, np.arange(data.n_file_train, len(data.trials))).s1()
    encoder, _ = D.train_dual_encoder(fold.train, D.DualEncoderConfig(epochs=2, val_fraction=0),
                                      progress=False)
    recons = [G.decode_fold(encoder, f, TINY_DECODERS, "cpu")[0] for f in (fold, swapped)]
    assert set(recons[0]) == {"anchor", "diffusion", "gan"}
    for name, recon in recons[0].items():
        np.testing.assert_array_equal(recon, recons[1][name], err_msg=name)


# --------------------------------------------------------------------------- benchmark folds
# two seeds: the ensemble rows (the seeds' fits as one model) run too
BENCHMARK = E.EvaluationConfig(seeds=(0, 1), epochs=2, permutation_control=True)


def run_fold(data, protocol, index, fits=None):
    """benchmark_fold on fold ``index`` of ``protocol`` -> {method: per-trial metrics}; each
    dual-encoder fit is appended to ``fits`` as (training trials, trained model)."""
    def spy(train, *args, **kwargs):
        model, history = train_fit(train, *args, **kwargs)
        fits.append((train, model))
        return model, history

    train_fit = E.train_dual_encoder
    pool = (data.trials.images, data.trials.image_ids) if protocol == "s3" else None
    with pytest.MonkeyPatch.context() as mp:
        if fits is not None:
            mp.setattr(E, "train_dual_encoder", spy)
        rows, _, _ = E.benchmark_fold(BENCHMARK, data, pool, torch.device("cpu"),
                                   (index, *splits(protocol, data)[index]))
    return {method: per_trial for method, per_trial, _ in rows}


@pytest.mark.parametrize("protocol", ["s2", "s3"])
def test_benchmark_rows_do_not_depend_on_the_test_images(protocol):
    data = make_simulated_dataset()
    _, _, test_idx = splits(protocol, data)[3]
    a, b = (run_fold(d, protocol, 3) for d in (data, swap_images(data, test_idx)))
    assert set(a) == {*E.BASELINES, "encoding_model", "dual_encoder", "dual_encoder_embedding_only",
                      "dual_encoder_ridge_readout", "dual_encoder_ensemble",
                      "dual_encoder_permuted"}
    for method, metrics in a.items():
        for metric, values in metrics.items():
            if metric not in AGAINST_TRUTH:
                np.testing.assert_array_equal(values, b[method][metric], err_msg=f"{method} {metric}")


def with_other_test_trials(data, test_idx):
    """``data`` whose trials ``test_idx`` have other fMRI (random) and other images (swap_images)."""
    fmri = data.trials.fmri.copy()
    fmri[test_idx] = np.random.default_rng(0).standard_normal(fmri[test_idx].shape)
    return swap_images(replace(data, trials=replace(data.trials, fmri=fmri)), test_idx)


def test_nested_selection_reads_training_trials_only():
    """The score setting chosen inside an S3 fold, and the inner scores behind the choice, stay
    the same when the fold's test trials get other fMRI and other images: nested selection reads
    the fold's training trials only. (S3 only: the S2 path differs in its inner folds alone.)"""
    data, protocol = make_simulated_dataset(), "s3"
    _, _, test_idx = splits(protocol, data)[3]
    changed = with_other_test_trials(data, test_idx)
    cfg = replace(BENCHMARK, nested=True, permutation_control=False, protocol=protocol)
    pool = lambda d: (d.trials.images, d.trials.image_ids) if protocol == "s3" else None  # noqa: E731
    (rows, _, nested), (_, _, nested_b) = (
        E.benchmark_fold(cfg, d, pool(d), torch.device("cpu"), (3, *splits(protocol, d)[3]))
        for d in (data, changed))
    assert "dual_encoder_nested" in {method for method, _, _ in rows}
    names = {D.setting_name(c) for c in D.score_settings()}
    assert set(nested["inner_top1"]) == set(nested["inner_mrr"]) == names
    assert {k: v for k, v in nested.items() if k != "seconds"} == \
        {k: v for k, v in nested_b.items() if k != "seconds"}


@pytest.mark.parametrize("script", ["tune_dual_encoder", "tune_anchor", "tune_decoders"])
def test_tuning_scripts_read_s1_training_trials_only(script, monkeypatch):
    """benchmarks/tune_*.py choose the released settings: every inner-CV score they report stays
    the same when the 12 S1 test trials get other fMRI and other images (tiny fits, on 2 of the 5
    inner folds), and every image prior they build (the read-out's, the anchor's, the decoders')
    excludes the inner fold's validation images that its training trials never show (passing no
    exclusion in a tuning script changed none of the S1 test trials' numbers, so passed)."""
    folds, new_images_kept, fold = [], [], L.MiyawakiData.fold
    monkeypatch.setattr(L.MiyawakiData, "fold", lambda *a, **kw: folds.append(fold(*a, **kw)) or folds[-1])
    for module in (D, G):
        def spy(images, anchor, generator, size, shift, mix, exclude=None, prior=module.image_prior):
            unseen = folds[-1].test.images[folds[-1].unseen_test]         # the fold being fitted
            excluded = np.zeros((0, *unseen.shape[1:])) if exclude is None else np.asarray(exclude)
            new_images_kept.append(sum(not (excluded == x).all((1, 2, 3)).any() for x in unseen))
            return prior(images, anchor, generator, size, shift, mix, exclude)
        monkeypatch.setattr(module, "image_prior", spy)
    monkeypatch.syspath_prepend(str(L.REPO_DIR / "benchmarks"))
    tune = __import__(script)
    data = make_simulated_dataset()
    changed = with_other_test_trials(data, data.s1().test_idx)
    tiny = replace(TINY_DECODERS, prior_size=32, anchor_folds=2)
    monkeypatch.setattr(D, "inner_folds", lambda *a, folds=D.inner_folds, **kw: list(folds(*a, **kw))[:2])
    monkeypatch.setattr(tune, "inner_folds", D.inner_folds, raising=False)
    monkeypatch.setattr(tune, "DualEncoderConfig", lambda **kw: D.DualEncoderConfig(epochs=1, **kw),
                        raising=False)
    cpu = torch.device("cpu")
    run = {"tune_dual_encoder": lambda d: tune.score(d, D.DualEncoderConfig(epochs=1), "unseen", [0],
                                                     D.score_settings()[::7], cpu),
           "tune_anchor": lambda d: tune.run(d, [replace(tiny, anchor_model="ridge"), tiny],
                                             ["unseen", "seen"]),
           "tune_decoders": lambda d: tune.run(d, {"default": tiny}, [dict(gate_shift=0.0)], ["unseen"],
                                               0, cpu)}[script]
    a, b = run(data), run(changed)
    assert list(numbers(a)) and changed_numbers(a, b) == []
    assert len(new_images_kept) > 0 and sum(new_images_kept) == 0


def test_tune_decoders_scores_a_candidate_without_an_anchor(monkeypatch):
    """A decoder without an anchor is scored once per setting that applies to it, not skipped for
    every blend > 0 (the docstring's --set anchor=False example came out with no row at all)."""
    monkeypatch.syspath_prepend(str(L.REPO_DIR / "benchmarks"))
    import tune_decoders as tune
    tiny = replace(TINY_DECODERS, prior_size=32, anchor_folds=2)
    monkeypatch.setattr(tune, "inner_folds", lambda *a, **kw: list(D.inner_folds(*a, **kw))[:1])
    monkeypatch.setattr(tune, "DualEncoderConfig", lambda **kw: D.DualEncoderConfig(epochs=1, **kw))
    sampling = [dict(anchor_blend=b, gate_shift=0.0) for b in (0.5, 1.0)]
    rows = tune.run(make_simulated_dataset(), {"anchored": tiny, "none": replace(tiny, anchor=False)},
                    sampling, ["unseen"], 0, torch.device("cpu"))["unseen"]
    assert sorted(rows["none"]) == ["diffusion", "gan"]            # once each: no anchor setting
    assert sorted(rows["anchored"]) == [f"{d} anchor_blend={b} gate_shift=0.0"
                                        for d in ("diffusion", "gan") for b in (0.5, 1.0)]


def test_nested_selection_takes_the_best_inner_top1(monkeypatch):
    """The declared rule: the fold's setting is the one of highest inner top-1 (inner MRR is
    recorded, not used); here the two point at different settings. The seeds' fits as one model
    get a nested row at that setting too (at the models' own setting it passed every other test)."""
    data = make_simulated_dataset()
    names = [D.setting_name(c) for c in D.score_settings()]
    best_top1, best_mrr = names[3], names[5]
    monkeypatch.setattr(E, "inner_cv_scores", lambda *args, **kw: {
        "top1": {n: 0.9 if n == best_top1 else 0.5 for n in names},
        "mrr": {n: 0.9 if n == best_mrr else 0.5 for n in names}})
    rows, ensemble = {}, E.ensemble_fold_metrics
    monkeypatch.setattr(E, "ensemble_fold_metrics", lambda fits, train, fold, settings, *a: rows.update(
        settings) or ensemble(fits, train, fold, settings, *a))
    cfg = replace(BENCHMARK, seeds=(0, 1), epochs=1, nested=True, permutation_control=False)
    _, _, nested = E.benchmark_fold(cfg, data, (data.trials.images, data.trials.image_ids),
                                    torch.device("cpu"), (3, *splits("s3", data)[3]))
    assert D.setting_name(nested["setting"]) == best_top1
    assert rows["dual_encoder_ensemble_nested"] == nested["setting"]


def test_s3_training_never_sees_the_held_out_image():
    """On an S3 fold no training trial shows the held-out image, and replacing that image (in
    its trials and among the candidates) leaves every trained weight identical but the pixel
    read-out's, which it reaches only as its image prior's exclusion (as the decoders' prior,
    below): here it excludes something (image 7, a "u", is a turned "n", which the prior makes),
    and refitting the read-out with the other exclusion gives the other fit's read-out."""
    data, k = make_simulated_dataset(), 7
    held_out = data.unique_images[k]
    other = 1.0 - held_out                                   # an image found nowhere in the set
    unique = data.unique_images.copy()
    unique[k] = other
    images = data.trials.images.copy()
    images[data.trials.image_ids == k] = other
    replaced = replace(data, trials=replace(data.trials, images=images), unique_images=unique)
    fits_a, fits_b = [], []
    run_fold(data, "s3", k, fits_a)
    run_fold(replaced, "s3", k, fits_b)
    assert len(fits_a) == len(fits_b) == 3                   # two seeds' dual encoders, the control
    binary = lambda a: (np.asarray(a) > 0.5).reshape(len(a), -1)  # noqa: E731
    for (train, model), (_, model_b) in zip(fits_a, fits_b):
        assert k not in train.image_ids
        assert not (binary(train.images) == binary(held_out[None])).all(1).any()
        state, state_b = model.state_dict(), model_b.state_dict()
        assert state.keys() == state_b.keys()
        for name in state:
            if not name.startswith("readout."):
                assert torch.equal(state[name], state_b[name]), name
        assert not torch.equal(model.readout.weight, model_b.readout.weight)
        refit = D.PixelReadout(train.fmri.shape[1])
        refit.fit(train.fmri, train.images, model.config.readout_model, other[None])
        assert torch.equal(refit.weight, model_b.readout.weight)
        assert torch.equal(refit.bias, model_b.readout.bias)


def test_s3_decoders_do_not_depend_on_the_held_out_image():
    """On an S3 fold the decoders (anchor, image prior and all) learn the same weights whether the
    image their prior must avoid is the held-out one or another never-seen image: the held-out
    image reaches training only as that exclusion, and here (an "e", which no reflection or
    shift of the other figures makes) it excluded nothing. (Image 7, a "u", is a turned "n":
    the prior makes it and the exclusion removes it.)"""
    data, k = make_simulated_dataset(), 6
    _, train_idx, test_idx = splits("s3", data)[k]
    fold = data.fold(train_idx, test_idx)
    encoder, _ = D.train_dual_encoder(fold.train, D.DualEncoderConfig(epochs=2, val_fraction=0),
                                      progress=False)
    cfg = replace(TINY_DECODERS, diffusion_steps=20, gan_steps=10)
    runs = [G.train_generative(encoder, fold.train, cfg, "cpu", progress=False, exclude=ex)
            for ex in (data.unique_images[k:k + 1], 1.0 - data.unique_images[k:k + 1])]
    assert cfg.anchor and cfg.augment_prob > 0
    (*decoders, history), (*decoders_b, history_b) = runs
    assert history["prior"]["rejected_samples"] == history_b["prior"]["rejected_samples"] == 0
    for model, model_b in zip(decoders, decoders_b):
        state, state_b = model.state_dict(), model_b.state_dict()
        for name in state:
            assert torch.equal(state[name], state_b[name]), name


def test_no_image_prior_of_an_s3_fold_holds_the_held_out_image(monkeypatch):
    """Every image prior built for an S3 fold's decoders by the benchmark's ``decode_fold`` (the
    anchor's, the out-of-fold anchors' and the novelty gate's calibration read-outs', the
    decoders' own) leaves out the held-out image, here image 7 (a "u", a turned "n": the priors
    make it, and the exclusion removes it)."""
    data, k = make_simulated_dataset(), 7
    _, train_idx, test_idx = splits("s3", data)[k]
    fold = data.fold(train_idx, test_idx)
    held_out = torch.as_tensor(data.unique_images[k]).flatten() > 0.5
    made, rejected = [], []

    def recorded(*args, **kwargs):
        images, anchors, n_rejected = image_prior(*args, **kwargs)
        made.append(int(((images.flatten(1) > 0.5) == held_out).all(1).sum()))
        rejected.append(n_rejected)
        return images, anchors, n_rejected

    image_prior = D.image_prior
    monkeypatch.setattr(D, "image_prior", recorded)                 # the read-outs' priors
    monkeypatch.setattr(G, "image_prior", recorded)                 # the decoders' own
    encoder = D.MiyawakiDualEncoder(data.n_voxels, config=D.DualEncoderConfig())  # embeddings only
    # the default prior size and folds: a 256-sample prior makes the "u" in 1 of 10 priors, these in 15 of 17
    default = G.GenerativeConfig()
    cfg = replace(TINY_DECODERS, prior_size=default.prior_size, anchor_folds=default.anchor_folds)
    G.decode_fold(encoder, fold, cfg, "cpu")                     # what the S3 benchmark runs
    assert len(made) == 1 + cfg.anchor_folds + 5 + 1             # anchor, out-of-fold, gate, decoders
    assert sum(made) == 0 and sum(r > 0 for r in rejected) >= len(rejected) // 2


def test_every_score_of_a_fold_s_fit_reads_the_trials_it_was_fitted_on(monkeypatch):
    """In a benchmark fold the permutation control's kNN condition and its nested linear parts
    read the control's shuffled trials, as its networks were fitted on, and the real fit's read
    the real trials: a control scored with correctly paired trials would not be a control."""
    data = make_simulated_dataset()
    fitted, reads = {}, []                          # id(model) -> its training trials; scores

    def fit(train, *args, **kwargs):
        model, history = train_dual_encoder(train, *args, **kwargs)
        fitted[id(model)] = train
        return model, history

    def read(name):
        def wrapper(model, train, *args, **kwargs):
            reads.append((name, model, train))
            return real(model, train, *args, **kwargs)
        real = getattr(E, name)
        return wrapper

    train_dual_encoder = E.train_dual_encoder
    monkeypatch.setattr(E, "train_dual_encoder", fit)
    for name in ("embedding_fold_metrics", "with_setting"):
        monkeypatch.setattr(E, name, read(name))
    cfg = replace(BENCHMARK, seeds=(0,), nested=True, protocol="s3")
    E.benchmark_fold(cfg, data, (data.trials.images, data.trials.image_ids), torch.device("cpu"),
                     (3, *splits("s3", data)[3]))
    assert len(fitted) == 2                                     # the real fit and the control
    for model_id, train in fitted.items():
        names = [name for name, model, _ in reads if id(model) == model_id]
        assert {"embedding_fold_metrics", "with_setting"} <= set(names)
    for name, model, train in reads:
        assert train is fitted[id(model)], name


def test_permutation_control_sits_at_chance_over_seeds():
    """The benchmark's control (training fMRI shuffled against images, scored by the benchmark's
    embedding_fold_metrics) identifies S1 test trials at chance for each of three seeds."""
    fold = make_simulated_dataset().s1()
    cfg = D.DualEncoderConfig(epochs=15, mixup=32, val_fraction=0.0)
    ranks = []
    for seed in (0, 1, 2):
        train = E.permuted_trials(fold.train, np.random.default_rng([seed, 0]))
        model, _ = D.train_dual_encoder(train, replace(cfg, seed=seed), "cpu", fold.unique_images,
                                        progress=False)
        ranks.append(E.embedding_fold_metrics(model, train, fold)["rank"])
    ranks = np.concatenate(ranks)
    assert np.mean(ranks == 1) <= 0.15 and np.mean(ranks) > 6      # chance 0.05, mean rank 10.5


def test_tune_decoders_gate_shift_moves_the_gate_s_logit(monkeypatch):
    """``--gate-shift d`` adds d to the gate's intercept (its logit), not to its slope: the two
    gates a shift of 0 and 1.5 give one anchored decoder differ by [0, 1.5] (mutation round 8:
    only a shift of 0 was run)."""
    monkeypatch.syspath_prepend(str(L.REPO_DIR / "benchmarks"))
    import tune_decoders as tune
    tiny = replace(TINY_DECODERS, prior_size=32, anchor_folds=2)
    monkeypatch.setattr(tune, "inner_folds", lambda *a, **kw: list(D.inner_folds(*a, **kw))[:1])
    monkeypatch.setattr(tune, "DualEncoderConfig", lambda **kw: D.DualEncoderConfig(epochs=1, **kw))
    gates, reconstruct = [], tune.reconstruct
    monkeypatch.setattr(tune, "reconstruct", lambda encoder, dec, *a: gates.append(
        dec.readout.gate_coef.clone()) or reconstruct(encoder, dec, *a))
    tune.run(make_simulated_dataset(), {"anchored": tiny}, [dict(gate_shift=0.0), dict(gate_shift=1.5)],
             ["seen"], 0, torch.device("cpu"))
    assert len(gates) == 4                                  # diffusion and GAN, at each shift
    torch.testing.assert_close(gates[2] - gates[0], torch.tensor([0.0, 1.5]))
