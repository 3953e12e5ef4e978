"""Dual encoder: fMRI MLP + stimulus CNN + CLIP-style correlation head, trained with a
symmetric multi-positive InfoNCE so that an fMRI pattern alone finds the image that was seen.

Usage::

    python miyawaki_dual_encoder.py                          # real file if in data/, else simulated
    python miyawaki_dual_encoder.py --data simulated --epochs 20 --out-dir /tmp/de
    python miyawaki_dual_encoder.py --noise-control          # fMRI replaced by noise: must be at chance

Test-time inputs are fMRI only: ``encode_fmri(x)`` embeds a trial, ``encode_image(y)`` embeds the
candidate images, and identification (``score_candidates``) ranks the candidates by the cosine
similarity of the embeddings, fused with two linear parts fitted in closed form on the same
training trials: the Pearson r of a pixel read-out (fMRI -> image, ``readout_weight``; the
posterior mean under receptive fields and an image prior of transformed training images, which
reads out never-seen images too, or ridge) and that of an encoding model (image -> voxels,
``encoding_weight``; Kay et al. 2008). Both weights 0 = the embeddings only.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from tqdm.auto import tqdm

from miyawaki_dataset_loader import (CHECKPOINT_FORMAT, IMAGE_SIDE, N_PIXELS, CheckpointError, Fold,
                                     generator_device, rand_on, SEED_METADATA,
                                     FromCheckpointHint, MiyawakiData, OptionError, RidgeBaseline,
                                     ScriptOptions, bf16_autocast, uses_bf16, chance_text,
                                     Trials, add_config_args, check_finite, check_options,
                                     check_same_data, config_dict, rerun_command, identification_ranks,
                                     load_checkpoint,
                                     one_cycle, one_line, parse_config, check_out_dir, prepare_out_dir,
                                     rank_summary, score_parts_text, SCORE_PART_NAMES,
                                     resolve_data, resolve_device, run_cli, save_checkpoint, save_figure,
                                     ENCODER_CHECKPOINT_NAME as CHECKPOINT_NAME,
                                     fmri_batch, image_batch,
                                     save_json, script_parser, seed_everything, staged_outputs, evaluating,
                                     write_summary,
                                     chance_levels, identification_scores, pearson_matrix,
                                     pearson_rows, topk_accuracy)

SCRIPT = "miyawaki_dual_encoder.py"
MAX_LOGIT_SCALE = math.log(100.0)
READOUT_MODELS = ("receptive-field", "ridge")   # the pixel read-out (PixelReadout.fit)
# the checkpoint's entries its readers use, and their types (load_checkpoint refuses a damaged file)
CHECKPOINT_FIELDS = {"state": dict, "config": dict, "seed": int, "n_voxels": int,
                     "fmri_mean": torch.Tensor, "fmri_std": torch.Tensor,
                     "data_source": str, "data_fingerprint": str}


@dataclass
class DualEncoderConfig:
    """Model and training settings (defaults: the seed's layer sizes, CPU-sized training); the
    metadata bounds are checked on every command line and config (check_options)."""

    latent_dim: int = field(default=512, metadata={
        "min": 1, "help": "D: the encoder latents and the correlation embedding"})
    fmri_hidden: tuple[int, ...] = field(default=(1024, 768), metadata={
        "min": 1, "help": "hidden widths of the fMRI MLP"})
    cnn_channels: tuple[int, ...] = field(default=(32, 64, 128), metadata={
        "min": 1, "max_items": 4, "help": "channels of the stimulus CNN's conv blocks (each but "
        "the last halves the 28 x 28 image: four leave 3 x 3; a fifth's 1 x 1 map would leave its "
        "BatchNorm one value per channel in a step that shows one image)"})
    head_hidden: tuple[int, ...] = field(default=(1024, 512), metadata={
        "min": 1, "help": "hidden widths of the correlation head"})
    dropout: float = field(default=0.3, metadata={
        "min": 0, "below": 1, "help": "dropout of the fMRI MLP and the head"})
    skip: bool = field(default=True, metadata={
        "help": "linear skip paths beside the fMRI MLP and the CNN"})
    # the identification score's settings: chosen by benchmarks/tune_dual_encoder.py on the S1
    # training trials (docs/MODELS.md, "Identification score"); the S2 / S3 benchmark can choose them
    # inside every fold instead (--nested)
    readout_weight: float = field(default=0.9, metadata={
        "min": 0, "max": 1, "help": "identification score: weight of the linear pixel read-out's "
        "Pearson r with each candidate (z-scored over the candidates, as the other parts)"})
    readout_model: str = field(default="receptive-field", metadata={
        "choices": READOUT_MODELS, "help": "the pixel read-out: the posterior mean "
        "under a receptive-field encoding model and an image prior of transformed training images "
        "(it reads out never-seen images too), or ridge (only within the span of the training images)"})
    encoding_weight: float = field(default=0.0, metadata={
        "min": 0, "max": 1, "help": "identification score: weight of the linear encoding model's "
        "Pearson r between the trial's fMRI and each candidate's predicted fMRI; the embeddings' "
        "cosine gets 1 - readout_weight - encoding_weight (so the two sum to at most 1)"})
    encoding_alpha: float = field(default=30.0, metadata={
        "above": 0, "help": "ridge alpha of the encoding model (images -> voxels)"})
    encoding_voxels: float = field(default=0.4, metadata={
        "above": 0, "max": 1, "help": "fraction of voxels the encoding model scores with: those "
        "it predicts best for held-out images of the training trials"})
    bf16: bool = field(default=True, metadata={
        "help": "bfloat16 autocast in training where the device runs bfloat16 natively (CUDA; CPUs "
        "with AMX or AVX-512 BF16: about 2x faster there); float32 elsewhere (other CPUs convert "
        "or emulate it: 1.7x to over 10x slower)"})
    epochs: int = field(default=100, metadata={"min": 1, "help": "training epochs"})
    batch_size: int = field(default=0, metadata={"min": 0, "help": "trials per step (0 = full batch)"})
    lr: float = field(default=1e-3, metadata={"above": 0, "help": "peak one-cycle learning rate"})
    weight_decay: float = field(default=0.5, metadata={"min": 0, "help": "AdamW weight decay"})
    mixup: int = field(default=64, metadata={
        "min": 0, "help": "mixed (fMRI, image) pairs added to every step (0 = off)"})
    mixup_alpha: float = field(default=1.0, metadata={
        "above": 0, "help": "Beta(alpha, alpha) mixing weights"})
    fmri_noise: float = field(default=0.5, metadata={
        "min": 0, "help": "std of Gaussian noise added to z-scored fMRI in training"})
    logit_scale_init: float = field(default=math.log(1 / 0.07), metadata={
        "help": "initial InfoNCE logit scale (log of 1 / temperature, CLIP's ln(1 / 0.07))"})
    # 0: the networks and the linear parts are fitted on every training trial, as in the inner CV
    # that chose the other settings, the S2 / S3 folds and the ridge baseline
    val_fraction: float = field(default=0.0, metadata={
        "min": 0, "below": 1, "help": "training trials held out for validation curves (never test "
        "trials; at most one trial of each image shown 3 times or more, so that every validation "
        "image is still seen in training; 0 = fit on all of them)"})
    log_every: int = field(default=20, metadata={"min": 1, "help": "epochs between log lines"})
    seed: int = field(default=0, metadata=SEED_METADATA)


# --------------------------------------------------------------------------- model
def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear + LayerNorm + SiLU + Dropout blocks through ``dims``; the last layer is linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.LayerNorm(b), nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FMRIEncoder(nn.Module):
    """MLP ``N x V -> hidden -> N x latent_dim`` (Linear + LayerNorm + SiLU + Dropout), plus an
    optional linear skip ``V -> latent_dim``: V1 maps the stimulus almost linearly (ridge is strong
    here), and the skip lets the encoder keep that linear code while the MLP adds the rest."""

    def __init__(self, fmri_dim: int, latent_dim: int = 512, hidden: tuple[int, ...] = (1024, 768),
                 dropout: float = 0.3, skip: bool = True):
        super().__init__()
        self.mlp = mlp([fmri_dim, *hidden, latent_dim], dropout)
        self.skip = nn.Linear(fmri_dim, latent_dim, bias=False) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fMRI ``N x V`` -> latent ``N x latent_dim`` (not normalised)."""
        z = self.mlp(x)
        return z + self.skip(x) if self.skip is not None else z


class StimulusEncoder(nn.Module):
    """CNN ``N x 1 x 28 x 28`` -> ``N x latent_dim``: three conv blocks (BatchNorm + ReLU),
    pooled to 4 x 4, then a linear layer; plus an optional linear skip from the centred pixels
    (a code that transfers to never-seen images, where the CNN alone does not)."""

    def __init__(self, latent_dim: int = 512, channels: tuple[int, ...] = (32, 64, 128),
                 skip: bool = True):
        super().__init__()
        self.skip = nn.Linear(28 * 28, latent_dim, bias=False) if skip else None
        blocks, c_in = [], 1
        for i, c in enumerate(channels):
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            blocks.append(nn.MaxPool2d(2) if i < len(channels) - 1 else nn.AdaptiveAvgPool2d(4))
            c_in = c
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in * 16, latent_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` -> latent ``N x latent_dim`` (not normalised)."""
        z = self.fc(self.conv(y).flatten(1))
        if self.skip is not None:
            flat = y.flatten(1)
            z = z + self.skip(flat - flat.mean(1, keepdim=True))
        return z


class PixelReadout(nn.Module):
    """Linear read-out of the image from z-scored fMRI, ``N x V -> N x 1 x 28 x 28`` (not clipped),
    weights held as buffers, so that a model that uses it saves and loads it with its own state:
    the receptive-field posterior mean (``posterior_weights``) or the ridge baseline's weights
    (docs/BASELINES.md, alpha by efficient LOO). Zeros until ``fit``."""

    def __init__(self, n_voxels: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(N_PIXELS, n_voxels))
        self.register_buffer("bias", torch.zeros(N_PIXELS))

    @torch.no_grad()
    def fit(self, fmri: np.ndarray, images: np.ndarray, model: str,
            exclude: np.ndarray | None = None) -> float | None:
        """``model`` of ``READOUT_MODELS`` (no default: the model's config names it) on fMRI
        ``N x V`` and images ``N x 1 x 28 x 28``, in place (the posterior's image prior never
        holds an image of ``exclude``) -> ridge's alpha (None for the receptive-field posterior)."""
        if model == "receptive-field":
            weight, bias = posterior_weights(fmri, images, exclude=exclude)
            alpha = None
        elif model == "ridge":
            ridge = RidgeBaseline().fit(fmri, images)
            weight, bias, alpha = ridge.model_.coef_, ridge.model_.intercept_, ridge.alpha_
        else:
            raise ValueError(f"unknown read-out model {model!r}; use one of {READOUT_MODELS}")
        self.weight.copy_(torch.as_tensor(weight))
        self.bias.copy_(torch.as_tensor(bias))
        return alpha

    def forward(self, fmri: torch.Tensor) -> torch.Tensor:
        """z-scored fMRI ``N x V`` -> read-out ``N x 1 x 28 x 28``."""
        return (fmri @ self.weight.T + self.bias).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


def grouped_folds(groups: np.ndarray, n_folds: int):
    """Image-grouped folds over ``N`` trials with image ids ``groups`` -> (train, held-out) index
    pairs, ``min(n_folds, images)`` of them: a held-out trial's image is absent from its train."""
    from sklearn.model_selection import GroupKFold  # imported here: sklearn costs ~60 MiB
    return GroupKFold(min(n_folds, len(np.unique(groups)))).split(np.zeros(len(groups)), groups=groups)


RF_SIZES = (1.0, 2.0, 3.5, 6.0)  # Gaussian receptive-field SDs in pixels (a grid cell is 2.8 px)


@functools.lru_cache(maxsize=1)
def receptive_field_bank(sizes: tuple[float, ...] = RF_SIZES) -> np.ndarray:
    """Candidate population receptive fields: an isotropic Gaussian (unit sum) centred on every
    pixel of the 28 x 28 image at each SD of ``sizes`` -> ``C x 784`` (C = 784 x len(sizes)),
    read-only (made once, shared by every fit)."""
    centre = np.arange(IMAGE_SIDE) + 0.5
    yy, xx = np.meshgrid(centre, centre, indexing="ij")
    d2 = ((yy.ravel()[:, None] - yy.ravel()[None]) ** 2
          + (xx.ravel()[:, None] - xx.ravel()[None]) ** 2)               # 784 centres x 784 pixels
    bank = np.concatenate([np.exp(-d2 / (2 * s * s)) for s in sizes])
    bank /= bank.sum(1, keepdims=True)
    bank.flags.writeable = False
    return bank


class EncodingReadout(nn.Module):
    """Linear encoding model (as in Kay et al. 2008): images ``N x 1 x 28 x 28 -> N x V``
    predicted z-scored fMRI (ridge, weights as buffers), and ``scores``: the Pearson r, over the
    voxels it predicts best (``voxels``), between a trial's fMRI and each candidate's predicted
    fMRI. Voxels are ranked by the model's accuracy on held-out *images* of its training trials
    (image-grouped CV), so the choice needs no repeated images and favours voxels whose
    prediction transfers to new ones. Zeros (and every voxel) until ``fit``."""

    def __init__(self, n_voxels: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_voxels, N_PIXELS))
        self.register_buffer("bias", torch.zeros(n_voxels))
        self.register_buffer("voxels", torch.ones(n_voxels, dtype=torch.bool))

    @torch.no_grad()
    def fit(self, fmri: np.ndarray, images: np.ndarray, image_ids: np.ndarray, alpha: float,
            voxel_fraction: float, n_folds: int = 5) -> int:
        """Ridge images -> fMRI ``N x V`` on training trials, in place; keeps the ``voxel_fraction``
        best-predicted voxels (all when fewer than 2 images) -> the number kept."""
        from sklearn.linear_model import Ridge  # imported here: sklearn costs ~60 MiB
        y, x = np.asarray(images, np.float64).reshape(len(images), -1), np.asarray(fmri, np.float64)
        model = Ridge(alpha=alpha).fit(y, x)
        self.weight.copy_(torch.as_tensor(model.coef_))
        self.bias.copy_(torch.as_tensor(model.intercept_))
        n_images, n_voxels = len(np.unique(image_ids)), x.shape[1]
        accuracy = np.zeros(n_voxels)
        if n_images >= 2 and voxel_fraction < 1:
            pred = np.zeros_like(x)
            for tr, va in grouped_folds(image_ids, n_folds):
                pred[va] = Ridge(alpha=alpha).fit(y[tr], x[tr]).predict(y[va]).reshape(len(va), -1)
            accuracy = pearson_rows(pred.T, x.T)
        keep = np.argsort(-accuracy, kind="stable")[:max(1, round(voxel_fraction * n_voxels))]
        self.voxels.zero_()
        self.voxels[torch.as_tensor(keep)] = True
        return len(keep)

    @torch.no_grad()
    def fit_receptive_fields(self, fmri: np.ndarray, images: np.ndarray, voxel_fraction: float) -> int:
        """A population-receptive-field model instead of ridge (Dumoulin & Wandell 2008; decoded as
        in Thirion et al. 2006's inverse retinotopy), in place: each voxel = bias + gain x (image .
        its Gaussian), the Gaussian (centre, size) of ``receptive_field_bank`` whose overlap with
        the training images ``N x 1 x 28 x 28`` correlates best with the voxel's fMRI ``N x V``,
        gain >= 0 by least squares. Ridge weights lie in the span of the training images, so they
        predict nothing of a new image outside it; a receptive field predicts any image. Keeps
        the ``voxel_fraction`` best-fitted voxels (that correlation) -> the number kept."""
        bank = receptive_field_bank()
        x = np.asarray(fmri, np.float64)
        overlap = np.asarray(images, np.float64).reshape(len(images), -1) @ bank.T    # N x C
        po, xc = overlap - overlap.mean(0), x - x.mean(0)
        corr = ((po / (np.linalg.norm(po, axis=0) + 1e-12)).T
                @ (xc / (np.linalg.norm(xc, axis=0) + 1e-12)))                     # C x V
        best = (corr == corr.max(0)).argmax(0)    # = corr.argmax(0), the first maximum; 2x faster
        fit = corr[best, np.arange(x.shape[1])]
        p = po[:, best]                                                             # N x V
        gain = np.maximum((p * xc).sum(0) / np.maximum((p ** 2).sum(0), 1e-12), 0)
        weight = torch.as_tensor(gain[:, None] * bank[best], dtype=torch.float32)
        # the Gaussians' far tails underflow to float32 subnormals, which make CPU matrix products
        # with these weights ~40x slower: flushed to 0 (far below any sum's last bit)
        self.weight.copy_(weight.where(weight.abs() >= torch.finfo(torch.float32).tiny, 0.0))
        self.bias.copy_(torch.as_tensor(x.mean(0) - gain * overlap[:, best].mean(0)))
        keep = np.argsort(-fit, kind="stable")[:max(1, round(voxel_fraction * x.shape[1]))]
        self.voxels.zero_()
        self.voxels[torch.as_tensor(keep)] = True
        return len(keep)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` -> predicted z-scored fMRI ``N x V``."""
        return images.flatten(1) @ self.weight.T + self.bias

    @torch.no_grad()
    def consistency_step(self, fmri: torch.Tensor, reg: float) -> Callable:
        """The encoding model as the likelihood of a decoder's sampler (a data-consistency step,
        as in DiffPIR, Zhu et al. 2023, with this linear forward model): for fMRI ``N x V`` a
        function ``step(images, weight)`` that moves images ``N x 1 x 28 x 28`` by ``weight``
        (scalar or ``N x 1``) times the regularised least-norm change that makes their predicted
        fMRI match ``fmri`` on the kept voxels, W^T (W W^T + mu I)^-1 (y - W x - b) with mu =
        ``reg`` x mean diag(W W^T). An unfitted (zero) model changes nothing."""
        keep = self.voxels
        w, y = self.weight[keep], fmri[:, keep] - self.bias[keep]          # K x 784, N x K
        gram = w.double() @ w.double().T        # rank <= the training images: float64 to invert
        scale = float(gram.diagonal().mean())
        if scale == 0:
            return lambda images, weight: images
        solve = torch.linalg.inv(gram + reg * scale * torch.eye(len(gram), dtype=gram.dtype,
                                                                device=gram.device))
        back = (w.double().T @ solve).T.to(w.dtype)                         # K x 784

        def step(images: torch.Tensor, weight) -> torch.Tensor:
            flat = images.flatten(1)
            return (flat + weight * ((y - flat @ w.T) @ back)).reshape(images.shape)
        return step

    @torch.no_grad()
    def scores(self, fmri: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
        """Pearson r over the kept voxels of fMRI ``N x V`` with each candidate's predicted fMRI
        (candidates ``K x 1 x 28 x 28``) -> ``N x K``."""
        keep = self.voxels
        return pearson_matrix(fmri[:, keep].cpu().numpy(), self(candidates)[:, keep].cpu().numpy())


# --------------------------------------------------------------------------- image prior, posterior read-out
def augmentation_ops(shift: int) -> torch.Tensor:
    """The paired augmentations as pixel gathers: the 8 rotations / reflections of the square,
    each shifted by (dy, dx) in {-shift, 0, shift}^2 px with zero fill -> index ``O x 784`` long
    into an image's 784 pixels followed by a zero (index 784: the fill); op 0 is the identity.
    ``apply_ops`` applies them."""
    n = IMAGE_SIDE
    grid = np.arange(N_PIXELS).reshape(n, n)
    moves = sorted({0, -shift, shift}, key=abs)
    index = []
    for k in range(4):
        for flip in (False, True):
            g = np.rot90(grid, k)
            g = g[:, ::-1] if flip else g
            for dy in moves:
                for dx in moves:
                    src = np.full((n, n), N_PIXELS)
                    rows, cols = slice(max(dy, 0), n + min(dy, 0)), slice(max(dx, 0), n + min(dx, 0))
                    src[rows, cols] = g[max(-dy, 0):n - max(dy, 0), max(-dx, 0):n - max(dx, 0)]
                    index.append(src.ravel())
    return torch.as_tensor(np.array(index))


def apply_ops(images: torch.Tensor, picks: torch.Tensor, ops: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
    """Op ``ops[i]`` (of ``augmentation_ops``' ``index``) applied to image ``picks[i]``: images ``N x
    1 x 28 x 28``, picks and ops ``P`` -> ``P x 1 x 28 x 28``."""
    padded = F.pad(images.flatten(1), (0, 1))                               # N x 785, a zero last
    return padded[picks].gather(1, index[ops]).view(-1, *images.shape[1:])


def random_boxes(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` masks ``n x 1 x 28 x 28`` (float 0/1), each a random axis-aligned box whose sides
    are uniform in [7, 21] px, placed uniformly: the pasted part of a cut-and-paste recombination."""
    side = 7 + (rand_on((n, 2), generator, device) * 15).long()
    start = (rand_on((n, 2), generator, device) * (29 - side)).long()
    r = torch.arange(IMAGE_SIDE, device=device)
    rows = (r[None] >= start[:, :1]) & (r[None] < start[:, :1] + side[:, :1])
    cols = (r[None] >= start[:, 1:]) & (r[None] < start[:, 1:] + side[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


def image_prior(images: torch.Tensor, anchor: torch.Tensor | None, generator: torch.Generator,
                size: int, shift: int, mix: float, exclude: torch.Tensor | None = None):
    """The image prior's images: ``size`` new images made from training (image,
    anchor) pairs ``N x 1 x 28 x 28`` (anchor None: images alone) -> (images ``P x 1 x 28 x 28``,
    their anchors or None, rejected). Each is a random rotation / reflection / shift
    (``augmentation_ops``, ``shift`` px) of a pair, applied to both, and with probability ``mix`` a
    random box of a second transformed pair pasted into both (V1, and so the read-out, is
    retinotopic: a part of the image maps to that part of the anchor). A sample equal to an image
    of ``exclude`` ``E x 1 x 28 x 28`` is dropped (P = size - rejected).
    No trial showed them: the decoders' ``training_set`` gives them conditions, and
    ``posterior_weights`` takes their mean and covariance."""
    device, n = images.device, size
    index = augmentation_ops(shift).to(device)

    def transformed():
        trials = torch.randint(len(images), (n,), generator=generator,
                               device=generator_device(generator, device)).to(device)
        ops = torch.randint(len(index), (n,), generator=generator,
                            device=generator_device(generator, device)).to(device)
        return (apply_ops(images, trials, ops, index),
                None if anchor is None else apply_ops(anchor, trials, ops, index))

    new_images, new_anchor = transformed()
    if mix > 0:
        paste_images, paste_anchor = transformed()
        box = random_boxes(n, generator, device)
        box = box * (rand_on((n, 1, 1, 1), generator, device) < mix)
        new_images = new_images + box * (paste_images - new_images)
        if new_anchor is not None:
            new_anchor = new_anchor + box * (paste_anchor - new_anchor)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if exclude is not None and len(exclude):
        # images a, b are equal where |a - b|^2 = |a|^2 + |b|^2 - 2 a.b is 0: in float64, P x E
        # without a P x E x 784 comparison; exact for binary images, and within 1e-6 (below one
        # 8-bit grey level, 1.5e-5) for grey ones; never thresholded, so that low-contrast images
        # do not all collapse into one
        a, b = new_images.flatten(1).double(), exclude.to(device).flatten(1).double()
        distance = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
        keep = ~(distance < 1e-6).any(1)
    return new_images[keep], None if new_anchor is None else new_anchor[keep], int((~keep).sum())


def posterior_readout(encoding: EncodingReadout, fmri: np.ndarray, images: np.ndarray,
                      prior: np.ndarray, noise_shrink: float,
                      prior_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The posterior-mean image under a linear-Gaussian model, as a linear read-out of fMRI: an
    image x ~ N(m, s S) (m, S: mean and covariance of the image prior's samples ``prior`` ``P x
    784``, s = ``prior_scale``), the kept voxels' fMRI y = W x + b + e (``encoding``, fitted on
    the trials fMRI ``N x V``, images ``N x 784``) with e ~ N(0, R), R the covariance of those
    trials' residuals shrunk towards its diagonal by ``noise_shrink``. x_hat = m + K (y - b - W m),
    K = s S W^T (W s S W^T + R)^-1 -> (weight ``784 x V``, zero off the kept voxels; bias ``784``)."""
    keep = encoding.voxels.cpu().numpy()
    w = encoding.weight.double().cpu().numpy()[keep]                       # K x 784
    b = encoding.bias.double().cpu().numpy()[keep]
    resid = np.asarray(fmri, np.float64)[:, keep] - (images @ w.T + b)
    noise = np.atleast_2d(np.cov(resid, rowvar=False))
    noise = (1 - noise_shrink) * noise + noise_shrink * np.diag(np.diag(noise))
    mean, cov = prior.mean(0), prior_scale * np.atleast_2d(np.cov(prior, rowvar=False))
    cw = cov @ w.T                                                         # 784 x K
    gain = np.linalg.solve(w @ cw + noise, cw.T).T                         # both symmetric
    weight = np.zeros((N_PIXELS, len(keep)))
    weight[:, keep] = gain
    return weight, mean - gain @ (b + w @ mean)


# The receptive-field posterior read-out's settings, shared by the dual encoder's pixel read-out
# (``readout_model="receptive-field"``) and the decoders' anchor (GenerativeConfig's defaults of
# the same names), chosen for the anchor by benchmarks/tune_anchor.py
POSTERIOR_DEFAULTS = {"rf_voxels": 0.4, "rf_noise_shrink": 0.8, "rf_prior_scale": 3.0,
                      "prior_size": 4096, "augment_shift": 3, "augment_mix": 0.5}


def receptive_fields(fmri: np.ndarray, images: np.ndarray, voxel_fraction: float) -> EncodingReadout:
    """Receptive fields (``EncodingReadout.fit_receptive_fields``, ``voxel_fraction`` of the voxels
    kept) fitted on trials' fMRI ``N x V`` and images ``N x 1 x 28 x 28``."""
    model = EncodingReadout(fmri.shape[1])
    model.fit_receptive_fields(fmri, images, voxel_fraction)
    return model


def posterior_weights(fmri: np.ndarray, images: np.ndarray, seed: int = 0,
                      encoding: EncodingReadout | None = None, exclude: np.ndarray | None = None,
                      **settings) -> tuple[np.ndarray, np.ndarray]:
    """The receptive-field posterior read-out fitted on trials, fMRI ``N x V`` (z-scored) and
    images ``N x 1 x 28 x 28`` -> (weight ``784 x V``, bias ``784``), float64: the posterior mean
    (``posterior_readout``) under receptive fields (``receptive_fields``; ``encoding`` when already
    fitted on these trials) and the image prior made from these trials' images (``image_prior``,
    drawn from ``seed``, never an image of ``exclude`` ``E x 1 x 28 x 28``). ``settings``: any of
    ``POSTERIOR_DEFAULTS``. Unlike ridge, whose weights lie in the span of the training images,
    it reads out images outside that span (a never-seen image)."""
    s = {**POSTERIOR_DEFAULTS, **settings}
    if encoding is None:
        encoding = receptive_fields(fmri, images, s["rf_voxels"])
    prior, _, _ = image_prior(torch.as_tensor(images), None, torch.Generator().manual_seed(seed),
                              s["prior_size"], s["augment_shift"], s["augment_mix"],
                              None if exclude is None else torch.as_tensor(np.asarray(exclude)))
    return posterior_readout(encoding, np.asarray(fmri, np.float64),
                             np.asarray(images, np.float64).reshape(len(images), -1),
                             prior.flatten(1).double().numpy(), s["rf_noise_shrink"], s["rf_prior_scale"])


# --------------------------------------------------------------------------- identification score
SCORE_PARTS = tuple(SCORE_PART_NAMES)      # ("embedding", "readout", "encoding")
SCORE_WEIGHTS = ("readout_weight", "encoding_weight")   # the config fields that weight the last two


def standardize_rows(scores: np.ndarray) -> np.ndarray:
    """``N x K`` scores z-scored over each row's K candidates (a constant row becomes 0)."""
    s = np.asarray(scores, np.float64)
    std = s.std(1, keepdims=True)
    return (s - s.mean(1, keepdims=True)) / np.where(std > 0, std, 1.0)


def score_weights(readout_weight: float, encoding_weight: float,
                  names=SCORE_WEIGHTS) -> tuple[float, float, float]:
    """The weights of ``SCORE_PARTS``: (1 - readout_weight - encoding_weight, readout_weight,
    encoding_weight); a ValueError naming ``names`` when either is negative or the two sum to
    more than 1."""
    for name, weight in zip(names, (readout_weight, encoding_weight)):
        if weight < 0:
            raise ValueError(f"{name} must be >= 0, got {weight:g}")
    if readout_weight + encoding_weight > 1 + 1e-9:
        raise ValueError(f"{names[0]} + {names[1]} must be <= 1, got {readout_weight:g} + "
                         f"{encoding_weight:g}")
    return 1 - readout_weight - encoding_weight, readout_weight, encoding_weight


def fused_scores(parts: dict, readout_weight: float, encoding_weight: float) -> np.ndarray:
    """The identification score ``N x K`` from the parts of ``score_parts``, each z-scored over the
    K candidates (``standardize_rows``): (1 - readout_weight - encoding_weight) z(embedding
    cosine) + readout_weight z(read-out r) + encoding_weight z(encoding r)."""
    weights = score_weights(readout_weight, encoding_weight)
    return sum(w * standardize_rows(parts[name]) for name, w in zip(SCORE_PARTS, weights) if w)


def ensemble_parts(models: list, fmri: torch.Tensor, candidates: torch.Tensor) -> dict:
    """The score parts (``score_parts``, each ``N x K``) of fits on the same trials that differ in
    seed only, scored as one model: the embeddings' cosine averaged over the fits (the cosine of
    their concatenated embeddings over sqrt(S)), the linear parts of the first model (fitted in
    closed form on the trials, they do not depend on the seed)."""
    parts = models[0].score_parts(fmri, candidates)
    if len(models) > 1:
        parts["embedding"] = np.mean([parts["embedding"]] + [m.score_parts(fmri, candidates)["embedding"]
                                                             for m in models[1:]], axis=0)
    return parts


class OracleWarning(UserWarning):
    """A model input carries the true image: what comes out is an oracle, not a decoding result."""


class CLIPCorrelation(nn.Module):
    """Correlation head: concat(fMRI slot, image slot) ``N x 2D`` -> hidden -> ``N x D``.

    At test time there is no image, so a single-modality embedding fills both slots with the same
    latent; training aligns the fMRI-only and image-only embeddings of the same trial."""

    def __init__(self, latent_dim: int = 512, hidden: tuple[int, ...] = (1024, 512),
                 dropout: float = 0.3):
        super().__init__()
        self.net = mlp([2 * latent_dim, *hidden, latent_dim], dropout)

    def forward(self, z_fmri_slot: torch.Tensor, z_image_slot: torch.Tensor) -> torch.Tensor:
        """Two latents ``N x D`` -> correlation embedding ``N x D`` (not normalised). Called with
        two different latents (an fMRI latent and the image's, as the seed project did) it warns:
        that embedding has seen the image, so anything decoded from it is an oracle."""
        if z_image_slot is not z_fmri_slot:
            warnings.warn("clip_correlation(fmri_latent, image_latent) mixes in the image's latent: "
                          "an ORACLE embedding, not decoding from fMRI; use model.encode_fmri(fmri)",
                          OracleWarning, stacklevel=2)
        return self.net(torch.cat([z_fmri_slot, z_image_slot], dim=1))


class MiyawakiDualEncoder(FromCheckpointHint, nn.Module):
    """fMRI encoder ``V -> 1024 -> 768 -> D``, stimulus CNN ``-> D``, the correlation head, and two
    linear models fitted in closed form on the training trials: a pixel read-out (``readout``,
    fMRI -> image) and an encoding model (``encoding``, image -> fMRI).

    ``encode_fmri`` / ``encode_image`` return unit vectors ``N x D`` in the shared space;
    ``score_candidates`` is what identification ranks by."""

    # Trials.fingerprint of the (z-scored) training trials it was fitted on, set by the fits and
    # kept in the checkpoint; score_checkpoint refuses another fold's (None: unknown, unchecked)
    training_fingerprint: str | None = None

    def __init__(self, fmri_dim: int = 967, latent_dim: int | None = None,
                 config: DualEncoderConfig | None = None):
        """Built from ``config`` (default: DualEncoderConfig, the seed's sizes) and the voxel count;
        ``latent_dim`` (the seed's argument) overrides the default config's D, and must agree
        with a given config's."""
        super().__init__()
        if config is not None and latent_dim not in (None, config.latent_dim):
            raise ValueError(f"latent_dim {latent_dim} disagrees with config.latent_dim "
                             f"{config.latent_dim}; pass one of them")
        cfg = config or DualEncoderConfig(**({} if latent_dim is None else {"latent_dim": latent_dim}))
        latent_dim = cfg.latent_dim
        self.config = cfg
        self.fmri_dim = fmri_dim
        self.fmri_encoder = FMRIEncoder(fmri_dim, latent_dim, cfg.fmri_hidden, cfg.dropout, cfg.skip)
        self.stimulus_encoder = StimulusEncoder(latent_dim, cfg.cnn_channels, cfg.skip)
        self.clip_correlation = CLIPCorrelation(latent_dim, cfg.head_hidden, cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.readout = PixelReadout(fmri_dim)
        self.encoding = EncodingReadout(fmri_dim)

    def latents(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict:
        """Unit-norm encoder latents and correlation embeddings for whichever inputs are given:
        keys ``fmri_latent``, ``fmri`` (from ``x`` ``N x V``), ``image_latent``, ``image``
        (from ``y`` ``M x 1 x 28 x 28``)."""
        out = {}
        for key, inp, enc in (("fmri", x, self.fmri_encoder), ("image", y, self.stimulus_encoder)):
            if inp is not None:
                z = enc(inp)
                out[key + "_latent"] = F.normalize(z.float(), dim=1)  # float32 under bf16 autocast
                out[key] = F.normalize(self.clip_correlation(z, z).float(), dim=1)
        return out

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict:
        """``model(x, y)`` is ``latents(x, y)`` (what ``torch.func.functional_call`` calls)."""
        return self.latents(x, y)

    def encode_fmri(self, x: torch.Tensor) -> torch.Tensor:
        """fMRI ``N x V`` (z-scored; numpy or torch, ``fmri_batch``) -> unit embedding ``N x D``.
        No image is involved. Runs in the module's mode: call ``eval()`` first for embeddings
        without dropout (``from_checkpoint`` returns the model in eval mode); and with autograd, as
        any module's forward (the training losses need it): under ``torch.no_grad()``, or
        ``.detach()``, before ``.numpy()``."""
        return self.latents(x=fmri_batch(x, self.fmri_dim, self.logit_scale.device))["fmri"]

    def encode_image(self, y: torch.Tensor) -> torch.Tensor:
        """Images ``N x 1 x 28 x 28`` in [0, 1] (numpy or torch, ``image_batch``) -> unit
        embedding ``N x D``; in the module's mode and with autograd, as ``encode_fmri``."""
        return self.latents(y=image_batch(y, self.logit_scale.device))["image"]

    @torch.no_grad()
    def score_parts(self, fmri: torch.Tensor, candidates: torch.Tensor) -> dict:
        """The parts of the identification score of fMRI ``N x V`` (z-scored) against candidate
        images ``K x 1 x 28 x 28``, each ``N x K``: ``embedding`` (cosine of ``encode_fmri`` and
        ``encode_image``), ``readout`` (the protocol's Pearson r of the clipped pixel read-out)
        and ``encoding`` (``EncodingReadout.scores``). No image of the trials is involved. Numpy or
        torch inputs, one trial or image or a batch (``fmri_batch``, ``image_batch``)."""
        fmri = fmri_batch(fmri, self.fmri_dim, self.logit_scale.device)
        candidates = image_batch(candidates, self.logit_scale.device)
        with evaluating(self):
            emb = (self.encode_fmri(fmri) @ self.encode_image(candidates).T).cpu().numpy()
            readout = self.readout(fmri).cpu().numpy()
        return {"embedding": emb, "readout": identification_scores(readout, candidates.cpu().numpy()),
                "encoding": self.encoding.scores(fmri, candidates)}

    def score_candidates(self, fmri: torch.Tensor, candidates: torch.Tensor,
                         readout_weight: float | None = None,
                         encoding_weight: float | None = None) -> np.ndarray:
        """Identification scores ``N x K`` (higher = better) of fMRI ``N x V`` against candidates
        ``K x 1 x 28 x 28``: ``fused_scores`` of ``score_parts`` with the config's weights unless
        given."""
        cfg = self.config
        return fused_scores(self.score_parts(fmri, candidates),
                            cfg.readout_weight if readout_weight is None else readout_weight,
                            cfg.encoding_weight if encoding_weight is None else encoding_weight)

    def clamped_scale(self) -> torch.Tensor:
        """exp(logit_scale) with logit_scale clamped to ln 100, as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    @classmethod
    def from_checkpoint(cls, path: Path, map_location="cpu") -> tuple["MiyawakiDualEncoder", dict]:
        """Rebuild the model from ``miyawaki_dual_encoder.pth``; returns (model in eval mode, ckpt)."""
        ckpt = load_checkpoint(path, "dual_encoder", SCRIPT, map_location, CHECKPOINT_FIELDS)
        try:
            model = cls(ckpt["n_voxels"], config=config_from_dict(ckpt["config"]))
            nn.Module.load_state_dict(model, ckpt["state"])   # without the hint to call this method
            if isinstance(ckpt.get("training_fingerprint"), str):   # older checkpoints: unknown
                model.training_fingerprint = ckpt["training_fingerprint"]
        except CheckpointError:
            raise
        except OptionError as e:
            raise CheckpointError(f"{path} holds a config this code refuses ({e}); "
                                  f"rerun `{rerun_command(SCRIPT, path)}`") from None
        except (TypeError, ValueError, RuntimeError) as e:   # a damaged config or state
            raise_config_mismatch(path, e)
        return model.to(map_location).eval(), ckpt


def noise_control_trials(train: Trials, seed: int) -> Trials:
    """The noise control's training trials (``--noise-control``): ``train`` with every fMRI row
    replaced by standard Gaussian noise ``N x V`` drawn from ``seed`` + 1000; images, labels and
    image ids kept. A model fitted on them has no fMRI information, so from the real test fMRI
    it must score at chance."""
    rng = np.random.default_rng(seed + 1000)
    return Trials(rng.standard_normal(train.fmri.shape).astype(np.float32), train.images,
                  train.labels, train.image_ids)


# the first title line of every figure of a noise control's models
NOISE_CONTROL_TITLE = "NOISE CONTROL (--noise-control): trained on Gaussian noise instead of fMRI\n"


def is_noise_control(ckpt: dict) -> bool:
    """Whether a dual-encoder checkpoint is a ``--noise-control`` run's."""
    return bool(ckpt.get("script_config", {}).get("noise_control", False))


def load_for_s1(path: Path, data: MiyawakiData, device: torch.device | str = "cpu"):
    """Reload the dual encoder for the S1 split of ``data``; returns (model, ckpt, fold).

    Refuses (CheckpointError naming this script) a checkpoint fitted on other data or z-scored
    with statistics other than the S1 training trials', so the fold's fMRI is what it was fed.
    A file without an S1 split is refused (DataError) before the checkpoint is read. For a noise
    control's checkpoint the fold's training fMRI is that control's noise
    (``noise_control_trials``), what the model was fitted on, so that whatever is fitted on the
    fold beside it (the evaluation's kNN and ridge, the decoders and their anchor) is the control
    too; the test trials keep their real fMRI."""
    fold = data.s1()
    model, ckpt = MiyawakiDualEncoder.from_checkpoint(path, map_location=device)
    check_same_data(ckpt, data, path, SCRIPT)
    for name in ("fmri_mean", "fmri_std"):
        saved, used = ckpt[name].cpu().numpy(), getattr(fold, name)
        if saved.shape != used.shape or not np.allclose(saved, used, rtol=1e-5, atol=1e-6):
            raise CheckpointError(f"{path} was z-scored with other statistics than the S1 training "
                                  f"trials; rerun `{rerun_command(SCRIPT, path)}`")
    if is_noise_control(ckpt):
        fold = replace(fold, train=noise_control_trials(fold.train, ckpt["seed"]))
    return model, ckpt, fold


def config_from_dict(d: dict) -> DualEncoderConfig:
    """Inverse of ``asdict`` (lists back to tuples), checked as a command line's (check_options);
    unknown keys are an error. A config without ``readout_model`` comes from a checkpoint of the
    releases whose read-out was ridge."""
    d = {"readout_model": "ridge", **d}
    names = {f.name for f in fields(DualEncoderConfig)}
    unknown = set(d) - names
    if unknown:
        raise CheckpointError(f"checkpoint config has unknown fields {sorted(unknown)}; "
                              f"rerun `python {SCRIPT}`")
    return check_options(DualEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in d.items()}))


def raise_config_mismatch(path: Path, err: Exception):
    """A state dict that does not fit the rebuilt model: say which script to rerun."""
    raise CheckpointError(f"{path} does not match this code's model ({one_line(err)}); "
                          f"rerun `{rerun_command(SCRIPT, path)}`") from None


# --------------------------------------------------------------------------- loss
def contrastive_loss(emb_fmri: torch.Tensor, emb_image: torch.Tensor, positives: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between R fMRI rows and J images.

    emb_fmri ``R x D`` and emb_image ``J x D`` unit vectors; positives ``R x J`` bool, True where
    fMRI row r was recorded while image j was shown. Repeats of an image are all positives, never
    negatives: each direction is a cross-entropy against the uniform distribution over positives."""
    logits = scale * emb_fmri @ emb_image.T
    pos = positives.float()
    return 0.5 * (F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, (pos / pos.sum(0, keepdim=True)).T))


def mixup(x: torch.Tensor, y: torch.Tensor, n_mix: int, alpha: float, generator: torch.Generator):
    """``n_mix`` mixed (fMRI ``N x V``, image ``N x 1 x 28 x 28``) pairs with Beta(alpha, alpha)
    weights. V1 responds almost linearly to contrast, so a mixed pair is a plausible trial."""
    a = torch.randint(len(x), (n_mix,), generator=generator).to(x.device)
    b = torch.randint(len(x), (n_mix,), generator=generator).to(x.device)
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample((n_mix,)).to(x.device)
    lx, ly = lam[:, None], lam[:, None, None, None]
    # b + lam * (a - b): a pair of one image mixes back to exactly that image (pair_loss relies on it)
    return x[b] + lx * (x[a] - x[b]), y[b] + ly * (y[a] - y[b])


def pair_batch(y: torch.Tensor, n_mixed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The image side of a training step for images ``N x 1 x 28 x 28`` whose last ``n_mixed``
    rows are mixup images -> (image columns ``C x 1 x 28 x 28``, positives ``N x C`` bool).

    The columns are the U distinct images of the first ``N - n_mixed`` rows (20 unique images in
    ~100 trials, which keeps the CNN's cost small) followed by the mixed rows' images as they are:
    a full-batch step then always gives the CNN the same number of images (a number that varied
    made oneDNN keep kernels for each shape: ~80 MiB more memory). A mixed image equal to a real
    one (a mix of two trials of one image) takes that image's id, so an image that fills two
    columns is never a negative; mixes of two different images are distinct (continuous weights)."""
    flat = y.flatten(1)
    n_real = len(y) - n_mixed
    uniq, real_ids = torch.unique(flat[:n_real], dim=0, return_inverse=True)
    mixed = flat[n_real:]
    same = (mixed[:, None] == uniq[None]).all(-1)                    # n_mixed x U
    mixed_ids = torch.where(same.any(1), same.int().argmax(1),
                            len(uniq) + torch.arange(n_mixed, device=y.device))
    col_ids = torch.cat([torch.arange(len(uniq), device=y.device), mixed_ids])
    pos = torch.cat([real_ids, mixed_ids])[:, None] == col_ids[None]  # N x (U + n_mixed)
    return torch.cat([uniq, mixed]).view(-1, *y.shape[1:]), pos


def pair_objective(out: dict, positives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE on the correlation embeddings plus InfoNCE on the encoder latents, from
    ``latents(x, image columns)`` and the positives of ``pair_batch`` (not checked for NaN)."""
    return (contrastive_loss(out["fmri"], out["image"], positives, scale)
            + contrastive_loss(out["fmri_latent"], out["image_latent"], positives, scale))


def chance_loss(y: torch.Tensor, n_mixed: int = 0) -> float:
    """``pair_loss`` at uniform scores for images ``N x 1 x 28 x 28`` (``pair_batch``'s rows R and
    image columns C): ln C + ln R, the level a loss curve starts from and is read against."""
    rows, columns = pair_batch(y, n_mixed)[1].shape
    return math.log(rows) + math.log(columns)


def pair_loss(model: MiyawakiDualEncoder, x: torch.Tensor, y: torch.Tensor,
              bf16: bool = False, n_mixed: int = 0) -> torch.Tensor:
    """Training objective for fMRI ``N x V`` paired with images ``N x 1 x 28 x 28`` (the last
    ``n_mixed`` rows mixup pairs; image columns and positives by ``pair_batch``): InfoNCE on the
    correlation embeddings plus InfoNCE on the encoder latents. With ``bf16`` the networks run
    under bfloat16 autocast where the device has it natively (``bf16_autocast``); the
    similarities and losses stay float32. A NaN / Inf raises."""
    images, pos = pair_batch(y, n_mixed)
    with bf16_autocast(x.device, bf16):
        out = model.latents(x, images)
    return check_finite(pair_objective(out, pos, model.clamped_scale()), "contrastive")


# --------------------------------------------------------------------------- training
def identify(model: MiyawakiDualEncoder, fmri: torch.Tensor, candidates: torch.Tensor,
             true_ids: np.ndarray) -> np.ndarray:
    """Rank of the true image (1 = best) among ``K`` candidates for each fMRI trial ``N x V``,
    by ``model.score_candidates`` (fMRI only)."""
    return identification_ranks(model.score_candidates(fmri, candidates), true_ids)


def score_part_summary(model: MiyawakiDualEncoder, fmri: torch.Tensor, candidates: torch.Tensor,
                       true_ids: np.ndarray) -> dict:
    """Each part of the identification score alone (``score_parts``) for fMRI ``N x V`` against
    candidates ``K x 1 x 28 x 28`` -> {part: {"top1": its own top-1, "weight": its weight in the
    score}}: what the networks and each linear part identify on their own (``score_parts_text``)."""
    parts = model.score_parts(fmri, candidates)
    weights = score_weights(model.config.readout_weight, model.config.encoding_weight)
    return {name: {"top1": topk_accuracy(identification_ranks(parts[name], true_ids), 1), "weight": w}
            for name, w in zip(SCORE_PARTS, weights)}


def unseen_candidates(trials: Trials, candidates: np.ndarray | None) -> np.ndarray | None:
    """The candidate images ``K x 1 x 28 x 28`` that no trial of ``trials`` shows (a never-seen
    test image), which the read-out's image prior must not hold; None without candidates."""
    if candidates is None:
        return None
    flat, shown = candidates.reshape(len(candidates), -1), trials.images.reshape(len(trials), -1)
    return candidates[~np.array([(shown == c).all(1).any() for c in flat], dtype=bool)]


def fit_linear_parts(model: MiyawakiDualEncoder, trials: Trials,
                     candidates: np.ndarray | None = None) -> dict:
    """Fit the model's pixel read-out and encoding model on ``trials`` (closed form, in place;
    what the networks are fitted on); the read-out's image prior never holds a candidate image
    ``K x 1 x 28 x 28`` that no trial showed (``unseen_candidates``) -> {"readout_alpha" (None
    for the receptive-field read-out), "encoding_voxels", "n_excluded_images"} for the history."""
    cfg = model.config
    unseen = unseen_candidates(trials, candidates)
    return {"readout_alpha": model.readout.fit(trials.fmri, trials.images, cfg.readout_model, unseen),
            "encoding_voxels": model.encoding.fit(trials.fmri, trials.images, trials.image_ids,
                                                  cfg.encoding_alpha, cfg.encoding_voxels),
            "n_excluded_images": 0 if unseen is None else len(unseen)}


def fit_arguments(train: Trials | Fold, candidates: np.ndarray | None
                  ) -> tuple[Trials, np.ndarray | None]:
    """(training trials, candidates) of a fit's ``train`` and ``candidates``: a ``Fold`` gives its
    training trials and its candidate images (so that the read-out's image prior never holds its
    never-seen test images), Trials come with the candidates given (None: the training images)."""
    if not isinstance(train, Fold):
        return train, candidates
    if candidates is not None:
        raise ValueError("candidates= with a Fold: the fold's own candidates (unique_images) are used; "
                         "pass its training trials (fold.train) to give others")
    return train.train, train.unique_images


def split_validation(trials: Trials, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set from training trials: one trial of each of ``round(fraction * N)``
    images that have at least 3 trials (so every validation image keeps at least 2 training
    trials) -> (training positions, validation positions)."""
    rng = np.random.default_rng(seed)
    n_val = int(round(fraction * len(trials)))
    ids, counts = np.unique(trials.image_ids, return_counts=True)
    eligible = rng.permutation(ids[counts >= 3])[:n_val]
    val = np.array([rng.choice(np.where(trials.image_ids == k)[0]) for k in eligible], dtype=int)
    return np.setdiff1d(np.arange(len(trials)), val), val


def optimizer(params, config: DualEncoderConfig, total_steps: int):
    """AdamW and its one-cycle cosine schedule over ``total_steps`` -> (optimiser, scheduler)."""
    # foreach: the multi-tensor update CUDA uses by default; on the CPU it gives the per-tensor
    # loop's numbers bit for bit, faster
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    # one-cycle cosine schedule (warm-up, then anneal; AdamW's beta1 cycles inversely). Chosen over
    # plain warm-up + cosine by the inner CV of benchmarks/tune_dual_encoder.py (unseen 0.60 vs 0.54).
    return opt, one_cycle(opt, config.lr, total_steps)


def augment(xb: torch.Tensor, yb: torch.Tensor, config: DualEncoderConfig, gen: torch.Generator):
    """One step's training pairs: Gaussian noise on the fMRI ``B x V`` (``fmri_noise``), then
    ``mixup`` mixed pairs appended -> (fMRI ``(B + mixup) x V``, images ``(B + mixup) x 1 x 28 x
    28``). Noise and pairs come from ``gen``; mixup's Beta weights from torch's global stream."""
    if config.fmri_noise > 0:
        xb = xb + config.fmri_noise * torch.randn(xb.shape, generator=gen).to(xb.device)
    if config.mixup:
        xm, ym = mixup(xb, yb, config.mixup, config.mixup_alpha, gen)
        xb, yb = torch.cat([xb, xm]), torch.cat([yb, ym])
    return xb, yb


def train_dual_encoder(train: Trials | Fold, config: DualEncoderConfig,
                       device: torch.device | str = "cpu", candidates: np.ndarray | None = None,
                       progress: bool = True):
    """Fit a dual encoder on training trials (fMRI already z-scored), or on a fold's (``Fold``:
    its training trials and candidates, ``fit_arguments``).

    candidates ``K x 1 x 28 x 28``: the images validation identification ranks against (default:
    the training images); those no training trial shows are kept out of the read-out's image
    prior (``fit_linear_parts``; with Trials alone nothing is, so pass a fold's candidates or the
    fold itself when its test images are never seen in training). Returns (model in eval mode,
    history): per-epoch lists ``train_loss``, ``val_loss``, ``val_top1``, the trial counts
    ``n_train`` (fitted on), ``n_validation`` and ``n_validation_asked`` (``val_fraction``'s
    share), each loss's value at uniform scores (``train_chance_loss``, ``val_chance_loss``: the
    training batches' rows and columns include mixup's, so the two losses are read against their
    own chance, not against each other), and ``fit_linear_parts``' entries. The model's
    ``training_fingerprint`` is ``train.fingerprint``. A setting out of its option's range
    (``check_options``) is an OptionError before any work, as on the command line."""
    check_options(config)
    train, candidates = fit_arguments(train, candidates)
    device = torch.device(device)
    seed_everything(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    tr_idx, val_idx = (split_validation(train, config.val_fraction, config.seed)
                       if config.val_fraction > 0 else (np.arange(len(train)), np.array([], int)))
    asked = round(config.val_fraction * len(train))
    if progress and len(val_idx) < asked:
        tqdm.write(f"validation: {len(val_idx)} trials held out, not the {asked} that --val-fraction "
                   f"{config.val_fraction:g} asks for (at most one of each image shown 3 times or more)")
    to = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    x, y = to(train.fmri[tr_idx]), to(train.images[tr_idx])
    xv, yv, val_ids = to(train.fmri[val_idx]), to(train.images[val_idx]), train.image_ids[val_idx]
    ranked = candidates
    if candidates is None:      # the training images at their ids (blank where an id has no trial)
        _, first = np.unique(train.image_ids, return_index=True)
        ranked = np.zeros((train.image_ids.max() + 1, *train.images.shape[1:]), np.float32)
        ranked[train.image_ids[first]] = train.images[first]
    cand = to(ranked)

    model = MiyawakiDualEncoder(train.fmri.shape[1], config=config)
    # closed form, once; the blanks of ids without a trial are no images, so nothing to exclude
    linear = fit_linear_parts(model, train.subset(tr_idx), candidates)
    model = model.to(device)
    bs = config.batch_size or len(x)
    steps_per_epoch = math.ceil(len(x) / bs)
    opt, sched = optimizer(model.parameters(), config, config.epochs * steps_per_epoch)
    history = {"train_loss": [], "val_loss": [], "val_top1": [], "n_train": len(tr_idx),
               "n_validation": len(val_idx), "n_validation_asked": asked, **linear,
               **({"val_chance_loss": chance_loss(yv)} if len(val_idx) else {})}
    # disable=None: the bar switches itself off when stderr is not a terminal
    bar = tqdm(range(1, config.epochs + 1), desc="dual encoder", disable=None if progress else True,
               leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=gen).to(device)
        losses = []
        for s in range(steps_per_epoch):
            b = order[s * bs:(s + 1) * bs]
            xb, yb = augment(x[b], y[b], config, gen)
            loss = pair_loss(model, xb, yb, config.bf16, config.mixup)
            if "train_chance_loss" not in history:                    # the first step's batch
                history["train_chance_loss"] = chance_loss(yb, config.mixup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history["train_loss"].append(float(np.mean(losses)))
        if len(val_idx):
            with evaluating(model):
                history["val_loss"].append(pair_loss(model, xv, yv).item())
            history["val_top1"].append(float((identify(model, xv, cand, val_ids) == 1).mean()))
        if progress and (epoch % config.log_every == 0 or epoch == config.epochs):
            msg = f"epoch {epoch} | loss {history['train_loss'][-1]:.3f}"
            if len(val_idx):
                msg += (f" | val loss {history['val_loss'][-1]:.3f} | val id@1 "
                        f"{history['val_top1'][-1]:.2f} (chance {chance_text(1 / len(cand))})")
            tqdm.write(msg)
    model.training_fingerprint = train.fingerprint
    return model.eval(), history


def train_dual_encoders(train: Trials | Fold, configs: list[DualEncoderConfig],
                        device: torch.device | str = "cpu", candidates: np.ndarray | None = None
                        ) -> tuple[list[MiyawakiDualEncoder], list[dict]]:
    """Several fits on the same trials as one batched model, one per config (configs that differ
    in ``seed`` only; full batch, no validation split): the models' parameters are stacked
    (``torch.func.stack_module_state``) and every step runs all of them at once under ``vmap``,
    what keeps a GPU busy with models this small.

    Each fit draws the initial weights, epoch order, fMRI noise and mixup pairs that
    ``train_dual_encoder`` draws for its seed, in the same order, so with ``dropout`` 0 the fits
    equal separate ``train_dual_encoder`` fits within float rounding (tests/test_dual_encoder.py).
    Dropout masks come from vmap (``randomness="different"``), while a separate fit draws them from
    its seed's stream, between the draws above: with dropout > 0 the noise and mixup draws differ
    from the second epoch on, and the fits are separate fits in distribution, not number for
    number. ``train`` and ``candidates``: as in ``train_dual_encoder``. Returns (models in eval
    mode, histories with ``train_loss`` per epoch, ``n_train``, ``n_validation``)."""
    from torch.func import functional_call, stack_module_state, vmap
    base = check_options(configs[0])
    train, candidates = fit_arguments(train, candidates)
    if any(replace(c, seed=base.seed) != base for c in configs):
        raise ValueError("batched fits need configs that differ in seed only")
    if base.batch_size or base.val_fraction:
        raise ValueError("batched fits are full batch without a validation split "
                         "(batch_size=0, val_fraction=0)")
    device = torch.device(device)
    x, y = torch.as_tensor(train.fmri, device=device), torch.as_tensor(train.images, device=device)
    models, gens, states = [], [], []
    for c in configs:                       # what train_dual_encoder does before its first step
        seed_everything(c.seed)
        gens.append(torch.Generator().manual_seed(c.seed))
        models.append(MiyawakiDualEncoder(train.fmri.shape[1], config=c).to(device))
        states.append(torch.get_rng_state())
    params, buffers = stack_module_state(models)
    template = MiyawakiDualEncoder(train.fmri.shape[1], config=base).to("meta")
    opt, sched = optimizer(list(params.values()), base, base.epochs)

    def one_loss(p, b, xb, images, pos):
        with bf16_autocast(device, base.bf16):
            out = functional_call(template, (p, b), (xb, images))
        scale = p["logit_scale"].clamp(max=MAX_LOGIT_SCALE).exp()
        return pair_objective(out, pos, scale)

    batched_loss = vmap(one_loss, randomness="different")
    histories = [{"train_loss": [], "val_loss": [], "val_top1": [], "n_train": len(x),
                  "n_validation": 0} for _ in configs]
    for _ in range(base.epochs):
        xs, cols, poss = [], [], []
        for i, gen in enumerate(gens):      # each fit's draws, from its own generators
            order = torch.randperm(len(x), generator=gen).to(device)
            torch.set_rng_state(states[i])              # this fit's global stream (mixup's Beta)
            xb, yb = augment(x[order], y[order], base, gen)
            states[i] = torch.get_rng_state()
            images, pos = pair_batch(yb, base.mixup)
            xs.append(xb), cols.append(images), poss.append(pos)
        losses = batched_loss(params, buffers, torch.stack(xs), torch.stack(cols), torch.stack(poss))
        check_finite(losses.sum(), "contrastive")
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        sched.step()
        for h, v in zip(histories, losses.tolist()):
            h["train_loss"].append(v)
    linear = fit_linear_parts(models[0], train, candidates)   # the same for every seed: fitted once
    parts = {name: {k: v.clone() for k, v in getattr(models[0], name).state_dict().items()}
             for name in ("readout", "encoding")}
    with torch.no_grad():
        for i, model in enumerate(models):
            model.load_state_dict({k: v[i] for k, v in {**params, **buffers}.items()})
            for name, state in parts.items():
                getattr(model, name).load_state_dict(state)
    for h, model in zip(histories, models):
        h.update(linear)
        model.training_fingerprint = train.fingerprint
    return [m.eval() for m in models], histories


# --------------------------------------------------------------------------- selection
# The declared grid of the identification score's settings (nested selection and the tuning
# script): every combination whose two linear weights sum to at most MAX_LINEAR_WEIGHT, so that
# the embeddings keep at least a tenth of the score (a read-out weight of 0.9 is the seen inner
# CV's best: the embeddings break the read-out's near ties between letters of one font), with
# either pixel read-out (the receptive-field one reads out new images; ridge was 0.005 better on
# the S1 training trials' seen inner CV); a weight of 0 takes the first read-out only, as the
# read-out is then unused, and an encoding weight of 0 the first alpha (27 settings).
SCORE_GRID = {"readout_weight": (0.0, 0.25, 0.5, 0.75, 0.9),
              "encoding_weight": (0.0, 0.25, 0.5, 0.75), "encoding_alpha": (30.0, 100.0),
              "readout_model": READOUT_MODELS}
MAX_LINEAR_WEIGHT = 0.9


def score_settings(grid: dict = SCORE_GRID) -> list[dict]:
    """The grid's settings as dicts of DualEncoderConfig fields, in grid order (the last key
    varies fastest)."""
    combos = (dict(zip(grid, values)) for values in itertools.product(*grid.values()))
    first_readout = grid.get("readout_model", (None,))[0]
    first_alpha = grid.get("encoding_alpha", (None,))[0]
    return [c for c in combos
            if c.get("readout_weight", 0) + c.get("encoding_weight", 0) <= MAX_LINEAR_WEIGHT + 1e-9
            and (c.get("readout_weight") != 0 or c.get("readout_model", first_readout) == first_readout)
            and (c.get("encoding_weight") != 0 or c.get("encoding_alpha", first_alpha) == first_alpha)]


def setting_name(setting: dict) -> str:
    """``{"readout_weight": 0.25, ..., "readout_model": "ridge"}`` ->
    ``"readout_weight=0.25,...,readout_model=ridge"`` (JSON keys, log lines)."""
    return ",".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:g}" for k, v in setting.items())


def with_setting(model: MiyawakiDualEncoder, trials: Trials, setting: dict,
                 candidates: np.ndarray | None = None) -> MiyawakiDualEncoder:
    """A copy of ``model`` whose config takes ``setting`` (score fields; the networks are copied,
    not retrained); a linear part whose own fields the setting changes (the read-out's model, the
    encoding model's alpha or voxels) is refitted on ``trials``, the trials the model was fitted
    on (``candidates``: as in ``fit_linear_parts``); the other part is copied as it is."""
    out = copy.deepcopy(model)
    cfg = out.config = replace(model.config, **setting)
    if cfg.readout_model != model.config.readout_model:
        out.readout.fit(trials.fmri, trials.images, cfg.readout_model,
                        unseen_candidates(trials, candidates))
    if ((cfg.encoding_alpha, cfg.encoding_voxels)
            != (model.config.encoding_alpha, model.config.encoding_voxels)):
        out.encoding.fit(trials.fmri, trials.images, trials.image_ids, cfg.encoding_alpha,
                         cfg.encoding_voxels)
    return out


def inner_folds(ids: np.ndarray, scheme: str, n_folds: int = 5,
                repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner folds over training trials with image ids ``ids`` ``N`` -> [(train, validation)]
    positions: ``seen`` = stratified by image id (every validation image also in the inner
    training set, like S1/S2), ``unseen`` = grouped by image id (validation images absent from
    it, like S3). ``repeats`` > 1: repeated CV, ``repeats x n_folds`` folds, every trial
    validated once per repeat (repeat r: the shuffle with random_state r; ``unseen`` repeat 0
    is unshuffled)."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold  # ~60 MiB, only here
    if scheme not in ("seen", "unseen"):
        raise ValueError(f"unknown inner scheme {scheme!r}; use seen or unseen")
    if repeats < 1:
        raise ValueError(f"repeats {repeats}; use 1 or more")
    x, k, folds = np.zeros(len(ids)), min(n_folds, len(np.unique(ids))), []
    for r in range(repeats):
        if scheme == "seen":
            split = StratifiedKFold(n_folds, shuffle=True, random_state=r).split(x, ids)
        else:
            split = (GroupKFold(k) if r == 0 else GroupKFold(k, shuffle=True, random_state=r)
                     ).split(x, ids, groups=ids)
        with warnings.catch_warnings():     # seen: an image with fewer trials than folds is expected
            warnings.simplefilter("ignore", UserWarning)
            folds += split
    return folds


def inner_cv_scores(data: MiyawakiData, train_idx: np.ndarray, config: DualEncoderConfig, scheme: str,
                    settings: list[dict], device: torch.device | str = "cpu", repeats: int = 1,
                    seeds: tuple[int, ...] | None = None) -> dict:
    """Inner-CV identification of each score setting: one dual encoder per inner fold of the
    trials ``train_idx`` of ``data`` (each inner fold z-scored by its own training trials; nothing
    outside ``train_idx`` is read), its validation trials ranked among all candidates with each
    setting (the networks are shared; only the linear parts are refitted) -> {"top1" | "mrr":
    {setting_name: mean over inner folds}} (mrr: mean reciprocal rank of the true image);
    ``repeats``: repeated inner CV (``inner_folds``), one fit per fold of every repeat; ``seeds``:
    one fit per seed in every inner fold, scored as one model (``ensemble_parts``; None: the
    config's seed alone)."""
    ranks: dict[str, list] = {setting_name(c): [] for c in settings}
    ids = data.trials.image_ids[train_idx]
    for tr, va in inner_folds(ids, scheme, repeats=repeats):
        fold = data.fold(train_idx[tr], train_idx[va])
        models = [train_dual_encoder(fold.train, replace(config, val_fraction=0.0, seed=seed), device,
                                     fold.unique_images, progress=False)[0]
                  for seed in (seeds or (config.seed,))]
        x, cand = (torch.as_tensor(a, device=device) for a in (fold.test.fmri, fold.unique_images))
        parts = {}
        for c in settings:
            linear = {k: v for k, v in c.items() if k not in SCORE_WEIGHTS}   # need a refit
            key = tuple(sorted(linear.items()))
            if key not in parts:                        # one refit per linear parts' setting
                parts[key] = ensemble_parts([with_setting(models[0], fold.train, linear,
                                                          fold.unique_images), *models[1:]], x, cand)
            weights = {k: c.get(k, getattr(config, k)) for k in SCORE_WEIGHTS}
            ranks[setting_name(c)].append(identification_ranks(fused_scores(parts[key], **weights),
                                                               fold.test.image_ids))
    return {"top1": {name: float(np.mean([topk_accuracy(r, 1) for r in rs])) for name, rs in ranks.items()},
            "mrr": {name: float(np.mean([(1 / r).mean() for r in rs])) for name, rs in ranks.items()}}


def select_setting(inner: dict, settings: list[dict]) -> dict:
    """The setting with the best inner-CV score (``inner_cv_scores``' "top1" for nested
    selection); a tie goes to the first in grid order (``score_settings``: the lower read-out
    weight first, then the lower encoding weight, alpha, and the receptive-field read-out before
    ridge)."""
    best = max(inner.values())
    return next(c for c in settings if inner[setting_name(c)] >= best - 1e-12)


# --------------------------------------------------------------------------- figures
def plot_training_curves(history: dict, chance: float, noise_control: bool = False) -> Figure:
    """Training loss per epoch and, when trials were held out (``val_fraction`` > 0), validation
    loss and identification (among the candidates, ``chance`` = 1 / K); the titles say what the
    validation set is, and whether the model is the noise control (``--noise-control``)."""
    validation = bool(history["val_loss"])
    fig = Figure(figsize=(10, 4.6) if validation else (5.5, 4.6))
    axes = fig.subplots(1, 2 if validation else 1, squeeze=False)[0]
    ep = np.arange(1, len(history["train_loss"]) + 1)
    marker = "o" if len(ep) < 5 else None                  # a line of one epoch would not show
    for ax in axes:                                        # whole epochs, however few
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, len(ep) + 0.5)
    line, = axes[0].plot(ep, history["train_loss"], marker=marker, label="train (with mixup + noise)")
    axes[0].set(xlabel="epoch", ylabel="InfoNCE loss (two terms)",
                title="Contrastive loss (dashed: " + ("each" if validation else "its value")
                      + " at uniform scores)")
    curves = [("train", line, "train_chance_loss")]
    if validation:
        line, = axes[0].plot(ep, history["val_loss"], marker=marker, label="validation (no mixup, no noise)")
        curves.append(("validation", line, "val_chance_loss"))
    for name, line, key in curves:    # different batch sizes: each loss against its own chance
        if key in history:
            axes[0].axhline(history[key], color=line.get_color(), ls="--", lw=0.8,
                            label=f"{name} at chance ({history[key]:.2f})")
    if validation:
        axes[1].plot(ep, history["val_top1"], marker=marker, label="validation top-1")
        axes[1].axhline(chance, color="gray", ls="--", label=f"chance {chance_text(chance)}")
        axes[1].set(xlabel="epoch", ylabel="top-1", ylim=(0, 1.02),
                    title=f"Validation top-1, {round(1 / chance)}-way, from fMRI only, by the model's\n"
                          f"score (embeddings + linear parts fitted before epoch 1)")
        axes[1].title.set_fontsize(9)
        axes[1].legend(fontsize=8)
    title = (f"Validation: {history.get('n_validation', '?')} training trials held out, one each "
             f"of images shown at least 3 times (so seen in training); never test trials"
             if validation else f"Fitted on all {history.get('n_train', '?')} training trials, none "
             + (f"held out\n(--val-fraction asked for {history['n_validation_asked']}: no image is "
                "shown the 3 times validation needs)" if history.get("n_validation_asked") else
                "held out\n(--val-fraction holds some out for validation curves)"))
    if noise_control:
        title = NOISE_CONTROL_TITLE + title
    fig.suptitle(title, fontsize=9, color="firebrick" if noise_control else "black")
    fig.subplots_adjust(top=0.78 if noise_control else 0.83, bottom=0.3)
    axes[0].legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.17))  # off the curves
    return fig


# --------------------------------------------------------------------------- script
@dataclass
class ScriptConfig(DualEncoderConfig, ScriptOptions):
    """Settings of this script: the model and training fields plus the common options."""

    noise_control: bool = field(default=False, metadata={
        "help": "replace every fMRI row by Gaussian noise (leak check: must score chance)"})


def main(argv: list[str] | ScriptConfig | None = None) -> dict:
    """Train on the S1 training trials, report S1 identification from fMRI only, save the
    checkpoint, curves and metrics; returns the metrics."""
    cfg = check_options(argv) if isinstance(argv, ScriptConfig) else parse_args(argv)
    try:
        score_weights(cfg.readout_weight, cfg.encoding_weight, ("--readout-weight", "--encoding-weight"))
    except ValueError as e:
        raise OptionError(str(e)) from None
    if cfg.batch_size == 1 and not cfg.mixup:
        raise OptionError("--batch-size 1 with --mixup 0 gives every step one (fMRI, image) pair, "
                          "whose InfoNCE loss is 0 (no negatives): nothing would be learned")
    device = resolve_device(cfg.device)
    check_out_dir(cfg.out_dir)
    data = resolve_data(cfg.data)
    fold: Fold = data.s1()
    out = prepare_out_dir(cfg.out_dir)
    train = fold.train
    if cfg.noise_control:  # every fMRI row replaced by Gaussian noise: identification must be chance
        train = noise_control_trials(train, cfg.seed)
    model_cfg = DualEncoderConfig(**{f.name: getattr(cfg, f.name) for f in fields(DualEncoderConfig)})
    t0 = time.perf_counter()
    model, history = train_dual_encoder(train, model_cfg, device, fold.unique_images)
    seconds = time.perf_counter() - t0
    test_x = torch.as_tensor(fold.test.fmri, device=device)
    candidates = torch.as_tensor(fold.unique_images, device=device)
    ranks = identify(model, test_x, candidates, fold.test.image_ids)
    k = len(fold.unique_images)
    metrics = {"split": "s1", "seed": cfg.seed, "n_train": history["n_train"],
               "n_validation": history["n_validation"], "n_test": len(ranks),
               **rank_summary(ranks, k),
               "score_parts": score_part_summary(model, test_x, candidates, fold.test.image_ids),
               "noise_control": cfg.noise_control,
               "train_seconds": seconds, "bf16_autocast": uses_bf16(device, cfg.bf16)}
    print(f"S1 identification from fMRI only: top-1 {metrics['top1']:.2f} "
          f"(chance {chance_text(1 / k)}), "
          f"top-5 {metrics['top5']:.2f}, mean rank {metrics['mean_rank']:.1f} of {k}"
          f"{' [NOISE CONTROL]' if cfg.noise_control else ''} | {seconds:.1f} s on {device}"
          f"{', bfloat16' if metrics['bf16_autocast'] else ', float32'}")
    print(f"  top-1 of each part of the score alone: {score_parts_text(metrics['score_parts'])}")
    config = config_dict(cfg)
    state = model.state_dict()
    checkpoint = {"kind": "dual_encoder", "format_version": CHECKPOINT_FORMAT,
                  "state": state, "model_state_dict": state,  # the seed's key, same tensors
                  "config": asdict(model_cfg),
                  "script_config": config, "seed": cfg.seed,
                  "fmri_mean": torch.as_tensor(fold.fmri_mean),
                  "fmri_std": torch.as_tensor(fold.fmri_std), "n_voxels": data.n_voxels,
                  "data_source": data.source, "data_fingerprint": data.fingerprint,
                  "training_fingerprint": model.training_fingerprint,
                  "history": history, "metrics": metrics}
    figure = "miyawaki_training_curves.png"
    with staged_outputs():      # written together: a run stopped here leaves the earlier outputs
        checkpoint_sha256 = save_checkpoint(checkpoint, out / CHECKPOINT_NAME)
        save_figure(plot_training_curves(history, 1 / k, cfg.noise_control), out / figure, data.source)
        # the result file's top level reads like the evaluation's and the decoders'
        save_json({**metrics, "data_source": data.source, "data_fingerprint": data.fingerprint,
                   "checkpoint_sha256": checkpoint_sha256,
                   "n_candidates": k, "chance": chance_levels(k), "figures": [figure], "config": config},
                  out / "miyawaki_dual_encoder.json")
    write_summary(out)
    print(f"saved {out / CHECKPOINT_NAME}, {out / figure}")
    return metrics


def parse_args(argv=None) -> ScriptConfig:
    """Command line (None: sys.argv) -> ScriptConfig; one option per field."""
    return parse_config(add_config_args(script_parser(__doc__), ScriptConfig), ScriptConfig, argv)


if __name__ == "__main__":
    run_cli(main)
