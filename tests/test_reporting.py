"""Reporting: what the result tables and figures show a reader, from hand-made inputs (no training).
The benchmark's markdown (every table row as wide as its header, the paired wins / ties / losses
under their own headings, the chance row's condition cell), summary.md's chance cells, the S3
gallery's panels (the first test trial everywhere, the protocol's clipped PixCorr, red only for a
memorised reconstruction), the generation figure's titles (r with the true image, red and
"as #k" only for a missed identification), where a panel's title sits, and what the speed
benchmark says the stages ran on."""

import io
import json
import re

import numpy as np
import pytest
from matplotlib.colors import same_color
from matplotlib.figure import Figure

import miyawaki_dataset_loader as L
import miyawaki_evaluation as E
import miyawaki_generative_backend as G


# --------------------------------------------------------------------------- helpers
def md_tables(text: str) -> list[tuple[str | None, list[list[str]]]]:
    """The markdown tables of ``text``: (the last heading above, rows as lists of stripped cells)."""
    tables, rows, heading = [], None, None
    for line in text.splitlines():
        if line.startswith("|"):
            if rows is None:
                rows = []
                tables.append((heading, rows))
            rows.append([c.strip() for c in line.strip()[1:-1].split("|")])
        else:
            rows = None
            if line.startswith("#"):
                heading = line
    return tables


def by_first_cell(rows: list[list[str]]) -> dict[str, list[str]]:
    return {r[0]: r for r in rows[2:]}          # after the header and separator rows


def title_color_is_red(ax) -> bool:
    return same_color(ax.title.get_color(), "tab:red")


# --------------------------------------------------------------------------- benchmark markdown
N_FOLDS = 6
RIDGE_TOP1 = [0.20, 0.30, 0.25, 0.40, 0.10, 0.35]
RIDGE_PIXCORR = [0.40, 0.50, 0.45, 0.42, 0.38, 0.47]
# per-fold values against ridge (by hand): dual encoder 3 wins / 1 tie / 2 losses on top-1,
# knn1 1 win / 0 ties / 5 losses; diffusion 4 wins / 0 ties / 2 losses on PixCorr
DUAL_TOP1 = [0.50, 0.30, 0.10, 0.60, 0.05, 0.45]
KNN1_TOP1 = [0.10, 0.20, 0.30, 0.30, 0.05, 0.30]
DIFFUSION_PIXCORR = [0.50, 0.40, 0.55, 0.50, 0.30, 0.60]
DIFFUSION_TOP1 = [0.20, 0.30, 0.25, 0.40, 0.10, 0.35]   # ties ridge in every fold


def hand_made_benchmark() -> dict:
    """A benchmark result as run_benchmark writes it: 6 folds, dual encoder over 2 seeds."""
    rng = np.random.default_rng(0)

    def method(top1, pixcorr=None, seeds=1, extra=()):
        out = {}
        for metric in (*L.METRICS, *extra):
            v = {"top1": top1, "pixcorr": pixcorr}.get(metric) or list(rng.uniform(0, 1, N_FOLDS))
            per_seed = np.repeat(np.asarray(v, float)[:, None], seeds, axis=1)
            out[metric] = E.aggregate(per_seed)
        return out

    methods = {"ridge": method(RIDGE_TOP1, RIDGE_PIXCORR),
               "knn1": method(KNN1_TOP1),
               "dual_encoder": method(DUAL_TOP1, seeds=2, extra=("condition_top1",)),
               "diffusion": method(DIFFUSION_TOP1, DIFFUSION_PIXCORR)}
    return {
        "protocol": "s2", "folds": [f"s2-fold{i}" for i in range(N_FOLDS)], "n_folds": N_FOLDS,
        "seeds": [0, 1], "data_source": "simulated", "n_trials": 119, "n_candidates": 20,
        "n_test_trials": 119, "n_unseen_test_trials": 0,
        "chance": {**L.chance_levels(20), "condition_uniform": 0.25, "condition_majority": 0.336},
        "methods": methods,
        "paired_vs_ridge_top1": E.paired_vs_reference(methods),
        "paired_vs_ridge_pixcorr": {g: v for g, v in E.paired_vs_reference(methods, metric="pixcorr")
                                    .items() if g in E.GENERATIVE},
        "seconds": {"total": 30.0, "ridge": 0.5, "knn1": 0.2, "dual_encoder": 20.0, "diffusion": 9.0},
        "config": {"epochs": 2, "knn_k": 5},
    }



def test_benchmark_markdown_says_when_knn_k_is_capped():
    """--knn-k above a fold's training trials: they all vote (the condition is then the majority);
    the markdown said "k=1000" as if a thousand had voted."""
    result = hand_made_benchmark()
    assert "training trials (k=5)" in E.benchmark_markdown(result)   # results without the record too
    result.update(config={**result["config"], "knn_k": 1000}, knn_voters=[95, 96, 95, 95, 96, 95])
    assert "(k=1000, capped at each fold's training trials: 95 vote)" in E.benchmark_markdown(result)


