"""Evaluation from fMRI only: dual-encoder checkpoint, classic baselines, S1/S2/S3 benchmark.

The checkpoint evaluation scores ``outputs/miyawaki_dual_encoder.pth`` on S1 (identification both
ways, condition decoding, figures); the classic baselines reproduce docs/BASELINES.md; the benchmark
trains a fresh dual encoder per fold and seed and compares it with the baselines on S1, S2 or S3.

Usage::

    python miyawaki_dual_encoder.py && python miyawaki_evaluation.py      # checkpoint on S1 + figures
    python miyawaki_evaluation.py --protocol s3 --seeds 0 1 2 3 4 --permutation-control --workers 2
    python miyawaki_evaluation.py --protocol s2 --data simulated --epochs 30 --out-dir /tmp/bench

Test-time inputs are fMRI only: a trial is scored against the candidate images by the dual
encoder's ``score_candidates`` (its fMRI-only embedding against the candidates' embeddings, beside
its two linear parts). Numbers that feed the true test image into the model appear
only under the ``oracle`` key (``--oracle``) and are labelled "oracle" wherever they are printed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator
from sklearn.linear_model import RidgeCV
from sklearn.manifold import TSNE
from sklearn.neighbors import KNeighborsClassifier
from tqdm.auto import tqdm

from miyawaki_dataset_loader import (DECODER_NAMES, GRID, IMAGE_SIDE, MAX_SEED, METRICS, RIDGE_ALPHAS, Fold,
                                     MeanImageBaseline, MiyawakiData, OptionError, RidgeBaseline,
                                     ScriptOptions, Trials, add_config_args, chance_levels, check_options,
                                     condition_accuracy, condition_name, config_dict, cosine_scores, evaluating,
                                     score_parts_text,
                                     file_sha256, check_seeds, check_unused, chance_text, value_text,
                                     fmri_batch,
                                     fold_means, identification_ranks, identification_scores,
                                     identification_summary, identified_labels, image_batch,
                                     image_to_fmri_summary, majority_rate, mean_rank, miyawaki_labels,
                                     nearest_training_check, panel_title, parse_config, pearson_matrix,
                                     pearson_rows, check_out_dir, prepare_out_dir, resolve_data,
                                     resolve_device,
                                     retrieval_ranks, remove_output, run_cli, save_figure, save_json, save_text,
                                     score_reconstructions, script_parser, splits, topk_accuracy,
                                     staged_outputs, uniform_condition_chance, upsample_grid, write_summary)
from miyawaki_dual_encoder import (CHECKPOINT_NAME, MAX_LINEAR_WEIGHT, SCORE_GRID, DualEncoderConfig,
                                   NOISE_CONTROL_TITLE, EncodingReadout, MiyawakiDualEncoder, OracleWarning,
                                   ensemble_parts, fused_scores, inner_cv_scores, is_noise_control,
                                   load_for_s1, score_part_summary, score_settings,
                                   select_setting, setting_name, train_dual_encoder,
                                   train_dual_encoders, with_setting)

BASELINES = ("mean_image", "ridge", "ridge_snap", "multiscale_local", "knn1", "knn5")
DECODERS = tuple(DECODER_NAMES)              # the two networks, which share a novelty gate
GENERATIVE = ("anchor", *DECODERS)           # with --generative: their anchor alone beside them
PROTOCOL_TITLES = {
    "s1": "the file's own split",
    "s2": "stratified 5-fold CV by image, 3 repeats (a test image is in training wherever it has other trials)",
    "s3": "leave-one-stimulus-out (the test image never in training)"}
METHOD_TITLES = {
    "mean_image": "mean image (floor)",
    "ridge": "ridge (fMRI->784 px)",
    "ridge_snap": "ridge + template snap",
    "multiscale_local": "multiscale local decoder (ridge)",
    "knn1": "kNN k=1 (corr. dist.)",
    "knn5": "kNN k=5 (corr. dist.)",
    "encoding_model": "encoding model (images -> voxels, Kay 2008)",
    "dual_encoder": "dual encoder (embeddings + linear parts)",
    "dual_encoder_embedding_only": "ablation: dual encoder, embeddings only",
    "dual_encoder_ridge_readout": "ablation: dual encoder, default score with ridge's pixel read-out",
    "dual_encoder_nested": "dual encoder, score setting by nested CV",
    "dual_encoder_ensemble": "dual encoder, the seeds' fits as one model (ensemble)",
    "dual_encoder_ensemble_nested": "dual encoder ensemble, the fold's nested setting",
    "dual_encoder_permuted": "dual encoder, permutation control",
    "dual_encoder_permuted_nested": "dual encoder, permutation control, the fold's nested setting",
    "anchor": "ablation: the decoders' anchor alone (linear read-out)",
    **DECODER_NAMES,
    # with --generative --permutation-control: anchor and decoders fitted on the control's pairs
    **{f"{g}_permuted": f"{title}, permutation control" for g, title in
       (("anchor", "the decoders' anchor alone"), *DECODER_NAMES.items())},
}
# the same fitted networks scored with other settings (rows of the benchmark)
ABLATIONS = {"dual_encoder_embedding_only": {"readout_weight": 0.0, "encoding_weight": 0.0},
             "dual_encoder_ridge_readout": {"readout_model": "ridge"}}
ORACLE_LABEL = "ORACLE: uses the true test image as a model input; not a decoding result"
IMAGE_LATENT_NOTE = ("condition of each test trial from its own image's latent (kNN among the "
                     "training images' latents): uses the image, not a decoding number")


# --------------------------------------------------------------------------- classic baselines
def _flat(images) -> np.ndarray:
    """N x ... -> N x P float64 (not clipped; the protocol metrics clip)."""
    images = np.asarray(images, dtype=np.float64)
    return images.reshape(len(images), -1)


def grid_cell_of_pixel() -> np.ndarray:
    """784 ints: the 10 x 10 grid cell (row-major) that each 28 x 28 pixel belongs to."""
    return upsample_grid(np.arange(GRID * GRID).reshape(GRID, GRID)).ravel()


def multiscale_bases(sizes=((1, 1), (1, 2), (2, 1), (2, 2))) -> np.ndarray:
    """B x 100 0/1 matrix: each row one basis (h x w block of grid cells) at every position.

    The default gives Miyawaki's 361 bases: 100 1x1, 90 1x2, 90 2x1, 81 2x2."""
    bases = []
    for h, w in sizes:
        for r in range(GRID - h + 1):
            for c in range(GRID - w + 1):
                block = np.zeros((GRID, GRID))
                block[r:r + h, c:c + w] = 1.0
                bases.append(block.ravel())
    return np.array(bases)


class MultiscaleLocalDecoder:
    """Miyawaki et al. 2008 multiscale local decoders, ridge version.

    Each basis (block of grid cells) gets its own ridge decoder of its mean contrast (mean over
    its cells of each cell's mean pixel value; RidgeCV, alpha chosen per basis by efficient LOO);
    a basis constant in the training fold is predicted as that constant (the ridge intercept).
    Predicted contrasts are clipped to [0, 1], a cell's value is the mean over the bases covering
    it, and the 10 x 10 grid is upsampled to 28 x 28. ``only_1x1=True`` keeps the 1x1 bases only
    (ablation)."""

    def __init__(self, only_1x1: bool = False):
        self.only_1x1 = only_1x1
        bases = multiscale_bases(((1, 1),) if only_1x1 else ((1, 1), (1, 2), (2, 1), (2, 2)))
        self.n_bases = len(bases)
        cell = grid_cell_of_pixel()
        cell_mean = np.eye(GRID * GRID)[cell].T                      # 100 x 784 membership
        cell_mean /= cell_mean.sum(axis=1, keepdims=True)           # edge cells: fewer pixels
        # B x 784: mean over the basis's cells, each cell weighted equally
        self.contrast_ = bases / bases.sum(axis=1, keepdims=True) @ cell_mean
        # 100 x B: average of the bases covering each cell
        self.combine_ = bases.T / bases.sum(axis=0)[:, None]
        self.cell_of_pixel_ = cell

    def fit(self, fmri, images):
        """fmri ``N x V``, images ``N x ...`` -> self."""
        contrasts = _flat(images) @ self.contrast_.T              # N x B
        self.model_ = RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(fmri, contrasts)
        return self

    def predict(self, fmri):
        """fmri ``N x V`` -> ``N x 784`` pixels in [0, 1]."""
        cells = self.model_.predict(fmri).clip(0.0, 1.0) @ self.combine_.T   # N x 100
        return cells[:, self.cell_of_pixel_]


class KNNBaseline:
    """k nearest training trials by correlation distance of the fMRI patterns.

    predict: mean image of the k neighbours. candidate_scores: 20-way scores that order images by
    votes among the neighbours, then by the highest similarity of any training trial of that
    image; images absent from the training fold score -inf (rank last). predict_labels: majority
    condition of the neighbours, a tie going to the tied condition with the closest neighbour."""

    def __init__(self, k: int = 1):
        self.k = k

    def fit(self, fmri, images, image_ids, labels):
        """Store the training trials: fmri ``N x V``, images ``N x ...``, image_ids and labels ``N``."""
        self.fmri_ = np.asarray(fmri, dtype=np.float64)
        self.images_ = _flat(images)
        self.image_ids_ = np.asarray(image_ids)
        self.labels_ = np.asarray(labels)
        return self

    def _neighbours(self, fmri):
        """-> (N x n_train similarities, N x k neighbour indices, closest first)."""
        sim = pearson_matrix(fmri, self.fmri_)
        return sim, np.argsort(-sim, axis=1, kind="stable")[:, :self.k]

    def predict(self, fmri):
        """fmri ``N x V`` -> ``N x 784`` mean image of the k neighbours."""
        _, nn = self._neighbours(fmri)
        return self.images_[nn].mean(axis=1)

    def candidate_scores(self, fmri, n_candidates: int) -> np.ndarray:
        """-> N x n_candidates scores (higher = better) for identification_ranks."""
        sim, nn = self._neighbours(fmri)
        scores = np.full((len(sim), n_candidates), -np.inf)
        for c in np.unique(self.image_ids_):
            of_c = self.image_ids_ == c
            votes = (self.image_ids_[nn] == c).sum(axis=1)
            # similarity in [-1, 1] -> +[0, 2] < 3: breaks vote ties without reordering votes
            scores[:, c] = 3.0 * votes + 1.0 + sim[:, of_c].max(axis=1)
        return scores

    def predict_labels(self, fmri):
        """fmri ``N x V`` -> ``N`` conditions by the neighbours' vote."""
        _, nn = self._neighbours(fmri)
        out = np.empty(len(nn), dtype=self.labels_.dtype)
        for i, row in enumerate(self.labels_[nn]):
            values, counts = np.unique(row, return_counts=True)
            tied = values[counts == counts.max()]
            out[i] = next(label for label in row if label in tied)  # row is closest first
        return out


