"""Evaluation: embedding metrics against brute force, figures, checkpoint errors, a tiny end-to-end
run on the simulated set (dual encoder -> evaluation) and the benchmark's JSON schema."""

import json
import re
import warnings
from dataclasses import replace

import numpy as np
import pytest
import scipy.io
import threadpoolctl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import miyawaki_dataset_loader as L
import miyawaki_dual_encoder as D
import miyawaki_evaluation as E
import miyawaki_generative_backend as G
from helpers import SMALL_ANCHOR_ARGS, file_arrays

FAST = ["--device", "cpu", "--data", "simulated"]


# --------------------------------------------------------------------------- metrics
def unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identification_summary_matches_brute_force_cosine_ranking():
    rng = np.random.default_rng(0)
    fmri, cand = unit(rng, 30) * rng.uniform(0.5, 2, (30, 1)), unit(rng, 20)  # norms must not matter
    ids = rng.integers(0, 20, 30)
    got = L.identification_summary(L.cosine_scores(fmri, cand), ids)
    ranks = []
    for f, t in zip(fmri, ids):
        cos = [f @ c / np.linalg.norm(f) / np.linalg.norm(c) for c in cand]
        ranks.append(1 + sum(cos[j] > cos[t] for j in range(20)))  # no ties with random floats
    assert list(got["ranks"]) == ranks
    assert got["top1"] == np.mean(np.array(ranks) == 1) and got["top5"] == np.mean(np.array(ranks) <= 5)
    assert got["mean_rank"] == pytest.approx(np.mean(ranks))
    assert (got["n_candidates"], got["chance_top1"], got["chance_top5"]) == (20, 0.05, 0.25)


def test_retrieval_ranks_match_brute_force_with_several_matches_and_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(40, 12)).astype(float)  # many ties
    item_ids = rng.integers(0, 5, 12)
    query_ids = rng.choice(item_ids, 40)
    want = []
    for row, q in zip(scores, query_ids):
        # best first; a tie puts non-matches first (pessimistic); rank of the first match
        order = sorted(range(12), key=lambda j: (-row[j], item_ids[j] == q))
        want.append(1 + next(p for p, j in enumerate(order) if item_ids[j] == q))
    np.testing.assert_array_equal(L.retrieval_ranks(scores, query_ids, item_ids), want)
    # one match per query: the same as the protocol's identification ranks
    ids = rng.integers(0, 12, 40)
    np.testing.assert_array_equal(L.retrieval_ranks(scores, ids, np.arange(12)),
                                  L.identification_ranks(scores, ids))
    with pytest.raises(ValueError, match="matching"):
        L.retrieval_ranks(scores[:1], [9], np.zeros(12))


def test_image_to_fmri_ranks_test_trials_and_is_undefined_for_one_image():
    images = np.eye(4)                                   # image k embedded as e_k
    trials = np.array([[1, 0, 0, 0], [0, 0.2, 1, 0], [0, 0.9, 0.1, 0]], float)
    ids = np.array([0, 1, 2])                            # trial 1 looks like image 2 and vice versa
    got = L.image_to_fmri_summary(images, np.arange(4), trials, ids)
    assert got["n_queries"] == 3                         # image 3 has no test trial
    assert got["top1"] == pytest.approx(1 / 3) and got["mean_rank"] == pytest.approx(5 / 3)
    assert got["chance_top1"] == pytest.approx(1 / 3)
    assert np.isnan(L.image_to_fmri_summary(images, np.arange(4), trials, np.zeros(3, int))["top1"])


def test_knn_condition_votes_among_training_embeddings():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    assert list(E.knn_condition(train, [2, 2, 5, 5], np.array([[1, 0.05], [0.05, 1]]), k=1)) == [2, 5]
    assert len(E.knn_condition(train, [2, 2, 5, 5], train, k=50)) == 4   # k capped at the train size


def test_aggregate_sd_over_folds_seeds_or_trials_and_paired_counts():
    a = E.aggregate(np.array([[0.2, 0.4], [0.6, 0.8], [1.0, 1.0]]))
    assert a["mean"] == pytest.approx(2 / 3) and a["std_over"] == "folds"
    assert a["std"] == pytest.approx(np.std([0.3, 0.7, 1.0], ddof=1))
    assert a["std_seeds"] == pytest.approx(np.std([0.6, 0.7333333], ddof=1), abs=1e-6)
    s = E.aggregate(np.array([[0.5, 0.7, 0.9]]))
    assert s["std_over"] == "seeds" and s["std"] == pytest.approx(0.2)
    t = E.aggregate(np.array([[0.5]]), np.array([0.0, 1.0, np.nan]))
    assert t["std_over"] == "trials" and t["std"] == pytest.approx(np.std([0, 1], ddof=1))
    one = E.aggregate(np.array([[1.0]]), np.array([1.0]))        # one test trial: no spread
    assert one["std"] is None and E.mean_sd(one) == "1.000" and E.mean_sd(t) == "0.500 ± 0.707"
    methods = {"ridge": {"top1": {"per_fold": [0.5, 0.5, 1.0]}},
               "x": {"top1": {"per_fold": [0.6, 0.5, 0.0]}}}
    assert E.paired_vs_reference(methods)["x"] == {"mean_diff": pytest.approx(-0.3), "wins": 1,
                                                   "ties": 1, "losses": 1}


