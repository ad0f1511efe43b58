"""The anomaly lab: build cases (real CT slabs with synthetic lesions and exact masks, plus untouched normal slabs)
and score any detector on them the way published work does (`medanomaly evaluate`)."""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .api import detect_volume, peak_rss_mb
from .bundle import CARD_NAME, ModelBundle, atomic_write_text, sha256_of
from .calibration import Calibration, min_voxels_for
from .detectors import Detector
from .engine import pick_device, score_slices
from .ensemble import Ensemble, calibration_of, load_scorer
from .errors import InputError
from .metrics import (FROC, FindingsFROC, PooledVoxelCurve, auroc_interval, average_precision, localization_hits,
                      proportion_interval, roc_auc)
from .orientation import Reorientation
from .preprocess import prepare_slices
from .synth import LesionInserter
from .volumes import read_volume

log = logging.getLogger(__name__)
MANIFEST = "cases.json"
FROC_RATES = (0.5, 1.0, 2.0, 4.0)
SIZE_BINS_MM = ((0, 6), (6, 10), (10, 20), (20, 1000))


def slab(image: sitk.Image, z0: int, z1: int) -> sitk.Image:
    """Canonical axial slices z0..z1-1 (superior index order) of an image, as a sub-image on the same grid."""
    r = Reorientation.for_image(image)
    axis = 2 - r.axes[0]  # image axis (i, j, k) that runs along S
    n = image.GetSize()[axis]
    lo, hi = (n - z1, n - z0) if r.flips[0] else (z0, z1)
    index = [0, 0, 0]
    size = list(image.GetSize())
    index[axis], size[axis] = lo, hi - lo
    return sitk.RegionOfInterest(image, size, index)


