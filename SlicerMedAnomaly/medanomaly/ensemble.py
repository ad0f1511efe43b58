"""Ensembles of model bundles: `--model ensemble:NAME1,NAME2,...` (mean), `ensemble-max:NAME1,NAME2,...` or
`ensemble-max-rate:NAME1,NAME2,...`.

Each member scores the volume on its own grid and calibrates its own map; the ensemble combines the members'
calibrated voxel probabilities by their mean or their maximum. Its volume p-value is that of the combined map's
strongest finding under the ensemble's false-finding curve (below), as for a single model's map; the members' own
volume scores are reported beside it.

Thresholds: a voxel where the mean (or the maximum) of the members' probabilities reaches t has at least one member
at t or more, so a false finding of the ensemble at t is a false finding of some member at t. The expected false
findings per cm of normal CT are therefore at most the sum of the members' calibrated rates (a union bound), and the
ensemble's threshold for a target rate is where that sum meets it: conservative, and needing no new calibration.

The same voxel probability does not mean the same false-finding rate in every member: a smooth map makes fewer,
larger findings from the same share of voxels than a grainy one. Under the plain maximum the member with the most
false findings per level sets the ensemble's thresholds, and the others then run far stricter than they would alone.
`max-rate` first maps each member's significance to the level of a common curve (the mean of the members' log
false-findings-per-cm curves) with the same false-finding rate, then takes the maximum. At every level each member
then contributes the same expected false findings, the union bound is M times the common curve, and at a target
rate each member runs at 1/M of it.
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
from .significance import LN10, MAX_SIGNIFICANCE, FalseFindingCurve

if TYPE_CHECKING:  # the detectors (torch) load with a scorer: naming and hashing models (batch's main process) is light
    from .calibration import Calibration
    from .detectors import Detector

PREFIXES = {"ensemble:": "mean", "ensemble-mean:": "mean", "ensemble-max:": "max", "ensemble-max-rate:": "max-rate"}
COMBINE_RULES = ("mean", "max", "max-rate")
# where members' significance is matched by rate: a uniform fine step where thresholds lie, coarse far out in the tail
MATCH_STEP, MATCH_FINE_END = 0.002, 40.0
MATCH_GRID = np.r_[np.arange(0.0, MATCH_FINE_END, MATCH_STEP), np.arange(MATCH_FINE_END, MAX_SIGNIFICANCE + 0.5, 0.5)]
MATCH_FINE = int(round(MATCH_FINE_END / MATCH_STEP))  # MATCH_GRID[:MATCH_FINE] is the uniform part


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

    def __init__(self, members: list[Calibration], matched: bool = False):
        self.members = members
        self.matched = matched
        self.min_size_mm3 = min(c.min_size_mm3 for c in members)
        self.default_fp_per_volume = float(np.mean([c.default_fp_per_volume for c in members]))

    def common_log_fp_rates(self, significance) -> np.ndarray:
        """The common curve members are matched to (max-rate): the mean of their log false-findings-per-cm."""
        return np.mean([c.log_fp_rates(significance) for c in self.members], axis=0)

    def log_fp_rate(self, threshold: float | None = None, *, log_exceedance: float | None = None) -> float:
        """log of the members' summed false-findings-per-cm rates (a voxel at t has some member at t or more); matched
        by rate, each member's rate at a common level is the common curve's, so the sum is M times it."""
        if self.matched:
            x = log_exceedance if log_exceedance is not None else np.log(max(1.0 - threshold, 1e-300))
            return float(np.log(len(self.members)) + self.common_log_fp_rates(-x / LN10))
        return float(np.logaddexp.reduce([c.log_fp_rate(threshold, log_exceedance=log_exceedance)
                                          for c in self.members]))

    def rate_matching_tables(self) -> list[np.ndarray]:
        """Per member, its significance mapped to the common curve's level with the same false-finding rate, on
        MATCH_GRID (np.interp(s, MATCH_GRID, table) maps a map)."""
        common = self.common_log_fp_rates(MATCH_GRID) - 1e-9 * MATCH_GRID  # strictly decreasing, for inversion
        return [np.interp(-c.log_fp_rates(MATCH_GRID), -common, MATCH_GRID) for c in self.members]


@dataclass
class Ensemble:
    members: list[Detector]
    combine: str = "mean"

    def __post_init__(self):
        if self.combine not in COMBINE_RULES:
            raise InputError(f"ensemble combine {self.combine!r}: use {', '.join(COMBINE_RULES)}")
        names = [m.card["name"] for m in self.members]
        self.card = {"name": f"ensemble-{self.combine}({','.join(names)})", "version": "-",
                     "method": "ensemble", "members": [{k: m.card[k] for k in ("name", "version", "method")}
                                                       for m in self.members]}
        from .calibration import Calibration

        self.calibration = EnsembleCalibration([Calibration.from_card(m.card["calibration"]) for m in self.members],
                                               matched=self.combine == "max-rate")
        self.match_tables = None
        if self.combine == "max-rate":
            for member, calibration in zip(self.members, self.calibration.members):
                if calibration.fp_curve_points() is None:
                    raise InputError(f"{member.card['name']}: its calibration counted no false finding, so it has no "
                                     "false-finding rate to match by; use ensemble-max with it")
            self.match_tables = self.calibration.rate_matching_tables()

    def member_transform(self, index: int):
        """What maps member `index`'s significance before the maps are combined (None: nothing): with max-rate, to
        the common curve's level of the same false-finding rate."""
        if self.match_tables is None:
            return None
        return lambda significance: match_levels(significance, self.match_tables[index])

    def combine_maps(self, maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The members' significance maps (-log10(1 - p)) combined as their probabilities are: the maximum, or
        the mean probability (-log10 of the mean of 1 - p, which keeps the tail's resolution). With it, per voxel,
        the index of the member whose significance is highest there (uint8): the member that flagged it."""
        strongest, source = maximum_with_source(maps)
        if self.combine in ("max", "max-rate"):  # max-rate: the maps were matched by rate (member_transform)
            return strongest, source
        del strongest
        return self.mean_significance(maps), source

    @staticmethod
    def mean_significance(maps: list[np.ndarray]) -> np.ndarray:
        """The mean of the members' probabilities, in significance."""
        low = elementwise(np.minimum, maps)  # each term 10^-(m - low) <= 1: no underflow however far out in the tail
        total = np.zeros_like(low)
        for m in maps:
            total += np.power(np.float32(10.0), low - m, dtype=np.float32)
        return low - np.log10(total / np.float32(len(maps)))


def match_levels(significance: np.ndarray, table: np.ndarray) -> np.ndarray:
    """np.interp(significance, MATCH_GRID, table) as float32, with the uniform part of the grid indexed directly
    instead of searched (a third of np.interp's time on a CT's millions of region voxels)."""
    s = np.asarray(significance, np.float32)
    position = np.clip(s, 0.0, MATCH_FINE_END - MATCH_STEP) * np.float32(1.0 / MATCH_STEP)
    index = np.minimum(position.astype(np.int64), MATCH_FINE - 2)
    weight = position - index
    fine = table.astype(np.float32)
    out = fine[index] * (1 - weight) + fine[index + 1] * weight
    far = s >= MATCH_FINE_END - MATCH_STEP
    if far.any():
        out[far] = np.interp(s[far], MATCH_GRID, table)
    return out.astype(np.float32, copy=False)


def maximum_with_source(maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The elementwise maximum of same-shaped maps and, per element, the index (uint8) of the first map that holds
    it, in one pass with no more copies than the maximum alone."""
    out = maps[0].copy()
    source = np.zeros(out.shape, np.uint8)
    for index, m in enumerate(maps[1:], start=1):
        higher = m > out
        source[higher] = index
        np.copyto(out, m, where=higher)
    return out, source


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