@pytest.mark.parametrize("protocol, unseen", [("s2", 0), ("s2", 3), ("s3", 119)])
def test_benchmark_markdown_says_the_template_snap_is_an_identification(protocol, unseen):
    """Ridge + template snap redraws the candidate ridge ranks first; the candidates hold every
    test image (S3's held-out one, an S2 image shown once), so where a fold never trained on its
    test image the snap shows the true test image wherever ridge identifies it (the README called
    it a look-up of training images that cannot help on S3)."""
    result = hand_made_benchmark()
    result.update(protocol=protocol, n_unseen_test_trials=unseen)
    assert "not a reconstruction" not in E.benchmark_markdown(result)       # no snap row, no note
    result["methods"]["ridge_snap"] = result["methods"]["ridge"]
    md = E.benchmark_markdown(result)
    note = ("ridge + template snap: ridge's identification drawn as an image (the candidate ridge "
            "ranks first, docs/BASELINES.md), not a reconstruction")
    unseen_note = ": the candidates include every test image its fold never trained on"
    assert note + (unseen_note if unseen else ".\n") in md


def test_every_row_of_every_benchmark_markdown_table_has_its_headers_cell_count():
    """A markdown table renders only when its separator row has as many cells as its header; a
    data row with fewer or more cells shifts its numbers under the wrong columns."""
    tables = md_tables(E.benchmark_markdown(hand_made_benchmark()))
    assert len(tables) == 3                       # methods, paired top-1, paired PixCorr
    for heading, rows in tables:
        header, separator = rows[0], rows[1]
        assert all(re.fullmatch(r":?-{3,}:?", c) for c in separator), (heading, separator)
        for row in rows[1:]:
            assert len(row) == len(header), (heading, header, row)
    header = tables[0][1][0]
    assert header == ["method", *L.METRICS, "s (all folds and seeds)"]
    # the seconds of a row that reuses fits count only what it adds, and the markdown says so
    assert "counts only what it adds" in E.benchmark_markdown(hand_made_benchmark())
    # MSE, whose values differ in the third decimal, shows four (the other metrics three)
    result = hand_made_benchmark()
    result["methods"]["ridge"]["mse"] = E.aggregate(np.full((N_FOLDS, 1), 0.04567))
    ridge_row = next(r for r in tables[0][1] if r[0] == E.METHOD_TITLES.get("ridge", "ridge"))
    mse_cell = next(r for r in md_tables(E.benchmark_markdown(result))[0][1]
                    if r[0] == ridge_row[0])[1 + list(L.METRICS).index("mse")]
    assert mse_cell.startswith("0.0457 ±"), mse_cell


def test_paired_tables_put_wins_ties_and_losses_under_their_own_columns():
    """The per-fold wins / ties / losses against ridge (counted by hand) under the columns so named,
    in the top-1 table and in the reconstructions' PixCorr table."""
    result = hand_made_benchmark()
    tables = {heading: rows for heading, rows in md_tables(E.benchmark_markdown(result))}
    top1 = next(rows for h, rows in tables.items() if h and "Paired per-fold differences" in h)
    pix = next(rows for h, rows in tables.items() if h and "PixCorr against ridge" in h)
    expected_top1 = {"dual_encoder": (3, 1, 2), "knn1": (1, 0, 5), "diffusion": (0, 6, 0)}
    for rows, expected, ref, values in (
            (top1, expected_top1, RIDGE_TOP1,
             {"dual_encoder": DUAL_TOP1, "knn1": KNN1_TOP1, "diffusion": DIFFUSION_TOP1}),
            (pix, {"diffusion": (4, 0, 2)}, RIDGE_PIXCORR, {"diffusion": DIFFUSION_PIXCORR})):
        columns = rows[0]
        assert columns == ["method", "mean diff", "wins", "ties", "losses"]
        table = by_first_cell(rows)
        assert set(table) == {E.METHOD_TITLES[n] for n in expected}
        for name, (wins, ties, losses) in expected.items():
            row = dict(zip(columns, table[E.METHOD_TITLES[name]]))
            assert (int(row["wins"]), int(row["ties"]), int(row["losses"])) == (wins, ties, losses), name
            assert float(row["mean diff"]) == pytest.approx(np.mean(values[name]) - np.mean(ref),
                                                             abs=1e-3)


def test_novelty_gate_line_says_what_its_spread_is_over():
    """The gate's ± is SD over folds, or with one fold over its test trials (aggregate's std_over),
    and the line says which."""
    for n_folds, over in ((N_FOLDS, "folds"), (1, "trials")):
        result = hand_made_benchmark()
        values = np.random.default_rng(1).uniform(0, 1, (n_folds, 1))
        result["methods"]["diffusion"]["novelty_gate"] = E.aggregate(values, values[0].repeat(12))
        md = E.benchmark_markdown(result)
        assert f"each fold's mean ± SD over {over}: diffusion decoder" in md, md