def build_cases(source: str | Path, slabs: list[tuple[int, int]], kinds: list[str], output: str | Path,
                seed: int = 0, name: str | None = None, group_note: str = "") -> dict:
    """Write one normal case per slab and one case per (slab, kind) with that lesion inserted, plus cases.json.

    Returns the manifest. Existing manifests in `output` are extended, so several sources can share one folder.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    image = read_volume(source).image
    name = name or Path(source).name.split(".")[0]
    manifest_path = output / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {
        "format": 1, "created_by": f"medanomaly {__version__}", "sources": [], "cases": []}
    manifest["sources"].append({"file": Path(source).name, "sha256": sha256_of(source) if Path(source).is_file()
                                else None, "slabs": slabs, "kinds": kinds, "seed": seed, "note": group_note})
    for s_index, (z0, z1) in enumerate(slabs):
        sub = slab(image, z0, z1)
        group = f"{name} slices {z0}-{z1 - 1}"
        normal_name = f"{name}_slab{s_index}_normal"
        sitk.WriteImage(sub, str(output / f"{normal_name}.nii.gz"), True)
        manifest["cases"].append({"case": normal_name, "volume": f"{normal_name}.nii.gz", "labels": None,
                                  "lesions": [], "group": group, "normal": True})
        inserter = LesionInserter(sub)
        for k_index, spec in enumerate(kinds):
            kind, _, diameter = spec.partition(":")  # "nodule_solid:8" fixes the diameter in mm
            params = {"diameter_mm": float(diameter)} if diameter else {}
            case_seed = seed * 100000 + s_index * 1000 + k_index
            try:
                insertion = inserter.insert(kind, seed=case_seed, **params)
            except ValueError as exc:
                log.warning("%s: no %s inserted (%s)", group, kind, exc)
                continue
            case = f"{name}_slab{s_index}_{k_index:02d}_{kind}"
            out = sitk.GetImageFromArray(insertion.volume)
            out.CopyInformation(sub)
            sitk.WriteImage(out, str(output / f"{case}.nii.gz"), True)
            labels = sitk.GetImageFromArray(insertion.mask.astype(np.uint8))
            labels.CopyInformation(sub)
            sitk.WriteImage(labels, str(output / f"{case}_labels.nii.gz"), True)
            manifest["cases"].append({"case": case, "volume": f"{case}.nii.gz", "labels": f"{case}_labels.nii.gz",
                                      "lesions": [dict(insertion.record, label=1)], "group": group,
                                      "normal": False})
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _diameter(lesion: dict) -> float:
    """The inserted diameter, or the equivalent-sphere diameter of lesions that have none (fluid, needles)."""
    diameter = lesion.get("diameter_mm")
    if diameter is None or lesion.get("kind", "").startswith(("effusion", "ascites", "needle")):
        diameter = 2 * (3 * lesion.get("volume_mm3", 0.0) / (4 * np.pi)) ** (1 / 3)
    return float(diameter)


# the flagship's sensitivity target: nodules of at least 6 mm, and needles, at no more than 2 false positives per volume
TARGET_SUBSETS = {
    "nodules >= 6 mm": lambda lesion: lesion["kind"].startswith("nodule") and lesion["diameter_mm"] >= 6.0,
    "needles": lambda lesion: lesion["kind"] == "needle",
}


def _size_bin(lesion: dict) -> str:
    diameter = _diameter(lesion)
    for lo, hi in SIZE_BINS_MM:
        if lo <= diameter < hi:
            return f"{lo}-{hi}" if hi < 1000 else f">={lo}"
    return "?"


CALIBRATION_MODES = ("auto", "cross", "card")


def recalibrated(detector: Detector, references: list, slice_scores: list, source: str) -> Detector:
    """A copy of `detector` (sharing its weights) whose card carries a calibration fitted on `references`
    ((smoothed raw scores, region, spacing) of normal CT) instead of its own."""
    own = Calibration.from_card(detector.card["calibration"])
    fitted = Calibration.fit(references, min_size_mm3=own.min_size_mm3,
                             default_fp_per_volume=own.default_fp_per_volume,
                             slice_scores=np.concatenate(slice_scores) if slice_scores else None)
    clone = copy.copy(detector)
    clone.card = dict(detector.card, calibration=fitted.to_card(
        reference_slabs=len(references), reference_slices=int(sum(r[0].shape[0] for r in references)),
        reference_voxels=int(sum(r[1].sum() for r in references)), source=source))
    return clone


def cross_calibrated(scorer: Detector | Ensemble, cases_dir: Path, cases: list[dict], device: str = "cpu",
                     extra_references: dict[int, list] | None = None) -> dict[str, Detector | Ensemble]:
    """For each case group, the scorer recalibrated on the normal cases of the *other* groups, so that no case is
    scored against a calibration that saw it (or its untouched base). Members of an ensemble are recalibrated one
    by one. Raises InputError when a group has no normal case outside it. `extra_references`: per member index,
    more normal references ((smoothed scores, region, spacing), as Calibration.fit takes) that every group's
    calibration of that member adds."""
    groups = sorted({c["group"] for c in cases})
    members = scorer.members if isinstance(scorer, Ensemble) else [scorer]
    torch_device = pick_device(device)
    refs: dict[int, dict[str, list]] = {i: {} for i in range(len(members))}
    for case in (c for c in cases if c["normal"]):
        volume = read_volume(cases_dir / case["volume"])
        r = Reorientation.for_image(volume.image)
        hu = r.to_canonical(volume.hu)
        shared: dict = {}
        for i, member in enumerate(members):
            slices = prepare_slices(hu, r.canonical_spacing, member.spec, shared)
            smoothed, _, engine = score_slices(member, slices, device=torch_device)
            refs[i].setdefault(case["group"], []).append(
                ((smoothed, slices.region, slices.spacing_mm), engine.slice_scores))
    out = {}
    for group in groups:
        recal = []
        for i, member in enumerate(members):
            others = [ref for g, found in refs[i].items() if g != group for ref in found]
            if not others:
                raise InputError(f"lab group {group!r} has no normal case in another group to calibrate on; "
                                 "use --calibration card")
            extra = (extra_references or {}).get(i, [])
            recal.append(recalibrated(member, [o[0] for o in others] + extra,
                                      [o[1] for o in others if o[1] is not None],
                                      source=f"lab normal cases outside group {group!r}"
                                      + (f" and {len(extra)} more normal slab(s)" if extra else "")))
        out[group] = Ensemble(recal, scorer.combine) if isinstance(scorer, Ensemble) else recal[0]
    return out


def cross_calibrated_cases(cases_dir: str | Path, model: str | Detector | Ensemble | None = None,
                           device: str = "cpu"):
    """Every case of a lab case set with its volume and the model recalibrated on the other groups' normal cases (as
    evaluate scores them by default): (case, volume, scorer) in the manifest's order, for experiments on the lab."""
    cases_dir = Path(cases_dir)
    cases = json.loads((cases_dir / MANIFEST).read_text())["cases"]
    scorers = cross_calibrated(load_scorer(model), cases_dir, cases, device)
    for case in cases:
        yield case, read_volume(cases_dir / case["volume"]), scorers[case["group"]]


