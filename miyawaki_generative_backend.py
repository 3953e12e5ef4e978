"""Diffusion and GAN decoders: dual-encoder correlation embedding (512-d) -> 28 x 28 stimulus.

Both decoders learn from the *frozen* embeddings of the training trials and, at test time, are
conditioned on the fMRI-only embedding ``encoder.encode_fmri(test_fmri)``; figures computed from
the true test image (``encoder.encode_image``) appear only with ``--oracle``, under the ``oracle`` key.

* ``MiyawakiDiffusionDecoder``: a DDPM (linear or cosine beta schedule, pure functions whose
  results are registered as buffers) with an MLP denoiser ``784 + time + condition -> 1024 ->
  1024 -> 784``, trained on the epsilon-prediction loss, with classifier-free guidance, a
  deterministic DDIM sampler and the ancestral DDPM sampler. The wrapper owns its loss.
* ``MiyawakiGANDecoder``: generator ``condition (+ noise z) -> 512 -> 1024 -> 784`` (sigmoid) and
  a spectral-norm projection discriminator, trained with the hinge loss plus
  ``recon_weight`` x MSE to the trial's image.

For images never seen in training (S3) both decoders also take a *low-level anchor*, a linear
read-out of the image from the same fMRI (out-of-fold for the training trials): ridge blended
with the posterior mean under a *receptive-field encoding model*, which, unlike ridge, reaches
images outside the span of the training images. They learn from an *image prior* of rotated /
reflected / shifted / cut-and-pasted images conditioned through synthetic fMRI (that encoding
model's prediction plus a training residual; never equal to a fold's unseen test image), start
DDIM from the noised anchor, take data-consistency steps under the same encoding model and blend
their output with the anchor; ``benchmarks/tune_anchor.py`` and ``benchmarks/tune_decoders.py``
chose these settings by inner CV on the S1 training trials (docs/MODELS.md, "Decoders").

Choices, each measured:

* The MLP's output is read as the clean image x_0 (``prediction_type="sample"``) and converted to
  epsilon; the loss stays the epsilon MSE, with Min-SNR-5 weighting (Hang et al. 2023). Read as
  epsilon, an MLP learns the t-dependent map x_t -> epsilon slowly: with 20 simulated images and
  fixed conditions, DDIM samples after 500 steps had MSE 0.43 (epsilon), 0.057 (v) and < 0.001
  (x_0, already after 250 steps).
* Train-time conditions are the fMRI-side embeddings of the training trials
  (``fmri_condition_prob=1``), chosen on training data only: decoders fitted on the other
  training trials and scored on the 11 the dual encoder then held out for validation (3 seeds) gave
  diffusion PixCorr / MSE 0.9946 / 0.0028 with image-side embeddings, 0.9969 / 0.0016 with a
  50/50 mix, 0.9970 / 0.0015 with fMRI-side ones (GAN: 0.998 / 0.001 for all three).
* ``guidance_scale=2`` on the same validation: PixCorr 0.9976 vs 0.9970 at 1 and 0.9915 at 4.
* GAN ``recon_weight=10`` on the same validation: PixCorr 0.9943 / SSIM 0.981 (0: 0.9932 / 0.974,
  100: 0.9952 / 0.979); the projection discriminator alone already ties images to conditions.
* bfloat16 autocast in training halves its time on a CPU with native bfloat16 (AMX or AVX-512
  BF16; float32 where it is converted or emulated); S1 PixCorr moved by < 0.005.

Usage::

    python miyawaki_dual_encoder.py && python miyawaki_generative_backend.py
    python miyawaki_generative_backend.py --data simulated --out-dir /tmp/sim --seed 1
    python miyawaki_generative_backend.py --sampler ddpm --guidance-scale 1.0
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from miyawaki_dataset_loader import (CHECKPOINT_FORMAT, DECODER_NAMES, IMAGE_SIDE, N_PIXELS,
                                     shown_images, uncalibrated_gate_note,
                                     CheckpointError, DataError, Fold, OptionError,
                                     check_unused, chance_levels, chance_text, value_text,
                                     FromCheckpointHint, MeanImageBaseline, RidgeBaseline, condition_name,
                                     identification_scores, ScriptOptions, bf16_autocast, uses_bf16,
                                     Trials, add_config_args, check_finite, check_options,
                                     config_dict, file_sha256, load_checkpoint, one_cycle, one_line,
                                     nearest_training_check, panel_title, parse_config, pearson_rows,
                                     check_out_dir, prepare_out_dir,
                                     reconstruction_metrics, resolve_data, resolve_device, run_cli,
                                     remove_output, rerun_command, save_checkpoint, save_figure, save_json,
                                     script_parser,
                                     seed_everything, evaluating, staged_outputs, write_summary, generator_device,
                                     rand_on, randn_on, fmri_batch, image_batch)
from miyawaki_dual_encoder import (CHECKPOINT_NAME as ENCODER_CHECKPOINT_NAME, SCRIPT as ENCODER_SCRIPT,
                                   NOISE_CONTROL_TITLE, POSTERIOR_DEFAULTS, EncodingReadout,
                                   MiyawakiDualEncoder, PixelReadout,
                                   grouped_folds, image_prior, is_noise_control, load_for_s1,
                                   posterior_weights, receptive_fields)

CHECKPOINT_KIND = "generative_backends"
CHECKPOINT_NAME = "miyawaki_generative_backends.pth"
FIGURE = "miyawaki_{}_generation.png"            # each decoder's S1 reconstructions
GENERATION_COLUMNS = 12    # trials per row block of those figures (S1 of the Miyawaki file: one)
SAMPLE_GRID_IMAGES = 40    # training images in the diffusion's sample grids, at most
SCRIPT = "miyawaki_generative_backend.py"


# --------------------------------------------------------------------------- noise schedules
def linear_beta_schedule(num_train_timesteps: int, beta_start: float = 1e-4,
                         beta_end: float = 0.02, max_beta: float = 0.999) -> torch.Tensor:
    """Betas ``T`` (float64) rising linearly (Ho et al. 2020). The endpoints are given for
    T = 1000 and scaled by 1000 / T, so any T destroys the signal equally; clipped at max_beta
    (as the cosine schedule's), which only T <= 20 reaches (beta 1 would leave alpha_bar 0)."""
    scale = 1000 / num_train_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_train_timesteps,
                          dtype=torch.float64).clamp(max=max_beta)


def cosine_beta_schedule(num_train_timesteps: int, s: float = 0.008,
                         max_beta: float = 0.999) -> torch.Tensor:
    """Betas ``T`` (float64) of Nichol & Dhariwal (2021): alpha_bar at step t (0-based) is
    f(t + 1) / f(0) with f(u) = cos^2((u / T + s) / (1 + s) * pi / 2); betas clipped at max_beta."""
    u = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(0, max_beta)