def test_chance_row_shows_uniform_condition_chance_beside_the_majority_rate():
    """The chance row: 1/K top-1, min(5, K)/K top-5, 0.5 two-way and, under condition, the uniform
    4-way chance with the test trials' majority-class rate in brackets (not the other way round)."""
    result = hand_made_benchmark()
    rows = md_tables(E.benchmark_markdown(result))[0][1]
    chance = dict(zip(rows[0], by_first_cell(rows)["*chance*"]))
    assert (float(chance["top1"]), float(chance["top5"]), float(chance["two_way"])) == (0.05, 0.25, 0.5)
    m = re.fullmatch(r"([\d.]+) \(majority ([\d.]+)\)", chance["condition"])
    assert m, chance["condition"]
    assert float(m[1]) == pytest.approx(0.25) and float(m[2]) == pytest.approx(0.336)


def test_majority_rate_is_averaged_over_folds_as_the_table_is():
    """The chance row's majority rate is the best constant condition scored as the table scores:
    the mean over folds of each fold's share. S3-like folds of one image each, 5 images per
    condition and more trials of condition 2: one fold in four (0.25), not the trials' majority."""
    trials = {2: 8, 3: 5, 4: 5, 5: 5}        # trials per image of each condition
    folds = [np.full(trials[c], c) for c in trials for _ in range(5)]
    assert L.majority_rate(np.concatenate(folds)) == pytest.approx(40 / 115)
    assert E.fold_majority_rate(folds) == pytest.approx(0.25)
    one = [np.array([2, 2, 3, 4, 5, 5, 5])]
    assert E.fold_majority_rate(one) == L.majority_rate(one[0]) == pytest.approx(3 / 7)


def test_spread_line_names_the_rows_whose_sd_is_over_something_else():
    """One split with 2 seeds: most rows' ± is over test trials, the dual encoder's over seeds,
    and the line says so by row; metrics outside the table (the gate's) do not count."""
    result = hand_made_benchmark()
    trial_values = np.linspace(0, 1, 12)
    for name, m in result["methods"].items():
        seeds = 2 if name == "dual_encoder" else 1
        for metric in m:
            m[metric] = E.aggregate(np.full((1, seeds), 0.5) + np.arange(seeds) / 10, trial_values)
    result["methods"]["dual_encoder"]["novelty_gate"] = E.aggregate(np.ones((1, 1)), trial_values)
    assert E.spread_text(result) == ("Mean over folds; ± = SD over trials; over seeds for "
                                     f"{E.METHOD_TITLES['dual_encoder']}")
    assert E.spread_text(hand_made_benchmark()) == "Mean over folds; ± = SD over folds"


def test_markdown_notes_test_conditions_no_training_trial_shows():
    """A random-image session's S1: the test trials' conditions are absent from training, so a
    vote among training trials scores 0 by construction, and the markdown says so."""
    random_session = L.make_simulated_dataset(random_images=L.SIM_RANDOM_IMAGES)
    for data, protocol, expected in ((random_session, "s1", 20), (random_session, "s3", 0),
                                     (L.make_simulated_dataset(), "s1", 0)):
        folds = L.splits(protocol, data)
        assert E.untrained_condition_trials(data.trials.labels, folds) == expected, protocol
    labels = np.array([1, 2, 2, 3, 3])     # a fold of three conditions, one of them untrained
    assert E.untrained_condition_trials(labels, [("f", np.array([1, 3]), np.array([0, 2, 4]))]) == 1
    result = hand_made_benchmark()
    assert "by construction" not in E.benchmark_markdown(result)
    result["n_test_trials_condition_untrained"] = 12
    assert ("12 of the 119 test trials show a condition that no training trial of their fold shows"
            in E.benchmark_markdown(result))


def test_nearest_training_image_check_says_how_few_folds_it_rests_on():
    """S2 with an image shown once: the check has values in that image's folds only (aggregate
    under "folds"), and the line names them; where every fold has one (S3) it says nothing."""
    result = hand_made_benchmark()
    result["methods"]["diffusion"]["closer_than_train"] = {**E.aggregate(np.ones((1, 1)), np.ones(1)),
                                                           "folds": ["s2-fold4"]}
    assert ("diffusion decoder 1.000. Never-seen test trials are in 1 of the 6 folds only (s2-fold4)"
            in E.benchmark_markdown(result))
    result["methods"]["diffusion"]["closer_than_train"] = E.aggregate(np.ones((N_FOLDS, 1)))
    assert "diffusion decoder 1.000." in E.benchmark_markdown(result)
    assert "Never-seen test trials are in" not in E.benchmark_markdown(result)


# --------------------------------------------------------------------------- summary.md
def test_summary_shows_each_results_chance_not_its_value(tmp_path):
    """summary.md's chance column: the K-way chance beside the dual encoder's top-1 and the uniform
    condition chance (majority rate in brackets) beside the kNN condition accuracy."""
    common = {"data_source": "simulated", "checkpoint_sha256": "ab" * 32}
    (tmp_path / "miyawaki_dual_encoder.json").write_text(json.dumps(
        {**common, "top1": 0.6, "chance_top1": 0.05, "n_candidates": 20}))
    (tmp_path / "miyawaki_evaluation.json").write_text(json.dumps(
        {**common, "n_test": 12,
         "condition_accuracy": {"correlation": 0.583, "uniform_chance": 0.25, "majority_rate": 0.417},
         "baselines": {"ridge": {"top1": 0.333, "condition": 0.5, "pixcorr": 0.4}}}))
    rows = md_tables(L.write_summary(tmp_path).read_text())[0][1]
    assert rows[0] == ["what", "value", "chance", "ridge"]
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[2:]}
    ident = table["dual encoder identification top-1 (20-way)"]
    assert (ident["value"], ident["chance"], ident["ridge"]) == ("0.600", "0.050", "0.333")
    cond = table["condition from the fMRI-only embedding (kNN)"]
    assert cond["value"] == "0.583"
    m = re.fullmatch(r"([\d.]+) \(majority ([\d.]+)\)", cond["chance"])
    assert m, cond["chance"]
    assert (float(m[1]), float(m[2])) == (0.25, 0.417)