def evaluate(cases_dir: str | Path, model: str | Detector | Ensemble | None = None, *, device: str = "cpu",
             progress=None, calibration: str = "auto", scorers: dict | None = None,
             calibration_note: str | None = None) -> dict:
    """Run a detector over the lab's cases and compute every metric; returns a JSON-able dict.

    calibration: "cross" scores each case group with the model recalibrated on the other groups' normal cases
    (out of sample: the shipped models were calibrated on the held-out slabs the lab's normal cases come from);
    "card" uses the model card's own calibration; "auto" is "cross" when every group has normal cases outside it.
    scorers: per case group, the model as an experiment calibrated it (then `calibration` is not used, and
    `calibration_note` says in the result how it was calibrated).
    """
    if calibration not in CALIBRATION_MODES:
        raise InputError(f"calibration {calibration!r}: use one of {', '.join(CALIBRATION_MODES)}")
    cases_dir = Path(cases_dir)
    manifest_path = cases_dir / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{cases_dir}: no {MANIFEST}; build cases with scripts/benchmark_lab.py first")
    manifest = json.loads(manifest_path.read_text())
    detector = load_scorer(model)
    groups = {c["group"] for c in manifest["cases"]}
    normal_groups = {c["group"] for c in manifest["cases"] if c["normal"]}
    if calibration == "auto":
        calibration = "cross" if all(normal_groups - {g} for g in groups) else "card"
    if scorers is None:
        scorers = (cross_calibrated(detector, cases_dir, manifest["cases"], device) if calibration == "cross"
                   else {g: detector for g in groups})
    pooled, normal_curve = PooledVoxelCurve(), PooledVoxelCurve()
    kind_curves: dict[str, PooledVoxelCurve] = {}
    froc, findings_froc = FROC(), FindingsFROC()
    volume_scores, volume_labels, seconds, normal_findings, default_hits = [], [], [], [], []
    normal_flagged_by = []  # which model or member made each of the normal cases' false findings
    case_scores: list[dict] = []
    localization: dict[str, list[bool]] = {}
    for n, case in enumerate(manifest["cases"]):
        volume = read_volume(cases_dir / case["volume"])
        r = Reorientation.for_image(volume.image)
        t0 = time.perf_counter()
        scorer = scorers[case["group"]]
        result = detect_volume(volume, scorer, device=device)
        seconds.append(time.perf_counter() - t0)
        labels = (sitk.GetArrayFromImage(sitk.ReadImage(str(cases_dir / case["labels"])))
                  if case["labels"] else None)
        truth = labels > 0 if labels is not None else np.zeros(result.significance.shape, bool)
        volume_scores.append(-result.volume_p_value)  # the ranking of the volume score, without its rounding
        case_scores.append({"case": case["case"], "normal": bool(case["normal"]),
                            "volume_score": result.volume_score, "volume_p_value": result.volume_p_value,
                            "findings": len(result.findings)})
        volume_labels.append(not case["normal"])
        pooled.add(result.significance, truth)
        if case["normal"]:
            normal_curve.add(result.significance, truth)
            normal_findings.append(len(result.findings))
            normal_flagged_by += [finding["flagged_by"] for finding in result.findings]
        else:
            for lesion in case["lesions"]:
                curve = kind_curves.setdefault(lesion["kind"], PooledVoxelCurve())
                inside = labels == lesion["label"]
                curve.add(result.significance, inside)
                hit = np.unique(result.labels[inside])  # the findings on it (finding i has label i)
                hit = hit[hit > 0]
                default_hits.append({"kind": lesion["kind"], "size": _size_bin(lesion), "found": bool(hit.size),
                                     "flagged_by": sorted({result.findings[i - 1]["flagged_by"] for i in hit})})
            heat_c, truth_c = r.to_canonical(result.heatmap), r.to_canonical(truth)
            rows = np.nonzero(truth_c.any(axis=(1, 2)))[0]
            hits = localization_hits(heat_c[rows], truth_c[rows])
            kind = case["lesions"][0]["kind"]
            localization.setdefault(kind, []).extend(bool(h) for h in hits)
        extent_cm = volume.hu.shape[r.axes[0]] * r.canonical_spacing[0] / 10.0
        case_calibration = calibration_of(scorer)
        base = case_calibration.threshold_significance(10.0, extent_cm)
        min_voxels = min_voxels_for(case_calibration.min_size_mm3, volume.voxel_volume_mm3)
        info = {lesion["label"]: {"kind": lesion["kind"], "size": _size_bin(lesion), "diameter_mm": _diameter(lesion)}
                for lesion in case["lesions"]}
        froc.add_case(result.significance, labels, base, min_voxels, info, case["case"])
        findings_froc.add_case(result.significance, labels, min_voxels, info, case["case"])
        if progress is not None:
            progress("evaluate", (n + 1) / len(manifest["cases"]))
    for kind, curve in kind_curves.items():
        curve.pos += normal_curve.pos
        curve.neg += normal_curve.neg
    dice, dice_threshold = pooled.best_dice()
    all_loc = [h for hits in localization.values() for h in hits]
    kinds = sorted({lesion["kind"] for lesion in froc.lesions})
    per_kind = {}
    for kind in kinds:
        hits = [h["found"] for h in default_hits if h["kind"] == kind]
        per_kind[kind] = {
            "lesions": len(hits),
            "sensitivity_at_2fp": froc.sensitivity_at(2.0, lambda lesion, k=kind: lesion["kind"] == k),
            "sensitivity_at_default": float(np.mean(hits)) if hits else float("nan"),
            "voxel_ap": kind_curves[kind].average_precision(),
            "localization_rate": float(np.mean(localization[kind])) if localization.get(kind) else float("nan"),
            "localization_slices": len(localization.get(kind, [])),
            # of the lesions found at the default sensitivity, how many a finding of each model or member hit
            "flagged_by_at_default": _tally(name for h in default_hits if h["kind"] == kind
                                            for name in h["flagged_by"]),
        }
    sizes = sorted({h["size"] for h in default_hits}, key=lambda s: float(s.strip(">=").split("-")[0]))
    per_size = {size: {"lesions": sum(h["size"] == size for h in default_hits),
                       "sensitivity_at_2fp": froc.sensitivity_at(2.0, lambda lesion, s=size: lesion["size"] == s)}
                for size in sizes}
    labels_arr, scores_arr = np.array(volume_labels), np.array(volume_scores)
    result = {
        "model": {k: detector.card[k] for k in ("name", "version", "method")},
        "cases": len(manifest["cases"]), "normal_cases": int((~labels_arr).sum()),
        "anomalous_cases": int(labels_arr.sum()),
        "volume_auroc": roc_auc(scores_arr, labels_arr), "volume_ap": average_precision(scores_arr, labels_arr),
        "voxel_ap": pooled.average_precision(), "voxel_auroc": pooled.auroc(),
        "dice_best": dice, "dice_threshold": dice_threshold,
        "froc": {str(rate): froc.sensitivity_at(rate) for rate in FROC_RATES},
        # the same lesions and rates, with the findings detect reports at every level (metrics.FindingsFROC)
        "findings_froc": {str(rate): findings_froc.sensitivity_at(rate) for rate in FROC_RATES},
        "localization_rate": float(np.mean(all_loc)) if all_loc else float("nan"),
        "localization_slices": len(all_loc),
        "fp_findings_per_normal_volume": float(np.mean(normal_findings)) if normal_findings else float("nan"),
        "fp_findings_flagged_by": _tally(normal_flagged_by),
        "sensitivity_at_default": float(np.mean([h["found"] for h in default_hits])) if default_hits else float("nan"),
        "per_kind": per_kind, "per_size": per_size,
        "target_sensitivity_at_2fp": {name: {"lesions": sum(map(subset, froc.lesions)),
                                             "sensitivity": froc.sensitivity_at(2.0, subset)}
                                      for name, subset in TARGET_SUBSETS.items()},
        "target_sensitivity_at_2fp_findings": {name: {"lesions": sum(map(subset, findings_froc.lesions)),
                                                      "sensitivity": findings_froc.sensitivity_at(2.0, subset)}
                                               for name, subset in TARGET_SUBSETS.items()},
        "seconds_per_volume_median": statistics.median(seconds) if seconds else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
        "calibration": calibration_note or (
            "cross-group: each group scored with the model recalibrated on the other groups' normal cases"
            if calibration == "cross" else "model card"),
        "case_scores": case_scores,
        "lesions_at_2fp": froc.lesion_table(2.0),
        "provenance": {"manifest_sha256": sha256_of(manifest_path), "sources": manifest["sources"]},
    }
    result["intervals_95"] = intervals(result)
    return result


