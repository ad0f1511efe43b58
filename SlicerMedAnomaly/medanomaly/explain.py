"""`medanomaly explain`: a latent direction that separates two groups of slices, and counterfactuals along it
(METHODS.md section 3).

Slices of a volume are inverted into the StyleGAN2 generator's latent space (encoder start, then Adam). Given two
labels per slice (the detector's flagged vs unflagged slices, or the user's label volume), a logistic regression in
W (the mean of the W+ rows) gives a direction alpha; its cross-validated AUC says how well the latent separates the
groups. G(w+ + lambda * alpha) for chosen slices (every row of the slice's fitted W+ moved along alpha, so lambda = 0
is its reconstruction) shows how a slice would have to change to move between the groups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from .calibration import Calibration
from .ensemble import load_scorer
from .errors import InputError
from .metrics import roc_auc
from .orientation import Reorientation
from .outputs import CaseStaging
from .preprocess import prepare_slices
from .volumes import read_volume

log = logging.getLogger(__name__)
DEFAULT_LAMBDAS = (-3.0, -1.5, 0.0, 1.5, 3.0)


@dataclass
class Direction:
    alpha: np.ndarray  # unit vector in W
    scale: float  # standard deviation of the latents along alpha (lambda is in these units)
    cv_auc: float
    folds: int
    intercept: float
    weights: np.ndarray  # logistic-regression weights on standardised latents


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 0.1, iterations: int = 200) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by L-BFGS (torch): weights and intercept. The penalty is strong because
    one volume gives about as many slices as W has dimensions."""
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach().numpy(), float(b.detach())