@pytest.mark.parametrize("value, note", [
    (0.0, "no test trial's condition occurs among the training trials, so a kNN vote over them "
          "cannot name it: 0 by construction, not a measurement"),
    (1.0, "one condition in the data: 1 by construction, not a measurement")])
def test_summary_flags_a_condition_accuracy_fixed_by_construction(tmp_path, value, note):
    """Either note of the evaluation (a condition no training trial has; one condition in all the
    data) flags the value in summary.md's row and follows the table (flagging the 0 alone passed
    every other test)."""
    (tmp_path / "miyawaki_evaluation.json").write_text(json.dumps(
        {"data_source": "simulated", "checkpoint_sha256": "ab" * 32, "n_test": 12,
         "condition_accuracy": {"correlation": value, "uniform_chance": 1.0 if value else 0.25,
                                "majority_rate": 1.0, "note": note},
         "baselines": {"ridge": {"top1": 0.333, "condition": value, "pixcorr": 0.4}}}))
    summary = L.write_summary(tmp_path).read_text()
    assert f"| condition from the fMRI-only embedding (kNN) | {value:.3f} (by construction: below) |" in summary
    assert f"The condition from the embedding: {note}." in summary


def test_summary_takes_the_identification_from_the_evaluation_alone(tmp_path):
    """A folder with the evaluation of a checkpoint kept elsewhere (``--checkpoint``) still has the
    identification row, from the evaluation's own JSON (it showed the condition row alone); a
    folder with no result yet says what to run instead of an empty table."""
    assert "No results yet: run `miyawaki_dual_encoder.py`" in L.write_summary(tmp_path).read_text()
    (tmp_path / "miyawaki_evaluation.json").write_text(json.dumps(
        {"data_source": "simulated", "checkpoint_sha256": "ab" * 32, "n_test": 12,
         "identification": {"top1": 0.75, "chance_top1": 0.05, "n_candidates": 20},
         "condition_accuracy": {"correlation": 0.5, "uniform_chance": 0.25, "majority_rate": 0.417},
         "baselines": {"ridge": {"top1": 0.333, "condition": 0.5, "pixcorr": 0.4}}}))
    summary = L.write_summary(tmp_path).read_text()
    assert "| dual encoder identification top-1 (20-way) | 0.750 | 0.050 | 0.333 |" in summary
    assert "No results yet" not in summary
    # the evaluation of a noise control's checkpoint, alone, says it is the control
    saved = json.loads((tmp_path / "miyawaki_evaluation.json").read_text())
    (tmp_path / "miyawaki_evaluation.json").write_text(json.dumps({**saved, "noise_control": True}))
    summary = L.write_summary(tmp_path).read_text()
    assert "**Noise control**" in summary
    assert "| dual encoder **noise control** identification top-1 (20-way) | 0.750 |" in summary


def test_summary_leaves_out_data_figures_of_other_data(tmp_path):
    """The loader's data figures (listed in its miyawaki_dataset.json) go with the results when
    they show the same data, and are left out, and named, when the loader last ran on another file
    (it overwrote the figures while the results stayed). Same data: the same fingerprint, whatever
    the path's spelling, or, for results of older code without one, the same source."""
    (tmp_path / "miyawaki_dual_encoder.json").write_text(json.dumps(
        {"data_source": "a.mat", "data_fingerprint": "f1", "checkpoint_sha256": "ab" * 32, "top1": 0.6,
         "chance_top1": 0.05, "n_candidates": 20, "figures": ["miyawaki_training_curves.png"]}))
    figures = ["miyawaki_samples_analysis.png", "miyawaki_fmri_correlation.png"]
    for name in [*figures, "miyawaki_training_curves.png"]:
        (tmp_path / name).write_bytes(b"png")
    de = json.loads((tmp_path / "miyawaki_dual_encoder.json").read_text())
    older = {k: v for k, v in de.items() if k != "data_fingerprint"}     # results of older code
    for source, fingerprint, results, shown in (
            ("a.mat", "f1", de, True), ("b.mat", "f2", de, False),
            ("a.mat", "f2", de, False),                      # the same path, other contents
            ("/data/a.mat", "f1", de, True),                 # the same file, another spelling
            ("a.mat", "f9", older, True), ("b.mat", "f9", older, False)):
        (tmp_path / "miyawaki_dual_encoder.json").write_text(json.dumps(results))
        (tmp_path / L.DATASET_JSON).write_text(json.dumps(
            {"data_source": source, "data_fingerprint": fingerprint, "figures": figures}))
        text = L.write_summary(tmp_path).read_text()
        assert ("miyawaki_samples_analysis.png" in text) == shown, (source, fingerprint)
        assert ("miyawaki_fmri_correlation.png" in text) == shown
        assert ("Left out: the data figures of `miyawaki_dataset.json`" in text) != shown
        assert "miyawaki_training_curves.png" in text and "identification" in text