def _tally(names) -> dict[str, int]:
    """How often each name occurs, by name."""
    return dict(sorted(Counter(names).items()))


def intervals(result: dict, level: float = 0.95) -> dict:
    """How far the lab's few cases let its headline numbers be trusted: bootstrap intervals of the slab AUROC
    (`case_scores`; 2 normal slabs make it coarse) and Wilson intervals of the lesion sensitivities at 2 false
    positives per slab, overall and for the flagship's target subsets. Works on stored results too."""
    cases = result["case_scores"]
    # what the slab AUROC ranked by: the p-value since software 0.2.0, the volume score before (stored results)
    ranks = [-c["volume_p_value"] if "volume_p_value" in c else c["volume_score"] for c in cases]
    out = {"level": level, "volume_auroc": auroc_interval(ranks, [not c["normal"] for c in cases], level)}

    def interval(sensitivity: float, lesions: int) -> tuple[float, float]:
        return proportion_interval(round(sensitivity * lesions) if lesions else 0, lesions, level)

    lesions = sum(k["lesions"] for k in result["per_kind"].values())
    for key in ("froc", "findings_froc"):
        if key in result:
            out[f"{key}_at_2fp"] = interval(result[key]["2.0"], lesions)
    for key in ("target_sensitivity_at_2fp", "target_sensitivity_at_2fp_findings"):
        out[key] = {name: interval(t["sensitivity"], t["lesions"]) for name, t in result.get(key, {}).items()}
    return out