def test_permuted_trials_shuffle_fmri_only(sim):
    train = sim.s1().train
    perm = E.permuted_trials(train, np.random.default_rng(0))
    for name in ("images", "labels", "image_ids"):
        np.testing.assert_array_equal(getattr(perm, name), getattr(train, name))
    assert not np.array_equal(perm.fmri, train.fmri)
    np.testing.assert_array_equal(np.sort(perm.fmri, axis=0), np.sort(train.fmri, axis=0))


# --------------------------------------------------------------------------- figures
def test_tsne_perplexity_is_capped_at_a_third_of_the_other_points(monkeypatch):
    """As --tsne-perplexity's help says: min(perplexity, (N - 1) / 3), at least 1."""
    used = []

    class Spy:                                           # stands in for sklearn's TSNE: no fit
        def __init__(self, perplexity, **kw):
            used.append(perplexity)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setattr(E, "TSNE", Spy)
    for n, asked in ((12, 30.0), (100, 30.0), (100, 5.0), (3, 30.0)):
        E.tsne_map(np.zeros((n, 4)), perplexity=asked)
    assert used == [11 / 3, 30.0, 5.0, 1.0]


def test_tsne_works_on_12_points_and_figures_are_figures():
    rng = np.random.default_rng(2)
    xy = E.tsne_map(unit(rng, 12, 16), seed=0, perplexity=30)
    assert xy.shape == (12, 2) and np.all(np.isfinite(xy))
    labels, ids = np.repeat([2, 3, 4, 5], 2), np.arange(8)
    fig = E.plot_latent_space(xy[:4], labels[:4], ids[:4], xy[4:], labels)
    FigureCanvasAgg(fig).draw()                          # the legend hides no point: right of the map
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x0 > ax.get_window_extent().x1
    sim, cands = rng.uniform(-1, 1, (4, 8)), rng.random((8, 1, 28, 28))
    assert isinstance(E.plot_similarity_matrix(sim, ids[:4], cands, labels), Figure)
    assert isinstance(E.plot_correlation_analysis(sim, ids[:4]), Figure)
    # a file of 300 images (30 test trials): a readable figure, not 300 labels on 16000 pixels
    sim, cands, ids = rng.uniform(-1, 1, (30, 300)), rng.random((300, 1, 28, 28)), np.arange(30)
    fig = E.plot_similarity_matrix(sim, ids, cands, np.zeros(300))
    assert max(fig.get_size_inches()) <= 30 and len(fig.axes[0].get_xticklabels()) < 40


def test_latent_space_colours_every_condition_of_the_file():
    """Each condition of a file gets its own colour, not only Miyawaki's 2-5 (a 10-label file's
    images were all grey but two); Miyawaki's keep blue, orange, green, red."""
    from matplotlib.colors import to_rgba
    xy = np.random.default_rng(0).normal(size=(14, 2))
    for image_labels, wanted in ((np.arange(10), 10), (np.array([2, 3, 4, 5]), 4)):
        k = len(image_labels)
        fig = E.plot_latent_space(xy[:4], image_labels[:4], np.arange(4), xy[4:4 + k], image_labels)
        squares = fig.axes[0].collections[1].get_facecolors()[:, :3]   # the image embeddings
        assert len(np.unique(squares.round(6), axis=0)) == wanted
    miyawaki = [to_rgba(c)[:3] for c in ("tab:blue", "tab:orange", "tab:green", "tab:red")]
    np.testing.assert_allclose(squares, miyawaki)