# --------------------------------------------------------------------------- S3 gallery
@pytest.fixture(scope="module")
def s1_fold(sim):
    """The simulated S1 fold: 12 test trials of different images (so rows of a reconstruction differ)."""
    fold = sim.s1()
    assert len(np.unique(fold.test.image_ids)) > 1
    return fold


def test_gallery_panels_show_the_first_test_trial_with_the_protocols_pixcorr(s1_fold):
    """Every decoder panel shows the decoder's reconstruction of the first test trial (the one in
    the "true" panel), clipped to [0, 1], and its r is the protocol's PixCorr of that trial (which
    clips the reconstruction): reconstructions here reach outside [0, 1] and differ row by row."""
    fold = s1_fold
    rng = np.random.default_rng(0)
    true = fold.test.images
    recons = {"diffusion": 2.5 * true - 0.8 + rng.normal(0, 0.3, true.shape),
              "gan": rng.normal(0.5, 0.8, true.shape)}
    gallery = E.fold_gallery(fold, recons, np.linspace(0.1, 0.9, len(true)))
    np.testing.assert_array_equal(gallery["true"][0], true[0])
    for name, recon in recons.items():
        img, corr, _, gate = gallery[name]
        np.testing.assert_allclose(img, recon[0].clip(0, 1), err_msg=name)
        protocol = L.score_reconstructions(recon.reshape(len(recon), -1), fold)["pixcorr"][0]
        assert corr == pytest.approx(protocol, abs=1e-9), name
        assert gate == pytest.approx(0.1)              # the first trial's gate


def test_gallery_ridge_panel_is_ridges_reconstruction_of_the_first_test_trial(s1_fold):
    """The ridge panel: ridge fitted on the training trials, from the first test trial's fMRI, shown
    clipped, with the protocol's (clipped) PixCorr of that reconstruction."""
    fold = s1_fold
    ridge = L.RidgeBaseline().fit(fold.train.fmri, fold.train.images).predict(fold.test.fmri)
    assert ridge.min() < 0 or ridge.max() > 1      # clipping matters for this check
    img, corr, like, gate = E.fold_gallery(fold, {})["ridge"]
    np.testing.assert_allclose(img, ridge[0].reshape(1, 28, 28).clip(0, 1), atol=1e-6)
    assert corr == pytest.approx(L.score_reconstructions(ridge, fold)["pixcorr"][0], abs=1e-6)
    assert gate is None and (like is None or like in fold.train.image_ids)


def test_gallery_figure_marks_only_memorised_reconstructions_in_red():
    """Red titles with "closer to #j" for a reconstruction that fails the nearest-training-image check
    and for nothing else: not a reconstruction that passes it, not the true or nearest image."""
    img = np.full((1, 28, 28), 0.5)
    gallery = {"true": (img, 1.0, None, None), "ridge": (img, 0.31, None, None),
               "diffusion": (img, 0.52, None, 0.2), "gan": (img, 0.77, 0, 0.2),   # like image #0
               "nearest training image": (img, 0.8, None, None)}
    fig = E.plot_gallery([gallery], ["#0 shapes"], "title")
    marked = {col: (title_color_is_red(ax), "closer to #0" in ax.get_title())
              for col, ax in zip(gallery, fig.axes)}
    assert marked == {"true": (False, False), "ridge": (False, False), "diffusion": (False, False),
                      "gan": (True, True), "nearest training image": (False, False)}
    assert "r=0.77" in fig.axes[3].get_title() and "g=0.20" in fig.axes[3].get_title()
    # the column heads: the decoders by their table names, the last one what it is (a look-up)
    heads = [ax.get_title().splitlines()[0] for ax in fig.axes]
    assert heads[2:4] == ["diffusion decoder", "GAN decoder"]
    assert fig.axes[4].get_title().startswith("training image\nclosest to the true")


# --------------------------------------------------------------------------- generation figure
def generation_case():
    """5 grey-level candidates, 4 trials showing candidates 0, 2, 4, 1."""
    rng = np.random.default_rng(1)
    candidates = rng.uniform(0.1, 0.9, (5, 1, 28, 28))
    ids = np.array([0, 2, 4, 1])
    return candidates, ids, np.array([2, 3, 4, 5, 2]), candidates[ids].copy()


def recon_titles(fig, n):
    """(title, red) of the reconstruction row's panels (the second row of ``n`` columns)."""
    return [(ax.get_title(), title_color_is_red(ax)) for ax in fig.axes[n:2 * n]]