def snap_to_templates(recon, candidates) -> np.ndarray:
    """Replace each reconstruction (N images) by its best-correlated candidate (K) -> N x 784."""
    return _flat(candidates)[np.argmax(identification_scores(recon, candidates), axis=1)]


def evaluate_baselines(fold: Fold, pool=None) -> tuple[dict, dict]:
    """Fit and score the classic baselines on one fold.

    Returns ({method: per-trial metrics (score_reconstructions)}, {method: fit+predict seconds});
    ridge_snap's time includes the ridge fit it reuses, as in docs/BASELINES.md."""
    xtr, ytr, xte = fold.train.fmri, fold.train.images, fold.test.fmri
    results, seconds = {}, {}
    t = time.perf_counter()
    recon = MeanImageBaseline().fit(xtr, ytr).predict(xte)
    seconds["mean_image"] = time.perf_counter() - t
    results["mean_image"] = score_reconstructions(recon, fold, pool)
    t = time.perf_counter()
    recon = RidgeBaseline().fit(xtr, ytr).predict(xte)
    seconds["ridge"] = seconds["ridge_snap"] = time.perf_counter() - t
    results["ridge"] = score_reconstructions(recon, fold, pool)
    # snapping keeps ridge's 20-way ranking and identified condition by construction
    ridge_scores = identification_scores(recon, fold.unique_images)
    results["ridge_snap"] = score_reconstructions(snap_to_templates(recon, fold.unique_images), fold,
                                                  pool, scores=ridge_scores)
    t = time.perf_counter()
    recon = MultiscaleLocalDecoder().fit(xtr, ytr).predict(xte)
    seconds["multiscale_local"] = time.perf_counter() - t
    results["multiscale_local"] = score_reconstructions(recon, fold, pool)
    for k in (1, 5):
        t = time.perf_counter()
        knn = KNNBaseline(k).fit(xtr, ytr, fold.train.image_ids, fold.train.labels)
        recon = knn.predict(xte)
        scores = knn.candidate_scores(xte, len(fold.unique_images))
        cond = knn.predict_labels(xte)
        seconds[f"knn{k}"] = time.perf_counter() - t
        results[f"knn{k}"] = score_reconstructions(recon, fold, pool, scores, cond)
    return results, seconds


# --------------------------------------------------------------------------- embedding metrics
EMBEDDING_NAMES = {"fmri": "correlation", "image": "image_correlation"}  # model.latents' names -> the seed's


def extract_latent_representations(model: MiyawakiDualEncoder, fmri=None, images=None) -> dict:
    """Embeddings of a dual encoder as numpy arrays (unit rows).

    fmri: ``N x V`` z-scored fMRI, or a ``Trials`` (then only its fMRI is used: the trials' images
    are never fed to the model, so the result is fMRI-only); images: ``M x 1 x 28 x 28`` in [0, 1]
    (both checked and converted as by the model's public methods: ``fmri_batch``, which reads a
    ``Trials``' fMRI, and ``image_batch``).
    Returns for whichever inputs are given the encoder latents ``fmri_latent`` ``N x D`` and
    ``image_latent`` ``M x D``, and the correlation embeddings ``correlation`` (fMRI-only, ``N x
    D``: ``encode_fmri``) and ``image_correlation`` (``M x D``: ``encode_image``). Given a
    DataLoader instead (the seed project's call), it returns ``loader_representations``: tensors
    under the same names, the latents as the seed named them (``fmri``, ``image``), so that a
    key read from both forms means one thing."""
    if isinstance(fmri, torch.utils.data.DataLoader):
        return loader_representations(model, fmri)
    device = next(model.parameters()).device
    with evaluating(model):
        out = model.latents(x=None if fmri is None else fmri_batch(fmri, model.fmri_dim, device),
                            y=None if images is None else image_batch(images, device))
    return {EMBEDDING_NAMES.get(k, k): v.cpu().numpy() for k, v in out.items()}


def loader_representations(model: MiyawakiDualEncoder, loader) -> dict:
    """The seed project's representations of every batch of a ``make_dataloaders`` loader, as
    CPU tensors: ``fmri`` and ``image`` (unit encoder latents ``N x D``), ``correlation`` (the
    fMRI-only embedding ``encode_fmri``, ``N x D``: what to retrieve with), ``image_correlation``
    (``encode_image`` of each trial's image), ``labels`` and ``image_ids`` ``N``. No embedding mixes
    a trial's fMRI with its image (the seed's pair embedding did: ``clip_correlation`` warns)."""
    device = next(model.parameters()).device
    parts: dict[str, list] = {}
    with evaluating(model):
        for fmri, images, labels, image_ids in loader:
            out = model.latents(x=fmri.to(device), y=images.to(device))
            for key, value in (("fmri", out["fmri_latent"]), ("image", out["image_latent"]),
                               *((EMBEDDING_NAMES[k], out[k]) for k in EMBEDDING_NAMES),
                               ("labels", labels), ("image_ids", image_ids)):
                parts.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def knn_voters(k: int, n_train: int) -> int:
    """The k that votes: at most the ``n_train`` training rows."""
    return min(k, n_train)


def knn_condition(train_emb, train_labels, test_emb, k: int = 5) -> np.ndarray:
    """Condition of each test row ``N x D`` by k-nearest-neighbour vote (cosine) among the
    training rows ``T x D`` (sklearn; ``knn_voters`` of them vote, a tie going to the smallest
    label)."""
    clf = KNeighborsClassifier(n_neighbors=knn_voters(k, len(train_emb)), metric="cosine")
    return clf.fit(train_emb, train_labels).predict(test_emb)


def identification_metrics(scores: np.ndarray, fold: Fold) -> dict:
    """Per-trial 20-way metrics of scores ``N x K`` for ``fold.test`` -> dict of N arrays: rank,
    top1, top5 and condition_top1 (the condition of the top-1 identified image)."""
    ranks = identification_ranks(scores, fold.test.image_ids)
    return {"rank": ranks, "top1": (ranks <= 1).astype(float), "top5": (ranks <= 5).astype(float),
            "condition_top1": (identified_labels(scores, fold.unique_labels)
                               == fold.test.labels).astype(float)}


def candidate_scores(model: MiyawakiDualEncoder, fold: Fold) -> np.ndarray:
    """``model.score_candidates`` of the fold's test fMRI against its K candidates -> ``N x K``."""
    device = next(model.parameters()).device
    return model.score_candidates(torch.as_tensor(fold.test.fmri, device=device),
                                  torch.as_tensor(fold.unique_images, device=device))


def ensemble_fold_metrics(models: list[MiyawakiDualEncoder], train: Trials, fold: Fold,
                          settings: dict, k: int = 5) -> dict:
    """Per-trial metrics on ``fold.test``, from fMRI only, of dual encoders fitted on ``train``
    that differ in seed only, scored as one model (``ensemble_parts``): {row name: score setting
    ({} = the models' own)} -> {row name: dict of N arrays}: ``identification_metrics`` and
    condition (kNN on the fits' concatenated fMRI embeddings of ``train``, whose cosine is the
    mean of the fits' cosines)."""
    device = next(models[0].parameters()).device
    x, cand = (torch.as_tensor(a, device=device) for a in (fold.test.fmri, fold.unique_images))
    emb = lambda trials: np.concatenate([extract_latent_representations(m, trials)["correlation"]  # noqa: E731
                                         for m in models], axis=1)
    condition = (knn_condition(emb(train), train.labels, emb(fold.test), k) == fold.test.labels)
    out = {}
    for name, setting in settings.items():
        first = with_setting(models[0], train, setting, fold.unique_images) if setting else models[0]
        scores = fused_scores(ensemble_parts([first, *models[1:]], x, cand),
                              first.config.readout_weight, first.config.encoding_weight)
        out[name] = {**identification_metrics(scores, fold), "condition": condition.astype(float)}
    return out


def embedding_fold_metrics(model: MiyawakiDualEncoder, train: Trials, fold: Fold, k: int = 5) -> dict:
    """Per-trial metrics of a dual encoder on ``fold.test`` from fMRI only -> dict of N arrays:
    ``ensemble_fold_metrics`` of the one model at its own setting (``identification_metrics`` of
    ``model.score_candidates``; condition by kNN on its fMRI correlation embeddings of ``train``,
    the trials the model was fitted on)."""
    return ensemble_fold_metrics([model], train, fold, {"own": {}}, k)["own"]


def encoding_model_metrics(fold: Fold, config: DualEncoderConfig) -> dict:
    """The linear encoding model alone (``EncodingReadout`` with the config's alpha and voxel
    fraction, fitted on ``fold.train``) as an identification baseline -> per-trial metrics, its
    condition that of the top-1 identified image (as the other baselines')."""
    enc = EncodingReadout(fold.train.fmri.shape[1])
    enc.fit(fold.train.fmri, fold.train.images, fold.train.image_ids, config.encoding_alpha,
            config.encoding_voxels)
    m = identification_metrics(enc.scores(torch.as_tensor(fold.test.fmri),
                                          torch.as_tensor(fold.unique_images)), fold)
    m["condition"] = m.pop("condition_top1")
    return m