def test_latent_space_numbers_the_test_images_among_hundreds():
    """A random-image session's map (460 images) numbers only the test trials' images and draws
    the others small (460 numbered squares hid the test trials); 20 images are all numbered."""
    rng = np.random.default_rng(0)
    for k, test_ids, numbered in ((460, np.arange(440, 460), 20), (20, np.arange(12), 20),
                                  (40, np.arange(5), 40), (460, np.repeat(np.arange(440, 450), 2), 10)):
        fig = E.plot_latent_space(rng.random((len(test_ids), 2)), np.full(len(test_ids), 2), test_ids,
                                  rng.random((k, 2)), np.full(k, 2))
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert len(texts) == numbered and set(map(str, test_ids)) <= set(texts)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dual encoder trained for 15 epochs on the simulated set, then evaluated (with oracle):
    (out dir, result, the t-SNE figure's title)."""
    out, titles, plot = tmp_path_factory.mktemp("eval"), [], E.plot_latent_space
    D.main([*FAST, "--epochs", "15", "--out-dir", str(out)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "plot_latent_space", lambda *a, title: titles.append(title) or plot(*a, title=title))
        return out, E.main([*FAST, "--out-dir", str(out), "--oracle"]), titles[0]


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_evaluation_end_to_end_from_fmri_only(trained):
    out, result, tsne_title = trained
    saved = json.loads((out / "miyawaki_evaluation.json").read_text())
    for key in ("split", "seed", "n_test", "identification", "condition_accuracy", "config"):
        assert key in saved
    # the settings of this mode only: no benchmark --seeds beside the checkpoint's seed
    assert not set(E.BENCHMARK_OPTIONS) & set(saved["config"]) and "tsne_perplexity" in saved["config"]
    ident = saved["identification"]
    for key in ("n_candidates", "chance_top1", "top1", "top5", "mean_rank", "image_to_fmri_top1"):
        assert key in ident
    for key in ("fmri_latent", "correlation", "majority_rate"):
        assert key in saved["condition_accuracy"]
    assert (saved["split"], saved["n_test"], ident["n_candidates"]) == ("s1", 12, 20)
    # what each part of the score identifies alone, as the dual encoder's JSON and summary.md say
    assert json.loads((out / "miyawaki_dual_encoder.json").read_text())["score_parts"] == ident["score_parts"]
    assert f"each part alone identifies: {L.score_parts_text(ident['score_parts'])}." in \
        (out / "summary.md").read_text()
    assert ident["top1"] > 4 * ident["chance_top1"]     # 15 epochs, simulated SNR
    assert ident["mean_rank"] < 5
    assert saved["condition_accuracy"]["correlation"] > saved["condition_accuracy"]["majority_rate"]
    assert "oracle" in saved["oracle"]["label"].lower()
    assert "uses the image" in saved["oracle"]["image_latent_condition_note"]
    assert saved["baselines"]["ridge"]["top1"] >= 0.5
    # the t-SNE map shows the embeddings, so its title gives their own top-1 before the score's
    assert f"embeddings' top-1 {ident['score_parts']['embedding']['top1']:.2f}, the identification score's " \
           f"{ident['top1']:.2f}" in tsne_title
    for name in ("latent_space_tsne", "similarity_matrix", "correlation_analysis"):
        assert (out / f"miyawaki_{name}.png").stat().st_size > 10_000


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_score_checkpoint_gives_the_script_s_numbers_without_writing(trained, sim):
    """The notebook call: a pure function of (model, fold) that returns what the script saves."""
    out, *_ = trained
    saved = json.loads((out / "miyawaki_evaluation.json").read_text())
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(out / D.CHECKPOINT_NAME)
    before = sorted(p.name for p in out.iterdir())
    scores = E.score_checkpoint(model, sim.s1(), oracle=True)
    assert sorted(p.name for p in out.iterdir()) == before
    for key in ("identification", "retrieval_test_trials", "condition_accuracy", "oracle"):
        assert json.loads(json.dumps(scores[key], default=lambda a: a.tolist())) == saved[key], key


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_score_checkpoint_refuses_a_fold_the_model_was_not_fitted_on(trained, sim):
    """The S1 checkpoint scored on an S3 fold, whose held-out image it was fitted on, gave top-1 1.0
    without a word (a notebook review): the model keeps the fingerprint of its training trials,
    in the checkpoint too, and score_checkpoint refuses another fold's, as it does a fresh fit's."""
    out, *_ = trained
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(out / D.CHECKPOINT_NAME)
    assert model.training_fingerprint == sim.s1().train.fingerprint
    s3 = sim.fold(*L.splits("s3", sim)[0][1:], name="s3-image0")
    with pytest.raises(ValueError, match=r"fitted on other training trials than those of fold "
                                         r"s3-image0, so some of the fold's test trials may be"):
        E.score_checkpoint(model, s3)
    fitted, _ = D.train_dual_encoder(s3.train, D.DualEncoderConfig(epochs=1, mixup=0), "cpu",
                                     s3.unique_images, progress=False)
    assert E.score_checkpoint(fitted, s3)["split"] == "s3-image0"      # its own fold is scored
    with pytest.raises(ValueError, match="fitted on other training trials"):
        E.score_checkpoint(fitted, sim.s1())


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_checkpoint_evaluation_numbers_against_brute_force(trained, sim):
    """The evaluation's identification by each part of the score alone (the embeddings: fMRI
    embedding against each candidate's image embedding; the read-out and the encoding model: the
    score at weight 1), its retrieval among the test trials (each test fMRI embedding against the
    test trials' image embeddings) and the 4-way condition chance, recomputed by hand."""
    saved = json.loads((trained[0] / "miyawaki_evaluation.json").read_text())
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(trained[0] / D.CHECKPOINT_NAME)
    test, cand = sim.s1().test, sim.s1().unique_images
    with torch.no_grad():
        fmri = model.encode_fmri(torch.as_tensor(test.fmri)).numpy()
        images, shown = (model.encode_image(torch.as_tensor(a)).numpy() for a in (cand, test.images))
    ids = test.image_ids
    parts = saved["identification"]["score_parts"]
    assert parts["embedding"]["top1"] == np.mean((fmri @ images.T).argmax(1) == ids)
    for name, weights in (("readout", (1, 0)), ("encoding", (0, 1))):
        alone = model.score_candidates(torch.as_tensor(test.fmri), torch.as_tensor(cand), *weights)
        assert parts[name]["top1"] == np.mean(alone.argmax(1) == ids), name
    a, b = model.config.readout_weight, model.config.encoding_weight
    assert [p["weight"] for p in parts.values()] == pytest.approx([1 - a - b, a, b])
    assert saved["retrieval_test_trials"]["top1"] == np.mean(ids[(fmri @ shown.T).argmax(1)] == ids)
    assert saved["condition_accuracy"]["uniform_chance"] == 0.25


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_extract_latents_from_trials_uses_fmri_only(trained, sim):
    model, _ = D.MiyawakiDualEncoder.from_checkpoint(trained[0] / D.CHECKPOINT_NAME)
    test = sim.s1().test
    reps = E.extract_latent_representations(model, test)
    assert set(reps) == {"fmri_latent", "correlation"} and reps["correlation"].shape == (12, 512)
    np.testing.assert_allclose(np.linalg.norm(reps["correlation"], axis=1), 1, atol=1e-5)
    both = E.extract_latent_representations(model, test.fmri, images=test.images)
    assert set(both) == {"fmri_latent", "correlation", "image_latent", "image_correlation"}
    np.testing.assert_allclose(both["correlation"], reps["correlation"], atol=1e-6)
    # the seed's DataLoader form: a key both forms give means the same thing in each (its "fmri"
    # was the encoder latent where the array form's was the embedding); the latents keep the seed's
    # names there, and the array form has no key of that name
    loader = E.extract_latent_representations(model, L.make_dataloaders(sim.s1())[1])
    for key in set(loader) & set(both):
        np.testing.assert_allclose(loader[key].numpy(), both[key], atol=1e-6, err_msg=key)
    assert set(loader) & set(both) == {"correlation", "image_correlation"}
    np.testing.assert_allclose(loader["fmri"].numpy(), both["fmri_latent"], atol=1e-6)


def test_evaluation_before_training_names_the_script(tmp_path, capsys):
    with pytest.raises(L.CheckpointError, match="miyawaki_dual_encoder.py"):
        E.main([*FAST, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        L.run_cli(lambda: E.main([*FAST, "--out-dir", str(tmp_path)]))
    message = capsys.readouterr().err
    assert exc.value.code == 1 and message.count("\n") == 1
    assert message.startswith("error: ") and "python miyawaki_dual_encoder.py" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.xdist_group("evaluation_trained")   # shares a module fixture: one test process (make test)
def test_checkpoint_from_another_voxel_count_is_refused(trained, tmp_path):
    path = tmp_path / "other.mat"
    scipy.io.savemat(path, file_arrays(L.make_simulated_dataset(n_voxels=300)))
    with pytest.raises(L.CheckpointError, match="967 voxels.*300 voxels.*miyawaki_dual_encoder.py"):
        E.main(["--device", "cpu", "--data", str(path), "--out-dir", str(tmp_path),
                "--checkpoint", str(trained[0] / D.CHECKPOINT_NAME)])


def test_a_file_with_one_test_trial_prints_undefined_numbers_as_undefined(tmp_path, mat_arrays,
                                                                          write_mat, capsys):
    """One test trial leaves the image -> fMRI retrieval and the decoders' 2-way score undefined:
    the scripts print "undefined" (the JSONs hold null), not nan, and warn of no empty mean."""
    arrays = {**mat_arrays, **{k: mat_arrays[k][:1] for k in ("fmriTest", "stimTest", "labelTest")}}
    args = ["--device", "cpu", "--data", str(write_mat(tmp_path / "one.mat", arrays)),
            "--out-dir", str(tmp_path / "out")]
    D.main([*args, "--epochs", "2", "--mixup", "8"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        E.main(args)
        G.main([*args, "--diffusion-steps", "3", "--gan-steps", "2", "--num-inference-steps", "2",
                "--n-sample-grids", "0", *SMALL_ANCHOR_ARGS])
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "S1 image->fMRI (1 image(s) rank 1 test trial(s)): top-1 undefined" in out
    assert out.count("2-way undefined (chance 0.5)") == 2                  # diffusion, GAN


def test_condition_of_a_random_image_session_is_flagged_as_zero_by_construction():
    """S1 of a random-image session: the training trials are all condition 1 (random), the test
    trials the figures' 2-5, so the kNN condition is 0 whatever the model: the result says so; on
    the figure set it says nothing."""
    for data, flagged in ((L.make_simulated_dataset(random_images=40), True),
                          (L.make_simulated_dataset(), False)):
        fold = data.s1()
        model, _ = D.train_dual_encoder(fold.train, D.DualEncoderConfig(epochs=1, mixup=0), "cpu",
                                        fold.unique_images, progress=False)
        cond = E.score_checkpoint(model, fold)["condition_accuracy"]
        assert ("note" in cond) == flagged
        if flagged:
            assert cond["correlation"] == cond["fmri_latent"] == 0 and "0 by construction" in cond["note"]


def test_summary_flags_a_condition_accuracy_that_is_zero_by_construction(tmp_path, monkeypatch):
    """summary.md carries the evaluation's note beside a condition accuracy that is 0 by
    construction (a random-image session: no test condition occurs in training); it showed the 0
    as a measurement, where the console and the JSON said it was not."""
    data = L.make_simulated_dataset(random_images=40)
    for module in (D, E):
        monkeypatch.setattr(module, "resolve_data", lambda arg: data)
    args = ["--data", "simulated-random", "--out-dir", str(tmp_path), "--device", "cpu"]
    D.main([*args, "--epochs", "1", "--mixup", "8"])
    E.main(args)
    summary = (tmp_path / "summary.md").read_text()
    assert "| condition from the fMRI-only embedding (kNN) | 0.000 (by construction: below) |" in summary
    assert "0 by construction, not a measurement" in summary


def test_condition_chance_counts_the_trials_conditions():
    """The uniform condition chance counts the trials' conditions: a file that shows each image under
    two conditions has 2 (its images' labels, each the first trial's, gave one: chance 1.00), and a
    file of one condition is flagged as 1 by construction."""
    sim = L.make_simulated_dataset()
    two = np.where(np.arange(len(sim.trials)) % 2, 2, 3)          # every image under both
    for labels, chance in ((two, 0.5), (np.full(len(sim.trials), 2), 1.0), (sim.trials.labels, 0.25)):
        data = replace(sim, trials=replace(sim.trials, labels=labels),
                       unique_labels=np.full(len(sim.unique_images), 2))
        assert L.uniform_condition_chance(data.trials.labels) == chance
        fold = data.s1()
        model, _ = D.train_dual_encoder(fold.train, D.DualEncoderConfig(epochs=1, mixup=0), "cpu",
                                        fold.unique_images, progress=False)
        cond = E.score_checkpoint(model, fold)["condition_accuracy"]
        assert cond["uniform_chance"] == chance
        assert ("1 by construction" in cond.get("note", "")) == (chance == 1)
        # the majority-class rate of the scored (test) trials (the training trials': 0.346 against 0.25)
        assert cond["majority_rate"] == L.majority_rate(fold.test.labels)
    # a k above the training trials is capped by the vote, and the result says which k voted
    assert E.score_checkpoint(model, fold, 500)["condition_accuracy"]["k"] == len(fold.train)
    # one test trial of a condition no training trial has: the others are scored, with no note
    labels = sim.trials.labels.copy()
    labels[sim.s1().test_idx[0]] = 6
    odd = replace(sim, trials=replace(sim.trials, labels=labels)).s1()
    assert "note" not in E.score_checkpoint(model, odd)["condition_accuracy"]


def test_nested_inner_folds_mimic_the_fold():
    """Nested selection holds images out of its inner folds where the fold's test images are never
    seen in training (S3, and S1 of a random-image session), trials where they are (S1, S2)."""
    sim, session = L.make_simulated_dataset(), L.make_simulated_dataset(random_images=60)
    _, train_idx, test_idx = L.splits("s3", sim)[0]
    assert E.nested_scheme(sim.s1()) == E.nested_scheme(sim.fold(*L.splits("s2", sim)[0][1:])) == "seen"
    assert E.nested_scheme(sim.fold(train_idx, test_idx)) == E.nested_scheme(session.s1()) == "unseen"
    # test trials of a never-seen image and of a seen one: seen (unseen only where every one is new)
    seen_too = np.append(test_idx, train_idx[0])
    assert E.nested_scheme(sim.fold(np.setdiff1d(train_idx, seen_too), seen_too)) == "seen"


def test_s2_with_an_image_shown_once_averages_its_unseen_metric_over_its_folds(tmp_path, mat_arrays,
                                                                              monkeypatch):
    """An S2 fold whose test trial shows an image that no training trial shows (here one trial
    given an image of its own, in the second fold) has the nearest-training-image check; the
    others do not. The benchmark averages each metric over the folds that have it and names them.
    S2's 2-way rivals are the fold's test trials (docs/PROTOCOL.md; S3's, all trials: the pool
    of all trials on S2 passed every test)."""
    pools, fold_run = [], E.benchmark_fold
    monkeypatch.setattr(E, "benchmark_fold", lambda cfg, data, pool, *a: pools.append(pool)
                        or fold_run(cfg, data, pool, *a))
    for trial in range(len(mat_arrays["stimTrn"])):
        arrays = {k: v.copy() for k, v in mat_arrays.items()}
        arrays["stimTrn"][trial] = 1 - arrays["stimTrn"][trial]          # an image found nowhere else
        path = tmp_path / "once.mat"
        scipy.io.savemat(path, arrays)
        folds = L.splits("s2", L.load_miyawaki(path))
        if trial in folds[1][2]:
            break
    result = E.main(["--device", "cpu", "--data", str(path), "--protocol", "s2", "--max-folds", "2",
                     "--seeds", "0", "--epochs", "1", "--out-dir", str(tmp_path / "out")])
    assert pools == [None, None]
    ridge = result["methods"]["ridge"]
    assert len(ridge["top1"]["per_fold"]) == 2 and "folds" not in ridge["top1"]
    assert ridge["closer_than_train"]["folds"] == [folds[1][0]]
    assert len(ridge["closer_than_train"]["per_fold"]) == 1
    assert result["n_candidates"] == 21                               # 20 figures and the new image
    assert result["n_unseen_test_trials"] == 1
    assert result["n_test_trials"] == len(folds[0][2]) + len(folds[1][2])
    md = (tmp_path / "out" / "benchmark_s2.md").read_text()
    assert "ridge (21-way top-1)" in md and "S2 note: 1 of the folds'" in md


def test_benchmark_s3_two_folds_writes_the_schema(tmp_path, capsys, monkeypatch):
    (tmp_path / "benchmark_s3_reconstructions.png").write_bytes(b"an earlier --generative run's")
    shuffles, permuted = [], E.permuted_trials         # each fold's permutation control's shuffle
    monkeypatch.setattr(E, "permuted_trials", lambda train, rng: shuffles.append(
        rng.bit_generator.state["state"]["state"]) or permuted(train, rng))
    result = E.main([*FAST, "--protocol", "s3", "--max-folds", "2", "--seeds", "0", "1",
                     "--epochs", "2", "--permutation-control", "--nested", "--out-dir", str(tmp_path)])
    # the console's rows say what their ± is, as the markdown does; without a live progress bar
    # (not a terminal) a line per fold says how far the run is and how long the rest should take
    out = capsys.readouterr().out
    assert "Mean over folds; ± = SD over folds:\nmean image" in out
    assert re.search(r"\| fold 1 of 2, \d+ s so far, about [1-9]\d* s to go\n", out)
    assert re.search(r"\| fold 2 of 2, \d+ s so far, about 0 s to go\n", out)
    saved = json.loads((tmp_path / "benchmark_s3.json").read_text())
    assert saved["protocol"] == "s3" and saved["n_folds"] == 2 and saved["seeds"] == [0, 1]
    assert not set(E.CHECKPOINT_OPTIONS) & set(saved["config"]) and saved["config"]["seeds"] == [0, 1]
    assert "No results yet" in (tmp_path / "summary.md").read_text()   # rewritten, as by every script
    assert saved["data_fingerprint"] == L.make_simulated_dataset().fingerprint   # which data, not a path
    assert saved["seed_fits"] == "separate"                   # auto on a CPU: one fit per seed
    # a fit's time: the dual encoders' seconds over folds x seeds; each fold's control its own
    # shuffle (one for every fold was a copy of one control, not independent ones)
    assert saved["dual_encoder_seconds_per_fit"] == pytest.approx(saved["seconds"]["dual_encoder"] / 4)
    assert len(shuffles) == 2 and shuffles[0] != shuffles[1]
    assert not (tmp_path / "benchmark_s3_reconstructions.png").exists()   # no decoders: no gallery
    assert set(saved["methods"]) == {*E.BASELINES, "encoding_model", "dual_encoder",
                                     "dual_encoder_permuted", "dual_encoder_embedding_only",
                                     "dual_encoder_ridge_readout", "dual_encoder_nested",
                                     "dual_encoder_permuted_nested", "dual_encoder_ensemble",
                                     "dual_encoder_ensemble_nested"}
    nested = saved["nested"]
    assert nested["inner_scheme"] == "unseen" and nested["inner_repeats"] == 1
    assert nested["grid"] == {k: list(v) for k, v in D.SCORE_GRID.items()}
    assert [c["fold"] for c in nested["per_fold"]] == saved["folds"]
    for choice in nested["per_fold"]:       # the chosen setting is the best by its inner top-1
        assert len(choice["inner_top1"]) == len(choice["inner_mrr"]) == len(D.score_settings())
        assert choice["inner_top1"][D.setting_name(choice["setting"])] == max(choice["inner_top1"].values())
    for name, metrics in saved["methods"].items():
        wanted = ({"top1", "top5", "condition", "condition_top1"} if name.startswith("dual")
                  else {"top1", "top5", "condition"} if name == "encoding_model"   # no image
                  else {*L.METRICS, "closer_than_train"})   # the S3 nearest-training-image check
        assert set(metrics) == wanted, name
        for m in metrics.values():
            assert {"mean", "std"} <= set(m) and len(m["per_fold"]) == 2
            assert m["std_over"] == "folds"
    assert "std_seeds" in saved["methods"]["dual_encoder"]["top1"]
    for name in ("dual_encoder_ensemble", "dual_encoder_ensemble_nested"):   # one model per fold
        assert all(len(v) == 1 for v in saved["methods"][name]["top1"]["per_fold_seed"])
    assert set(saved["paired_vs_ridge_top1"]["dual_encoder"]) == {"mean_diff", "wins", "ties", "losses"}
    assert saved["chance"]["top1"] == 0.05
    # kNN cannot name an image absent from training (docs/BASELINES.md S3)
    assert saved["methods"]["knn1"]["top1"]["mean"] == 0.0
    md = (tmp_path / "benchmark_s3.md").read_text()
    assert "| *chance* | 0.050 | 0.250 |" in md and "wins" in md and "permutation control" in md
    assert result["methods"] == saved["methods"]
    # a --max-folds run says that it is one, and what S3 is, in its title lines
    assert saved["n_folds_available"] == 20
    assert md.startswith("# Benchmark S3: leave-one-stimulus-out (the test image never in training)"
                         "\n\nthe first 2 of 20 folds (--max-folds)")
    assert "(of the scored folds' test trials, which --max-folds may limit" in md   # one condition here
    assert f"model only where its weight is > 0: {len(D.score_settings())} settings)" in md
    assert "The mean image scores below 0.5 here: it is the mean of the training images" in md
    # on S3 every other candidate is a training image: the nearest-training-image check is the
    # PixCorr top-1 again, fold for fold, as the markdown says
    for name in ("ridge", "mean_image", "multiscale_local"):
        m = saved["methods"][name]
        assert m["closer_than_train"]["per_fold"] == m["top1"]["per_fold"], name
    assert "top-1 by PixCorr again" in md


def test_identification_metrics_per_trial_against_their_ranks(sim):
    """The benchmark's per-trial rank, top-1, top-5 and condition of the top-1 image, from scores
    that put each test trial's true image at a chosen rank (1 .. 7; top-5 counting rank 5 in
    was checked nowhere: `< 5` passed every test)."""
    fold = sim.s1()
    n, k = len(fold.test), len(fold.unique_images)
    ranks = np.arange(n) % 7 + 1
    scores = np.zeros((n, k))
    for i, (true, rank) in enumerate(zip(fold.test.image_ids, ranks)):
        others = [c for c in range(k) if c != true]
        order = others[:rank - 1] + [true] + others[rank - 1:]        # best first
        scores[i, order] = np.arange(k, 0, -1)
    m = E.identification_metrics(scores, fold)
    assert np.array_equal(m["rank"], ranks)
    assert np.array_equal(m["top1"], (ranks == 1).astype(float))
    assert np.array_equal(m["top5"], (ranks <= 5).astype(float)) and m["top5"].sum() > m["top1"].sum()
    top_image = scores.argmax(1)
    same = fold.unique_labels[top_image] == fold.test.labels
    assert np.array_equal(m["condition_top1"], same.astype(float))


def test_benchmark_workers_give_the_same_numbers_as_one_process(tmp_path, monkeypatch):
    """Folds run in 2 processes (1 thread each) match one process with 1 thread, fold by fold."""
    args = [*FAST, "--protocol", "s3", "--max-folds", "3", "--seeds", "0", "--epochs", "3",
            "--permutation-control"]
    spawn, pools = E.multiprocessing.get_context("spawn"), []

    class Context:  # the real spawn context, noting each worker pool it makes
        def Pool(self, processes, *args):
            pools.append(processes)
            return spawn.Pool(processes, *args)

    monkeypatch.setattr(E.multiprocessing, "get_context", lambda method: Context())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pooled = E.main([*args, "--workers", "2", "--out-dir", str(tmp_path / "pooled")])
        torch.set_num_threads(1)
        single = E.main([*args, "--out-dir", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(threads)
    assert pools == [2] and pooled["workers"] == 2 and single["workers"] == 1
    for method in ("ridge", "dual_encoder", "dual_encoder_permuted"):
        for metric, m in single["methods"][method].items():
            assert pooled["methods"][method][metric]["per_fold"] == m["per_fold"], (method, metric)
    with pytest.raises(SystemExit):
        E.parse_args(["--protocol", "s3", "--workers", "0"])


def test_benchmark_starts_no_more_worker_processes_than_folds(tmp_path, monkeypatch):
    """--workers 2 with one fold runs it in this process; with two folds, in a pool of 2."""
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    pools = []

    class Context:  # notes the pool's size and stops the run there
        def Pool(self, processes, *args):
            pools.append(processes)
            raise Stop

    monkeypatch.setattr(E.multiprocessing, "get_context", lambda method: Context())
    monkeypatch.setattr(E, "benchmark_fold", stop)
    for folds, pool in (("1", []), ("2", [2])):
        pools.clear()
        with pytest.raises(Stop):
            E.main([*FAST, "--protocol", "s3", "--max-folds", folds, "--seeds", "0", "--workers", "2",
                    "--out-dir", str(tmp_path)])
        assert pools == pool


def test_benchmark_workers_run_blas_on_their_share_of_threads():
    """A worker's numpy / scipy BLAS runs on the worker's threads, not on one per core (the tests
    set 1 thread by environment, so 2 shows the limit at work)."""
    with E.multiprocessing.get_context("spawn").Pool(1, E.worker_threads, (2,)) as pool:
        info = pool.apply(threadpoolctl.threadpool_info)
    blas = [lib["num_threads"] for lib in info if lib["user_api"] == "blas"]
    assert blas and set(blas) == {2}, info


@pytest.mark.parametrize("stretch", [True, False])
def test_generative_decoders_are_scored_from_fmri_only(sim, stretch, monkeypatch):
    """A fold's anchor row (the decoders' ablation) is what both decoders output with their novelty
    gate wide open (at the default blend b = 1: the clipped anchor, stretched where
    ``output_stretch`` is on; stretching it with the stretch off passed every other test)."""
    fold = sim.s1()
    encoder, _ = D.train_dual_encoder(fold.train, D.DualEncoderConfig(epochs=4, val_fraction=0),
                                      progress=False)
    tiny = G.GenerativeConfig(seed=0, diffusion_steps=3, gan_steps=3, num_inference_steps=2,
                              prior_size=256, anchor_folds=3, output_stretch=stretch)
    monkeypatch.setattr(G.LinearReadout, "novelty", lambda self, anchor: torch.ones(len(anchor)))
    recons, seconds, gate = G.decode_fold(encoder, fold, tiny, "cpu")
    assert set(recons) == set(seconds) == {"anchor", "diffusion", "gan"}
    assert gate.shape == (12,) and np.all((gate >= 0) & (gate <= 1))   # the decoders' novelty gate
    for recon in recons.values():
        assert recon.shape == (12, 1, 28, 28) and np.all((recon >= 0) & (recon <= 1))
        assert set(L.fold_means(L.score_reconstructions(recon, fold))) == set(L.METRICS)
    for name in ("diffusion", "gan"):
        np.testing.assert_array_equal(recons[name], recons["anchor"], err_msg=name)


def test_generative_benchmark_says_where_the_gate_could_not_be_calibrated(sim, tmp_path, monkeypatch):
    """On a file that shows every training image once (a random-image session, a digits file) no
    fold's gate can be calibrated: both decoders output their anchor there, and the benchmark's
    JSON and markdown say so (their rows equalled the anchor's without a word; the decoders are
    stubbed here: what is tested is the count and the note)."""
    data = L.make_simulated_dataset(random_images=60)
    monkeypatch.setattr(E, "resolve_data", lambda arg: data)

    def decode_fold(encoder, fold, config, device):        # the mean image, instantly
        mean = np.repeat(fold.train.images.mean(0, keepdims=True), len(fold.test), 0)
        return ({g: mean for g in E.GENERATIVE}, {g: 0.0 for g in E.GENERATIVE},
                np.ones(len(fold.test)))
    monkeypatch.setattr(G, "decode_fold", decode_fold)
    result = E.main([*FAST, "--protocol", "s3", "--max-folds", "2", "--seeds", "0", "--epochs", "1",
                     "--generative", "--out-dir", str(tmp_path)])
    assert result["n_folds_gate_uncalibrated"] == 2
    assert ("In 2 of the 2 folds no training image is shown twice, so the gate has no seen examples"
            in (tmp_path / "benchmark_s3.md").read_text())
    assert G.gate_can_be_calibrated(sim.trials.image_ids[L.splits("s3", sim)[0][1]])   # Miyawaki's
    assert not G.gate_can_be_calibrated(np.arange(5)) and not G.gate_can_be_calibrated(np.array([], int))
    assert "no training image is shown twice" not in E.benchmark_markdown(
        {**json.loads((tmp_path / "benchmark_s3.json").read_text()), "n_folds_gate_uncalibrated": 0})


def test_s3_gallery_marks_a_memorised_reconstruction_and_shows_the_gate(sim):
    """The S3 --generative figure's panels (fold_gallery): a reconstruction equal to the never-seen
    image passes the nearest-training-image check, one equal to the nearest training image is
    marked memorised; the decoders' panels carry the fold's novelty gate."""
    name, train_idx, test_idx = L.splits("s3", sim)[4]
    fold = sim.fold(train_idx, test_idx, name)
    true = fold.test.images
    nearest = fold.unique_images[L.nearest_training_check(true, fold)[1]]
    copied = next(k for k in np.unique(fold.train.image_ids)              # another training image
                  if k != L.nearest_training_check(true, fold)[1][0])
    recons = {"anchor": true, "diffusion": true,
              "gan": np.repeat(fold.unique_images[copied:copied + 1], len(true), 0)}
    gallery = E.fold_gallery(fold, recons, np.full(len(true), 0.75))
    assert list(gallery) == ["true", "ridge", "anchor", "diffusion", "gan", "nearest training image"]
    img, corr, like, gate = gallery["diffusion"]
    assert img.shape == (1, 28, 28) and corr == pytest.approx(1.0) and like is None and gate == 0.75
    assert gallery["gan"][2] == copied and gallery["gan"][3] == 0.75    # the image the GAN copied
    assert gallery["anchor"][3] is None and gallery["ridge"][3] is None
    np.testing.assert_array_equal(gallery["nearest training image"][0], nearest[0])
    fig = E.plot_gallery([gallery, gallery], ["a", "b"], "title")
    assert len(fig.axes) == 2 * len(gallery)
    assert f"closer to #{copied}" in fig.axes[4].get_title() and "g=0.75" in fig.axes[3].get_title()
    # a seen image (S2) is a training image itself: its perfect reconstruction ties with it and
    # is no memorisation
    s2 = sim.fold(*L.splits("s2", sim)[0][1:])
    assert E.fold_gallery(s2, {"diffusion": s2.test.images})["diffusion"][2] is None



def test_generative_benchmark_fold_scores_both_decoders_and_records_their_gate(sim, monkeypatch):
    """--generative on an S3 fold: anchor, diffusion and GAN rows with the protocol's metrics and
    the nearest-training-image check; the decoders' rows carry their (shared) novelty gate per test
    trial, as does the fold's gallery, and the anchor's row, which uses no gate, does not. With
    --permutation-control the three are fitted again on the control's shuffled pairs, on top of its
    dual encoder (the reconstruction rows had no control): they reconstruct no better than the
    mean image and never identify the held-out image, where the real ones do (measured on this
    fold: PixCorr 0.14-0.16 against the mean image's 0.24 and the real rows' 0.89-0.90)."""
    config = G.GenerativeConfig
    tiny = lambda seed: replace(config(seed=seed), diffusion_steps=3, gan_steps=2,  # noqa: E731
                                num_inference_steps=4, prior_size=64, n_sample_grids=0)
    monkeypatch.setattr(G, "GenerativeConfig", tiny)          # what benchmark_fold imports
    cfg = E.EvaluationConfig(protocol="s3", seeds=(0,), epochs=2, generative=True, permutation_control=True)
    job = (7, *L.splits("s3", sim)[7])
    rows, gallery, _ = E.benchmark_fold(cfg, sim, (sim.trials.images, sim.trials.image_ids),
                                        torch.device("cpu"), job)
    rows = {method: per_trial for method, per_trial, _ in rows}
    n_test = len(job[3])
    means = {method: L.fold_means(per_trial) for method, per_trial in rows.items()}
    floor = means["mean_image"]["pixcorr"]
    for name in E.GENERATIVE:
        assert {*L.METRICS, "closer_than_train"} <= set(rows[name]), name
        control = means[f"{name}_permuted"]
        assert control["pixcorr"] < floor + 0.05 and control["top1"] == 0, (name, control)
        assert means[name]["pixcorr"] > floor + 0.3 and means[name]["top1"] == 1, name
    assert "novelty_gate" not in rows["anchor"] and "novelty_gate" not in rows["anchor_permuted"]
    gate = rows["diffusion"]["novelty_gate"]
    assert gate.shape == (n_test,) and np.all((gate >= 0) & (gate <= 1))
    np.testing.assert_array_equal(rows["gan"]["novelty_gate"], gate)
    assert gallery["diffusion"][3] == gallery["gan"][3] == pytest.approx(float(gate[0]))
    assert L.fold_means(rows["diffusion"])["novelty_gate"] == pytest.approx(float(gate.mean()))


def test_encoding_model_row_is_the_model_at_the_config_s_alpha_and_voxels(sim):
    """The benchmark's "encoding model" row is ``EncodingReadout`` fitted with the config's alpha
    and voxel fraction (swapped, it was alpha 0.4 on every voxel: a wrong row that passed every
    test; mutation round 8)."""
    fold, cfg = sim.s1(), D.DualEncoderConfig(encoding_alpha=30.0, encoding_voxels=0.2)
    enc = D.EncodingReadout(sim.n_voxels)
    enc.fit(fold.train.fmri, fold.train.images, fold.train.image_ids, 30.0, 0.2)
    assert int(enc.voxels.sum()) == round(0.2 * sim.n_voxels)
    scores = enc.scores(torch.as_tensor(fold.test.fmri), torch.as_tensor(fold.unique_images))
    np.testing.assert_array_equal(E.encoding_model_metrics(fold, cfg)["rank"],
                                  L.identification_ranks(np.asarray(scores), fold.test.image_ids))