def test_generation_figure_marks_nothing_when_every_reconstruction_is_its_true_image():
    candidates, ids, labels, true = generation_case()
    fig = G.plot_generation(true, true.copy(), "title", ids, candidates, labels)
    assert len(fig.axes) == 2 * len(true)             # grey-level images: no binarised row
    for title, red in recon_titles(fig, len(true)):
        assert title.splitlines()[0] == "r=1.00" and "as #" not in title and not red, title


def test_generation_figure_names_the_candidate_a_missed_reconstruction_was_taken_for():
    """Column 1 reconstructs candidate 3 instead of its image 2: that panel alone is red and says
    "as #3"; the noisy but correct ones stay black; every r is Pearson(reconstruction, true)."""
    candidates, ids, labels, true = generation_case()
    rng = np.random.default_rng(2)
    recon = np.clip(true + rng.normal(0, 0.1, true.shape), 0, 1)
    recon[1] = candidates[3]
    fig = G.plot_generation(true, recon, "title", ids, candidates, labels)
    r = L.pearson_rows(recon.reshape(4, -1), true.reshape(4, -1))
    assert np.all(r < 0.99)                           # the r values say something here
    titles = recon_titles(fig, len(true))
    for i, (title, red) in enumerate(titles):
        assert title.splitlines()[0] == f"r={r[i]:.2f}", (i, title)
        if i == 1:
            assert red and title.splitlines()[-1] == "as #3", title
        else:
            assert not red and "as #" not in title, (i, title)


def test_generation_figure_of_many_trials_wraps_into_blocks_of_12_columns():
    """30 test trials (a generality review's digits file) made one row 4442 px wide: they wrap into
    blocks of 12, 12 and 6 columns, each block with its row names, each trial in its own place."""
    rng = np.random.default_rng(0)
    candidates = rng.uniform(0, 1, (30, 1, 28, 28))
    ids = np.arange(30)
    fig = G.plot_generation(candidates, candidates.copy(), "title", ids, candidates, np.zeros(30, int))
    assert len(fig.axes) == 2 * 30 and fig.get_figwidth() == pytest.approx(1.25 * 12)
    grid = {ax.get_subplotspec().get_geometry()[2]: ax for ax in fig.axes}   # place in the 6 x 12 grid
    for i in range(30):      # block i // 12: its row of true images, then its reconstructions
        true_row = 2 * (i // 12)
        assert grid[true_row * 12 + i % 12].get_title() == f"#{i} label 0", i
        assert grid[(true_row + 1) * 12 + i % 12].get_title().startswith("r=1.00"), i
    assert [grid[r * 12].get_ylabel() for r in range(6)] == ["true", "recon\n(r: PixCorr)"] * 3
    # a title of two lines (a noise control's) keeps clear of the panels' titles, however tall
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    for n in (12, 30):
        fig = G.plot_generation(candidates[:n], candidates[:n], "NOISE CONTROL\ntitle", ids[:n],
                                candidates, np.zeros(30, int))
        renderer = FigureCanvasAgg(fig).get_renderer()
        panels = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)
        assert fig._suptitle.get_window_extent(renderer).y0 > panels, n


def test_a_panel_title_sits_where_matplotlib_would_place_it():
    """panel_title fixes the title's y (to skip matplotlib's placement at every draw): the saved
    figure is the same, pixel for pixel, as with the automatic placement."""
    def saved(title):
        fig = Figure(figsize=(2, 1))
        for k, ax in enumerate(fig.subplots(1, 2)):
            ax.imshow(np.eye(28) * (k + 1) / 2, cmap="gray", vmin=0, vmax=1)
            ax.axis("off") if k else (ax.set_xticks([]), ax.set_yticks([]))
            title(ax, f"panel {k}\nr=0.{k}", fontsize=7)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()

    assert saved(L.panel_title) == saved(lambda ax, text, **kw: ax.set_title(text, **kw))