# --------------------------------------------------------------------------- figures
def tsne_map(points: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of ``N x D`` points (cosine metric) -> ``N x 2``. The perplexity is capped at
    (N - 1) / 3 (at least 1), so that a dozen points still work."""
    n = len(points)
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                random_state=seed)
    return tsne.fit_transform(np.asarray(points, np.float64))


NUMBERED_IMAGES = 40   # the t-SNE map numbers every image up to this many, else the test trials'


def plot_latent_space(test_xy, test_labels, test_ids, image_xy, image_labels, train_xy=None,
                      train_labels=None, title="") -> Figure:
    """Joint t-SNE map: test-trial fMRI embeddings (circles, ``N x 2``) joined to their true image's
    embedding (squares numbered by image id, ``K x 2``); optional training-trial fMRI embeddings
    (small dots). Colour = condition, one per label of the file (tab10, tab20 beyond 10 labels:
    Miyawaki's 2-5 are blue, orange, green, red); the legend sits right of the map. Of more than
    ``NUMBERED_IMAGES`` images (a random-image session's hundreds) only the test trials' are
    drawn large and numbered, the others small."""
    present = [image_labels, test_labels, [] if train_labels is None else train_labels]
    order = sorted({int(c) for labels in present for c in np.asarray(labels).ravel()})
    cmap = colormaps["tab10" if len(order) <= 10 else "tab20"]
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(order)}
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot()
    if train_xy is not None:
        ax.scatter(train_xy[:, 0], train_xy[:, 1], s=10, alpha=0.3, c=[colour[int(c)] for c in train_labels])
    for (x, y), k in zip(test_xy, test_ids):
        ax.plot([x, image_xy[k, 0]], [y, image_xy[k, 1]], color="0.5", lw=0.8, zorder=1)
    ax.scatter(test_xy[:, 0], test_xy[:, 1], s=60, c=[colour[int(c)] for c in test_labels],
               edgecolors="k", zorder=3)
    numbered = (np.arange(len(image_xy)) if len(image_xy) <= NUMBERED_IMAGES
                else np.unique(np.asarray(test_ids, int)))
    small = np.setdiff1d(np.arange(len(image_xy)), numbered)
    colours = np.array([colour[int(c)] for c in image_labels])
    if len(small):
        ax.scatter(image_xy[small, 0], image_xy[small, 1], s=12, marker="s", zorder=2,
                   c=colours[small], alpha=0.5)
    ax.scatter(image_xy[numbered, 0], image_xy[numbered, 1], s=150, marker="s", zorder=2,
               edgecolors="k", c=colours[numbered], alpha=0.8)
    for k in numbered:
        ax.annotate(str(k), tuple(image_xy[k]), ha="center", va="center", fontsize=7, color="w",
                    zorder=4, fontweight="bold")
    # the markers' legend entries in grey (an empty scatter each): their colours are the conditions'
    kinds = [({"s": 60, "edgecolors": "k"}, "fMRI, test trials (line to true image)"),
             ({"s": 150, "marker": "s", "edgecolors": "k", "alpha": 0.8},
              "image embeddings (number = image id)" + (", test trials' images" if len(small) else ""))]
    if len(small):
        kinds.append(({"s": 12, "marker": "s", "alpha": 0.5}, "image embeddings, the other images"))
    if train_xy is not None:
        kinds.insert(0, ({"s": 10, "alpha": 0.3}, "fMRI, training trials"))
    handles = [ax.scatter([], [], color="0.6", **style) for style, _ in kinds]
    labels = [label for _, label in kinds]
    for c in sorted(set(np.asarray(image_labels).tolist())):
        handles.append(ax.scatter([], [], color=colour[c], marker="o"))
        labels.append(condition_name(c, image_labels))
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1),  # off the map
              borderaxespad=0)
    ax.set(xlabel="t-SNE 1", ylabel="t-SNE 2", title=title or "Joint t-SNE of fMRI and image embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def plot_similarity_matrix(sim, true_ids, candidates, candidate_labels, title="",
                           score_label="cosine similarity") -> Figure:
    """Scores (``score_label``) of N test trials (rows) with K candidate images (columns,
    thumbnails on top); the true image is boxed, each row's top-1 pick dotted. sim ``N x K``;
    candidates ``K x 1 x 28 x 28``; true_ids ``N``. At most 30 inches a side: past 40 candidates or
    60 trials the axis keeps plain numbers instead of a label each (a file of hundreds of images)."""
    sim = np.asarray(sim)
    n, k = sim.shape
    fig = Figure(figsize=(min(30.0, max(7.0, 0.45 * k + 2)), min(30.0, max(4.0, 0.4 * n + 2.2))))
    gs = fig.add_gridspec(2, 2, height_ratios=[1.1, n], width_ratios=[k, 0.6], hspace=0.02,
                          wspace=0.05)
    ax = fig.add_subplot(gs[1, 0])
    thumbs = fig.add_subplot(gs[0, 0], sharex=ax)
    cax = fig.add_subplot(gs[1, 1])
    gap = 4
    strip = np.ones((IMAGE_SIDE, k * (IMAGE_SIDE + gap)))
    for j, img in enumerate(np.asarray(candidates)[:, 0]):
        strip[:, j * (IMAGE_SIDE + gap) + gap // 2:j * (IMAGE_SIDE + gap) + gap // 2 + IMAGE_SIDE] = img
    thumbs.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(-0.5, k - 0.5, 0, 1))
    thumbs.set_yticks([])
    thumbs.tick_params(labelbottom=False, bottom=False)
    thumbs.set_title(title or f"{score_label}: test fMRI vs candidate images")
    im = ax.imshow(sim, cmap="viridis", interpolation="nearest", aspect="auto")
    ax.scatter(true_ids, np.arange(n), marker="s", s=120, facecolors="none", edgecolors="r",
               linewidths=1.5, label="true image")
    ax.scatter(sim.argmax(1), np.arange(n), marker="o", s=14, color="w", edgecolors="k",
               label="top-1 pick")
    if k <= 40:
        ax.set_xticks(range(k), [f"{j}\n{int(candidate_labels[j])}" for j in range(k)], fontsize=7)
    if n <= 60:
        ax.set_yticks(range(n), [f"trial {i} (img {int(t)})" for i, t in enumerate(true_ids)],
                      fontsize=7)
    key = "" if not miyawaki_labels(candidate_labels) else " (" + ", ".join(   # a file's own: no key
        f"{c} {condition_name(c, candidate_labels)}" for c in np.unique(candidate_labels).astype(int)) + ")"
    ax.set_xlabel(f"candidate image id / condition{key}\n(red box: true image, white dot: top-1 pick)")
    fig.colorbar(im, cax=cax, label=score_label)
    return fig


def matched_auc(sim, true_ids) -> float:
    """P(a matched score > a mismatched one) over all pairs of ``sim`` ``N x K`` (ties count 1/2;
    chance 0.5): the Mann-Whitney statistic of the true image's scores against the others'."""
    from scipy.stats import rankdata
    sim = np.asarray(sim, dtype=np.float64)
    match = np.zeros(sim.shape, dtype=bool)
    match[np.arange(len(sim)), true_ids] = True
    ranks = rankdata(sim.ravel())
    n_m, n_u = int(match.sum()), int((~match).sum())
    return float((ranks[match.ravel()].sum() - n_m * (n_m + 1) / 2) / (n_m * n_u))


def plot_correlation_analysis(sim, true_ids, title="", score_label="cosine similarity") -> Figure:
    """Left: distribution of matched (true image) vs mismatched scores (``score_label``), sim
    ``N x K``, titled with their AUC (``matched_auc``: the means would compare nothing for scores
    z-scored over the candidates, where the mismatched mean is -1/(K-1) of the matched one). Right:
    K-way identification rank of each test trial, with top-1 / top-5 and chance (a label per trial
    up to 40 trials)."""
    sim = np.asarray(sim)
    n, k = sim.shape
    match = np.zeros_like(sim, dtype=bool)
    match[np.arange(n), true_ids] = True
    ranks = identification_ranks(sim, true_ids)
    fig = Figure(figsize=(12, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(sim.min(), sim.max(), 25)
    ax1.hist(sim[~match], bins=bins, density=True, alpha=0.6, color="tab:gray",
             label=f"mismatched pairs (n={int((~match).sum())})")
    ax1.hist(sim[match], bins=bins, density=True, alpha=0.7, color="tab:red",
             label=f"matched pairs (n={n})")
    ax1.set(xlabel=score_label, ylabel="density",
            title=f"Matched vs mismatched pairs\nAUC {matched_auc(sim, true_ids):.2f} (chance 0.50)")
    ax1.legend(fontsize=8)
    colours = ["tab:green" if r == 1 else "tab:olive" if r <= 5 else "tab:gray" for r in ranks]
    # a log axis from rank 1's floor: a rank-1 bar is a fifth of the height among 20 candidates
    # and still visible among hundreds (on a linear axis it was a sliver)
    ax2.bar(np.arange(n), ranks - 0.5, bottom=0.5, color=colours)      # rank 1: the lowest bar
    ax2.axhline((k + 1) / 2, color="k", ls="--", lw=1, label=f"chance mean rank {(k + 1) / 2:.1f}")
    ax2.axhline(5.5, color="tab:olive", ls=":", lw=1, label="top-5 boundary")
    if n <= 20:
        ax2.set_xticks(np.arange(n), [f"{i}\n({int(t)})" for i, t in enumerate(true_ids)], fontsize=7)
    elif n <= 40:                        # one line each, upright: two-line labels ran together
        ax2.set_xticks(np.arange(n), [f"{i} ({int(t)})" for i, t in enumerate(true_ids)], fontsize=6,
                       rotation=90)
    ax2.set(xlabel="test trial (true image id)", ylabel=f"rank of true image (1 = best of {k})",
            yscale="log", ylim=(0.5, k + 0.5),
            title=f"Identification rank\ntop-1 {np.mean(ranks == 1):.2f}, top-5 "
                  f"{np.mean(ranks <= 5):.2f} (chance {chance_text(1 / k)} / "
                  f"{chance_text(min(5, k) / k)})")
    # round ranks up to K, K itself, and none close under it (labels 20 and 22 ran together)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if 1.3 * t <= k] + [k]
    ax2.set_yticks(ticks, [str(t) for t in ticks])
    ax2.yaxis.set_minor_locator(NullLocator())
    handles, _ = ax2.get_legend_handles_labels()
    handles += [Patch(color=c, label=t) for c, t in
                (("tab:green", "top-1 hit"), ("tab:olive", "in top-5"), ("tab:gray", "rank > 5"))]
    ax2.legend(handles=handles, fontsize=8, loc="upper right")
    if title:                         # room above the panels' two-line titles for each line
        fig.suptitle(title)
        fig.subplots_adjust(top=0.82 - 0.25 * title.count("\n") / fig.get_figheight())
    return fig


# --------------------------------------------------------------------------- checkpoint evaluation
def oracle_metrics(model: MiyawakiDualEncoder, fold: Fold, cand_emb: np.ndarray, k: int) -> dict:
    """The seed's joint embedding clip_correlation(fMRI latent, latent of the TRUE test image),
    scored against the candidate image embeddings, and the condition of each test image from its
    own image latent. Both use the test image: oracle only."""
    device = next(model.parameters()).device

    def joint(trials: Trials) -> np.ndarray:
        x = torch.as_tensor(trials.fmri, device=device)
        y = torch.as_tensor(trials.images, device=device)
        with warnings.catch_warnings():             # an oracle on purpose, reported as one
            warnings.simplefilter("ignore", OracleWarning)
            z = model.clip_correlation(model.fmri_encoder(x), model.stimulus_encoder(y))
        return torch.nn.functional.normalize(z, dim=1).cpu().numpy()

    with evaluating(model):
        test, train = joint(fold.test), joint(fold.train)
    ident = identification_summary(cosine_scores(test, cand_emb), fold.test.image_ids)
    pred = knn_condition(train, fold.train.labels, test, k)
    latent = [extract_latent_representations(model, images=t.images)["image_latent"]
              for t in (fold.train, fold.test)]
    pred_image = knn_condition(latent[0], fold.train.labels, latent[1], k)
    return {"label": ORACLE_LABEL, "joint_embedding_top1": ident["top1"],
            "joint_embedding_top5": ident["top5"],
            "joint_embedding_condition": condition_accuracy(pred, fold.test.labels),
            "image_latent_condition": condition_accuracy(pred_image, fold.test.labels),
            "image_latent_condition_note": IMAGE_LATENT_NOTE}


def print_checkpoint_summary(result: dict) -> None:
    """One line per number of the checkpoint evaluation, each with its chance level."""
    ident, r12 = result["identification"], result["retrieval_test_trials"]
    cond, ridge = result["condition_accuracy"], result["baselines"]["ridge"]
    k, n = ident["n_candidates"], result["n_test"]
    if result.get("noise_control"):
        print("NOISE CONTROL: the dual encoder, the kNN votes and ridge below were fitted on Gaussian "
              "noise instead of the training trials' fMRI (--noise-control); every number must sit at chance")
    print(f"S1 fMRI->image identification (fMRI only, {k}-way): top-1 {ident['top1']:.3f} "
          f"(chance {ident['chance_top1']:.3f}), top-5 {ident['top5']:.3f} (chance "
          f"{chance_text(ident['chance_top5'])}), mean rank {ident['mean_rank']:.2f} (chance "
          f"{ident['chance_mean_rank']:.1f})")
    print(f"  top-1 of each part of the score alone: {score_parts_text(ident['score_parts'])}")
    print(f"S1 image->fMRI ({ident['image_to_fmri_n_queries']} image(s) rank {n} test trial(s)): "
          f"top-1 {value_text(ident['image_to_fmri_top1'])} (chance "
          f"{value_text(ident['image_to_fmri_chance_top1'])}), mean rank "
          f"{value_text(ident['image_to_fmri_mean_rank'], 2)}")
    print(f"S1 {n}-way retrieval among test trials: top-1 {r12['top1']:.3f} "
          f"(chance {r12['chance_top1']:.3f})")
    asked = result["config"]["knn_k"]
    capped = f", --knn-k {asked} capped at the {cond['k']} training trials" if asked != cond["k"] else ""
    print(f"S1 {round(1 / cond['uniform_chance'])}-way condition (kNN k={cond['k']}{capped}): fMRI latent "
          f"{cond['fmri_latent']:.3f}, fMRI "
          f"correlation embedding {cond['correlation']:.3f} | majority rate {cond['majority_rate']:.3f}"
          + (f" ({cond['note']})" if "note" in cond else ""))
    print(f"S1 ridge baseline for reference: top-1 {ridge['top1']:.3f}, top-5 {ridge['top5']:.3f}")


def checkpoint_embeddings(model: MiyawakiDualEncoder, fold: Fold) -> dict:
    """The embeddings the checkpoint evaluation uses: ``candidates`` (the K unique images),
    ``train`` / ``test`` (fMRI only) and ``test_images`` (the test trials' own images, for the
    labelled retrieval among them), each ``extract_latent_representations``' dict; and
    ``scores``, the model's identification scores of the test trials (``candidate_scores``)."""
    return {"scores": candidate_scores(model, fold),
            "candidates": extract_latent_representations(model, images=fold.unique_images),
            "train": extract_latent_representations(model, fold.train),
            "test": extract_latent_representations(model, fold.test),
            "test_images": extract_latent_representations(model, images=fold.test.images)}


def score_checkpoint(model: MiyawakiDualEncoder, fold: Fold, knn_k: int = 5, oracle: bool = False,
                     embeddings: dict | None = None) -> dict:
    """Score a dual encoder on ``fold`` (fMRI only at test time; no I/O): fMRI -> image
    identification among the K candidates and the reverse direction, the labelled retrieval
    among the test trials' own images, condition accuracy (kNN among training trials), the
    classic baselines, each beside its chance; with ``oracle`` also the ORACLE numbers under
    ``oracle``. What ``miyawaki_evaluation.py`` writes to ``miyawaki_evaluation.json``.
    ``embeddings``: ``checkpoint_embeddings(model, fold)`` when the caller has them already.
    ValueError for a model fitted on other training trials than the fold's (its
    ``training_fingerprint``): another fold's test trials can be trials it was fitted on (an S1
    model on an S3 fold has seen the held-out image), and their fMRI is z-scored otherwise."""
    fitted = model.training_fingerprint
    if fitted is not None and fitted != fold.train.fingerprint:
        raise ValueError(f"this dual encoder was fitted on other training trials than those of fold "
                         f"{fold.meta.get('split') or '(unnamed)'}, so some of the fold's test trials may "
                         "be trials it was fitted on: score it on its own fold (load_for_s1 gives the "
                         "script's), or fit one on this fold (train_dual_encoder(fold, config))")
    emb = embeddings or checkpoint_embeddings(model, fold)
    cand, tr, te, te_img = (emb[k] for k in ("candidates", "train", "test", "test_images"))
    test, k = fold.test, len(fold.unique_images)
    ident = identification_summary(emb["scores"], test.image_ids)
    fmri_emb, cand_emb = te["correlation"], cand["image_correlation"]
    device = next(model.parameters()).device
    parts = score_part_summary(model, torch.as_tensor(test.fmri, device=device),
                               torch.as_tensor(fold.unique_images, device=device), test.image_ids)
    reverse = image_to_fmri_summary(cand_emb, np.arange(k), fmri_emb, test.image_ids)
    n = len(test)
    r12 = retrieval_ranks(cosine_scores(fmri_emb, te_img["image_correlation"]), test.image_ids,
                          test.image_ids)
    same = test.image_ids[:, None] == test.image_ids[None, :]
    cond = {
        "k": knn_voters(knn_k, len(fold.train)),   # the k that voted in knn_condition
        "fmri_latent": condition_accuracy(
            knn_condition(tr["fmri_latent"], fold.train.labels, te["fmri_latent"], knn_k), test.labels),
        "correlation": condition_accuracy(
            knn_condition(tr["correlation"], fold.train.labels, fmri_emb, knn_k), test.labels),
        "majority_rate": majority_rate(test.labels),
        "uniform_chance": uniform_condition_chance(np.concatenate([fold.train.labels, test.labels])),
    }
    if cond["uniform_chance"] == 1:
        cond["note"] = "one condition in the data: 1 by construction, not a measurement"
    elif untrained_conditions(fold.train.labels, test.labels).all():   # e.g. a random-image session
        cond["note"] = ("no test trial's condition occurs among the training trials, so a kNN vote "
                        "over them cannot name it: 0 by construction, not a measurement")
    base, _ = evaluate_baselines(fold)
    result = {
        "split": fold.meta.get("split", ""), "n_test": n, "n_candidates": k, "chance": chance_levels(k),
        "identification": {   # fMRI -> image, named as in the other result files
            "n_candidates": k, "chance_top1": ident["chance_top1"], "chance_top5": ident["chance_top5"],
            "top1": ident["top1"], "top5": ident["top5"],
            "mean_rank": ident["mean_rank"], "chance_mean_rank": ident["chance_mean_rank"],
            "ranks": ident["ranks"],
            "readout_weight": model.config.readout_weight,
            "readout_model": model.config.readout_model,
            "encoding_weight": model.config.encoding_weight,
            "score_parts": parts,   # each part's own top-1 and its weight in the score
            "score": "model.score_candidates: (1 - readout_weight - encoding_weight) z(cosine of the "
                     "fMRI-only and image embeddings) + readout_weight z(Pearson r of the linear "
                     "pixel read-out with each candidate) + encoding_weight z(Pearson r of the fMRI "
                     "with each candidate's fMRI predicted by the linear encoding model)",
            "image_to_fmri_top1": reverse["top1"], "image_to_fmri_mean_rank": reverse["mean_rank"],
            "image_to_fmri_chance_top1": reverse["chance_top1"],
            "image_to_fmri_n_queries": reverse["n_queries"],
            "image_to_fmri_definition": "each unique image with test trials ranks the N test trials' "
                                        "fMRI embeddings; hit = any trial of that image",
        },
        "retrieval_test_trials": {
            "n_items": n, "top1": topk_accuracy(r12, 1), "mean_rank": mean_rank(r12),
            "chance_top1": float(same.mean()),
            "definition": f"{n}-way: each test fMRI embedding ranks the image embeddings of the "
                          f"{n} test trials; identical images count as matches",
        },
        "condition_accuracy": cond,
        "baselines": {name: fold_means(m) for name, m in base.items()},
    }
    if oracle:
        result["oracle"] = oracle_metrics(model, fold, cand_emb, knn_k)
    return result


def evaluate_checkpoint(cfg: "EvaluationConfig") -> dict:
    """Reload the S1 dual encoder, score it from fMRI only (score_checkpoint), save the figures
    and the JSON."""
    device = resolve_device(cfg.device)
    check_out_dir(cfg.out_dir)
    path = Path(cfg.checkpoint) if cfg.checkpoint else Path(cfg.out_dir) / CHECKPOINT_NAME
    data = resolve_data(cfg.data)
    model, ckpt, fold = load_for_s1(path, data, device)
    out = prepare_out_dir(cfg.out_dir)
    emb = checkpoint_embeddings(model, fold)             # for the scores and the figures
    scores = score_checkpoint(model, fold, cfg.knn_k, cfg.oracle, emb)
    control = is_noise_control(ckpt)       # then the fold's training fMRI is the control's noise
    result = {"split": "s1", "seed": ckpt["seed"], "data_source": data.source,
              "data_fingerprint": data.fingerprint, "checkpoint": str(path),
              "checkpoint_sha256": file_sha256(path), "noise_control": control,
              **{key: v for key, v in scores.items() if key not in ("split", "oracle")},
              "config": mode_config(cfg)}
    cand, tr, te = emb["candidates"], emb["train"], emb["test"]
    test, k, n = fold.test, len(fold.unique_images), len(fold.test)
    sim = emb["scores"]
    ident = scores["identification"]
    print_checkpoint_summary(result)
    if cfg.oracle:
        result["oracle"] = o = scores["oracle"]
        print(f"ORACLE (uses the true test image): joint-embedding top-1 "
              f"{o['joint_embedding_top1']:.3f}, top-5 {o['joint_embedding_top5']:.3f}, "
              f"condition {o['joint_embedding_condition']:.3f}; condition from the image latent "
              f"{o['image_latent_condition']:.3f}")

    xy = tsne_map(np.concatenate([te["correlation"], cand["image_correlation"], tr["correlation"]]),
                  cfg.seed, cfg.tsne_perplexity)
    top = NOISE_CONTROL_TITLE if control else ""
    label = (f"identification score ({model.config.readout_model} read-out weight "
             f"{model.config.readout_weight:g}, encoding weight {model.config.encoding_weight:g};\n"
             f"a sum of parts z-scored over the {k} candidates)")
    figures = {
        "miyawaki_latent_space_tsne.png": plot_latent_space(
            xy[:n], test.labels, test.image_ids, xy[n:n + k], fold.unique_labels, xy[n + k:],
            fold.train.labels, title=f"{top}Joint t-SNE of fMRI-only and image embeddings\n(S1 test: the "
                                     f"embeddings' top-1 {ident['score_parts']['embedding']['top1']:.2f}, the "
                                     f"identification score's {ident['top1']:.2f}, chance "
                                     f"{chance_text(1 / k)})"),
        "miyawaki_similarity_matrix.png": plot_similarity_matrix(
            sim, test.image_ids, fold.unique_images, fold.unique_labels,
            title=f"{top}S1 test trials from fMRI only vs {k} candidate images (top-1 {ident['top1']:.2f}, "
                  f"chance {chance_text(1 / k)})", score_label=label),
        "miyawaki_correlation_analysis.png": plot_correlation_analysis(
            sim, test.image_ids, f"{top}S1 test trials, from fMRI only", label)}
    with staged_outputs():      # written together: a run stopped here leaves the earlier outputs
        for name, fig in figures.items():
            save_figure(fig, out / name, data.source)
        save_json({**result, "figures": list(figures)}, out / "miyawaki_evaluation.json")
    write_summary(out)
    print(f"saved {out / 'miyawaki_evaluation.json'} and 3 figures in {out}")
    return result


# --------------------------------------------------------------------------- benchmark
def permuted_trials(train: Trials, rng: np.random.Generator) -> Trials:
    """Training trials with the fMRI rows shuffled against images, labels and ids (leak control)."""
    return replace(train, fmri=train.fmri[rng.permutation(len(train))])


def untrained_conditions(train_labels: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """``N`` bool: the test trials (``test_labels`` ``N``) whose condition no training trial shows
    (a random-image session): a vote among training trials cannot name it."""
    return ~np.isin(test_labels, train_labels)


def untrained_condition_trials(labels: np.ndarray, folds: list) -> int:
    """How many test trials of ``folds`` (``splits``: (name, train, test)) over the trials'
    ``labels`` ``N`` have a condition their fold's training trials lack (``untrained_conditions``)."""
    return sum(int(untrained_conditions(labels[train], labels[test]).sum()) for _, train, test in folds)


def fold_majority_rate(fold_labels: list[np.ndarray]) -> float:
    """The majority-class rate of a benchmark table: the score of the best constant condition
    averaged as the table averages (the mean over folds of each fold's share of it), for the
    folds' test labels (``F`` arrays); one fold: ``majority_rate``."""
    conditions = np.unique(np.concatenate(fold_labels))
    return float(max(np.mean([np.mean(labels == c) for labels in fold_labels]) for c in conditions))


def spread_text(result: dict) -> str:
    """What the benchmark's ± is (``aggregate``'s ``std_over`` of the table's columns, ``METRICS``),
    for its table and its console lines: the most common kind, and the rows of any other."""
    rows = {name: " / ".join(sorted({m[metric]["std_over"] for metric in METRICS if metric in m}))
            for name, m in result["methods"].items()}
    kinds = Counter(rows.values()).most_common()
    return (f"Mean over folds; ± = SD over {kinds[0][0]}"
            + "".join(f"; over {kind} for " + ", ".join(METHOD_TITLES.get(n, n) for n, k in rows.items()
                                                        if k == kind) for kind, _ in kinds[1:]))


def mean_sd(stats: dict, digits: int = 3) -> str:
    """``aggregate``'s mean ± std as text; the mean alone where the std is undefined (one test
    trial)."""
    text = f"{stats['mean']:.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {stats['std']:.{digits}f}"


def aggregate(values: np.ndarray, trial_values: np.ndarray | None = None) -> dict:
    """Summarise one metric of one method. values ``F x S``: fold means for F folds and S seeds
    (S = 1 for deterministic methods); trial_values: the per-trial values of the single fold.

    mean = mean over folds of the seed-averaged fold values; std = SD over folds (F > 1), else
    over seeds (S > 1), else over test trials (docs/BASELINES.md S1 convention); std_seeds = SD over
    seeds of the protocol mean (S > 1); per_fold / per_fold_seed: the values behind them."""
    values = np.asarray(values, np.float64)
    per_fold = values.mean(axis=1)
    out = {"mean": float(per_fold.mean())}
    if len(per_fold) > 1:
        out.update(std=float(per_fold.std(ddof=1)), std_over="folds")
    elif values.shape[1] > 1:
        out.update(std=float(values[0].std(ddof=1)), std_over="seeds")
    else:
        t = np.asarray(trial_values, np.float64)
        t = t[~np.isnan(t)]
        # one trial has no spread: None
        out.update(std=float(t.std(ddof=1)) if len(t) > 1 else None, std_over="trials")
    if values.shape[1] > 1:
        out["std_seeds"] = float(values.mean(axis=0).std(ddof=1))
    out["per_fold"] = per_fold.tolist()
    # F x S, so that runs over other seeds can be merged (the rows fitted per seed; not the
    # ensemble's, F x 1, nor the rows of a run's first seed alone: nested, permutation control)
    out["per_fold_seed"] = values.tolist()
    return out


def paired_vs_reference(methods: dict, reference: str = "ridge", metric: str = "top1",
                        tol: float = 1e-9) -> dict:
    """Per-fold differences (method - reference) of ``metric``: mean difference, wins/ties/losses."""
    ref = np.asarray(methods[reference][metric]["per_fold"])
    out = {}
    for name, m in methods.items():
        if name == reference or metric not in m:
            continue
        d = np.asarray(m[metric]["per_fold"]) - ref
        out[name] = {"mean_diff": float(d.mean()), "wins": int((d > tol).sum()),
                     "ties": int((np.abs(d) <= tol).sum()), "losses": int((d < -tol).sum())}
    return out


def unseen_s2_note(n_unseen: int, n_test: int) -> str:
    """The line an S2 run prints (and its markdown holds) when some test trials show an image
    their fold's training trials do not."""
    return (f"S2 note: {n_unseen} of the folds' {n_test} test trials show an image that no training "
            f"trial of their fold shows (an image the file shows once: stratified folds keep some "
            f"trials of any other image in training): on those S2 tests never-seen images, as S3 "
            f"does (their nearest-training-image check is closer_than_train)")


def benchmark_markdown(result: dict) -> str:
    """The benchmark JSON as a markdown table with chance levels and paired differences."""
    p, ch = result["protocol"].upper(), result["chance"]
    n, available = result["n_folds"], result.get("n_folds_available", result["n_folds"])
    folds = folds_text(n, available)
    lines = [f"# Benchmark {p}: {PROTOCOL_TITLES[result['protocol']]}", "",
             f"{folds}; data: {result['data_source']}; fMRI only at test time; higher is better but "
             f"for MSE.", "",
             f"Dual encoder: seeds {result['seeds']}, {result['config']['epochs']} epochs per fit, "
             f"trained on each fold's training trials (val_fraction 0). Baselines are deterministic "
             f"(once per fold). Wall time {result['seconds']['total']:.0f} s.", "",
             *([unseen_s2_note(result["n_unseen_test_trials"], result["n_test_trials"]), ""]
               if p == "S2" and result["n_unseen_test_trials"] else []),
             "| method | " + " | ".join(METRICS) + " | s (all folds and seeds) |",
             "|---" * (len(METRICS) + 2) + "|"]
    for name, m in result["methods"].items():
        cells = []
        for metric in METRICS:
            if metric not in m:
                cells.append("–")
                continue
            d = 4 if metric == "mse" else 3
            cell = mean_sd(m[metric], d)
            if "std_seeds" in m[metric]:
                cell += f" (seeds ± {m[metric]['std_seeds']:.{d}f})"
            cells.append(cell)
        lines.append(f"| {METHOD_TITLES.get(name, name)} | " + " | ".join(cells)
                     + f" | {result['seconds'].get(name, float('nan')):.1f} |")
    lines.append(f"| *chance* | {ch['top1']:.3f} | {ch['top5']:.3f} | {ch['two_way']:.2f} | "
                 f"see mean image | see mean image | see mean image | {ch['condition_uniform']:.2f} "
                 f"(majority {ch['condition_majority']:.3f}) | |")
    lines += ["", spread_text(result)
              + ("; for the dual encoder each fold's value is the mean over seeds and '(seeds ± x)' "
                 "is the SD over seeds of the protocol mean." if len(result["seeds"]) > 1 else "."),
              "Seconds: each row's own fit and scoring; a row that reuses another's fits (the dual "
              "encoder's ablations and ensembles, the anchor alone, whose fit the decoders' time "
              "holds) counts only what it adds.",
              "Condition: baselines, the encoding model, the anchor and the decoders use the "
              "condition of the top-1 identified image (kNN rows: neighbour vote); the dual encoder "
              "uses a kNN vote on the fMRI-only correlation "
              f"embeddings of the training trials (k={result['config']['knn_k']}"
              + (f", capped at each fold's training trials: {min(result['knn_voters'])} vote"
                 if min(result.get("knn_voters", [np.inf])) < result["config"]["knn_k"] else "") + ")"
              + "".join(f"; {METHOD_TITLES[name]}, condition of the top-1 image: "
                        f"{mean_sd(result['methods'][name]['condition_top1'])}"
                        for name in ("dual_encoder", "dual_encoder_permuted") if name in result["methods"])
              + ". The majority rate is the best constant condition's score, averaged over the "
                "folds as the table is" + (" (of the scored folds' test trials, which --max-folds may "
                                          "limit to a few conditions)" if n < available else "") + "."
              + (f" {result['n_test_trials_condition_untrained']} of the {result['n_test_trials']} "
                 "test trials show a condition that no training trial of their fold shows: a vote "
                 "among training trials (kNN rows, the dual encoder's) cannot name it, so scores 0 on "
                 "them by construction." if result.get("n_test_trials_condition_untrained") else ""),
              "Two-way pool: " + ("all trials (S3). The mean image scores below 0.5 here: it is the "
                                  "mean of the training images, which are the rivals, and the held-out "
                                  "image is not among them." if result["protocol"] == "s3" else
                                  "the fold's test trials."),
              *([f"{METHOD_TITLES['ridge_snap']}: ridge's identification drawn as an image (the "
                 f"candidate ridge ranks first, docs/BASELINES.md), not a reconstruction"
                 + (": the candidates include every test image its fold never trained on (S3's "
                    "held-out image), so wherever ridge identifies one the output is the true test "
                    "image." if result["n_unseen_test_trials"] else ".")]
                if "ridge_snap" in result["methods"] else []), "",
              f"## Paired per-fold differences against ridge ({result['n_candidates']}-way top-1)", "",
              "| method | mean diff | wins | ties | losses |", "|---|---|---|---|---|"]
    for name, d in result["paired_vs_ridge_top1"].items():
        lines.append(f"| {METHOD_TITLES.get(name, name)} | {d['mean_diff']:+.3f} | {d['wins']} | "
                     f"{d['ties']} | {d['losses']} |")
    if "nested" in result:
        n = result["nested"]
        chosen = [setting_name(c["setting"]) for c in n["per_fold"]]
        counts = "; ".join(f"{name} ({chosen.count(name)})" for name in dict.fromkeys(chosen))
        lines += ["", f"Nested selection: every fold chose the dual encoder's score setting from the "
                  f"grid {n['grid']} (linear weights summing to at most {n['max_linear_weight']:g}; "
                  f"the alpha only where the encoding weight is > 0, the read-out model only where "
                  f"its weight is > 0: {len(n['per_fold'][0]['inner_top1'])} settings) "
                  f"by inner CV on its own training trials ({n['inner_scheme']} inner folds, "
                  f"{n['inner_repeats']} repeat(s), seed {n['inner_seed']}; {n['rule']}). Chosen "
                  f"(folds): {counts}. The per-fold choices and inner scores are in the JSON."]
    if "dual_encoder_ensemble" in result["methods"]:
        lines += ["", "Ensemble: in every fold the seeds' fits scored as one model (their embeddings' "
                  "cosine averaged; the linear parts do not depend on the seed), one value per fold"
                  + ("; its nested row takes the fold's setting, chosen by the first seed's inner CV"
                     if "nested" in result else "") + "."]
    if "dual_encoder_permuted" in result["methods"]:
        lines += ["", "Permutation control: training fMRI rows shuffled against the images within "
                  "every fold (one shuffle per fold, first seed only), networks and linear parts "
                  "alike; it must sit at chance, with the default score and (with --nested) with "
                  "the fold's nested setting"
                  + ("; with --generative the decoders and their anchor are fitted on the same "
                     "shuffled pairs, on top of the control's dual encoder, and must sit at chance "
                     "top-1 and near the mean image's reconstruction scores"
                     if "diffusion_permuted" in result["methods"] else "") + "."]
    if "paired_vs_ridge_pixcorr" in result:
        lines += ["", "## Reconstruction: paired per-fold PixCorr against ridge", "",
                  "| method | mean diff | wins | ties | losses |", "|---|---|---|---|---|"]
        for name, d in result["paired_vs_ridge_pixcorr"].items():
            lines.append(f"| {METHOD_TITLES.get(name, name)} | {d['mean_diff']:+.4f} | {d['wins']} | "
                         f"{d['ties']} | {d['losses']} |")
    gates = {n: m["novelty_gate"] for n, m in result["methods"].items() if "novelty_gate" in m}
    if gates:
        lines += ["", "Novelty gate (the decoders' P(new image) from each test trial's fMRI; near 1 "
                  "the output leans on the linear anchor, near 0 it is the decoder's sample), mean "
                  f"over folds of each fold's mean ± SD over {next(iter(gates.values()))['std_over']}: "
                  + ", ".join(f"{METHOD_TITLES.get(n, n)} {mean_sd(g)}" for n, g in gates.items()) + "."]
    if result.get("n_folds_gate_uncalibrated"):     # the benchmark's decoders: blend 1, stretch on
        lines += ["", f"In {result['n_folds_gate_uncalibrated']} of the {n} folds no training image is "
                  "shown twice, so the gate has no seen examples to be calibrated on and reads every "
                  "test trial as new (g = 1): there both decoders output their linear anchor, clipped "
                  "and contrast-stretched, and their rows equal the anchor's."]
    novel = {n: m["closer_than_train"] for n, m in result["methods"].items() if "closer_than_train" in m}
    if novel:
        # folds with a never-seen test trial; recorded only when not every fold has one (S2)
        some = next(iter(novel.values())).get("folds")
        lines += ["", "Nearest-training-image check (docs/PROTOCOL.md, Shirakawa et al. 2024): mean over "
                  "folds of each fold's share of never-seen test trials whose reconstruction is "
                  "closer (PixCorr) to the true image than to every training image: "
                  + ", ".join(f"{METHOD_TITLES.get(n, n)} {v['mean']:.3f}" for n, v in novel.items()) + "."
                  + (f" Never-seen test trials are in {len(some)} of the {result['n_folds']} folds "
                     f"only ({', '.join(some)}), so these rest on them alone." if some else "")
                  + (" On S3 every candidate but the true image is a training image, so this is the "
                     "reconstructions' top-1 by PixCorr again (ties aside); it adds information "
                     "where the candidates are not the training images (a random-image session)."
                     if result["protocol"] == "s3" else "")]
    return "\n".join(lines) + "\n"


def benchmark_fold(cfg: "EvaluationConfig", data: MiyawakiData, pool, device: torch.device,
                   job: tuple[int, str, np.ndarray, np.ndarray]) -> tuple[list, dict]:
    """One benchmark fold, ``job`` = (index, name, train_idx, test_idx): the baselines once, then
    per seed a dual encoder (the permutation control for the first seed, both decoders with
    ``--generative``), and with several seeds their fits scored as one model (the ensemble rows,
    ``ensemble_fold_metrics``; with ``--nested`` also at the fold's setting, which the first
    seed's inner CV chose). Every fit seeds itself, so a fold gives the same numbers in any process.
    Returns ([(method, per-trial metrics, seconds)], gallery, nested): with ``--generative``,
    gallery holds the fold's first test trial as ``1 x 28 x 28`` images (true, ridge, decoders of
    the first seed, nearest training image) and each one's PixCorr with the true image; with
    ``--nested``, nested holds the fold's score setting chosen by inner CV (first seed, the grid
    of ``score_settings``, by inner top-1) and the inner top-1 and MRR of every setting; else
    they are empty."""
    index, name, train_idx, test_idx = job
    fold = data.fold(train_idx, test_idx, name)
    base, base_secs = evaluate_baselines(fold, pool)
    rows = [(method, per_trial, base_secs[method]) for method, per_trial in base.items()]
    gallery, nested = {}, {}
    de_cfgs = [DualEncoderConfig(epochs=cfg.epochs, seed=seed, val_fraction=0.0) for seed in cfg.seeds]
    t = time.perf_counter()
    rows.append(("encoding_model", encoding_model_metrics(fold, de_cfgs[0]), time.perf_counter() - t))
    if cfg.nested:        # the score's settings by inner CV on this fold's training trials only
        t = time.perf_counter()
        settings = score_settings()
        scheme = nested_scheme(fold)
        inner = inner_cv_scores(data, fold.train_idx, de_cfgs[0], scheme, settings, device,
                                cfg.inner_repeats)
        nested = {"fold": name, "inner_scheme": scheme, "setting": select_setting(inner["top1"], settings),
                  "inner_mrr": inner["mrr"], "inner_top1": inner["top1"],
                  "seconds": time.perf_counter() - t}
    batched = {}
    if batched_seed_fits(cfg, device):             # all seeds' dual encoders as one vmapped fit
        t = time.perf_counter()
        models, _ = train_dual_encoders(fold.train, de_cfgs, device, fold.unique_images)
        batched = {c.seed: (m, (time.perf_counter() - t) / len(models)) for c, m in zip(de_cfgs, models)}
    fits = []                                      # the seeds' dual encoders, for the ensemble rows
    for de_cfg in de_cfgs:
        seed = de_cfg.seed
        runs = [("dual_encoder", fold.train)]
        if cfg.permutation_control and seed == cfg.seeds[0]:  # one seed: a chance-level check
            runs.append(("dual_encoder_permuted",
                         permuted_trials(fold.train, np.random.default_rng([seed, index]))))
        for method, train in runs:
            t = time.perf_counter()
            if method == "dual_encoder" and batched:
                model, fit_secs = batched[seed]
            else:
                model, _ = train_dual_encoder(train, de_cfg, device, fold.unique_images, progress=False)
                fit_secs = 0.0
            metrics = embedding_fold_metrics(model, train, fold, cfg.knn_k)
            rows.append((method, metrics, time.perf_counter() - t + fit_secs))
            if method == "dual_encoder":
                fits.append(model)
            variants = dict(ABLATIONS) if method == "dual_encoder" else {}
            if nested:                      # the same networks, scored with other settings
                variants[method + "_nested"] = nested["setting"]    # the control's too
            for variant, setting in variants.items():   # (their kNN condition is the networks')
                t = time.perf_counter()
                scores = candidate_scores(with_setting(model, train, setting, fold.unique_images), fold)
                rows.append((variant, {**metrics, **identification_metrics(scores, fold)},
                             time.perf_counter() - t + (nested["seconds"] if variant == "dual_encoder_nested"
                                                        and seed == cfg.seeds[0] else 0.0)))
            if cfg.generative:
                # the decoders' module only for --generative: at the top, a script imports only
                # the loader and the dual encoder
                from miyawaki_generative_backend import GenerativeConfig, decode_fold
                # the control's anchor and decoders learn from its shuffled pairs too, on top of
                # its encoder: the reconstruction rows get their permutation control
                control = "" if method == "dual_encoder" else "_permuted"
                recons, secs, gate = decode_fold(model, replace(fold, train=train),
                                                 GenerativeConfig(seed=seed), device)
                rows += [(g + control, {**score_reconstructions(recon, fold, pool),
                                        **({"novelty_gate": gate} if gate is not None and g in DECODERS
                                           else {})},
                          secs[g]) for g, recon in recons.items()]
                if not gallery and not control:
                    gallery = fold_gallery(fold, recons, gate)
    if len(fits) > 1:               # the seeds' fits as one model: no fit of its own
        t = time.perf_counter()
        ensemble = ensemble_fold_metrics(fits, fold.train, fold, {
            "dual_encoder_ensemble": {}, **({"dual_encoder_ensemble_nested": nested["setting"]}
                                            if nested else {})}, cfg.knn_k)
        rows += [(name, metrics, (time.perf_counter() - t) / len(ensemble))
                 for name, metrics in ensemble.items()]
    return rows, gallery, nested


def nested_scheme(fold: Fold) -> str:
    """The inner folds of nested selection mimic the fold's generalisation: where no test image is
    shown in training (S3; S1 of a random-image session) they hold images out of the inner
    training set (``unseen``), else trials (``seen``: S1 / S2 of the real file)."""
    return "unseen" if fold.unseen_test.all() else "seen"


def batched_seed_fits(cfg: "EvaluationConfig", device: torch.device) -> bool:
    """Whether a fold's seeds train as one batched model (``train_dual_encoders``): ``--seed-fits
    batched``, or ``auto`` on a GPU with several seeds (on a CPU separate fits are as fast, and
    their numbers are the reference ones)."""
    return len(cfg.seeds) > 1 and (cfg.seed_fits == "batched"
                                   or (cfg.seed_fits == "auto" and device.type == "cuda"))


def fold_gallery(fold: Fold, recons: dict, gate: np.ndarray | None = None) -> dict:
    """The first test trial of ``fold``: {"true" | "ridge" | decoder | "nearest training image":
    (image ``1 x 28 x 28``, PixCorr with the true image, like, novelty gate)}; like (reconstructions
    of a never-seen image only, else None) is the id of the training image a reconstruction is
    closer to than to the true one, where the nearest-training-image check fails (None where it
    passes, and for a seen image, which is itself a training image); the
    novelty gate (the decoders' ``gate`` of that trial, else None) is what their output leaned on;
    the nearest training image is the training image most correlated with the true one (what a
    look-up could give)."""
    true = fold.test.images[:1]
    one = replace(fold, test=fold.test.subset(np.arange(1)))
    ridge = RidgeBaseline().fit(fold.train.fmri, fold.train.images).predict(fold.test.fmri[:1])
    nearest = fold.unique_images[nearest_training_check(true, one)[1][0]]
    corr = lambda img: float(pearson_rows(np.clip(img.reshape(1, -1), 0, 1), true.reshape(1, -1))[0])  # noqa: E731
    out = {"true": (true[0], 1.0, None, None)}
    for name, recon in {"ridge": ridge.reshape(true.shape), **{g: r[:1] for g, r in recons.items()}}.items():
        g = float(gate[0]) if gate is not None and name in DECODERS else None
        closer, like = nearest_training_check(recon, one)
        memorised = one.unseen_test[0] and not closer[0]
        out[name] = (recon[0].clip(0, 1), corr(recon), int(like[0]) if memorised else None, g)
    out["nearest training image"] = (nearest, corr(nearest), None, None)
    return out


def gallery_row_name(data: MiyawakiData, fold: tuple) -> str:
    """A gallery row's label: an S3 fold by its held-out image ("#3 shapes"), others by name."""
    name, _, test_idx = fold
    if not name.startswith("s3"):
        return name
    k = data.trials.image_ids[test_idx[0]]
    return f"#{k} {condition_name(data.unique_labels[k], data.unique_labels)}"


def gallery_title(protocol: str, seed: int, n_folds: int, n_available: int) -> str:
    """The gallery's title: what it shows (saying when --max-folds left folds out) and its marks."""
    partial = f", {folds_text(n_folds, n_available)}" if n_folds < n_available else ""
    return (f"{protocol.upper()}: first test trial of each fold{partial}, "
            f"from fMRI only\n(decoders: seed {seed}; g, their novelty gate: near 1 their output is "
            f"mostly the anchor)\nred, closer to #j: a never-seen image's reconstruction closer "
            f"(PixCorr) to training image j than to the true one (a network's: memorised?)\nlast "
            f"column: the training image closest to the true one (a look-up with the true image, "
            f"not a decoder's output)")


def folds_text(n_folds: int, n_available: int) -> str:
    """"20 folds", or "the first 4 of 20 folds (--max-folds)" when a run left folds out."""
    if n_folds < n_available:
        return f"the first {n_folds} of {n_available} folds (--max-folds)"
    return f"{n_folds} fold{'s' * (n_folds != 1)}"


GALLERY_TITLES = {"ridge": "ridge", "anchor": "anchor alone",
                  "nearest training image": "training image\nclosest to the true"}


def plot_gallery(galleries: list[dict], names: list[str], title: str) -> Figure:
    """One row per fold (``galleries`` from ``fold_gallery``, ``names`` their folds), one column
    per panel, PixCorr with the true image in each title (and the decoders' novelty gate g); a
    reconstruction that fails the nearest-training-image check is marked "closer to #j" in red, j
    the training image it is closer to (a linear read-out's too, which memorises nothing)."""
    cols = list(galleries[0])
    lines = title.count("\n") + 1
    height = 1.55 * len(galleries) + 0.6 + 0.2 * lines
    fig = Figure(figsize=(1.5 * len(cols), height))
    axes = fig.subplots(len(galleries), len(cols), squeeze=False)
    fig.subplots_adjust(top=1 - (0.8 + 0.2 * lines) / height, bottom=0.1 / height, hspace=0.45)
    for r, (g, name) in enumerate(zip(galleries, names)):
        for c, col in enumerate(cols):
            img, corr, like, gate = g[col]
            ax = axes[r, c]
            ax.imshow(img[0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            panel_title(ax, (f"{GALLERY_TITLES.get(col, METHOD_TITLES.get(col, col))}\n" if r == 0 else "")
                        + f"r={corr:.2f}"
                        + (f" g={gate:.2f}" if gate is not None else "")
                        + (f"\ncloser to #{like}" if like is not None else ""), fontsize=7,
                        color="tab:red" if like is not None else "k")
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    return fig


def worker_threads(n: int) -> None:
    """A benchmark worker's initializer: torch and numpy / scipy's BLAS (and OpenMP) on ``n``
    threads. BLAS left at its default, one thread per core, made two workers' pools busy-wait on
    each other's cores: the S3 benchmark's work outside the networks ran 2.5x slower. Ctrl-C is
    left to the parent, which terminates the workers (each printed its own traceback)."""
    torch.set_num_threads(n)
    threadpoolctl.threadpool_limits(n)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_benchmark(cfg: "EvaluationConfig") -> dict:
    """Run every fold (``cfg.workers`` processes at a time), aggregate as docs/BASELINES.md, write
    ``benchmark_<protocol>.json`` / ``.md``; returns the JSON dict."""
    device = resolve_device(cfg.device)
    check_out_dir(cfg.out_dir)
    data: MiyawakiData = resolve_data(cfg.data)
    folds = splits(cfg.protocol, data)
    n_available = len(folds)
    if cfg.max_folds > n_available:     # it would change nothing and be recorded as a limit
        raise OptionError(f"--max-folds {cfg.max_folds} is more than the {n_available} fold"
                          f"{'s' * (n_available != 1)} of {cfg.protocol.upper()} on {data.source}; "
                          f"leave it out to run them all")
    out = prepare_out_dir(cfg.out_dir)
    if cfg.max_folds:
        folds = folds[:cfg.max_folds]
    uncalibrated = 0          # folds whose training trials show no image twice (--generative)
    if cfg.generative:
        from miyawaki_generative_backend import check_training_images, gate_can_be_calibrated
        for name, train, _ in folds:
            check_training_images(data.trials.image_ids[train], f"{data.source}: the training trials "
                                  f"of {cfg.protocol.upper()} fold {name}")
            uncalibrated += not gate_can_be_calibrated(data.trials.image_ids[train])
    # test trials whose image no training trial of their fold shows (all of S3's; in S2 those of
    # images shown once): scored as never-seen images
    n_unseen = sum(int(data.fold(train, test).unseen_test.sum()) for _, train, test in folds)
    n_test = sum(len(test) for _, _, test in folds)
    if cfg.protocol == "s2" and n_unseen:
        print(unseen_s2_note(n_unseen, n_test))
    pool = (data.trials.images, data.trials.image_ids) if cfg.protocol == "s3" else None
    # method -> metric -> {fold: S fold means}; a metric of some folds only (closer_than_train:
    # folds with a never-seen test image) has those folds alone
    values: dict[str, dict[str, dict[int, list]]] = {}
    first_trials: dict[tuple, np.ndarray] = {}   # (method, metric) -> per-trial values, first fold and seed
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    run_fold = partial(benchmark_fold, cfg, data, pool, device)
    jobs = [(i, *f) for i, f in enumerate(folds)]
    # worker processes (no more than there are folds) share this process's threads (1 each for 2
    # workers on this 2-core machine, which runs S3 in ~20 % less time than one process with 2
    # threads); leaving the block on an error or Ctrl-C terminates the workers at once
    n_workers = min(cfg.workers, len(jobs))
    workers = (multiprocessing.get_context("spawn").Pool(
        n_workers, worker_threads, (max(1, torch.get_num_threads() // n_workers),))
        if n_workers > 1 else nullcontext())
    with workers:
        results = workers.imap(run_fold, jobs) if n_workers > 1 else map(run_fold, jobs)
        bar = tqdm(results, total=len(folds), desc=f"{cfg.protocol} folds", disable=None)
        galleries, nested = [], []
        for i, (rows, gallery, choice) in enumerate(bar):  # in fold order, whichever process ran it
            if gallery:
                galleries.append(gallery)
            if choice:
                nested.append(choice)
            for method, per_trial, secs in rows:
                for metric, v in fold_means(per_trial).items():
                    values.setdefault(method, {}).setdefault(metric, {}).setdefault(i, []).append(v)
                    first_trials.setdefault((method, metric), per_trial[metric])
                seconds[method] = seconds.get(method, 0.0) + secs
            de, ridge = np.mean(values["dual_encoder"]["top1"][i]), values["ridge"]["top1"][i][0]
            bar.set_postfix(ridge=f"{ridge:.2f}", dual=f"{de:.2f}")
            if bar.disable:  # no live bar (not a terminal): one line per fold instead
                # and what is left at this pace (the first n_workers folds run side by side)
                elapsed = time.perf_counter() - t_start
                print(f"{folds[i][0]}: ridge top-1 {ridge:.3f} | dual encoder top-1 {de:.3f} (over "
                      f"{len(cfg.seeds)} seed(s)) | fold {i + 1} of {len(folds)}, {elapsed:.0f} s so "
                      f"far, about {elapsed / max(i + 1, n_workers) * (len(folds) - i - 1):.0f} s to go")

    k = len(data.unique_images)
    methods = {m: {metric: {**aggregate(list(v.values()), first_trials[m, metric]),
                            **({"folds": [folds[i][0] for i in v]} if len(v) < len(folds) else {})}
                   for metric, v in mv.items()} for m, mv in values.items()}
    seconds["total"] = time.perf_counter() - t_start
    result = {
        "protocol": cfg.protocol, "folds": [f[0] for f in folds], "n_folds": len(folds),
        "n_folds_available": n_available,
        "seeds": list(cfg.seeds), "data_source": data.source, "data_fingerprint": data.fingerprint,
        "n_trials": len(data.trials),
        "n_candidates": k, "n_test_trials": n_test, "n_unseen_test_trials": n_unseen,
        "n_test_trials_condition_untrained": untrained_condition_trials(data.trials.labels, folds),
        "knn_voters": [knn_voters(cfg.knn_k, len(train)) for _, train, _ in folds],   # per fold
        "chance": {**chance_levels(k),
                   "condition_uniform": uniform_condition_chance(data.trials.labels),
                   # the best constant condition, averaged over the folds' test trials as the
                   # table is (S1: its 12; S3 of Miyawaki's file, one image per fold and 5 per
                   # condition: one fold in four)
                   "condition_majority": fold_majority_rate([data.trials.labels[test]
                                                             for _, _, test in folds])},
        "methods": methods,
        "paired_vs_ridge_top1": paired_vs_reference(methods),
        **({"paired_vs_ridge_pixcorr": {g: v for g, v in paired_vs_reference(methods, metric="pixcorr")
                                        .items() if g in GENERATIVE},
            "n_folds_gate_uncalibrated": uncalibrated} if cfg.generative else {}),
        **({"nested": {"grid": {k: list(v) for k, v in SCORE_GRID.items()},
                       "max_linear_weight": MAX_LINEAR_WEIGHT,
                       "inner_scheme": " / ".join(sorted({n["inner_scheme"] for n in nested})),
                       "inner_seed": cfg.seeds[0],
                       "inner_repeats": cfg.inner_repeats,
                       "rule": "highest mean inner top-1; a tie goes to the first setting in "
                               "grid order (inner_mrr: recorded, not used)",
                       "per_fold": nested}} if nested else {}),
        "seconds": seconds,
        "dual_encoder_seconds_per_fit": seconds["dual_encoder"] / (len(folds) * len(cfg.seeds)),
        "workers": cfg.workers,
        "seed_fits": "batched" if batched_seed_fits(cfg, device) else "separate",
        "config": mode_config(cfg),
    }
    gallery = out / f"benchmark_{cfg.protocol}_reconstructions.png"
    with staged_outputs():      # written together: a run stopped here leaves the earlier outputs
        save_json(result, out / f"benchmark_{cfg.protocol}.json")
        save_text(benchmark_markdown(result), out / f"benchmark_{cfg.protocol}.md")
        if galleries:
            save_figure(plot_gallery(galleries, [gallery_row_name(data, f) for f in folds],
                                     gallery_title(cfg.protocol, cfg.seeds[0], len(folds), n_available)),
                        gallery, data.source)
        else:                               # no decoders this run: an older gallery is not its own
            remove_output(gallery)
    write_summary(out)                      # its figure list, as every script's last step
    print(spread_text(result) + ":")
    for name in methods:
        m = methods[name]
        print(f"{METHOD_TITLES.get(name, name):40s} top-1 {mean_sd(m['top1'])}"
              f"  top-5 {m['top5']['mean']:.3f}  condition {m['condition']['mean']:.3f}")
    print(f"chance: top-1 {result['chance']['top1']:.3f}, top-5 {result['chance']['top5']:.3f}, condition "
          f"{result['chance']['condition_uniform']:.3f} (majority {result['chance']['condition_majority']:.3f})"
          f" | dual encoder "
          f"{result['dual_encoder_seconds_per_fit']:.1f} s per fit | total {seconds['total']:.0f} s")
    print(f"saved {out / f'benchmark_{cfg.protocol}.json'} and .md")
    return result


# --------------------------------------------------------------------------- script
@dataclass
class EvaluationConfig(ScriptOptions):
    """Settings of this script (``seed``: the t-SNE seed of the checkpoint evaluation); one
    command-line option per field (add_config_args)."""

    checkpoint: Path | None = field(default=None, metadata={"type": Path,
        "help": "checkpoint evaluation: the dual-encoder checkpoint; default "
                "OUT_DIR/miyawaki_dual_encoder.pth"})
    protocol: str | None = field(default=None, metadata={"choices": ("s1", "s2", "s3"),
        "help": "run the benchmark on this protocol instead of evaluating the checkpoint"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"min": 0, "max": MAX_SEED,
        "help": "benchmark: dual-encoder seeds per fold"})
    epochs: int = field(default=DualEncoderConfig.epochs, metadata={"min": 1,
        "help": "benchmark: dual-encoder epochs per fit"})
    max_folds: int = field(default=0, metadata={"min": 0,
        "help": "benchmark: only the first N folds, in the protocol's order, not a sample (S3 "
                "holds the images out in order of their condition: on the Miyawaki file its first "
                "five are the five shapes; 0 = all)"})
    permutation_control: bool = field(default=False, metadata={
        "help": "benchmark: also train on fMRI rows shuffled against images, first seed only "
                "(must be at chance)"})
    nested: bool = field(default=False, metadata={
        "help": "benchmark: also choose the dual encoder's score setting (read-out weight and "
                "model, encoding weight, encoding alpha) inside every fold by inner CV on its training "
                "trials (5 extra fits per fold and --inner-repeats; row dual_encoder_nested)"})
    inner_repeats: int = field(default=1, metadata={"min": 1,
        "help": "with --nested: repeats of the 5-fold inner CV, averaged (5 fits per fold and "
                "repeat; repeat r reshuffles the inner folds with random_state r)"})
    generative: bool = field(default=False, metadata={
        "help": "benchmark: also train the diffusion and GAN decoders per fold and seed"})
    workers: int = field(default=1, metadata={"min": 1,
        "help": "benchmark: folds run in this many processes at once (each gets 1/workers of "
                "torch's threads; numbers depend slightly on the thread count)"})
    seed_fits: str = field(default="auto", metadata={"choices": ("auto", "batched", "separate"),
        "help": "benchmark: train a fold's seeds as one batched (vmapped) model or one by one; "
                "auto = batched on a GPU (with dropout the batched fits equal separate ones in "
                "distribution, not number for number)"})
    knn_k: int = field(default=5, metadata={"min": 1,
        "help": "neighbours of the kNN condition classifier"})
    tsne_perplexity: float = field(default=30.0, metadata={"above": 0,
        "help": "checkpoint evaluation: t-SNE perplexity (capped at (points - 1) / 3); --seed "
                "seeds the t-SNE map"})
    oracle: bool = field(default=False, metadata={
        "help": "checkpoint evaluation: also report ORACLE numbers that feed the true test image "
                "to the model"})


# the options of one mode only: a value other than the default in the other mode is refused, not
# ignored (and recorded in the JSON's config as if it had been used)
CHECKPOINT_OPTIONS = ("checkpoint", "seed", "tsne_perplexity", "oracle")
BENCHMARK_OPTIONS = ("seeds", "epochs", "max_folds", "permutation_control", "nested", "inner_repeats",
                     "generative", "workers", "seed_fits")


def mode_config(cfg: EvaluationConfig) -> dict:
    """The run's settings for its JSON: ``config_dict`` without the other mode's options (their
    defaults applied to nothing; a checkpoint's evaluation recorded 5 --seeds)."""
    other = CHECKPOINT_OPTIONS if cfg.protocol else BENCHMARK_OPTIONS
    return {k: v for k, v in config_dict(cfg).items() if k not in other}


def check_mode_options(cfg: EvaluationConfig) -> None:
    """OptionError for an option of the other mode than ``cfg.protocol`` picks (``CHECKPOINT_OPTIONS``
    without a protocol, ``BENCHMARK_OPTIONS`` with one), for repeated ``--seeds``, for
    ``--seed-fits`` with one seed, for ``--inner-repeats`` without ``--nested``, and for more
    ``--workers`` than CPUs."""
    if cfg.protocol:
        check_unused(cfg, CHECKPOINT_OPTIONS, "without --protocol (the checkpoint's evaluation); the "
                     "benchmark trains its own models, seeded by --seeds")
    else:
        check_unused(cfg, BENCHMARK_OPTIONS, "with --protocol s1|s2|s3 (the benchmark)")
    check_seeds(cfg.seeds)
    if cfg.protocol and len(cfg.seeds) == 1:
        check_unused(cfg, ("seed_fits",), "with more than one --seeds value (one seed's fit has nothing "
                     "to batch)")
    if cfg.inner_repeats > 1 and not cfg.nested:
        raise OptionError(f"--inner-repeats {cfg.inner_repeats} needs --nested (it repeats the "
                          "nested selection's inner CV)")
    cpus = os.cpu_count() or 1
    if cfg.workers > cpus:      # each worker is a process with its own models: more only fill memory
        raise OptionError(f"--workers {cfg.workers} is more than the {cpus} CPUs here; give at most {cpus}")


def main(argv: list[str] | EvaluationConfig | None = None) -> dict:
    """Checkpoint evaluation on S1 (default) or, with a protocol, the benchmark; returns metrics."""
    cfg = check_options(argv) if isinstance(argv, EvaluationConfig) else parse_args(argv)
    check_mode_options(cfg)
    if cfg.protocol is None:
        return evaluate_checkpoint(cfg)
    return run_benchmark(cfg)


def parse_args(argv=None) -> EvaluationConfig:
    """Command line (None: sys.argv) -> EvaluationConfig; one option per field."""
    return parse_config(add_config_args(script_parser(__doc__), EvaluationConfig), EvaluationConfig, argv)


if __name__ == "__main__":
    run_cli(main)