HEADLINE = ("cases", "normal_cases", "anomalous_cases", "volume_auroc", "volume_ap", "voxel_ap", "voxel_auroc",
            "dice_best", "froc", "localization_rate", "fp_findings_per_normal_volume", "sensitivity_at_default",
            "seconds_per_volume_median")


def pooled_localization(result: dict, kinds: tuple[str, ...] = ("needle", "effusion")) -> float:
    """The localization rate over all lesion slices of the given kinds (the StyleGAN2 study's needles and fluid)."""
    rows = [result["per_kind"][k] for k in kinds if k in result["per_kind"]]
    slices = sum(r.get("localization_slices", 0) for r in rows)
    return float(sum(r["localization_rate"] * r.get("localization_slices", 0) for r in rows) / slices) if slices else float("nan")


def record_in_card(bundle_path: str | Path, result: dict) -> None:
    """Write the lab's headline numbers for this bundle into its model card (`evaluation.lab`), atomically. The
    weights and their checksums are untouched."""
    bundle = ModelBundle.load(bundle_path)
    if bundle.card["name"] != result["model"]["name"]:
        raise InputError(f"{bundle_path}: card is {bundle.card['name']!r}, results are for {result['model']['name']!r}")
    lab = {k: result[k] for k in HEADLINE}
    lab["per_kind"] = {kind: {k: v for k, v in row.items() if k in ("lesions", "sensitivity_at_2fp", "voxel_ap",
                                                                      "localization_rate", "localization_slices")}
                       for kind, row in result["per_kind"].items()}
    lab["localization_rate_needle_and_fluid"] = pooled_localization(result)
    for key in ("target_sensitivity_at_2fp", "target_sensitivity_at_2fp_findings", "findings_froc", "intervals_95"):
        if key in result:
            lab[key] = result[key]
    lab["cases_manifest_sha256"] = result["provenance"]["manifest_sha256"]
    lab["calibration"] = result.get("calibration", "model card")
    lab["medanomaly_version"] = __version__
    lab["date"] = time.strftime("%Y-%m-%d")
    card = dict(bundle.card, evaluation={**bundle.card.get("evaluation", {}), "lab": lab})
    atomic_write_text(bundle.path / CARD_NAME, json.dumps(card, indent=2, default=float) + "\n")
    ModelBundle.load(bundle.path).verify()


