"""`detect`: the one function behind the command line, the Python API and the Slicer module."""

from __future__ import annotations

import logging
import platform
import resource
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .bundle import ModelBundle
from .calibration import (REFERENCE_LEVEL, UNLIKE_FACTOR, Calibration, contiguous_runs,
                          sensitivity_to_fp_per_volume)
from .detectors import Detector
from .ensemble import Ensemble, calibration_of, load_scorer
from .engine import CancelCheck, ProgressCallback, pick_device, score_slices, to_native
from .errors import InputError, OutputError
from .findings import find_findings, min_voxels_for, strongest_finding_p_value
from .orientation import Reorientation
from .outputs import (DICOM_SEG_FILE, DICOM_SR_FILE, CaseStaging, write_dicom_report, write_dicom_segmentation,
                      write_image, write_json, write_mood, write_overview, write_segmentation)
from .preprocess import CUT_EDGE_MM, prepare_slices, unwindow
from .significance import probability_of_significance
from .volumes import COVERAGE_WARN_SHARE, CTVolume, check_path_encoding, read_volume, warn

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


@dataclass
class DetectionResult:
    """Everything `detect_volume` computed for one volume; arrays lie on the input's [k, j, i] grid."""

    volume: CTVolume
    significance: np.ndarray  # float32 -log10(1 - probability): the calibrated heatmap, its tail resolved
    labels: np.ndarray  # uint8, finding i has label i
    findings: list[dict]
    volume_score: float
    threshold: float
    reconstruction: np.ndarray | None  # int16 HU pseudo-healthy volume, when the method makes one
    timings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    dropped_findings: int = 0
    output_dir: Path | None = None
    files: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more fields for findings.json (batch hashes, for example)
    volume_p_value: float = float("nan")  # 1 - volume_score without rounding: the ranking key of batches
    reference_check: dict = field(default_factory=dict)  # slices unlike the model's normal reference (check_reference)
    warnings: list[str] = field(default_factory=list)  # about the result; the volume's own are added in summary()
    threshold_significance: float = float("nan")  # -log10(1 - threshold): findings are significance >= this
    coverage: dict = field(default_factory=dict)  # the body outside the model's field of view (check_coverage)

    @property
    def heatmap(self) -> np.ndarray:
        """float32 probability in [0, 1], computed from `significance` on each access (keep it if you need it
        often). It rounds everything above 1 - 6e-8 to 1: rank and threshold by significance."""
        return probability_of_significance(self.significance)

    def summary(self) -> dict:
        return {
            "case": self.volume.case_name,
            "input": self.volume.source,
            "series_uid": self.volume.series_uid,
            "volume_score": round(self.volume_score, 6),
            "volume_p_value": float(f"{self.volume_p_value:.6g}"),
            "threshold": self.threshold,
            "threshold_significance": round(self.threshold_significance, 6),
            "findings": self.findings,
            "dropped_findings": self.dropped_findings,
            "model": self.model,
            "settings": self.settings,
            "software": {"medanomaly": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "geometry": {"size": list(self.volume.image.GetSize()), "spacing": list(self.volume.spacing),
                         "origin": list(self.volume.image.GetOrigin()),
                         "direction": list(self.volume.image.GetDirection())},
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "reference_check": self.reference_check,
            "coverage": self.coverage,
            "warnings": self.volume.warnings + self.warnings,
            "files": self.files,
            **self.extra,
        }


class _InThisThread:
    """What side_executor gives a process that is to use one core: each task runs at once, in the caller's thread."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # raised where its result is asked for, as a thread's would be
            future.set_exception(exc)
        return future

    def __enter__(self) -> "_InThisThread":
        return self

    def __exit__(self, *exc) -> None:
        return None


def side_executor(workers: int) -> "ThreadPoolExecutor | _InThisThread":
    """Threads for work beside the main thread's (labelling, compressing: both release the GIL) where this process may
    use more than one core (torch's thread count; a batch worker is given its share of the cores), else the
    caller's thread, so that a worker does not take another's core."""
    return ThreadPoolExecutor(max_workers=workers) if torch.get_num_threads() > 1 else _InThisThread()


SIGNIFICANCE_DECIMALS = 2  # significance.nrrd is for display: 0.01 of -log10(1 - p) keeps it a third of the size


class Stopwatch:
    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


def detect_volume(volume: CTVolume, model: "ModelBundle | Detector | Ensemble | str | None" = None, *,
                  device: str = "auto", sensitivity: float | None = None, fp_rate: float | None = None,
                  min_size_mm3: float | None = None, memory_budget_mb: float = 1024.0,
                  progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> DetectionResult:
    """Detect anomalies in one volume, in memory: heatmap, findings and scores on the input grid.

    Args:
        model: a catalog name, bundle folder, `ensemble:NAME1,NAME2` / `ensemble-max:...` /
            `ensemble-max-rate:...`, or a loaded model.
        sensitivity: 0..1; sets the target false-positive findings per normal volume (0.5 -> 0.32).
        fp_rate: that target directly (overrides sensitivity); default: the model card's.
        min_size_mm3: smallest finding kept; default: the model card's.
    """
    watch = Stopwatch()
    scorer = load_scorer(model)
    members = scorer.members if isinstance(scorer, Ensemble) else [scorer]
    torch_device = pick_device(device)
    watch.lap("load_model")
    notify = progress or (lambda stage, fraction: None)

    notify("preprocess", 0.0)
    reorientation = Reorientation.for_image(volume.image)
    hu_canonical = reorientation.to_canonical(volume.hu)
    watch.lap("preprocess")
    maps, volume_p_values, reconstruction, network_s, engines, coverages = [], [], None, 0.0, [], []
    unlike = []  # per member: each canonical slice's exceedance share over its reference's (None: not calibrated)
    shared_slices: dict = {}  # members on the same model grid resample the volume once
    # the searches for a strongest component run beside the main thread's work
    with side_executor(1) as side:
        for index, detector in enumerate(members):
            member_notify = (lambda stage, fraction, i=index: notify(stage, (i + fraction) / len(members)))
            significance, member_p, recon, engine, ratio, member_coverage = _score_member(
                detector, volume, reorientation, hu_canonical, torch_device, memory_budget_mb, member_notify, cancel,
                watch, side, want_reconstruction=reconstruction is None, shared_slices=shared_slices,
                transform=scorer.member_transform(index) if isinstance(scorer, Ensemble) else None)
            maps.append(significance)
            volume_p_values.append(member_p)
            unlike.append(ratio)
            reconstruction = reconstruction if reconstruction is not None else recon
            network_s += engine.network_s
            engines.append(engine)
            coverages.append(member_coverage)
        calibration = calibration_of(scorer)
        card = scorer.card
        extent_cm = hu_canonical.shape[0] * reorientation.canonical_spacing[0] / 10.0
        # and which member flagged each voxel (its highest significance there), for each finding's `flagged_by`
        significance, source = scorer.combine_maps(maps) if isinstance(scorer, Ensemble) else (maps[0], None)
        del maps  # before the searches below, which label the whole map
        if isinstance(scorer, Ensemble):
            # the strongest finding of the combined map, under the ensemble's own false-finding curve: a member's
            # volume p-value may come from its slice scores (deep kNN), whose calibration need not agree with its map's
            strongest = side.submit(strongest_finding_p_value, significance, calibration, extent_cm, min_voxels_for(
                calibration.min_size_mm3, volume.voxel_volume_mm3))
        target_fp = fp_rate if fp_rate is not None else (
            sensitivity_to_fp_per_volume(sensitivity) if sensitivity is not None
            else calibration.default_fp_per_volume)
        threshold_significance = calibration.threshold_significance(target_fp, extent_cm)
        threshold = float(probability_of_significance(threshold_significance, np.float64))
        min_size = calibration.min_size_mm3 if min_size_mm3 is None else float(min_size_mm3)
        labels, findings, dropped = find_findings(significance, volume.hu, volume.image, threshold_significance,
                                                  min_size, lambda s: calibration.log_expected_findings(s, extent_cm),
                                                  members=[m.card["name"] for m in members], source=source)
        del source
        volume_p_values = [p.result() for p in volume_p_values]
        volume_p_value = strongest.result() if isinstance(scorer, Ensemble) else volume_p_values[0]
    volume_score = 1.0 - volume_p_value  # P(no normal finding as strong); the p-value keeps what this rounds away
    watch.lap("findings")
    notify("postprocess", 1.0)

    timings = dict(watch.laps)
    timings["network"] = network_s
    timings["pipeline"] = sum(watch.laps.values()) - network_s
    first = members[0]
    settings = {"device": str(torch_device), "batch_size": engines[0].batch_size,
                "target_fp_per_volume": target_fp, "sensitivity": sensitivity, "min_size_mm3": min_size,
                "window_hu": list(first.spec.window_hu), "model_spacing_mm": first.spec.spacing_mm,
                "model_size": first.spec.size, "region": first.spec.region,
                "model_slices": engines[0].slices, "model_slice_spacing_mm": round(engines[0].slice_spacing_mm, 4)}
    model_info = {"name": card["name"], "version": card["version"], "method": card["method"]}
    reference_check, warnings = check_reference(unlike, volume, reorientation, hu_canonical.shape)
    coverage, coverage_warnings = check_coverage(coverages, volume.case_name)
    warnings += coverage_warnings
    warnings += check_slice_thickness(members, reorientation.canonical_spacing[0], volume.case_name)
    warnings += check_min_size(min_size, calibration.min_size_mm3, volume.case_name)
    if isinstance(scorer, Ensemble):
        settings["ensemble"] = {"combine": scorer.combine,
                                "member_volume_scores": [1.0 - p for p in volume_p_values]}
        model_info["members"] = card["members"]
    return DetectionResult(
        volume=volume, significance=significance, labels=labels, findings=findings, volume_score=volume_score,
        volume_p_value=volume_p_value,
        threshold=threshold, reconstruction=reconstruction, timings=timings, dropped_findings=dropped,
        threshold_significance=threshold_significance,
        model=model_info, settings=settings, reference_check=reference_check, warnings=warnings, coverage=coverage,
    )


def check_coverage(coverages: list[dict], case_name: str) -> tuple[dict, list[str]]:
    """The body outside the model's field of view (preprocess.coverage): of all members, the one leaving out the most,
    and a warning when that is at least COVERAGE_WARN_SHARE of the body."""
    record = max(coverages, key=lambda c: c["body_share_outside"])
    if record["body_share_outside"] < COVERAGE_WARN_SHARE:
        return record, []
    sides = ", ".join(f"{mm:g} mm {side}" for side, mm in record["beyond_mm"].items() if mm > 0)
    warning = (f"{record['body_share_outside'] * 100:.1f}% of the body lies outside the model's "
               f"{record['field_of_view_mm']:g} mm field of view (it reaches {sides} beyond it) and was not examined, "
               f"nor a {CUT_EDGE_MM:g} mm band inside the edges that cut it off")
    log.warning("%s: %s", case_name, warning)
    return record, [warning]


THICK_SLICE_FACTOR = 2.0  # slices more than this many times as thick as a model's are warned about


def check_slice_thickness(members: list[Detector], slice_spacing_mm: float, case_name: str) -> list[str]:
    """A warning when the input's slices are more than THICK_SLICE_FACTOR times as thick as those the model learned
    from (the card's input.slice_mm; the thinnest of an ensemble's): thin slices are averaged to the model's
    thickness, but thick ones cannot be made thin, and the calibration was not made on them."""
    thicknesses = [m.spec.slice_mm for m in members if m.spec.slice_mm > 0]
    if not thicknesses or slice_spacing_mm <= THICK_SLICE_FACTOR * min(thicknesses):
        return []
    model_mm = min(thicknesses)
    warning = (f"its slices are {slice_spacing_mm:.3g} mm apart, {slice_spacing_mm / model_mm:.1f}x the "
               f"{model_mm:g} mm the model learned from and was calibrated on: its p-values may be too small and its "
               "findings less reliable; a thinner reconstruction of the scan is better, if there is one")
    log.warning("%s: %s", case_name, warning)
    return [warning]


def check_min_size(min_size_mm3: float, calibrated_mm3: float, case_name: str) -> list[str]:
    """A warning when findings smaller than the calibration's minimum are kept (--min-size-mm3): normal CT makes more
    of them than the calibration counted, so the threshold lets through more false findings than --fp-rate or
    --sensitivity asks, and their p-values are too small. A larger minimum only drops findings (conservative)."""
    if min_size_mm3 >= calibrated_mm3:
        return []
    warning = (f"findings down to {min_size_mm3:g} mm3 are kept, but the model's false-finding rates were calibrated "
               f"on findings of at least {calibrated_mm3:g} mm3: expect more false findings than the sensitivity "
               "setting promises, and p-values that are too small")
    log.warning("%s: %s", case_name, warning)
    return [warning]


def check_reference(unlike: list, volume: CTVolume, reorientation: Reorientation, canonical_shape
                    ) -> tuple[dict, list[str]]:
    """The reference check of detect_volume (calibration.Calibration.unlike_reference): which canonical slices have
    UNLIKE_FACTOR times the highest share of high-probability voxels of any normal reference slice (for an
    ensemble, of any member's), as a findings.json record and a warning naming their superior-inferior extent."""
    ratios = [r for r in unlike if r is not None]
    if not ratios:
        return {"available": False, "reason": "the model's calibration predates the reference check; recalibrate it "
                                              "with `medanomaly calibrate`"}, []
    ratio = np.fmax.reduce(ratios)  # NaN only where no member measured the slice
    checked = np.isfinite(ratio)
    flagged = np.nonzero(checked & (ratio >= UNLIKE_FACTOR))[0]
    ranges = []
    for run in contiguous_runs(flagged):
        ends = []
        for z in (run[0], run[-1]):
            k, j, i = reorientation.input_index([z, (canonical_shape[1] - 1) / 2, (canonical_shape[2] - 1) / 2],
                                                canonical_shape)
            ends.append(round(float(volume.image.TransformContinuousIndexToPhysicalPoint((i, j, k))[2]), 1))
        ranges.append(sorted(ends))
    record = {"available": True, "level": REFERENCE_LEVEL, "factor": UNLIKE_FACTOR,
              "slices_checked": int(checked.sum()), "slices_unlike": int(flagged.size),
              "max_ratio": round(float(np.nanmax(ratio)), 3) if checked.any() else None,
              "unlike_s_mm": ranges}
    warnings = []
    if flagged.size:
        where = ", ".join(f"S {a:g} to {b:g} mm" if a != b else f"S {a:g} mm" for a, b in ranges[:4])
        where += f" and {len(ranges) - 4} more" if len(ranges) > 4 else ""
        warn(warnings, volume.case_name,
             f"{flagged.size} of {int(checked.sum())} slices ({where}) look unlike the model's normal reference: up "
             f"to {record['max_ratio']:.1f}x as large a share of their tissue above the {REFERENCE_LEVEL * 100:g}th "
             "percentile of normal tissue as any reference slice. The scan may differ from the model's training data "
             "(body region, contrast, kernel, scanner) or hold widespread disease; read the findings there with care")
    return record, warnings


def _score_member(detector: Detector, volume: CTVolume, reorientation: Reorientation, hu_canonical: np.ndarray,
                  device: torch.device, memory_budget_mb: float, notify, cancel, watch: "Stopwatch",
                  side: "ThreadPoolExecutor | _InThisThread", *, want_reconstruction: bool,
                  shared_slices: dict | None = None, transform=None):
    """One detector over the volume: its calibrated heatmap as significance on the input grid, its volume p-value (a
    future: `side`, a side_executor, computes it while the caller goes on), its pseudo-healthy reconstruction (HU on
    the input grid) when it makes one, the engine, each canonical slice's ratio to the normal reference
    (Calibration.unlike_reference) and how much of the body its field of view leaves out.
    `transform` (an ensemble's, Ensemble.member_transform) maps the significance inside the region before it goes to
    the input grid; the volume p-value and the reference check stay the member's own."""
    calibration = Calibration.from_card(detector.card["calibration"])
    slices = prepare_slices(hu_canonical, reorientation.canonical_spacing, detector.spec, shared_slices)
    if slices.grid.resamples_slices:
        log.info("%s: %d slices of %.3g mm averaged to %d of %.3g mm, the thickness model %s was trained on",
                 volume.case_name, slices.grid.native_slices, reorientation.canonical_spacing[0],
                 slices.grid.model_slices, slices.spacing_mm[0], detector.card["name"])
    watch.lap("preprocess")
    scores, recon, engine = score_slices(detector, slices, device=device, memory_budget_mb=memory_budget_mb,
                                         progress=notify, cancel=cancel)
    watch.lap("network_and_smoothing")
    notify("postprocess", 0.0)
    significance = calibration.voxel_significance(scores, slices.region)
    p_value = side.submit(calibration.volume_p_value, scores, slices.region, slices.spacing_mm, engine.slice_scores)
    unlike = calibration.unlike_reference(probability_of_significance(significance), slices.region)
    if unlike is not None:  # per canonical slice, from the model slice nearest to it
        unlike = unlike[slices.grid.native_slice_index()]
    if transform is not None:
        significance[slices.region] = transform(significance[slices.region])
    native = np.ascontiguousarray(reorientation.to_input(to_native(significance, slices)))
    np.maximum(native, 0.0, out=native)
    reconstruction = None
    if recon is not None and want_reconstruction:
        lo, hi = detector.spec.window_hu
        delta = unwindow(recon, (lo, hi)) - slices.hu.clamp(lo, hi).numpy()
        delta *= slices.body
        # in place on the one native-sized float32 array: rounded change + input HU, clipped to int16
        native_delta = to_native(delta, slices)
        np.rint(native_delta, out=native_delta)
        native_delta += hu_canonical
        np.clip(native_delta, -32768, 32767, out=native_delta)
        reconstruction = np.ascontiguousarray(reorientation.to_input(native_delta), dtype=np.int16)
        del native_delta
    watch.lap("postprocess")
    return native, p_value, reconstruction, engine, unlike, slices.coverage


def write_case(result: DetectionResult, output_dir: str | Path, *, mood: bool = False, overview: bool = True) -> Path:
    """Write a case's files into OUT/<case>/ atomically (a staging folder renamed when complete)."""
    volume, image = result.volume, result.volume.image
    t0 = time.perf_counter()
    with CaseStaging(Path(output_dir), volume.case_name) as staging:
        try:
            # the heatmap and significance (float32, one after the other, each array freed once copied into its
            # image) beside the other images, and the overview (drawn in this thread) meanwhile: at most one float32
            # map is held twice at a time, as when writing serially
            def maps():
                write_image(lambda: result.heatmap, image, staging.path / "heatmap.nrrd")
                # the heatmap's tail, which the float32 probability rounds to 1
                write_image(lambda: np.round(result.significance, SIGNIFICANCE_DECIMALS), image,
                            staging.path / "significance.nrrd")

            def others():
                if result.reconstruction is not None:
                    write_image(result.reconstruction, image, staging.path / "reconstruction.nrrd")
                write_image(result.labels, image, staging.path / "labels.nrrd")
                write_segmentation(result.labels, result.findings, image, staging.path / "anomalies.seg.nrrd")
                if volume.dicom_files and result.findings:
                    _write_dicom_objects(result, staging.path)

            with side_executor(2) as pool:
                pending = [pool.submit(maps), pool.submit(others)]
                if overview:
                    _write_overview(result, staging.path / "overview.png")
                for job in pending:
                    job.result()  # a writer's error is raised here, and the pool waits for the other first
            result.files = {name: name for name in sorted(p.name for p in staging.path.iterdir())}
            if mood:
                result.files["mood"] = write_mood(result.significance, image, result.volume_p_value, Path(output_dir),
                                                  Path(volume.source).name)
            result.timings["write"] = time.perf_counter() - t0
            result.files["findings.json"] = "findings.json"
            write_json(result.summary(), staging.path / "findings.json")
        except OSError as exc:
            raise OutputError(f"{output_dir}: writing results failed ({exc.strerror or exc}); "
                              "check free space and permissions") from None
        result.output_dir = staging.commit()
    return result.output_dir


def _write_dicom_objects(result: DetectionResult, folder: Path) -> None:
    """anomalies.seg.dcm and anomalies.sr.dcm (the findings table, referencing the SEG's segments) for a DICOM input
    with findings; a series that cannot carry them gets a warning, not a failed case (every other file is as good
    without them)."""
    name, case = result.model["name"], result.volume.case_name
    try:
        segmentation, sources = write_dicom_segmentation(
            result.labels, result.findings, result.volume.image, result.volume.dicom_files, folder / DICOM_SEG_FILE,
            model_name=name, software_version=__version__)
    except OutputError as exc:
        warn(result.warnings, case, f"no DICOM SEG or SR written: {exc}")
        return
    try:
        write_dicom_report(segmentation, sources, result.findings, folder / DICOM_SR_FILE, model_name=name,
                           software_version=__version__)
    except OutputError as exc:
        warn(result.warnings, case, f"no DICOM SR written: {exc}")


def _write_overview(result: DetectionResult, path: Path) -> None:
    """overview.png: axial and coronal views through the top finding, the case's warnings in its title."""
    volume = result.volume
    reorientation = Reorientation.for_image(volume.image)
    hu_canonical = reorientation.to_canonical(volume.hu)
    centres = [(f["id"], reorientation.canonical_index(f["centroid_ijk"][::-1], hu_canonical.shape))
               for f in result.findings]
    title = [f"{volume.case_name}: volume score {result.volume_score:.3f}, "
             f"{len(result.findings)} finding(s), model {result.model['name']}"]
    if result.reference_check.get("slices_unlike"):
        title.append(f"warning: {result.reference_check['slices_unlike']} slice(s) look unlike the "
                     "model's normal reference (findings.json)")
    if result.coverage.get("body_share_outside", 0.0) >= COVERAGE_WARN_SHARE:
        title.append(f"warning: {result.coverage['body_share_outside'] * 100:.1f}% of the body outside "
                     "the model's field of view, not examined (findings.json)")
    write_overview(path, hu_canonical, reorientation.to_canonical(result.significance), reorientation.canonical_spacing,
                   result.threshold_significance, centres, title="\n".join(title))


def detect(inputs: str | Path | Iterable[str | Path], output: str | Path | None = None, *,
           model: str | None = None, device: str = "auto", sensitivity: float | None = None,
           fp_rate: float | None = None, min_size_mm3: float | None = None, mood: bool = False,
           series: str | None = None, allow_non_hu: bool = False, max_memory_gb: float | None = None,
           memory_budget_mb: float = 1024.0, overview: bool = True,
           progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> list[DetectionResult]:
    """Detect anomalies in one or more CT volumes and write `OUT/<case>/` for each (the `medanomaly detect` command).

    Keywords match the command's flags. With `output=None` nothing is written and results stay in memory.
    """
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not paths:
        raise InputError("no input given; pass one or more CT files or DICOM folders")
    if sensitivity is not None and not 0.0 <= sensitivity <= 1.0:
        raise InputError(f"--sensitivity {sensitivity}: must lie between 0 and 1")
    if fp_rate is not None and fp_rate <= 0:
        raise InputError(f"--fp-rate {fp_rate}: must be a positive number of false positives per volume")
    if min_size_mm3 is not None and min_size_mm3 < 0:
        raise InputError(f"--min-size-mm3 {min_size_mm3}: must not be negative")
    pick_device(device)
    detector = load_scorer(model)
    if output is not None:
        _check_writable(Path(output))
    results = []
    for path in paths:
        t0 = time.perf_counter()
        volume = read_volume(path, series=series, allow_non_hu=allow_non_hu, max_memory_gb=max_memory_gb)
        read_s = time.perf_counter() - t0
        result = detect_volume(volume, detector, device=device, sensitivity=sensitivity, fp_rate=fp_rate,
                               min_size_mm3=min_size_mm3, memory_budget_mb=memory_budget_mb, progress=progress,
                               cancel=cancel)
        result.timings["read"] = read_s
        result.timings["pipeline"] += read_s
        if output is not None:
            write_case(result, output, mood=mood, overview=overview)
        result.timings["total"] = time.perf_counter() - t0
        results.append(result)
    return results


def _check_writable(output: Path) -> None:
    check_path_encoding(output, OutputError)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".medanomaly-write-test-{id(output)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{output}: output folder is not writable ({exc.strerror}); choose another with -o") from None