BETA_SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PRIOR_CONDITIONS = ("image", "synthetic", "null")
ANCHOR_MODELS = ("receptive-field", "ridge")
SAMPLERS = ("ddim", "ddpm")


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style features of integer timesteps ``N`` -> ``N x dim``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def scale_condition(condition: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings ``N x D`` -> entries of unit RMS (x sqrt(D)), the scale of the other
    network inputs; the all-zero null condition of classifier-free guidance stays zero."""
    return condition * math.sqrt(condition.shape[1])


# --------------------------------------------------------------------------- low-level anchor
class LinearReadout(PixelReadout):
    """The low-level anchor: a linear read-out of the image from z-scored fMRI, ``N x V -> N x 1 x
    28 x 28`` (``PixelReadout``'s buffers, saved with the decoder's state; weights from
    ``fit_anchor``); with ``gate_images`` > 0 also its novelty gate (``novelty``): the fold's ``K``
    training images and a logistic fit; and the contrast stretch ``stretch`` (``choose_stretch``)
    of the decoders' outputs."""

    def __init__(self, n_voxels: int, gate_images: int = 0):
        super().__init__(n_voxels)
        self.register_buffer("gate_images", torch.zeros(gate_images, N_PIXELS))
        self.register_buffer("gate_coef", torch.zeros(2))
        self.register_buffer("stretch", torch.zeros(()))

    def with_gate(self, images: np.ndarray, coef: np.ndarray) -> "LinearReadout":
        """This read-out with a novelty gate over training images ``K x 1 x 28 x 28`` and logistic
        coefficients (slope, intercept) (``fit_novelty_gate``)."""
        gated = LinearReadout(self.weight.shape[1], len(images)).to(self.weight.device)
        gated.weight.copy_(self.weight)
        gated.bias.copy_(self.bias)
        gated.gate_images.copy_(torch.as_tensor(images).reshape(len(images), -1))
        gated.gate_coef.copy_(torch.as_tensor(coef))
        gated.stretch.copy_(self.stretch)
        return gated

    def novelty(self, anchor: torch.Tensor) -> torch.Tensor:
        """P(the image behind each read-out ``N x 1 x 28 x 28`` is not a training image) ``N``:
        the logistic gate on its nearest-training-image similarity (ones without a gate)."""
        if not len(self.gate_images):
            return torch.ones(len(anchor), device=anchor.device)
        s = nearest_image_similarity(anchor.detach().cpu().numpy(), self.gate_images.cpu().numpy())
        s = torch.as_tensor(s, dtype=torch.float32, device=self.gate_coef.device)
        return torch.sigmoid(self.gate_coef[0] * s + self.gate_coef[1]).to(anchor.device)


def nearest_image_similarity(readouts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The protocol's identification score (Pearson r of the clipped read-out) of each read-out
    ``N x 1 x 28 x 28`` with its nearest image of ``images`` ``K x ...`` -> ``N``."""
    return identification_scores(readouts, images).max(1)


STRETCHES = tuple(round(0.05 * k, 2) for k in range(10))    # contrast stretches t tried: 0 .. 0.45


def contrast_stretch(images: torch.Tensor, t) -> torch.Tensor:
    """Images ``N x 1 x 28 x 28`` with [t, 1 - t] mapped linearly onto [0, 1], clipped (t < 0.5; t =
    0: clipped only): a steeper output for stimuli that are figures on a blank background."""
    return ((images - t) / (1 - 2 * t)).clamp(0, 1)


def choose_stretch(anchors: np.ndarray, images: np.ndarray) -> float:
    """The contrast stretch t of ``STRETCHES`` under which out-of-fold anchors ``N x 1 x 28 x 28``
    (``out_of_fold_readouts``) best match their trials' images (mean PixCorr, docs/PROTOCOL.md)
    among the stretches that leave their MSE no higher than none does (PixCorr hardly sees the
    grey levels a stretch moves: it would map a grey background to black): chosen per fit on
    training trials only, so binary figures get a steep stretch and grayscale images a mild one
    or none."""
    a, y = torch.as_tensor(anchors).flatten(1), np.asarray(images).reshape(len(images), -1)
    stretched = [contrast_stretch(a, t).numpy() for t in STRETCHES]
    mse = [np.mean((s - y) ** 2, dtype=np.float64) for s in stretched]
    score = [pearson_rows(s, y).mean() if m <= mse[0] else -np.inf for s, m in zip(stretched, mse)]
    return STRETCHES[int(np.argmax(score))]


def fit_anchor(train: Trials, config: "GenerativeConfig", alpha: float | None = None,
               exclude: np.ndarray | None = None,
               encoding: EncodingReadout | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The low-level anchor's linear read-out, fitted on trials (fMRI z-scored) -> (weight ``784 x
    V``, bias ``784``, ridge alpha), float64. The ridge read-out (``alpha`` None: chosen by
    efficient LOO, as the ridge baseline) and, with ``anchor_model="receptive-field"``, the
    receptive-field posterior read-out (``posterior_weights`` with the config's ``rf_*``,
    ``prior_size`` and ``augment_*``; its image prior never holds an image of ``exclude`` ``E x 1
    x 28 x 28``), weighted ``1 - rf_ridge_weight`` beside ridge: ridge is best inside the span of
    the training images, the receptive fields outside it. ``encoding``:
    those receptive fields when already fitted on these trials (``encoding_model``,
    ``receptive_field_folds``), else fitted here."""
    from sklearn.linear_model import Ridge
    x = np.asarray(train.fmri, np.float64)
    y = np.asarray(train.images, np.float64).reshape(len(train), -1)
    if alpha is None:
        ridge = RidgeBaseline().fit(x, y)
        alpha, ridge = ridge.alpha_, ridge.model_
    else:
        ridge = Ridge(alpha=alpha).fit(x, y)
    if config.anchor_model == "ridge":
        return ridge.coef_, ridge.intercept_, alpha
    weight, bias = posterior_weights(train.fmri, train.images, config.seed + 3, encoding, exclude,
                                     **{k: getattr(config, k) for k in POSTERIOR_DEFAULTS})
    r = config.rf_ridge_weight
    return (r * ridge.coef_ + (1 - r) * weight, r * ridge.intercept_ + (1 - r) * bias, alpha)


def receptive_field_folds(train: Trials, config: "GenerativeConfig") -> list[tuple]:
    """The decoders' image-grouped folds of training trials (``anchor_folds``, ``grouped_folds``) ->
    per fold (training indices, held-out indices, ``receptive_fields`` fitted on the training part,
    or None with ``anchor_model="ridge"``): one fit per fold, shared by the out-of-fold anchors and
    residuals."""
    rf = config.anchor_model == "receptive-field"
    return [(tr, va, receptive_fields(train.fmri[tr], train.images[tr], config.rf_voxels)
             if rf else None) for tr, va in grouped_folds(train.image_ids, config.anchor_folds)]


def out_of_fold_readouts(train: Trials, config: "GenerativeConfig", alpha: float,
                         folds: list | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Anchors ``N x 1 x 28 x 28`` of training trials, each by the read-out (``fit_anchor``, ridge
    ``alpha``) fitted on the trials of *other images* only (``folds``: ``receptive_field_folds``,
    made here when None; the held-out images, and the images of ``exclude`` ``E x 1 x 28 x 28``
    (a fold's never-seen test images), kept out of its image prior), so that the decoders learn
    from anchors that look like the anchor of a never-seen test image."""
    x, out = np.asarray(train.fmri, np.float64), np.zeros((len(train), N_PIXELS))
    for tr, va, encoding in receptive_field_folds(train, config) if folds is None else folds:
        banned = train.images[va] if exclude is None else np.concatenate([train.images[va], exclude])
        weight, bias, _ = fit_anchor(train.subset(tr), config, alpha, exclude=banned, encoding=encoding)
        out[va] = x[va] @ weight.T + bias
    return out.reshape(train.images.shape).astype(np.float32)


def encoding_model(encoder: nn.Module, train: Trials, config: "GenerativeConfig") -> EncodingReadout:
    """The decoders' encoding model (images -> voxels), the likelihood of their sampler and the
    source of the synthetic-fMRI prior: with ``anchor_model="receptive-field"`` receptive fields
    fitted here on the trials (``receptive_fields``; they predict any image), with "ridge" a copy
    of the frozen encoder's ridge encoding model."""
    if config.anchor_model == "ridge":
        return copy.deepcopy(encoder.encoding)
    return receptive_fields(train.fmri, train.images, config.rf_voxels)


def out_of_fold_residuals(train: Trials, config: "GenerativeConfig", alpha: float,
                          folds: list | None = None) -> np.ndarray:
    """What the decoders' encoding model (``encoding_model``; ridge with ``alpha``, or receptive
    fields) misses on a new image: the training trials' fMRI ``N x V`` minus its prediction by the
    same kind of model fitted on the trials of other images only (``folds``:
    ``receptive_field_folds``, made here when None); trial noise included."""
    from sklearn.linear_model import Ridge
    fmri, pred = np.asarray(train.fmri, np.float64), np.zeros(train.fmri.shape)
    images = np.asarray(train.images, np.float64).reshape(len(train), -1)
    for tr, va, encoding in receptive_field_folds(train, config) if folds is None else folds:
        pred[va] = (Ridge(alpha=alpha).fit(images[tr], fmri[tr]).predict(images[va]) if encoding is None
                    else encoding(torch.as_tensor(train.images[va])).numpy())
    return (fmri - pred).astype(np.float32)


def gate_can_be_calibrated(image_ids: np.ndarray) -> bool:
    """Whether training trials of image ids ``image_ids`` ``N`` give the novelty gate "seen"
    examples to be calibrated on (``fit_novelty_gate``): some image shown at least twice. Without
    them the gate reads every trial as new (g = 1), e.g. on a random-image session."""
    return len(image_ids) > 0 and np.unique(image_ids, return_counts=True)[1].max() >= 2


def fit_novelty_gate(train: Trials, config: "GenerativeConfig", alpha: float, unseen: np.ndarray,
                     n_folds: int = 5, exclude: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """Calibrate the novelty gate on training trials only -> (training images ``K x 1 x 28 x 28``,
    logistic (slope, intercept) on the nearest-training-image similarity) or None when no image
    has two trials. "Unseen" examples: the out-of-fold anchors ``unseen`` (image-grouped,
    ``out_of_fold_readouts``), compared with every training image, their own included (without
    it, as a never-seen test image is compared, the inner CV scored lower: docs/MODELS.md);
    "seen": anchors of trials by the read-out (``fit_anchor``, ridge
    ``alpha``; its image prior never holds an image of ``exclude``) fitted without them but with
    other trials of their image (each image's trials dealt round-robin to ``n_folds`` folds;
    trials of images shown once are left out)."""
    from sklearn.linear_model import LogisticRegression
    ids = train.image_ids
    _, first, inverse, counts = np.unique(ids, return_index=True, return_inverse=True, return_counts=True)
    if not gate_can_be_calibrated(ids):
        return None
    repeated = counts[inverse] >= 2
    rank = np.zeros(len(ids), dtype=int)
    for k in range(len(counts)):
        rank[inverse == k] = np.arange(counts[k])
    seen = np.zeros((len(train), N_PIXELS))
    for f in range(n_folds):
        va = rank % n_folds == f
        if va.any():
            weight, bias, _ = fit_anchor(train.subset(np.where(~va)[0]), config, alpha, exclude)
            seen[va] = np.asarray(train.fmri[va], np.float64) @ weight.T + bias
    images = train.images[first]
    s = np.concatenate([nearest_image_similarity(unseen, images),
                        nearest_image_similarity(seen[repeated], images)])
    y = np.r_[np.ones(len(unseen)), np.zeros(int(repeated.sum()))]
    mu, sd = s.mean(), s.std() + 1e-8
    fit = LogisticRegression().fit(((s - mu) / sd)[:, None], y)
    slope = fit.coef_[0, 0] / sd
    return images, np.array([slope, fit.intercept_[0] - slope * mu], dtype=np.float32)


def anchor_features(anchor: torch.Tensor) -> torch.Tensor:
    """Read-outs ``N x 1 x 28 x 28`` -> network inputs ``N x 784``: clipped to [0, 1], scaled to
    [-1, 1] like the diffusion's pixels."""
    return anchor.reshape(len(anchor), -1).clamp(0, 1) * 2 - 1


# --------------------------------------------------------------------------- models
class CheckpointMixin(FromCheckpointHint):
    """``from_checkpoint`` for a decoder stored under ``CHECKPOINT_KEY`` as {"config", "state"}."""

    CHECKPOINT_KEY = ""
    # weights_fingerprint of the dual encoder whose embeddings it was trained on (None: unknown,
    # e.g. a seed-style load_state_dict); reconstruct refuses another encoder
    encoder_fingerprint: str | None = None

    @staticmethod
    def constructor_config(args: dict) -> dict:
        """The constructor's arguments from its ``locals()``, taken before any other local is
        bound: the config ``checkpoint_entry`` saves and ``from_checkpoint`` passes back."""
        return {k: v for k, v in args.items() if k not in ("self", "__class__")}

    def checkpoint_entry(self) -> dict:
        """{"config": constructor arguments, "state": state dict, "encoder_fingerprint"}, as
        ``from_checkpoint`` reads it."""
        return {"config": dict(self.config), "state": self.state_dict(),
                "encoder_fingerprint": self.encoder_fingerprint}

    @classmethod
    def from_checkpoint(cls, path_or_dict, map_location="cpu", encoder_checkpoint=None):
        """Rebuild from ``outputs/miyawaki_generative_backends.pth`` (a path or the loaded dict)
        -> (model in eval mode, checkpoint dict). The dual encoder it was trained on top of must be
        unchanged (check_encoder; ``encoder_checkpoint`` overrides the path recorded in it)."""
        from_file = not isinstance(path_or_dict, dict)
        ckpt = (load_checkpoint(path_or_dict, CHECKPOINT_KIND, SCRIPT, map_location) if from_file
                else path_or_dict)
        check_encoder(ckpt, encoder_checkpoint, Path(path_or_dict) if from_file else None)
        try:
            entry = ckpt[cls.CHECKPOINT_KEY]
            model = cls(**entry["config"])
            model.load_state_dict(entry["state"])
            model.encoder_fingerprint = entry.get("encoder_fingerprint")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            where, rerun = ((path_or_dict, rerun_command(SCRIPT, path_or_dict)) if from_file
                            else ("the checkpoint", f"python {SCRIPT}"))
            raise CheckpointError(f"the {cls.CHECKPOINT_KEY} decoder in {where} does not fit this code "
                                  f"({one_line(e)}); rerun `{rerun}`") from None
        return model.to(map_location).eval(), ckpt


def weights_fingerprint(module: nn.Module) -> str:
    """Short sha256 of a module's state (names, dtypes and values): which dual encoder a decoder's
    conditions came from."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_encoder(ckpt: dict, encoder_checkpoint=None, ckpt_path: Path | None = None) -> None:
    """Refuse (CheckpointError naming the command to rerun) decoders whose dual encoder changed
    since they were trained: the file ``encoder_checkpoint`` must have the sha256 recorded in the
    generative checkpoint ``ckpt``; by default the path recorded in it or, for a checkpoint read
    from the file ``ckpt_path``, the dual encoder beside it (an output folder copied or moved
    elsewhere keeps its pair) must."""
    where = ckpt_path or "the checkpoint"
    rerun = rerun_command(SCRIPT, ckpt_path) if ckpt_path else f"python {SCRIPT}"
    recorded = ckpt.get("encoder_checkpoint")
    if not isinstance(ckpt.get("encoder_sha256"), str):
        raise CheckpointError(f"{where} does not record which dual encoder it was trained on; "
                              f"rerun `{rerun}`")
    paths = [Path(encoder_checkpoint)] if encoder_checkpoint else [
        *([Path(recorded)] if isinstance(recorded, str) and recorded else []),
        *([Path(ckpt_path).parent / ENCODER_CHECKPOINT_NAME] if ckpt_path else [])]
    if not paths:
        raise CheckpointError(f"{where} does not record the path of its dual encoder; pass "
                              f"encoder_checkpoint=..., or rerun `{rerun}`")
    if any(p.is_file() and file_sha256(p) == ckpt["encoder_sha256"] for p in paths):
        return
    path = paths[0]
    if not path.is_file():
        raise CheckpointError(f"{where} was trained on top of the dual encoder {path}, which is not "
                              f"there; pass its new path, or rerun "
                              f"`{rerun_command(ENCODER_SCRIPT, path)}` and `{rerun}`")
    raise CheckpointError(f"{where} was trained on another dual encoder than the one now in {path} "
                          f"(retrained since?); rerun `{rerun}`")


class MLPDenoiser(nn.Module):
    """The denoising network: concat(x_t ``N x 784``, sinusoidal t ``N x time_dim``, condition
    ``N x D`` [, anchor features ``N x 784``]) -> hidden -> hidden -> ``N x 784`` (SiLU), the seed
    project's widths. Its output is read as the diffusion wrapper's ``prediction_type``."""

    def __init__(self, condition_dim: int, time_dim: int, hidden_dim: int, anchor: bool = False):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(N_PIXELS * (1 + anchor) + time_dim + condition_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, N_PIXELS))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                anchor: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ``N x 784``, timesteps ``N``, conditions ``N x D``, anchor read-outs ``N x 1 x 28 x 28``
        (when built with ``anchor``) -> ``N x 784``."""
        parts = [x, sinusoidal_embedding(timesteps, self.time_dim), scale_condition(condition)]
        if anchor is not None:
            parts.append(anchor_features(anchor))
        return self.net(torch.cat(parts, dim=1))


class AnchorMixin:
    """The low-level anchor of a decoder built with ``anchor_voxels > 0``: it owns a
    ``LinearReadout`` (``readout``) and an ``EncodingReadout`` (``encoding``, its likelihood),
    both fitted by ``train_generative``, takes read-outs as a second input beside the embedding,
    and blends its samples with them (``anchor_blend``). Any decoder may take an encoding model
    as a likelihood (``likelihood_weight``): a data-consistency step of its samples towards the
    test fMRI (``reconstruct`` passes it: the decoder's own, else the frozen encoder's)."""

    def _init_anchor(self, anchor_voxels: int, anchor_blend: float, gate_images: int = 0,
                     likelihood_weight: float = 0.0, likelihood_reg: float = 3.0,
                     likelihood_gate_power: float = 1.0) -> None:
        if not 0 <= anchor_blend <= 1:
            raise ValueError(f"anchor_blend {anchor_blend}; use a value in [0, 1]")
        if likelihood_weight < 0 or likelihood_reg <= 0 or likelihood_gate_power <= 0:
            raise ValueError(f"likelihood_weight {likelihood_weight}, likelihood_reg {likelihood_reg}, "
                             f"likelihood_gate_power {likelihood_gate_power}; use a weight >= 0 and "
                             "a regularisation and a power > 0")
        if anchor_blend > 0 and not anchor_voxels:
            raise ValueError("anchor_blend > 0 needs a decoder with a low-level anchor (anchor_voxels > 0)")
        self.readout = LinearReadout(anchor_voxels, gate_images) if anchor_voxels else None
        self.encoding = EncodingReadout(anchor_voxels) if anchor_voxels else None

    def forward(self, condition: torch.Tensor, anchor: torch.Tensor | None = None,
                generator: torch.Generator | None = None, likelihood: Callable | None = None) -> torch.Tensor:
        """``decoder(condition[, anchor, likelihood=...])`` samples images ``N x 1 x 28 x 28``
        (``sample``; the likelihood: ``decoder.encoding.consistency_step(fmri, likelihood_reg)``);
        from fMRI, ``reconstruct(encoder, decoder, fmri)`` does it all."""
        return self.sample(condition, generator, anchor, likelihood=likelihood)

    def _check_anchor(self, anchor: torch.Tensor | None) -> None:
        if (anchor is None) != (self.readout is None):
            raise ValueError("this decoder " + ("needs the low-level anchor: pass anchor=decoder."
                                                "readout(fmri) (reconstruct() does)" if anchor is None
                                                else "was built without an anchor: pass anchor=None"))

    def _novelty(self, anchor: torch.Tensor | None) -> torch.Tensor | None:
        """The read-out's P(new image) ``N`` (``LinearReadout.novelty``) with ``novelty_gate`` and
        an anchor, else None (ungated); computed once per ``sample`` for the step and the blend."""
        if anchor is None or not self.config.get("novelty_gate"):
            return None
        return self.readout.novelty(anchor)

    def _likelihood_weight(self, likelihood: Callable | None, novelty: torch.Tensor | None):
        """The data-consistency weight: ``likelihood_weight``, times P(new image) ``novelty`` to
        the power ``likelihood_gate_power`` when gated (``N x 1``: a seen image keeps the
        decoder's sample, and a half-open gate moves it little); None = no step."""
        w = self.config.get("likelihood_weight", 0.0)
        if likelihood is None or w == 0:
            return None
        if novelty is not None:
            return w * novelty[:, None] ** self.config["likelihood_gate_power"]
        return w

    def _finish(self, images: torch.Tensor, anchor: torch.Tensor | None,
                novelty: torch.Tensor | None) -> torch.Tensor:
        """Samples ``N x 1 x 28 x 28`` -> (1 - b) samples + b clip(anchor): b = anchor_blend, times
        P(new image) ``novelty`` when gated (``_novelty``); then, with ``output_stretch``, the
        read-out's contrast stretch (``contrast_stretch``, ``LinearReadout.stretch``)."""
        if anchor is None:
            return images
        b = self.config.get("anchor_blend", 0.0)
        if b > 0:
            b = b if novelty is None else b * novelty[:, None, None, None]
            images = (1 - b) * images + b * anchor.clamp(0, 1)
        return self.stretch_output(images)

    def stretch_output(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` in [0, 1] with the read-out's contrast stretch
        (``contrast_stretch``, ``LinearReadout.stretch``) where ``output_stretch`` is on, else as
        they are: the last step of every anchored output."""
        return contrast_stretch(images, self.readout.stretch) if self.config.get("output_stretch") else images


class MiyawakiDiffusionDecoder(CheckpointMixin, AnchorMixin, nn.Module):
    """Conditional DDPM on 28 x 28 images. Public images are ``N x 1 x 28 x 28`` in [0, 1]; the
    diffusion runs on flattened pixels scaled to [-1, 1]. Conditions are ``N x D`` unit vectors;
    the zero vector is the null condition of classifier-free guidance.

    Scheduler vocabulary follows diffusers: ``num_train_timesteps``, ``beta_schedule``,
    ``add_noise(original_samples, noise, timesteps)``, ``step(model_output, timestep, sample)``.
    The sampling defaults (``sampler``, ``num_inference_steps``, ``guidance_scale``) are part of
    the model's config so that ``sample(condition, generator)`` is the same call as the GAN's.

    With a low-level anchor (``anchor_voxels`` > 0) the denoiser also sees the linear read-out
    of the image, and DDIM may start from it (SDEdit, Meng et al. 2022): the read-out noised to
    ``init_strength`` x T (1 = from pure noise) is denoised from there."""

    CHECKPOINT_KEY = "diffusion"

    def __init__(self, correlation_dim: int = 512, num_train_timesteps: int = 1000,
                 beta_schedule: str = "cosine", prediction_type: str = "sample",
                 snr_gamma: float = 5.0, hidden_dim: int = 1024, time_dim: int = 128,
                 condition_drop_prob: float = 0.1, sampler: str = "ddim",
                 num_inference_steps: int = 50, guidance_scale: float = 2.0,
                 anchor_voxels: int = 0, init_strength: float = 1.0, anchor_blend: float = 0.0,
                 gate_images: int = 0, novelty_gate: bool = False, likelihood_weight: float = 0.0,
                 likelihood_reg: float = 3.0, likelihood_gate_power: float = 1.0,
                 output_stretch: bool = False):
        super().__init__()
        self.config = self.constructor_config(locals())
        if not 0 < init_strength <= 1:
            raise ValueError(f"init_strength {init_strength}; use a value in (0, 1]")
        for name, value, allowed in (("beta_schedule", beta_schedule, BETA_SCHEDULES),
                                     ("prediction_type", prediction_type, PREDICTION_TYPES),
                                     ("sampler", sampler, SAMPLERS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}; use one of {sorted(allowed)}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.condition_drop_prob = condition_drop_prob
        self.denoiser = MLPDenoiser(correlation_dim, time_dim, hidden_dim, anchor=anchor_voxels > 0)
        self._init_anchor(anchor_voxels, anchor_blend, gate_images, likelihood_weight, likelihood_reg,
                          likelihood_gate_power)
        betas = BETA_SCHEDULES[beta_schedule](num_train_timesteps)
        # derived from the config, so not stored in checkpoints
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)

    # ---- scheduler
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) noise; samples ``N x P``, t ``N``."""
        a_bar = self.alphas_cumprod[timesteps][:, None]
        return a_bar.sqrt() * original_samples + (1 - a_bar).sqrt() * noise

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             prev_timestep: int, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_prev (``N x P``) from predicted noise (DDIM, Song et al. 2021).

        x_0 is predicted, clipped to [-1, 1] and the noise re-derived from it; then
        x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z with
        sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)). eta = 0 is deterministic
        DDIM; eta = 1 with prev_timestep = timestep - 1 is exactly the ancestral DDPM step
        (posterior mean and variance beta_tilde). prev_timestep = -1 means a_prev = 1."""
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else a_t.new_tensor(1.0)
        x0 = self.clean_estimate(sample, model_output, timestep)
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and prev_timestep >= 0:
            prev = prev + sigma * randn_on(sample.shape, generator, sample.device)
        return prev

    # ---- model
    def noise_estimate(self, sample: torch.Tensor, timesteps: torch.Tensor,
                       condition: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """epsilon ``N x P`` at x_t = ``sample`` from the denoiser's output, read as
        ``prediction_type``: epsilon itself, v = sqrt(a) eps - sqrt(1 - a) x_0, or the clean
        sample x_0 (a = alpha_bar_t). ``anchor``: read-outs ``N x 1 x 28 x 28`` (anchored models)."""
        out = self.denoiser(sample, timesteps, condition, anchor).float()  # float32 under autocast
        if self.prediction_type == "epsilon":
            return out
        a_bar = self.alphas_cumprod[timesteps][:, None]
        if self.prediction_type == "v_prediction":
            return (1 - a_bar).sqrt() * sample + a_bar.sqrt() * out
        return (sample - a_bar.sqrt() * out) / (1 - a_bar).sqrt()

    def predict_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                      guidance_scale: float = 1.0, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """epsilon ``N x P`` with classifier-free guidance on the embedding: eps_u + w (eps_c -
        eps_u), where eps_u keeps the anchor and zeroes the embedding; w = 1 is the plain
        conditional model (one forward pass)."""
        if guidance_scale == 1.0:
            return self.noise_estimate(sample, timesteps, condition, anchor)
        eps_c, eps_u = self.noise_estimate(
            sample.repeat(2, 1), timesteps.repeat(2), torch.cat([condition, torch.zeros_like(condition)]),
            None if anchor is None else anchor.repeat(2, 1, 1, 1)).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def clean_estimate(self, sample: torch.Tensor, eps: torch.Tensor, timestep: int) -> torch.Tensor:
        """x_0 ``N x P`` predicted from x_t = ``sample`` and its noise ``eps``, clipped to [-1, 1]."""
        a_t = self.alphas_cumprod[timestep]
        return ((sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)

    def _consistent_noise(self, sample: torch.Tensor, eps: torch.Tensor, timestep: int,
                          likelihood: Callable, weight) -> torch.Tensor:
        """epsilon ``N x P`` re-derived from the x_0 estimate of (x_t, eps) after a
        data-consistency step ``likelihood(images, weight)`` on it (in [0, 1] image space)."""
        a_t = self.alphas_cumprod[timestep]
        x0 = self.clean_estimate(sample, eps, timestep)
        images = likelihood(((x0 + 1) / 2).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), weight)
        x0 = (images.reshape(len(sample), -1) * 2 - 1).clamp(-1, 1)
        return (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()

    def loss(self, images: torch.Tensor, condition: torch.Tensor,
             generator: torch.Generator | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE (scalar) for images ``N x 1 x 28 x 28`` in [0, 1] and conditions
        ``N x D`` (anchored models: read-outs ``N x 1 x 28 x 28`` too): uniform t, Gaussian noise,
        each embedding dropped to zero with ``condition_drop_prob`` (classifier-free guidance)."""
        self._check_anchor(anchor)
        n, device = len(images), images.device
        x0 = images.reshape(n, -1) * 2 - 1
        t = torch.randint(self.num_train_timesteps, (n,), generator=generator,
                          device=generator_device(generator, device)).to(device)
        noise = randn_on(x0.shape, generator, device)
        keep = rand_on((n, 1), generator, device) >= self.condition_drop_prob
        pred = self.noise_estimate(self.add_noise(x0, noise, t), t, condition * keep, anchor)
        per_sample = ((pred - noise) ** 2).mean(1)
        if self.snr_gamma > 0:
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            per_sample = per_sample * snr.clamp(max=self.snr_gamma) / snr
        return check_finite(per_sample.mean(), "diffusion")

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, generator: torch.Generator | None = None,
               anchor: torch.Tensor | None = None, sampler: str | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               init_strength: float | None = None, likelihood: Callable | None = None,
               finish: bool = True) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` in [0, 1] for conditions ``N x D`` (anchored models: and
        read-outs ``N x 1 x 28 x 28``). ``ddim``: deterministic DDIM over ``num_inference_steps``
        evenly spaced timesteps from T - 1 to 0 (the same generator gives the same images) or, with
        an anchor and ``init_strength`` s < 1, from the anchor noised to step s (T - 1) over
        ``ceil(s x steps)`` steps; ``ddpm``: ancestral sampling over every step (it refuses a
        ``num_inference_steps``). With a ``likelihood`` (``EncodingReadout.consistency_step`` of
        the test fMRI) every step but the last moves its x_0 estimate by a data-consistency step,
        and the denoiser then pulls the moved estimate back to the image prior. Then blended with
        the anchor (``anchor_blend``) and contrast-stretched (``output_stretch``), unless
        ``finish`` is False (the sampler's own images: the training-progress grids)."""
        self._check_anchor(anchor)
        sampler = sampler or self.config["sampler"]
        steps = num_inference_steps or self.config["num_inference_steps"]
        w = self.config["guidance_scale"] if guidance_scale is None else guidance_scale
        s = self.config["init_strength"] if init_strength is None else init_strength
        s = 1.0 if anchor is None else s
        T = self.num_train_timesteps
        start = round(s * (T - 1))
        if sampler == "ddim":
            n = min(max(1, math.ceil(s * steps)), start + 1)
            timesteps, eta = torch.linspace(start, 0, n).round().long().tolist(), 0.0
        elif sampler == "ddpm":
            if num_inference_steps is not None:
                raise ValueError("num_inference_steps applies to the ddim sampler only; ddpm "
                                 "steps through every timestep")
            timesteps, eta = list(range(start, -1, -1)), 1.0
        else:
            raise ValueError(f"sampler {sampler!r}; use one of {SAMPLERS}")
        novelty = self._novelty(anchor)
        weight = self._likelihood_weight(likelihood, novelty)
        x = randn_on((len(condition), N_PIXELS), generator, condition.device)
        if s < 1:
            x = self.add_noise(anchor_features(anchor), x, torch.full((len(x),), start, device=x.device))
        for i, t in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
            eps = self.predict_noise(x, tt, condition, w, anchor)
            if weight is not None and prev >= 0:
                eps = self._consistent_noise(x, eps, t, likelihood, weight)
            x = self.step(eps, t, x, prev, eta, generator)
        images = ((x + 1) / 2).clamp(0, 1).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        return self._finish(images, anchor, novelty) if finish else images


class ProjectionDiscriminator(nn.Module):
    """D(x, c) = psi(phi(x)) + <embed(c), phi(x)> (Miyato & Koyama 2018), spectral norm on every
    layer; images ``N x 1 x 28 x 28`` in [0, 1], conditions ``N x D`` -> logits ``N``. With
    ``anchor``, phi sees concat(image, anchor read-out) and so judges the pair."""

    def __init__(self, condition_dim: int = 512, hidden_dim: int = 512, anchor: bool = False):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.phi = nn.Sequential(sn(nn.Linear(N_PIXELS * (1 + anchor), hidden_dim)), nn.LeakyReLU(0.2),
                                 sn(nn.Linear(hidden_dim, hidden_dim)), nn.LeakyReLU(0.2))
        self.psi = sn(nn.Linear(hidden_dim, 1))
        self.embed = sn(nn.Linear(condition_dim, hidden_dim, bias=False))

    def forward(self, images: torch.Tensor, condition: torch.Tensor,
                anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` in [0, 1], conditions ``N x D`` (, read-outs ``N x 1 x 28 x
        28``) -> logits ``N``."""
        x = images.reshape(len(images), -1) * 2 - 1
        h = self.phi(x if anchor is None else torch.cat([x, anchor_features(anchor)], 1))
        return self.psi(h)[:, 0] + (self.embed(scale_condition(condition)) * h).sum(1)


class MiyawakiGANDecoder(CheckpointMixin, AnchorMixin, nn.Module):
    """Conditional GAN: generator concat(condition ``N x D``, z ``N x noise_dim`` [, anchor
    features ``N x 784``]) -> 512 -> 1024 -> 784 (LeakyReLU, sigmoid) -> ``N x 1 x 28 x 28`` in
    [0, 1]; projection discriminator (on image and anchor when anchored)."""

    CHECKPOINT_KEY = "gan"

    def __init__(self, correlation_dim: int = 512, noise_dim: int = 32, disc_hidden_dim: int = 512,
                 anchor_voxels: int = 0, anchor_blend: float = 0.0, gate_images: int = 0,
                 novelty_gate: bool = False, likelihood_weight: float = 0.0,
                 likelihood_reg: float = 3.0, likelihood_gate_power: float = 1.0,
                 output_stretch: bool = False):
        super().__init__()
        self.config = self.constructor_config(locals())
        self.noise_dim = noise_dim
        anchored = anchor_voxels > 0
        self.generator = nn.Sequential(
            nn.Linear(correlation_dim + noise_dim + N_PIXELS * anchored, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, N_PIXELS), nn.Sigmoid())
        self.discriminator = ProjectionDiscriminator(correlation_dim, disc_hidden_dim, anchored)
        self._init_anchor(anchor_voxels, anchor_blend, gate_images, likelihood_weight, likelihood_reg,
                          likelihood_gate_power)

    def generate(self, condition: torch.Tensor, z: torch.Tensor,
                 anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` from conditions ``N x D``, noise ``N x noise_dim`` (and
        read-outs ``N x 1 x 28 x 28`` when anchored)."""
        parts = [scale_condition(condition), z] + ([] if anchor is None else [anchor_features(anchor)])
        return self.generator(torch.cat(parts, 1)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, generator: torch.Generator | None = None,
               anchor: torch.Tensor | None = None, likelihood: Callable | None = None) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` in [0, 1]; z drawn from ``generator``; with a ``likelihood``
        (``EncodingReadout.consistency_step`` of the test fMRI) one data-consistency step of the
        generated images; then blended with the anchor (``anchor_blend``) and contrast-stretched
        (``output_stretch``)."""
        self._check_anchor(anchor)
        z = randn_on((len(condition), self.noise_dim), generator, condition.device)
        images = self.generate(condition, z, anchor)
        novelty = self._novelty(anchor)
        weight = self._likelihood_weight(likelihood, novelty)
        if weight is not None:
            images = likelihood(images, weight).clamp(0, 1)
        return self._finish(images, anchor, novelty)


# --------------------------------------------------------------------------- losses
def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean relu(1 - D(real)) + mean relu(1 + D(fake)); logits ``N``."""
    return check_finite(F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean(), "discriminator")


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: -mean D(fake); logits ``N``."""
    return check_finite(-fake_logits.mean(), "generator")


# --------------------------------------------------------------------------- training
def decoder_default(name: str):
    """The default of a decoders' constructor argument: written once, in the constructor, and
    read by GenerativeConfig (whose anchor settings are the script's own choice)."""
    for cls in (MiyawakiDiffusionDecoder, MiyawakiGANDecoder):
        param = inspect.signature(cls).parameters.get(name)
        if param is not None:
            return param.default
    raise KeyError(f"no decoder takes {name!r}")


@dataclass
class GenerativeConfig(ScriptOptions):
    """Settings of both decoders and of the script (CPU-sized defaults). Fields named like a
    decoder's constructor argument are passed to it (``build_decoder``)."""

    encoder_checkpoint: str = field(default="", metadata={
        "help": "dual-encoder checkpoint; default OUT_DIR/miyawaki_dual_encoder.pth"})
    fmri_condition_prob: float = field(default=1.0, metadata={"min": 0, "max": 1,
        "help": "train-time conditioning: probability of a trial's fMRI embedding instead of its "
                "image embedding (0 = image only, 1 = fMRI only, as at test time)"})
    # diffusion model
    num_train_timesteps: int = field(default=decoder_default("num_train_timesteps"), metadata={
        "min": 1, "help": "diffusion steps T"})
    beta_schedule: str = field(default=decoder_default("beta_schedule"), metadata={
        "choices": sorted(BETA_SCHEDULES), "help": "noise schedule"})
    prediction_type: str = field(default=decoder_default("prediction_type"), metadata={
        "choices": PREDICTION_TYPES, "help": "what the MLP outputs (converted to epsilon)"})
    snr_gamma: float = field(default=decoder_default("snr_gamma"), metadata={"min": 0,
        "help": "Min-SNR-gamma weighting of the epsilon loss (0 = unweighted)"})
    condition_drop_prob: float = field(default=decoder_default("condition_drop_prob"), metadata={
        "min": 0, "below": 1,
        "help": "classifier-free guidance: probability of training on the null condition"})
    sampler: str = field(default=decoder_default("sampler"), metadata={
        "choices": SAMPLERS, "help": "ddim: deterministic; ddpm: ancestral, every timestep"})
    num_inference_steps: int = field(default=decoder_default("num_inference_steps"), metadata={
        "min": 1, "help": "DDIM steps (--sampler ddim only: ddpm steps through every timestep)"})
    guidance_scale: float = field(default=decoder_default("guidance_scale"), metadata={"min": 0,
        "help": "classifier-free guidance scale w (1 = the conditional model alone, 0 = the "
                "unconditional one; below 0 it would steer away from the fMRI's embedding)"})
    # diffusion training
    diffusion_steps: int = field(default=400, metadata={"min": 1, "help": "diffusion optimiser steps"})
    diffusion_batch_size: int = field(default=256, metadata={"min": 1,
        "help": "trials per diffusion step, drawn with replacement"})
    diffusion_lr: float = field(default=1e-3, metadata={"above": 0,
                                                        "help": "peak one-cycle learning rate"})
    n_sample_grids: int = field(default=4, metadata={"min": 0,
        "help": "DDIM sample grids kept during diffusion training"})
    # GAN
    noise_dim: int = field(default=decoder_default("noise_dim"), metadata={
        "min": 1, "help": "GAN noise z dimension"})
    gan_steps: int = field(default=300, metadata={"min": 1, "help": "GAN steps (full batch; D then G)"})
    gan_lr: float = field(default=2e-4, metadata={"above": 0, "help": "Adam learning rate of D and G"})
    recon_weight: float = field(default=10.0, metadata={"min": 0,
        "help": "weight of the MSE reconstruction loss beside the hinge adversarial loss"})
    bf16: bool = field(default=True, metadata={
        "help": "bfloat16 autocast for the training forward passes where the device runs "
        "bfloat16 natively (CUDA; CPUs with AMX or AVX-512 BF16), else float32; sampling stays "
        "float32"})
    log_every: int = field(default=100, metadata={"min": 1, "help": "steps between log lines"})
    # low-level anchor and image prior (what lets the decoders reconstruct never-seen images)
    anchor: bool = field(default=True, metadata={
        "help": "condition both decoders on a linear read-out of the image as well (low-level "
                "anchor, see anchor_model; fitted on the training trials, out-of-fold for them)"})
    anchor_model: str = field(default="receptive-field", metadata={"choices": ANCHOR_MODELS,
        "help": "the anchor's read-out: ridge, or ridge blended with the posterior mean under a "
                "receptive-field encoding model and the image prior (which also gives the "
                "synthetic-fMRI prior its fMRI), which reaches images outside the span of the "
                "training images"})
    rf_voxels: float = field(default=POSTERIOR_DEFAULTS["rf_voxels"], metadata={"above": 0, "max": 1,
        "help": "receptive-field anchor: fraction of voxels it reads (the best-fitted ones)"})
    rf_noise_shrink: float = field(default=POSTERIOR_DEFAULTS["rf_noise_shrink"], metadata={"min": 0, "max": 1,
        "help": "receptive-field anchor: shrinkage of the residual covariance towards its diagonal"})
    rf_prior_scale: float = field(default=POSTERIOR_DEFAULTS["rf_prior_scale"], metadata={"above": 0,
        "help": "receptive-field anchor: scale of the image prior's covariance"})
    rf_ridge_weight: float = field(default=0.5, metadata={"min": 0, "max": 1,
        "help": "receptive-field anchor: weight of the ridge read-out beside the posterior mean"})
    anchor_folds: int = field(default=10, metadata={"min": 2,
        "help": "image-grouped folds for the training trials' out-of-fold anchors (and the "
                "synthetic-fMRI prior's out-of-fold residuals)"})
    augment_prob: float = field(default=0.5, metadata={"min": 0, "below": 1,
        "help": "share of training samples replaced by samples of the image prior (rotated / "
                "reflected / shifted and recombined copies of training (anchor, image) pairs)"})
    augment_mix: float = field(default=POSTERIOR_DEFAULTS["augment_mix"], metadata={"min": 0, "max": 1,
        "help": "share of the prior samples that also get a random box pasted from a second "
                "transformed pair (cut-and-paste recombination of figures)"})
    prior_condition: str = field(default="synthetic", metadata={"choices": PRIOR_CONDITIONS,
        "help": "condition of the prior's samples: the frozen encoder's encode_image of the new "
                "image; synthetic fMRI (the encoder's encoding model's prediction for the new image "
                "plus a training trial's out-of-fold residual) through encode_fmri, with its "
                "read-out as the anchor; or the null condition"})
    augment_shift: int = field(default=POSTERIOR_DEFAULTS["augment_shift"], metadata={"min": 0, "max": 28,
        "help": "shift of the augmentations in pixels (3 = one cell of the 10 x 10 grid; 28 can "
                "move a whole image out)"})
    prior_size: int = field(default=POSTERIOR_DEFAULTS["prior_size"], metadata={"min": 2,
        "help": "image-prior samples made (and encoded) once per fit, drawn from at every step"})
    init_strength: float = field(default=0.15, metadata={"above": 0, "max": 1,
        "help": "DDIM starts from the anchor noised to this fraction of T (1 = from pure noise)"})
    anchor_blend: float = field(default=1.0, metadata={"min": 0, "max": 1,
        "help": "final image = (1 - b g) sample + b g clipped anchor, g the novelty gate's P(new "
                "image) (g = 1 with --no-novelty-gate)"})
    likelihood_weight: float = field(default=4.0, metadata={"min": 0,
        "help": "weight of the data-consistency step towards the test fMRI under the decoders' "
                "encoding model (images -> voxels; see anchor_model), at every DDIM step but the last and "
                "once on the GAN's output, scaled by the novelty gate of an anchored decoder "
                "(without anchor or gate: unscaled) (0 = off)"})
    likelihood_reg: float = field(default=decoder_default("likelihood_reg"), metadata={"above": 0,
        "help": "ridge of that step, relative to the mean diagonal of W W^T over the kept voxels"})
    likelihood_gate_power: float = field(default=4.0, metadata={"above": 0,
        "help": "the step's weight is scaled by the novelty gate's P(new image) to this power"})
    novelty_gate: bool = field(default=True, metadata={
        "help": "scale the blend b (and the likelihood step) by the probability that the "
                "anchor shows a new image (a logistic fit of its similarity to the nearest "
                "training image, calibrated on training trials' read-outs of seen and of "
                "held-out images)"})
    output_stretch: bool = field(default=True, metadata={
        "help": "anchored decoders: stretch the output's contrast, [t, 1 - t] onto [0, 1], t chosen "
                "per fit from 0 .. 0.45 by the PixCorr of the training trials' out-of-fold anchors"})
    oracle: bool = field(default=False, metadata={
        "help": "also report ORACLE numbers that feed the true test image to the decoders (its "
                "embedding as the condition, the image as the anchor): not a decoding result"})


def check_training_images(image_ids: np.ndarray, where: str) -> None:
    """DataError (``where``: whose training trials, for the message) where training trials of image
    ids ``image_ids`` show fewer than 2 distinct images: the decoders' anchor, gate and synthetic
    prior are fitted out of fold, grouped by image."""
    if len(np.unique(image_ids)) < 2:
        raise DataError(f"{where} show one distinct image; the decoders need at least 2 (their "
                        "anchor's read-outs are fitted out of fold, grouped by image)")


def build_decoder(cls: type, correlation_dim: int, config: GenerativeConfig, seed: int,
                  anchor_voxels: int = 0, gate_images: int = 0) -> nn.Module:
    """A decoder with the config fields that name its constructor arguments (and a low-level
    anchor over ``anchor_voxels`` voxels, 0 = none), initialised from ``seed`` without touching
    the global random state."""
    names = inspect.signature(cls).parameters
    kwargs = {f.name: getattr(config, f.name) for f in fields(config) if f.name in names}
    if not anchor_voxels:
        kwargs.pop("anchor_blend", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(correlation_dim=correlation_dim, anchor_voxels=anchor_voxels,
                   gate_images=gate_images, **kwargs)


def embed_trials(encoder: nn.Module, fmri: np.ndarray, images: np.ndarray,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen dual-encoder embeddings of trials: (encode_fmri(fmri ``N x V``), encode_image(images
    ``N x 1 x 28 x 28``)), both ``N x D`` unit vectors on ``device``."""
    with evaluating(encoder):
        return (encoder.encode_fmri(torch.as_tensor(fmri, device=device)),
                encoder.encode_image(torch.as_tensor(images, device=device)))


@dataclass
class DecoderTrainingSet:
    """What both decoders learn from, all on one device: per training trial its image ``N x 1 x 28
    x 28``, fMRI- and image-side embeddings ``N x D`` and out-of-fold anchor ``N x 1 x 28 x 28``
    (None without an anchor) with the read-out fitted on all trials, its ridge alpha and the
    decoders' encoding model (``encoding_model``); and the
    image prior (``image_prior``): ``P`` new images, their conditions ``P x D`` and anchors (None
    without a prior or an anchor), ``rejected`` counting the prior samples dropped as excluded."""

    images: torch.Tensor
    cond_fmri: torch.Tensor
    cond_image: torch.Tensor
    anchor: torch.Tensor | None = None
    readout: LinearReadout | None = None
    encoding: EncodingReadout | None = None
    alpha: float | None = None
    prior_images: torch.Tensor | None = None
    prior_cond: torch.Tensor | None = None
    prior_anchor: torch.Tensor | None = None
    rejected: int = 0

    @property
    def anchor_voxels(self) -> int:
        """V of the read-out behind the anchors (0 = no anchor)."""
        return 0 if self.readout is None else self.readout.weight.shape[1]

    @property
    def gate_images(self) -> int:
        """K training images of the read-out's novelty gate (0 = none)."""
        return 0 if self.readout is None else len(self.readout.gate_images)

    def draw(self, idx: torch.Tensor, config: GenerativeConfig, generator: torch.Generator):
        """Samples for trial indices ``idx`` ``B`` -> (images, conditions ``B x D``, anchors or None).

        Conditions: each the fMRI embedding with probability ``fmri_condition_prob``, else the image
        embedding of the same trial. With a prior, ``augment_prob`` of the samples are replaced by
        prior samples drawn uniformly (image, its condition and anchor together)."""
        device = self.images.device
        use_fmri = rand_on((len(idx), 1), generator, device) < config.fmri_condition_prob
        cond = torch.where(use_fmri, self.cond_fmri[idx], self.cond_image[idx])
        images, anchor = self.images[idx], None if self.anchor is None else self.anchor[idx]
        if self.prior_images is None or config.augment_prob == 0:
            return images, cond, anchor
        aug = rand_on((len(idx),), generator, device) < config.augment_prob
        pick = torch.randint(len(self.prior_images), (len(idx),), generator=generator,
                             device=generator_device(generator, device)).to(device)
        images = torch.where(aug[:, None, None, None], self.prior_images[pick], images)
        cond = torch.where(aug[:, None], self.prior_cond[pick], cond)
        if anchor is not None:
            anchor = torch.where(aug[:, None, None, None], self.prior_anchor[pick], anchor)
        return images, cond, anchor


def encode_in_chunks(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                     chunk: int = 256) -> torch.Tensor:
    """``encode`` (a frozen encoder's ``encode_image`` / ``encode_fmri``) of ``inputs`` ``P x ...``
    -> ``P x D``, ``chunk`` rows at a time (the prior's thousands of samples at once would cost
    peak memory)."""
    return torch.cat([encode(part) for part in inputs.split(chunk)])


def _progress(desc: str, total: int, progress: bool):
    """A tqdm range 1..total that shows only on a terminal (disable=None)."""
    return tqdm(range(1, total + 1), desc=desc, leave=False, disable=None if progress else True)


def train_diffusion(data: DecoderTrainingSet, config: GenerativeConfig,
                    grid_condition: torch.Tensor | None = None, grid_anchor: torch.Tensor | None = None,
                    progress: bool = True) -> tuple[MiyawakiDiffusionDecoder, dict]:
    """Fit the diffusion decoder on a training set; each step draws ``diffusion_batch_size``
    trials with replacement (``DecoderTrainingSet.draw``).

    Returns (model in eval mode, history): ``loss`` (mean per ``log_every`` steps) and
    ``samples`` {step: the sampler's own DDIM images ``G x 1 x 28 x 28``, unblended, for
    ``grid_condition`` ``G x D`` (and ``grid_anchor``)}."""
    device = data.images.device
    gen = torch.Generator(device).manual_seed(config.seed)
    model = build_decoder(MiyawakiDiffusionDecoder, data.cond_fmri.shape[1], config, config.seed,
                          data.anchor_voxels, data.gate_images).to(device)
    # foreach: the multi-tensor update CUDA uses by default; on the CPU the per-tensor loop's
    # numbers bit for bit, faster (both decoders)
    opt = torch.optim.Adam(model.parameters(), lr=config.diffusion_lr, foreach=True)
    sched = one_cycle(opt, config.diffusion_lr, config.diffusion_steps)
    grid_at = set(np.linspace(0, config.diffusion_steps, config.n_sample_grids + 1)[1:].round().astype(int))
    history, running = {"loss": [], "samples": {}}, []
    for step in _progress("diffusion", config.diffusion_steps, progress):
        idx = torch.randint(len(data.images), (config.diffusion_batch_size,), generator=gen,
                            device=gen.device).to(device)
        images, cond, anchor = data.draw(idx, config, gen)
        with bf16_autocast(device, config.bf16):
            loss = model.loss(images, cond, gen, anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % config.log_every == 0 or step == config.diffusion_steps:
            history["loss"].append(float(np.mean(running)))
            running = []
            if progress:
                tqdm.write(f"diffusion step {step} | loss {history['loss'][-1]:.4f}")
        if grid_condition is not None and step in grid_at:
            with evaluating(model):
                # the sampler's own images: the gate and stretch are not fitted yet (an unfitted
                # gate, 0.5, would blend half the anchor in)
                history["samples"][step] = model.sample(
                    grid_condition, torch.Generator().manual_seed(config.seed), grid_anchor,
                    finish=False).cpu().numpy()
    return model.eval(), history


def train_gan(data: DecoderTrainingSet, config: GenerativeConfig,
              progress: bool = True) -> tuple[MiyawakiGANDecoder, dict]:
    """Fit the GAN decoder on a training set, full batch (every trial once per step, through
    ``DecoderTrainingSet.draw``): per step one discriminator update (hinge) and one generator
    update (hinge + ``recon_weight`` x MSE). Returns (model in eval mode, history of means per
    ``log_every`` steps: ``d_loss``, ``g_adv``, ``g_recon``)."""
    device = data.images.device
    gen = torch.Generator(device).manual_seed(config.seed + 1)
    model = build_decoder(MiyawakiGANDecoder, data.cond_fmri.shape[1], config, config.seed + 1,
                          data.anchor_voxels, data.gate_images).to(device)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=config.gan_lr, betas=(0.5, 0.999),
                             foreach=True)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=config.gan_lr, betas=(0.5, 0.999),
                             foreach=True)
    history = {"d_loss": [], "g_adv": [], "g_recon": []}
    running = {k: [] for k in history}
    idx = torch.arange(len(data.images), device=device)
    for step in _progress("gan", config.gan_steps, progress):
        images, cond, anchor = data.draw(idx, config, gen)
        with bf16_autocast(device, config.bf16):
            fake = model.generate(cond, randn_on((len(images), config.noise_dim), gen, device), anchor).float()
            d_loss = hinge_discriminator_loss(model.discriminator(images, cond, anchor).float(),
                                              model.discriminator(fake.detach(), cond, anchor).float())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        with bf16_autocast(device, config.bf16):
            g_adv = hinge_generator_loss(model.discriminator(fake, cond, anchor).float())
        g_recon = check_finite(F.mse_loss(fake, images), "reconstruction")
        opt_g.zero_grad(set_to_none=True)
        (g_adv + config.recon_weight * g_recon).backward()
        opt_g.step()
        for k, v in zip(running, (d_loss, g_adv, g_recon)):
            running[k].append(v.item())
        if step % config.log_every == 0 or step == config.gan_steps:
            for k in history:
                history[k].append(float(np.mean(running[k])))
                running[k] = []
            if progress:
                tqdm.write(f"gan step {step} | d {history['d_loss'][-1]:.3f} | g adv "
                           f"{history['g_adv'][-1]:.3f} | recon {history['g_recon'][-1]:.4f}")
    return model.eval(), history


def synthetic_fmri(encoding: nn.Module, images: torch.Tensor, residuals: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Synthetic z-scored fMRI ``P x V`` for images ``P x 1 x 28 x 28`` that no trial showed: the
    encoding model's prediction (``EncodingReadout``, all voxels) plus the residual ``N x V`` of a
    random training trial (``out_of_fold_residuals``: the error of that model on a new image)."""
    pick = torch.randint(len(residuals), (len(images),), generator=generator,
                         device=generator_device(generator, images.device)).to(images.device)
    return encoding(images) + residuals[pick]


def training_set(encoder: nn.Module, train: Trials, config: GenerativeConfig,
                 device: torch.device, exclude: np.ndarray | None = None) -> DecoderTrainingSet:
    """The decoders' training set for one fold's training trials (fMRI z-scored): frozen
    embeddings; with ``config.anchor`` the anchor's read-out fitted on all of them (``fit_anchor``),
    out-of-fold anchors and the decoders' encoding model (``encoding_model``); with
    ``config.augment_prob`` the image prior (``image_prior``), which never holds an
    image of ``exclude`` (``E x 1 x 28 x 28``), and its samples' conditions (``prior_condition``):
    ``encode_fmri`` of their synthetic fMRI (``synthetic_fmri``), with its read-out as the anchor;
    ``encode_image`` of the new image, with the transformed anchor; or the null condition (zeros),
    with the transformed anchor."""
    cond_fmri, cond_image = embed_trials(encoder, train.fmri, train.images, device)
    data = DecoderTrainingSet(torch.as_tensor(train.images, device=device), cond_fmri, cond_image)
    synthetic = config.augment_prob > 0 and config.prior_condition == "synthetic"
    if config.anchor or config.prior_condition == "synthetic":
        data.encoding = encoding_model(encoder, train, config)
    folds = receptive_field_folds(train, config) if config.anchor or synthetic else None
    if config.anchor:
        readout = LinearReadout(train.fmri.shape[1])
        weight, bias, data.alpha = fit_anchor(train, config, exclude=exclude, encoding=data.encoding)
        readout.weight.copy_(torch.as_tensor(weight))
        readout.bias.copy_(torch.as_tensor(bias))
        anchor = out_of_fold_readouts(train, config, data.alpha, folds, exclude)
        readout.stretch.fill_(choose_stretch(anchor, train.images))
        gate = fit_novelty_gate(train, config, data.alpha, anchor, exclude=exclude)
        data.readout = (readout if gate is None else readout.with_gate(*gate)).to(device)
        data.anchor = torch.as_tensor(anchor, device=device)
    if data.encoding is not None:
        data.encoding = data.encoding.to(device)
    if config.augment_prob > 0:
        gen = torch.Generator(device).manual_seed(config.seed + 2)
        data.prior_images, data.prior_anchor, data.rejected = image_prior(
            data.images, None if synthetic else data.anchor, gen, config.prior_size,
            config.augment_shift, config.augment_mix,
            None if exclude is None else torch.as_tensor(np.asarray(exclude)))
        with evaluating(encoder):
            if synthetic:
                residuals = out_of_fold_residuals(train, config, encoder.config.encoding_alpha, folds)
                fmri = synthetic_fmri(data.encoding, data.prior_images,
                                      torch.as_tensor(residuals, device=device), gen)
                data.prior_cond = encode_in_chunks(encoder.encode_fmri, fmri)
                data.prior_anchor = None if data.readout is None else data.readout(fmri)
            elif config.prior_condition == "image":
                data.prior_cond = encode_in_chunks(encoder.encode_image, data.prior_images)
            else:
                data.prior_cond = torch.zeros(len(data.prior_images), cond_fmri.shape[1], device=device)
    return data


def train_generative(encoder: nn.Module, train: Trials | Fold, config: GenerativeConfig,
                     device: torch.device | str = "cpu", progress: bool = True,
                     exclude: np.ndarray | None = None):
    """Fit both decoders on the frozen embeddings (and anchors) of one fold's training trials
    (``Trials``, fMRI z-scored); ``exclude``: images the image prior must not produce (a fold's
    never-seen test images, ``E x 1 x 28 x 28``: ``fold.never_seen_images``; with Trials alone
    none is excluded). A ``Fold`` gives both: its training trials and its never-seen test images.
    Usable per cross-validation fold; no I/O.

    Returns (diffusion, gan, history): history["diffusion"] / ["gan"] hold the loss curves and
    ``seconds``; history["diffusion"]["samples"] the DDIM grids of one training trial per image
    (at most ``SAMPLE_GRID_IMAGES`` images, spread over the conditions: ``shown_images``; their
    ids in ``sample_image_ids``);
    history["prior"] what the image prior held. Anchored decoders carry the fitted read-out. A
    setting out of its option's range (``check_options``) is an OptionError before any work."""
    check_options(config)
    if isinstance(train, Fold):
        if exclude is not None:
            raise ValueError("exclude= with a Fold: the fold's never-seen test images are excluded; "
                             "pass its training trials (fold.train) to exclude others")
        train, exclude = train.train, train.never_seen_images
    device = torch.device(device)
    t0 = time.perf_counter()
    data = training_set(encoder, train, config, device, exclude)
    grid_ids, first = np.unique(train.image_ids, return_index=True)
    shown = shown_images(train.labels[first], SAMPLE_GRID_IMAGES)   # a random session's 440: 40
    grid_ids, first = grid_ids[shown], torch.as_tensor(first[shown], device=device)
    diffusion, hist_d = train_diffusion(data, config, data.cond_fmri[first],
                                        None if data.anchor is None else data.anchor[first], progress)
    hist_d["sample_image_ids"] = grid_ids.tolist()
    t2 = time.perf_counter()
    gan, hist_g = train_gan(data, config, progress)
    # the training set's set-up (anchors, embeddings) is counted once, in the diffusion's time
    hist_d["seconds"], hist_g["seconds"] = t2 - t0, time.perf_counter() - t2
    fingerprint = weights_fingerprint(encoder)
    for model in (diffusion, gan):
        model.encoder_fingerprint = fingerprint
        if data.anchor is not None:
            model.readout.load_state_dict(data.readout.state_dict())
            model.encoding.load_state_dict(data.encoding.state_dict())
    prior = {"augment_prob": config.augment_prob, "augment_mix": config.augment_mix,
             "prior_size": 0 if data.prior_images is None else len(data.prior_images),
             "n_excluded_images": 0 if exclude is None else len(exclude),
             "rejected_samples": data.rejected, "anchor_alpha": data.alpha}
    return diffusion, gan, {"diffusion": hist_d, "gan": hist_g, "prior": prior}


def decode_fold(encoder: nn.Module, fold: Fold, config: GenerativeConfig,
                device: torch.device | str = "cpu") -> tuple[dict, dict, np.ndarray | None]:
    """One cross-validation fold: both decoders trained on ``fold.train`` on top of the frozen
    ``encoder`` (the image prior excluding the test images absent from training: S3's held-out
    image), then ``fold.test`` reconstructed from its fMRI only, sampled with a generator seeded
    by ``config.seed`` -> ({"diffusion" | "gan": ``N x 1 x 28 x 28``}, {name: seconds}, the
    decoders' novelty gate per test trial ``N`` or None, ``novelty``); an anchored pair adds
    "anchor", their linear anchor alone, clipped and with ``output_stretch`` stretched like their
    outputs (both decoders' ablation)."""
    diffusion, gan, history = train_generative(encoder, fold, config, device, progress=False)
    recons, seconds = {}, {}
    readout = diffusion.readout
    if readout is not None:
        t = time.perf_counter()
        with torch.no_grad():
            x = torch.as_tensor(fold.test.fmri, device=readout.weight.device)
            recons["anchor"] = diffusion.stretch_output(readout(x).clamp(0, 1)).cpu().numpy()
        seconds["anchor"] = time.perf_counter() - t       # its fit is in the diffusion's seconds
    for name, decoder in (("diffusion", diffusion), ("gan", gan)):   # the keys of DECODER_NAMES
        t = time.perf_counter()
        recons[name] = reconstruct(encoder, decoder, fold.test.fmri, torch.Generator().manual_seed(config.seed))
        seconds[name] = history[name]["seconds"] + time.perf_counter() - t
    return recons, seconds, novelty(diffusion, fold.test.fmri)


def check_decoder(decoder, encoder=None) -> None:
    """TypeError unless ``decoder`` is one of this module's decoders (and ``encoder``, where given,
    a dual encoder): swapped or other objects failed deep inside with an AttributeError."""
    if not isinstance(decoder, AnchorMixin) or not isinstance(encoder, (MiyawakiDualEncoder, type(None))):
        given = "" if encoder is None else f"{type(encoder).__name__}, "
        raise TypeError(f"got {given}{type(decoder).__name__}; expected " + (
            "" if encoder is None else "the dual encoder (MiyawakiDualEncoder), then ") +
            "a decoder (MiyawakiDiffusionDecoder or MiyawakiGANDecoder)")


def _decode(encoder: nn.Module, encode, decoder: nn.Module, x: torch.Tensor, anchor,
            generator: torch.Generator | int | None, likelihood=None) -> np.ndarray:
    """``decoder.sample`` conditioned on ``encode(x)`` (a method of ``encoder``; x a batch on the
    decoder's device), for an anchored decoder ``anchor(x)`` and with ``likelihood(x)`` (None: no
    data-consistency step), both models evaluating -> numpy; the noise drawn from ``generator``
    (an int: a CPU generator seeded with it; None: torch's global stream); ValueError for a
    decoder trained on another dual encoder's embeddings (``encoder_fingerprint``)."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    elif not isinstance(generator, (torch.Generator, type(None))):
        raise TypeError(f"generator {type(generator).__name__}; expected a torch.Generator, an int "
                        f"seed or None")
    trained_on = decoder.encoder_fingerprint
    if trained_on is not None and trained_on != weights_fingerprint(encoder):
        raise ValueError(f"this decoder was trained on the embeddings of another dual encoder (weights "
                         f"{trained_on}, this one's {weights_fingerprint(encoder)}); load the encoder "
                         f"its checkpoint names (encoder_checkpoint), or retrain the decoders on this one")
    if not len(x):                        # no trials: no images (the sampler's shapes need a row)
        return np.zeros((0, 1, IMAGE_SIDE, IMAGE_SIDE), np.float32)
    with evaluating(encoder, decoder):
        a = None if decoder.readout is None else anchor(x)
        step = None if likelihood is None else likelihood(x)
        return decoder.sample(encode(x), generator, a, likelihood=step).cpu().numpy()


def reconstruct(encoder: nn.Module, decoder: nn.Module, fmri: np.ndarray,
                generator: torch.Generator | int | None = None) -> np.ndarray:
    """Test-time decoding from fMRI only: z-scored fMRI ``N x V`` -> encode_fmri (and, for an
    anchored decoder, its linear read-out of the same fMRI; with ``likelihood_weight`` > 0 an
    encoding model's consistency step towards the same fMRI as the sampler's likelihood: the
    decoder's own, ``encoding_model``, else the frozen encoder's) -> decoder sample ->
    ``N x 1 x 28 x 28`` float32 numpy in [0, 1]. fMRI: numpy or torch, one trial or ``N x V``
    (``fmri_batch``); ``generator`` seeds the sampling noise (a torch.Generator; an int: the
    script's draws for that ``--seed``; None: torch's global stream)."""
    check_decoder(decoder, encoder)
    x = fmri_batch(fmri, encoder.fmri_dim, next(decoder.parameters()).device)
    cfg = decoder.config
    encoding = encoder.encoding if decoder.encoding is None else decoder.encoding
    likelihood = None if not cfg["likelihood_weight"] else (
        lambda x: encoding.consistency_step(x, cfg["likelihood_reg"]))
    return _decode(encoder, encoder.encode_fmri, decoder, x, decoder.readout, generator, likelihood)


def novelty(decoder: nn.Module, fmri: np.ndarray) -> np.ndarray | None:
    """The novelty gate ``reconstruct`` uses on z-scored fMRI ``N x V``: per trial P(the image is
    not a training image) ``N`` (the anchor's, ``LinearReadout.novelty``: near 1 the output leans
    on the anchor, near 0 it is the decoder's sample); None for a decoder without anchor or gate.
    Both decoders of one fit share it (``train_generative``)."""
    check_decoder(decoder)
    if decoder.readout is None:
        return None
    x = fmri_batch(fmri, decoder.readout.weight.shape[1], decoder.readout.weight.device)
    with torch.no_grad():
        gate = decoder._novelty(decoder.readout(x))
    return None if gate is None else gate.cpu().numpy()


ORACLE_NOTE = ("ORACLE (the true test image as the condition's source and an anchored decoder's "
               "anchor; not a decoding result, and where the gate reads that anchor as a new image "
               "the output is the anchor itself, stretched, so it bounds nothing there)")


def oracle_reconstruct(encoder: nn.Module, decoder: nn.Module, images: np.ndarray,
                       generator: torch.Generator | int | None = None) -> np.ndarray:
    """ORACLE decoding, conditioned on the true image's embedding (and, for an anchored decoder,
    the true image as its anchor; there is no fMRI, so no likelihood step) (``N x 1 x 28 x 28``
    in and out): an upper bound of the decoder, never a decoding result. Where the novelty gate
    reads that anchor as a new image (a test image absent from training) the output is the true
    image, stretched, so it bounds the decoder only on images seen in training."""
    check_decoder(decoder, encoder)
    return _decode(encoder, encoder.encode_image, decoder,
                   image_batch(images, next(decoder.parameters()).device), lambda y: y, generator)


# --------------------------------------------------------------------------- figures
def plot_generation(true: np.ndarray, recon: np.ndarray, title: str, image_ids: np.ndarray,
                    candidates: np.ndarray, labels: np.ndarray, gate: np.ndarray | None = None) -> Figure:
    """For every trial a column: true image | reconstruction | (binary images only) the
    reconstruction binarised at 0.5, PixCorr with the true image in the panel titles; each column
    is named by its image (#id and condition, from the candidates' ``labels``), and a
    reconstruction whose K-way identification (Pearson with the ``candidates``) misses is marked
    in red with the image it was taken for. true, recon ``N x 1 x 28 x 28`` in [0, 1]; image_ids
    ``N`` index the candidates ``K x 1 x 28 x 28``; gate ``N``: the decoders' novelty gate
    (``novelty``), shown in each reconstruction's panel title. More than ``GENERATION_COLUMNS``
    trials wrap into blocks of that many columns, one under the other."""
    n = len(true)
    guess = identification_scores(recon, candidates).argmax(1)
    flat = lambda a: a.reshape(n, -1)  # noqa: E731
    rows = [("true", true, None), ("recon\n(r: PixCorr)", recon, pearson_rows(flat(recon), flat(true)))]
    if np.isin(true, (0, 1)).all():           # figures: the binarised reconstruction too
        binary = (recon > 0.5).astype(np.float32)
        rows.append(("binarised at 0.5\n(r: its PixCorr)", binary, pearson_rows(flat(binary), flat(true))))
    cols = min(n, GENERATION_COLUMNS)
    blocks = math.ceil(n / cols)
    lines = title.count("\n") + 1
    height = 1.6 * len(rows) * blocks + 0.4 + 0.2 * lines
    fig = Figure(figsize=(1.25 * cols, height))
    axes = fig.subplots(len(rows) * blocks, cols, squeeze=False, gridspec_kw={"hspace": 0.7})
    # the title's room in inches, for each of its lines, however many blocks
    fig.subplots_adjust(top=1 - (0.45 + 0.2 * lines) / height)
    for ax in axes[-len(rows):, n - (blocks - 1) * cols:].ravel():   # the last block's empty places
        fig.delaxes(ax)
    for r, (name, imgs, corr) in enumerate(rows):
        for i in range(n):
            ax = axes[i // cols * len(rows) + r, i % cols]
            ax.imshow(imgs[i, 0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if corr is None:
                panel_title(ax, f"#{image_ids[i]} {condition_name(labels[image_ids[i]], labels)}", fontsize=6)
            else:
                wrong = r == 1 and guess[i] != image_ids[i]
                panel_title(ax, f"r={corr[i]:.2f}" + (f"\ng={gate[i]:.2f}" if r == 1 and gate is not None else "")
                            + (f"\nas #{guess[i]}" if wrong else ""), fontsize=7,
                            color="tab:red" if wrong else "k")
        for b in range(blocks):
            axes[b * len(rows) + r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    return fig


def plot_sample_grid(samples: np.ndarray, title: str, names: list[str] | None = None,
                     cols: int = 10) -> Figure:
    """Samples ``G x 1 x 28 x 28`` in [0, 1] on a grid, each titled by its ``names`` entry, under
    a ``title`` of any number of lines."""
    rows, lines = math.ceil(len(samples) / cols), title.count("\n") + 1
    height = 1.3 * rows + 0.2 + 0.17 * lines
    fig = Figure(figsize=(1.0 * cols, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(top=1 - (0.25 + 0.17 * lines) / height, bottom=0.1 / height, hspace=0.5)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, name in zip(axes.ravel(), samples, names or [""] * len(samples)):
        ax.imshow(img[0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        panel_title(ax, name, fontsize=6)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    return fig


# --------------------------------------------------------------------------- script
# what only the anchor uses (its blend, the sampler's start from it, its gate and the gate's power
# on the likelihood step, the stretch of its read-out, its posterior half, the voxels its receptive
# fields keep): refused with --no-anchor rather than ignored and recorded as used (the likelihood
# step of an unanchored decoder is the frozen encoder's)
ANCHOR_OPTIONS = ("anchor_blend", "init_strength", "novelty_gate", "likelihood_gate_power",
                  "output_stretch", "rf_voxels", "rf_ridge_weight", "rf_noise_shrink", "rf_prior_scale")
# what only receptive fields use (the voxels they keep, the posterior half): refused with "ridge"
RECEPTIVE_FIELD_OPTIONS = ("rf_voxels", "rf_ridge_weight", "rf_noise_shrink", "rf_prior_scale")
# the image prior's draw: the decoders' prior samples and the receptive-field posterior's prior
PRIOR_OPTIONS = ("prior_size", "augment_shift", "augment_mix")


def check_settings(cfg: GenerativeConfig) -> None:
    """OptionError for a setting that would change nothing in this run and still be recorded as
    used (``check_unused``; a sweep of every option on the simulated set found each of these
    leaving every number as it was), and for the gate turned off at blend 1, whose output is the
    anchor alone (both decoders' samples blended away: they scored the same to the last digit)."""
    synthetic = cfg.augment_prob > 0 and cfg.prior_condition == "synthetic"
    posterior = cfg.anchor and cfg.anchor_model == "receptive-field" and cfg.rf_ridge_weight < 1
    if not cfg.anchor:
        check_unused(cfg, ANCHOR_OPTIONS, "with the decoders' anchor, which --no-anchor turns off")
        if not synthetic:   # the anchor's model and folds also make the synthetic prior's fMRI
            check_unused(cfg, ("anchor_model", "anchor_folds"), "with the decoders' anchor or a "
                         "synthetic-fMRI prior (--prior-condition synthetic, --augment-prob above 0)")
    if cfg.anchor_model == "ridge":
        check_unused(cfg, RECEPTIVE_FIELD_OPTIONS, "with --anchor-model receptive-field (ridge fits no "
                     "receptive fields)")
    elif cfg.rf_ridge_weight == 1:   # the anchor is the ridge read-out: the posterior weighs 0
        check_unused(cfg, ("rf_noise_shrink", "rf_prior_scale"), "with --rf-ridge-weight below 1 "
                     "(the posterior's share of the anchor)")
    if cfg.augment_prob == 0:
        check_unused(cfg, ("prior_condition",), "with the image prior's samples (--augment-prob above 0)")
        if not posterior:
            check_unused(cfg, PRIOR_OPTIONS, "with the image prior's samples (--augment-prob above 0) "
                         "or the receptive-field anchor's posterior")
    if not cfg.novelty_gate:
        check_unused(cfg, ("likelihood_gate_power",), "with the novelty gate, which --no-novelty-gate turns off")
        if cfg.anchor and cfg.anchor_blend == 1:
            raise OptionError("--no-novelty-gate at --anchor-blend 1 outputs the anchor alone (the "
                              "decoders' samples are blended away); give --anchor-blend below 1")
    if cfg.sampler == "ddpm":
        check_unused(cfg, ("num_inference_steps",),
                     "with --sampler ddim (ddpm steps through every timestep)")


def main(argv: list[str] | GenerativeConfig | None = None) -> dict:
    """Train both decoders on the S1 training trials' frozen embeddings, decode the S1 test
    trials from fMRI only, save checkpoint, figures and metrics; returns the metrics."""
    cfg = check_options(argv) if isinstance(argv, GenerativeConfig) else parse_args(argv)
    check_settings(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    check_out_dir(cfg.out_dir)
    data = resolve_data(cfg.data)
    check_training_images(data.s1().train.image_ids, f"{data.source}: the S1 training trials")
    enc_path = Path(cfg.encoder_checkpoint or Path(cfg.out_dir) / ENCODER_CHECKPOINT_NAME).resolve()
    encoder, enc_ckpt, fold = load_for_s1(enc_path, data, device)  # z-scored as the encoder saw it
    enc_sha256 = file_sha256(enc_path)
    out = prepare_out_dir(cfg.out_dir)
    train, test = fold.train, fold.test     # a noise control's training fMRI is its noise
    control = is_noise_control(enc_ckpt)
    top = NOISE_CONTROL_TITLE if control else ""

    t0 = time.perf_counter()
    # the fold's training trials; the image prior never holds a test image they never show
    diffusion, gan, history = train_generative(encoder, fold, cfg, device)
    scoring = dict(true=test.images, image_ids=test.image_ids, candidates=fold.unique_images)
    gate = novelty(diffusion, test.fmri)              # the GAN's is the same (one read-out)
    n_new = int(fold.unseen_test.sum())
    seen_text = ("every image also shown in training" if n_new == 0 else
                 f"{n_new} of {len(test)} showing an image no training trial shows")
    results, oracle, figures = {}, {}, {}
    for name, decoder in (("diffusion", diffusion), ("gan", gan)):
        t1 = time.perf_counter()
        recon = reconstruct(encoder, decoder, test.fmri, torch.Generator().manual_seed(cfg.seed))
        sample_seconds = time.perf_counter() - t1
        results[name] = {**reconstruction_metrics(recon, **scoring),
                         "train_seconds": history[name]["seconds"],
                         "sample_seconds_per_image": sample_seconds / len(test)}
        if fold.unseen_test.any():    # docs/PROTOCOL.md's zero-shot check (a random-image session)
            results[name]["closer_than_train"] = float(
                nearest_training_check(recon, fold)[0][fold.unseen_test].mean())
        if cfg.oracle:
            oracle[name] = reconstruction_metrics(oracle_reconstruct(
                encoder, decoder, test.images, torch.Generator().manual_seed(cfg.seed)), **scoring)
        m = results[name]
        figures[FIGURE.format(name)] = plot_generation(test.images, recon, (
            f"{top}{DECODER_NAMES[name]}, S1 test trials ({seen_text}), from fMRI only: PixCorr "
            f"{m['pixcorr']:.3f}, "
            f"MSE {m['mse']:.4f}, {len(fold.unique_images)}-way top-1 {m['top1']:.2f} (misidentified in red"
            + ("; g: novelty gate, P(new image)" if gate is not None else "") + ")"),
            test.image_ids, fold.unique_images, fold.unique_labels, gate)
    stage_seconds = time.perf_counter() - t0

    floor = reconstruction_metrics(MeanImageBaseline().fit(train.fmri, train.images).predict(test.fmri)
                                   .reshape(test.images.shape), **scoring)
    config = config_dict(cfg)
    k = len(fold.unique_images)
    metrics = {
        "split": "s1", "seed": cfg.seed, "data_source": data.source,
        "data_fingerprint": data.fingerprint, "device": str(device),
        "test_input": "fMRI only: encode_fmri(z-scored test fMRI)", "noise_control": control,
        "n_test": len(test), "n_candidates": k,
        "chance": chance_levels(k),
        "diffusion": results["diffusion"], "gan": results["gan"], "mean_image_floor": floor,
        **({"oracle": {"note": ORACLE_NOTE, **oracle}} if cfg.oracle else {}),
        "novelty_gate": None if gate is None else {
            "note": "per_trial: both decoders' P(new image) per test trial, from its fMRI (near 1: "
                    "the output leans on the anchor; near 0: the decoder's sample); "
                    "image_unseen_in_training: the truth it estimates, per test trial (its image is "
                    "shown by no training trial)",
            "per_trial": gate.tolist(), "mean": float(gate.mean()),
            "image_unseen_in_training": fold.unseen_test.tolist(),    # per trial: what g estimates
            # no training image shown twice: no "seen" examples to calibrate on, g = 1 everywhere
            "calibrated": len(diffusion.readout.gate_images) > 0},
        "sampler": {"diffusion": {"sampler": cfg.sampler, "num_inference_steps": cfg.num_inference_steps,
                                  "guidance_scale": cfg.guidance_scale},
                    "gan": {"noise_dim": cfg.noise_dim}, "generator_seed": cfg.seed},
        "image_prior": history["prior"],
        "generative_stage_seconds": stage_seconds, "bf16_autocast": uses_bf16(device, cfg.bf16),
        "encoder_checkpoint": str(enc_path),
        "encoder_sha256": enc_sha256, "figures": [FIGURE.format(n) for n in DECODER_NAMES],
        "config": config}
    with staged_outputs():      # written together: a run stopped here leaves the earlier outputs
        for name, fig in figures.items():
            save_figure(fig, out / name, data.source)
        grid_dir = out / "diffusion_samples"
        grid_dir.mkdir(exist_ok=True)
        for stale in grid_dir.glob("step_*.png"):
            remove_output(stale)
        grid_ids = history["diffusion"]["sample_image_ids"]
        n_train_images = len(np.unique(train.image_ids))
        per_image = ("per image" if len(grid_ids) == n_train_images else
                     f"each of {len(grid_ids)} of the {n_train_images} images (each condition's first)")
        for step, samples in history["diffusion"]["samples"].items():
            save_figure(plot_sample_grid(samples, (
                f"{top}diffusion samples during training, after {step} of {cfg.diffusion_steps} steps: one "
                f"training trial {per_image},\nfrom its fMRI embedding"
                + (f" and out-of-fold anchor (DDIM from it at {cfg.init_strength:g} of the schedule)"
                   if diffusion.readout is not None else "")
                + ";\nthe decoder's own samples, before the blend with the anchor, the stretch and the "
                  "likelihood step:\nnot the test reconstructions"),
                [f"#{i}\n{condition_name(fold.unique_labels[i], fold.unique_labels)}" for i in grid_ids]),
                grid_dir / f"step_{step:05d}.png", data.source)
        save_checkpoint({"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT,
                         "diffusion": diffusion.checkpoint_entry(), "gan": gan.checkpoint_entry(),
                         # the seed project's keys, the same tensors (load with from_checkpoint)
                         "diffusion_state_dict": diffusion.state_dict(), "gan_state_dict": gan.state_dict(),
                         "script_config": config, "seed": cfg.seed, "encoder_checkpoint": str(enc_path),
                         "encoder_sha256": enc_sha256,
                         "data_source": data.source, "data_fingerprint": data.fingerprint,
                         "n_voxels": data.n_voxels, "metrics": metrics,
                         "history": {n: {key: v for key, v in history[n].items() if key != "samples"}
                                     for n in DECODER_NAMES}}, out / CHECKPOINT_NAME)
        save_json(metrics, out / "miyawaki_generation.json")
    write_summary(out)
    if control:
        print("NOISE CONTROL: the dual encoder, both decoders and their anchor were fitted on Gaussian "
              "noise instead of the training trials' fMRI (--noise-control); every number must sit "
              "at the mean-image floor")
    for name, title in DECODER_NAMES.items():
        m = results[name]
        print(f"{title:17s} S1 from fMRI only: MSE {m['mse']:.4f} | PixCorr {m['pixcorr']:.3f} | "
              f"SSIM {m['ssim']:.3f} | 2-way {value_text(m['two_way'])} (chance 0.5) | "
              f"top-1 {m['top1']:.2f} (chance {chance_text(1 / k)}) | top-5 {m['top5']:.2f} | "
              + (f"closer to the true image than to any training image {m['closer_than_train']:.2f} | "
                 if "closer_than_train" in m else "")
              + f"train {m['train_seconds']:.1f} s, {1000 * m['sample_seconds_per_image']:.1f} ms/image")
    if gate is not None and not metrics["novelty_gate"]["calibrated"]:
        print(uncalibrated_gate_note(cfg.anchor_blend, cfg.output_stretch))
    if cfg.oracle:
        print(f"{ORACLE_NOTE}: " + " | ".join(
            f"{DECODER_NAMES[name]} PixCorr {o['pixcorr']:.3f}, MSE {o['mse']:.4f}"
            for name, o in oracle.items()))
    print(f"mean-image floor: MSE {floor['mse']:.4f} | PixCorr {floor['pixcorr']:.3f}; generative "
          f"stage {stage_seconds:.1f} s on {device}, "
          f"{'bfloat16' if metrics['bf16_autocast'] else 'float32'}; saved {out / CHECKPOINT_NAME}, "
          f"{out / 'miyawaki_generation.json'}")
    return metrics


def parse_args(argv=None) -> GenerativeConfig:
    """Command line (None: sys.argv) -> GenerativeConfig; one option per field (the common four
    from the loader)."""
    return parse_config(add_config_args(script_parser(__doc__), GenerativeConfig), GenerativeConfig, argv)


if __name__ == "__main__":
    run_cli(main)