def test_pipeline_speed_reports_the_device_precision_and_threads_the_stages_ran_with(tmp_path,
                                                                                     monkeypatch):
    """benchmarks/pipeline_speed.py printed the --device option ("auto"), not the device the
    stages ran on, and neither their precision nor their thread count, which decide the times."""
    import sys

    import torch
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    import pipeline_speed

    def stage(script, args):           # the stages' result JSONs, as the scripts write them
        (tmp_path / "miyawaki_dual_encoder.json").write_text(json.dumps(
            {"config": {"epochs": 2}, "n_train": 10, "train_seconds": 1.0, "bf16_autocast": False}))
        (tmp_path / "miyawaki_generation.json").write_text(json.dumps(
            {"device": "cpu", "bf16_autocast": True, "diffusion": {"sample_seconds_per_image": 0.01}}))
        return {"wall_s": 1.0, "cpu_s": 1.5, "peak_mib": 100.0}
    monkeypatch.setattr(pipeline_speed, "run_stage", stage)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)                      # not the tests' 1 nor the machine's core count
    try:
        result = pipeline_speed.main(["--repeats", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "pipeline_speed.md").read_text()
    assert (result["device"], result["device_option"], result["torch_threads"]) == ("cpu", "auto", 3)
    assert result["bf16_autocast"] == {"dual_encoder": False, "generative": True}
    assert ("ran on cpu (--device auto; dual encoder float32; generative bfloat16 autocast), 3 torch "
            "threads") in text


def test_correlation_analysis_titles_the_matched_scores_auc_not_their_means():
    """The left panel compared the matched scores' mean with the mismatched ones', which for
    scores z-scored over the candidates is -1/(K-1) of the matched mean by construction: it said
    nothing. It now gives the AUC, checked by brute force over every (matched, mismatched) pair,
    ties counting one half; the ranks' bars start at rank 1's floor, not at 0, on a log axis
    (among 300 candidates, a generality review's file, the bars of ranks 1-6 were invisible on a
    linear one), whose ticks end at K; each panel's title is two lines (one-line titles ran into
    each other), and more than 20 trials get one-line labels, upright (two-line ones overlapped)."""
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 4, (6, 9)).astype(float)         # many ties
    ids = rng.integers(0, 9, 6)
    match = np.zeros(sim.shape, bool)
    match[np.arange(6), ids] = True
    m, u = sim[match], sim[~match]
    brute = np.mean((m[:, None] > u[None]) + 0.5 * (m[:, None] == u[None]))
    assert E.matched_auc(sim, ids) == pytest.approx(brute)
    assert E.matched_auc(np.eye(6, 9), np.arange(6)) == 1.0
    fig = E.plot_correlation_analysis(sim, ids)
    left, right = fig.axes[:2]
    assert left.get_title() == f"Matched vs mismatched pairs\nAUC {brute:.2f} (chance 0.50)"
    assert right.get_title().startswith("Identification rank\ntop-1 ")
    assert right.get_ylim()[0] == 0.5 and min(b.get_y() for b in right.patches) == 0.5
    assert right.get_yscale() == "log" and list(right.get_yticks()) == [1, 2, 5, 9]   # not 5 beside 9
    def ticks(k):
        return list(E.plot_correlation_analysis(rng.random((3, k)), np.arange(3)).axes[1].get_yticks())
    assert ticks(22) == [1, 2, 5, 10, 22] and ticks(26) == [1, 2, 5, 10, 20, 26]
    assert [t.get_text() for t in right.get_xticklabels()][:2] == ["0\n(" + str(ids[0]) + ")",
                                                                 "1\n(" + str(ids[1]) + ")"]
    right = E.plot_correlation_analysis(rng.random((30, 300)), np.arange(30)).axes[1]
    labels = right.get_xticklabels()
    assert labels[29].get_text() == "29 (29)" and labels[29].get_rotation() == 90
    assert list(right.get_yticks()) == [1, 2, 5, 10, 20, 50, 100, 200, 300]


def test_similarity_matrix_names_the_condition_codes_under_its_columns():
    """Its columns showed the raw condition codes 2-5 where every other figure names them."""
    rng = np.random.default_rng(0)
    cands = rng.random((8, 1, 28, 28))
    fig = E.plot_similarity_matrix(rng.random((3, 8)), np.arange(3), cands, np.repeat([2, 3, 4, 5], 2))
    names = ", ".join(f"{c} {L.condition_name(c, [2, 3, 4, 5])}" for c in (2, 3, 4, 5))
    assert f"condition ({names})" in fig.axes[0].get_xlabel()
    fig = E.plot_similarity_matrix(rng.random((3, 8)), np.arange(3), cands, np.arange(8))
    assert "(" not in fig.axes[0].get_xlabel().split("\n")[0]     # a file's own labels: no key


def test_summary_counts_the_novelty_gates_false_alarms(tmp_path):
    """summary.md said the gate 'read 3 of 12 test trials as new images' without saying that all
    12 were of images seen in training: it now counts false alarms against the JSON's truth per
    trial (``image_unseen_in_training``), and keeps the old sentence for a JSON without it."""
    metrics = {"pixcorr": 0.9, "top1": 1.0}
    gen = {"data_source": "simulated", "encoder_sha256": "ab" * 32, "n_test": 4,
           "diffusion": metrics, "gan": metrics, "mean_image_floor": {"pixcorr": 0.6},
           "chance": {"top1": 0.05},
           "novelty_gate": {"per_trial": [0.9, 0.5, 0.7, 0.55],
                            "image_unseen_in_training": [False, True, True, False]}}
    (tmp_path / "miyawaki_generation.json").write_text(json.dumps(gen))
    text = " ".join(L.write_summary(tmp_path).read_text().split())
    assert ("read 3 of 4 test trials as new images" in text and "2 of those show an image seen in "
            "training (false alarms); of the 2 trials whose image no training trial shows, it read "
            "1 as new." in text)
    gen["novelty_gate"]["image_unseen_in_training"] = [False] * 4
    (tmp_path / "miyawaki_generation.json").write_text(json.dumps(gen))
    text = " ".join(L.write_summary(tmp_path).read_text().split())
    assert "Every test image is also shown in training, so all 3 are false alarms." in text
    gen["novelty_gate"]["per_trial"] = [0.1] * 4
    (tmp_path / "miyawaki_generation.json").write_text(json.dumps(gen))
    text = " ".join(L.write_summary(tmp_path).read_text().split())
    assert "read 0 of 4 test trials as new images" in text and "so none is a false alarm." in text
    gen["novelty_gate"]["per_trial"] = [0.9, 0.5, 0.7, 0.55]
    del gen["novelty_gate"]["image_unseen_in_training"]
    (tmp_path / "miyawaki_generation.json").write_text(json.dumps(gen))
    text = " ".join(L.write_summary(tmp_path).read_text().split())
    assert "read 3 of 4 test trials as new images" in text and "false alarms" not in text


