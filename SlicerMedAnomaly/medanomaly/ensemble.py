"""Ensembles of model bundles: `--model ensemble:NAME1,NAME2,...` (mean) or `ensemble-max:NAME1,NAME2,...`.

Each member scores the volume on its own grid and calibrates its own map; the ensemble combines the members'
calibrated voxel probabilities and volume scores by their mean or their maximum.

Thresholds: a voxel where the mean (or the maximum) of the members' probabilities reaches t has at least one member
at t or more, so a false finding of the ensemble at t is a false finding of some member at t. The expected false
findings per cm of normal CT are therefore at most the sum of the members' calibrated rates (a union bound), and the
ensemble's threshold for a target rate is where that sum meets it: conservative, and needing no new calibration.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .bundle import ModelBundle, ensemble_for_alias, resolve_model
from .errors import InputError
from .significance import FalseFindingCurve

if TYPE_CHECKING:  # the detectors (torch) load with a scorer: naming and hashing models (batch's main process) is light
    from .calibration import Calibration
    from .detectors import Detector

PREFIXES = {"ensemble:": "mean", "ensemble-mean:": "mean", "ensemble-max:": "max"}


def parse_spec(model: str | None) -> tuple[str, list[str]] | None:
    """'ensemble-max:A,B' -> ('max', ['A', 'B']); the same for the alias a catalog gives a recommended ensemble
    (`chest-ct-nodules-needles`); None for a single model."""
    if not isinstance(model, str):
        return None
    for prefix, combine in PREFIXES.items():
        if model.startswith(prefix):
            names = [n.strip() for n in model[len(prefix):].split(",") if n.strip()]
            if len(names) < 2:
                raise InputError(f"--model {model}: an ensemble needs at least two models, as {prefix}NAME1,NAME2")
            return combine, names
    spec = ensemble_for_alias(model)
    return parse_spec(spec) if spec is not None else None


class EnsembleCalibration(FalseFindingCurve):
    """What the pipeline asks of a calibration, for an ensemble: thresholds by the union bound over members."""

    def __init__(self, members: list[Calibration]):
        self.members = members
        self.min_size_mm3 = min(c.min_size_mm3 for c in members)
        self.default_fp_per_volume = float(np.mean([c.default_fp_per_volume for c in members]))

    def log_fp_rate(self, threshold: float | None = None, *, log_exceedance: float | None = None) -> float:
        """log of the members' summed false-findings-per-cm rates (a voxel at t has some member at t or more)."""
        return float(np.logaddexp.reduce([c.log_fp_rate(threshold, log_exceedance=log_exceedance)
                                          for c in self.members]))


@dataclass
class Ensemble:
    members: list[Detector]
    combine: str = "mean"

    def __post_init__(self):
        if self.combine not in ("mean", "max"):
            raise InputError(f"ensemble combine {self.combine!r}: use mean or max")
        names = [m.card["name"] for m in self.members]
        self.card = {"name": f"ensemble-{self.combine}({','.join(names)})", "version": "-",
                     "method": "ensemble", "members": [{k: m.card[k] for k in ("name", "version", "method")}
                                                       for m in self.members]}
        from .calibration import Calibration

        self.calibration = EnsembleCalibration([Calibration.from_card(m.card["calibration"]) for m in self.members])

    def combine_significance(self, maps: list[np.ndarray]) -> np.ndarray:
        """The members' significance maps (-log10(1 - p)) combined as their probabilities are: the maximum, or
        the mean probability (-log10 of the mean of 1 - p, which keeps the tail's resolution)."""
        if self.combine == "max":
            return elementwise(np.maximum, maps)
        low = elementwise(np.minimum, maps)  # each term 10^-(m - low) <= 1: no underflow however far out in the tail
        total = np.zeros_like(low)
        for m in maps:
            total += np.power(np.float32(10.0), low - m, dtype=np.float32)
        return low - np.log10(total / np.float32(len(maps)))

    def combine_p_values(self, p_values: list[float]) -> float:
        """The members' volume p-values (1 - volume score) combined as their volume scores are: 1 - the mean of the
        scores is the mean of the p-values, 1 - their maximum the minimum."""
        return float(np.min(p_values) if self.combine == "max" else np.mean(p_values))


def elementwise(ufunc: np.ufunc, maps: list[np.ndarray]) -> np.ndarray:
    """ufunc (np.maximum, np.minimum) over same-shaped arrays, pairwise into one new array: ufunc.reduce over a list
    first stacks them all into one (several GB for three whole chest CTs), which takes longer than the reduction."""
    out = maps[0].copy()
    for m in maps[1:]:
        ufunc(out, m, out=out)
    return out


def load_scorer(model: "str | Path | ModelBundle | Detector | Ensemble | None") -> "Detector | Ensemble":
    """A detector, or an ensemble of detectors, from a catalog name, bundle folder, ensemble spec or object."""
    from .detectors import Detector, build_detector

    if isinstance(model, (Detector, Ensemble)):
        return model
    if isinstance(model, ModelBundle):
        return build_detector(model)
    spec = parse_spec(str(model)) if model is not None else None
    if spec is None:
        return build_detector(resolve_model(model))
    combine, names = spec
    return Ensemble([build_detector(resolve_model(n)) for n in names], combine)


def calibration_of(scorer: "Detector | Ensemble") -> "Calibration | EnsembleCalibration":
    from .calibration import Calibration

    return scorer.calibration if isinstance(scorer, Ensemble) else Calibration.from_card(scorer.card["calibration"])


def model_folders(model: str | None) -> list[Path]:
    """The bundle folder of every model the argument names: one, or each member of an ensemble."""
    spec = parse_spec(model)
    return [resolve_model(model).path] if spec is None else [resolve_model(n).path for n in spec[1]]


def resolved_spec(model: str | None) -> str:
    """The model argument with every name resolved to its bundle folder (what batch workers receive)."""
    spec = parse_spec(model)
    folders = [str(f) for f in model_folders(model)]
    return folders[0] if spec is None else f"ensemble-{spec[0]}:" + ",".join(folders)


def model_identity(model: str | None) -> str:
    """SHA-256 over the model cards (and the combination rule): changes whenever a result could."""
    spec = parse_spec(model)
    cards = resolve_model(model).card if spec is None else [spec[0]] + [resolve_model(n).card for n in spec[1]]
    return hashlib.sha256(json.dumps(cards, sort_keys=True).encode()).hexdigest()