def markdown_table(results: list[dict]) -> str:
    """One row per detector: the lab's headline numbers (the slab AUROC with its 95% interval)."""
    header = ["detector", "method", "volume AUROC [95%]", "volume AP", "voxel AP", "voxel AUROC", "Dice (best)",
              "sens @0.5/1/2/4 FP", "findings sens @0.5/1/2/4 FP", "localization", "FP/normal vol (default)",
              "s/volume"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        froc = "/".join(f"{r['froc'][str(rate)]:.2f}" for rate in FROC_RATES)
        findings_froc = ("/".join(f"{r['findings_froc'][str(rate)]:.2f}" for rate in FROC_RATES)
                         if "findings_froc" in r else "-")
        low, high = r["intervals_95"]["volume_auroc"] if "intervals_95" in r else (float("nan"),) * 2
        rows.append(f"| {r['model']['name']} | {r['model']['method']} | "
                    f"{r['volume_auroc']:.3f} [{low:.2f}, {high:.2f}] | "
                    f"{r['volume_ap']:.3f} | {r['voxel_ap']:.4f} | {r['voxel_auroc']:.3f} | {r['dice_best']:.3f} | "
                    f"{froc} | {findings_froc} | {r['localization_rate']:.2f} | "
                    f"{r['fp_findings_per_normal_volume']:.2f} | {r['seconds_per_volume_median']:.2f} |")
    return "\n".join(rows)


def markdown_breakdown(results: list[dict]) -> str:
    """Per lesion kind: sensitivity at 2 false positives per volume, voxel AP and localization, per detector."""
    kinds = sorted({k for r in results for k in r["per_kind"]})
    header = ["lesion kind", "n"] + [f"{r['model']['name']} sens@2FP / voxel AP / loc" for r in results]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in kinds:
        n = next(r["per_kind"][kind]["lesions"] for r in results if kind in r["per_kind"])
        cells = []
        for r in results:
            k = r["per_kind"].get(kind)
            cells.append("-" if k is None else f"{k['sensitivity_at_2fp']:.2f} / {k['voxel_ap']:.3f} / "
                                               f"{k['localization_rate']:.2f}")
        rows.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    sizes = list(dict.fromkeys(size for r in results for size in r["per_size"]))
    rows += ["", "| lesion size (equivalent diameter, mm) | n | " + " | ".join(
        f"{r['model']['name']} sens@2FP" for r in results) + " |", "|" + "---|" * (len(results) + 2)]
    for size in sizes:
        n = next(r["per_size"][size]["lesions"] for r in results if size in r["per_size"])
        cells = [f"{r['per_size'][size]['sensitivity_at_2fp']:.2f}" if size in r["per_size"] else "-"
                 for r in results]
        rows.append(f"| {size} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