def test_summary_says_what_the_decoders_output_where_the_gate_could_not_be_calibrated(tmp_path):
    """No training image shown twice: the gate reads every trial as new, and at blend 1 the output
    is the anchor, clipped, and stretched only with --output-stretch (it said "stretched" with the
    stretch off); below blend 1 the networks' samples still count, and the note says no more."""
    metrics = {"pixcorr": 0.9, "top1": 1.0}
    gen = {"data_source": "simulated", "encoder_sha256": "ab" * 32, "n_test": 2,
           "diffusion": metrics, "gan": metrics, "mean_image_floor": {"pixcorr": 0.6},
           "chance": {"top1": 0.05}, "novelty_gate": {"per_trial": [1.0, 1.0], "calibrated": False}}
    said = {}
    for blend, stretch in ((1.0, True), (1.0, False), (0.5, True)):
        gen["config"] = {"anchor_blend": blend, "output_stretch": stretch}
        (tmp_path / "miyawaki_generation.json").write_text(json.dumps(gen))
        text = L.write_summary(tmp_path).read_text()
        said[blend, stretch] = note = L.uncalibrated_gate_note(blend, stretch)
        assert note in text and "read 2 of 2" not in text
    assert "output is then their linear anchor, clipped and contrast-stretched, on every" in said[1.0, True]
    assert "output is then their linear anchor, clipped, on every" in said[1.0, False]
    assert said[0.5, True].endswith("reads every test trial as new (g = 1).")


def test_gallery_rows_name_the_held_out_image_and_the_title_a_partial_run():
    """The S3 gallery labelled its rows 's3-image0' (other figures say '#0 shapes') and did not say
    when --max-folds had left folds out."""
    data = L.make_simulated_dataset()
    name, tr, te = L.splits("s3", data)[7]
    k = data.trials.image_ids[te[0]]
    condition = L.condition_name(data.unique_labels[k], data.unique_labels)
    assert E.gallery_row_name(data, (name, tr, te)) == f"#{k} {condition}"
    s2 = L.splits("s2", data)[0]
    assert E.gallery_row_name(data, s2) == s2[0]
    assert "fold, the first 4 of 20 folds (--max-folds), from fMRI only\n" in E.gallery_title("s3", 0, 4, 20)
    assert "fold, from fMRI only" in E.gallery_title("s3", 0, 20, 20)


def test_correlation_analysis_makes_room_for_a_title_of_several_lines():
    """A suptitle of several lines (a noise control's) moves the panels down, so that it does not
    run into the panels' own two-line titles; a one-line one leaves them room for themselves."""
    sim = np.random.default_rng(0).random((6, 20))
    tops = [E.plot_correlation_analysis(sim, np.arange(6), title=t).subplotpars.top
            for t in ("one line", "a\nb", "a\nb\nc")]
    assert tops[0] == pytest.approx(0.82) and tops[0] > tops[1] > tops[2]


def test_latent_space_legend_shows_the_markers_in_grey_and_the_points_in_their_conditions():
    """The markers' legend entries took the colour of their first point (a blue 'training
    trials' dot, whatever the conditions); they are grey, and the points keep their colours."""
    rng = np.random.default_rng(0)
    fig = E.plot_latent_space(rng.random((4, 2)), np.array([2, 3, 4, 5]), np.arange(4),
                              rng.random((8, 2)), np.repeat([2, 3, 4, 5], 2),
                              rng.random((10, 2)), np.repeat([2, 3, 4, 5, 5], 2))
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][:3] == [
        "fMRI, training trials", "fMRI, test trials (line to true image)",
        "image embeddings (number = image id)"]
    for handle in legend.legend_handles[:3]:
        assert same_color(handle.get_facecolor()[0][:3], "0.6")
    data = [c for c in ax.collections if len(c.get_offsets())]
    assert len(data) == 3 and all(len({tuple(f) for f in c.get_facecolors()}) == 4 for c in data)
    proxies = [c for c in ax.collections if not len(c.get_offsets())][:3]   # each marker's own size
    assert [float(c.get_sizes()[0]) for c in proxies] == [float(d.get_sizes()[0]) for d in data]


def test_a_full_run_markdown_says_its_fold_count_and_no_max_folds_notes():
    """A run of every fold: "6 folds;" (one fold: "1 fold"), and neither the --max-folds caveat
    on the majority rate nor the phrase of a partial run."""
    md = E.benchmark_markdown(hand_made_benchmark())
    n = hand_made_benchmark()["n_folds"]
    assert f"\n\n{n} folds; data:" in md and "--max-folds" not in md and "scored folds'" not in md
    assert E.folds_text(1, 1) == "1 fold" and E.folds_text(20, 20) == "20 folds"