def latent_direction(latents: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> Direction:
    """Fit the separating direction on all slices and its AUC by stratified k-fold cross-validation."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if min(n_pos, n_neg) < 2:
        raise InputError(f"explain needs at least 2 slices in each group (have {n_pos} flagged, {n_neg} not); "
                         "pass --labels with a label volume, or a volume with more findings")
    mean, std = latents.mean(0), latents.std(0) + 1e-8
    z = (latents - mean) / std
    folds = int(min(folds, n_pos, n_neg))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), int)
    for group in (labels, ~labels):  # stratified
        idx = rng.permutation(np.nonzero(group)[0])
        fold_of[idx] = np.arange(idx.size) % folds
    scores = np.empty(len(labels))
    for f in range(folds):
        test = fold_of == f
        w, b = fit_logistic(z[~test], labels[~test])
        scores[test] = z[test] @ w + b
    w, b = fit_logistic(z, labels)
    alpha = w / std  # the same logit change, in W units
    alpha = alpha / (np.linalg.norm(alpha) + 1e-12)
    scale = float(np.std(latents @ alpha))
    return Direction(alpha=alpha, scale=scale, cv_auc=roc_auc(scores, labels), folds=folds, intercept=b, weights=w)


def explain(input_path: str | Path, output: str | Path, *, model: str | None = None, labels: str | Path | None = None,
            slices: list[int] | None = None, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS, steps: int | None = None,
            device: str = "cpu", batch_size: int = 16) -> dict:
    """Invert the slices of a volume, fit the direction, render counterfactuals into OUT (see module doc).

    labels: a label volume on the input grid; axial slices holding any label are group 1. Default: the detector's
    flagged slices (slice score above the 99th percentile of normal slices in the model's calibration).
    slices: canonical slice indices to render (default: the three most flagged).
    """
    detector = load_scorer(model)
    if getattr(detector, "method", "") != "stylegan2":
        raise InputError(f"explain needs a stylegan2 model (got {getattr(detector, 'method', 'an ensemble')}); "
                         "pass --model with a stylegan2 bundle")
    torch_device = torch.device(device)
    detector.to(torch_device).eval()
    volume = read_volume(input_path)
    r = Reorientation.for_image(volume.image)
    prepared = prepare_slices(r.to_canonical(volume.hu), r.canonical_spacing, detector.spec)
    image = prepared.windowed(detector.spec)
    has_body = prepared.region.reshape(len(image), -1).mean(1) > 0.02
    z_indices = np.nonzero(has_body)[0]
    if z_indices.size < 4:
        raise InputError(f"{input_path}: fewer than 4 slices with body; explain needs a CT volume")
    latents, slice_scores = [], []
    for start in range(0, z_indices.size, batch_size):
        idx = z_indices[start:start + batch_size]
        x = image[idx, None].to(torch_device)
        ws, recon = detector.invert(x, steps)
        region = torch.from_numpy(prepared.region[idx, None]).to(torch_device)
        latents.append(ws.cpu().numpy())  # W+ per slice; the regression runs on W (the mean of its rows)
        slice_scores.append(detector.slice_score(detector.patch_scores(x, recon), region).cpu().numpy())
        log.info("inverted %d/%d slices", min(start + batch_size, z_indices.size), z_indices.size)
    latents_plus, slice_scores = np.concatenate(latents), np.concatenate(slice_scores)
    latents = latents_plus.mean(1)
    if labels is not None:
        label_image = sitk.ReadImage(str(labels))
        if label_image.GetSize() != volume.image.GetSize():
            raise InputError(f"{labels}: label volume size {label_image.GetSize()} differs from the CT's "
                             f"{volume.image.GetSize()}; export the labels on the CT's grid")
        label_c = r.to_canonical(sitk.GetArrayViewFromImage(label_image) > 0)
        groups = label_c.reshape(label_c.shape[0], -1).any(1)[z_indices]
        source = f"label volume {Path(labels).name}"
    else:
        cal = Calibration.from_card(detector.card["calibration"])
        if cal.slice_quantiles is None:
            raise InputError("this model's calibration has no slice scores; pass --labels")
        p = -np.expm1(cal.slice_log_exceedance(slice_scores))
        groups = p >= 0.99
        source = "detector: slice score above the 99th percentile of normal slices"
    direction = latent_direction(latents, groups)
    if slices is None:
        order = np.argsort(-slice_scores)
        chosen = [int(z_indices[i]) for i in order[:3]]
    else:
        bad = [s for s in slices if s not in set(z_indices.tolist())]
        if bad:
            raise InputError(f"--slices {bad}: not slices with body (valid: {z_indices.min()}..{z_indices.max()})")
        chosen = list(slices)
    alpha = torch.as_tensor(direction.alpha, dtype=torch.float32, device=torch_device)
    strips = {}
    g = detector.generator
    with torch.no_grad():
        for zi in chosen:
            # every row of the slice's own W+ moves along alpha, so lambda = 0 is its reconstruction
            w_plus = torch.as_tensor(latents_plus[int(np.nonzero(z_indices == zi)[0][0])], device=torch_device)
            lam = torch.tensor(lambdas, device=torch_device, dtype=torch.float32)[:, None, None]
            ws = w_plus[None] + lam * direction.scale * alpha[None, None]
            frames = ((g(ws) + 1) / 2).clamp(0, 1)[:, 0]
            strips[zi] = frames.cpu().numpy()
    summary = {"input": str(input_path), "model": {k: detector.card[k] for k in ("name", "version", "method")},
               "labels": source, "slices_flagged": int(groups.sum()), "slices_unflagged": int((~groups).sum()),
               "cv_auc": direction.cv_auc, "folds": direction.folds, "lambdas": list(lambdas),
               "lambda_unit": direction.scale, "rendered_slices": chosen,
               "note": "slice indices are canonical axial (inferior to superior); counterfactual volumes page "
                       "through lambda along their third axis"}
    _write_outputs(Path(output), summary, direction, strips, lambdas, detector.spec.spacing_mm)
    return summary


def _write_outputs(output: Path, summary: dict, direction: Direction, strips: dict, lambdas, spacing_mm: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with CaseStaging(output.parent, output.name) as case:
        staging = case.path
        (staging / "explain.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        save_file({"alpha": torch.as_tensor(direction.alpha, dtype=torch.float32)}, str(staging / "direction.safetensors"),
                  metadata={"cv_auc": f"{direction.cv_auc:.4f}", "lambda_unit": f"{direction.scale:.6f}"})
        rows = len(strips)
        fig, axes = plt.subplots(rows, len(lambdas), figsize=(2.2 * len(lambdas), 2.3 * rows), squeeze=False)
        for r_i, (zi, frames) in enumerate(strips.items()):
            for c_i, lam in enumerate(lambdas):
                ax = axes[r_i, c_i]
                ax.imshow(frames[c_i], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r_i == 0:
                    ax.set_title(f"lambda {lam:+.1f}")
                if c_i == 0:
                    ax.set_ylabel(f"slice {zi}")
            volume = sitk.GetImageFromArray(frames.astype(np.float32))  # [lambda, y, x]
            volume.SetSpacing((spacing_mm, spacing_mm, 1.0))
            sitk.WriteImage(volume, str(staging / f"counterfactual_slice{zi:03d}.nrrd"), useCompression=True)
        fig.suptitle(f"G(W+ + lambda * alpha) of each slice's inversion, CV AUC {direction.cv_auc:.2f}")
        fig.tight_layout()
        fig.savefig(staging / "counterfactuals.png")
        plt.close(fig)
        case.commit()
