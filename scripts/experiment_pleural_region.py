"""Nodules on the pleura: how much of each lies in the lung regions, and a probe of blobness with the wall masked.

python scripts/experiment_pleural_region.py [--cases runs/lab-pleural] [--wall] [--notch] [--tophat MM ...]
    [--spacing MM]

For every nodule case of a lab case set (benchmark_lab.py, e.g. the pleural set built with --kinds
nodule_juxtapleural:6 ...), the share of the nodule's voxels (on the model grid of chest-ct-shape-outlier) inside
region "lung" (the lungs closed with a 6 mm disc) and "lung_pleura" (a 15 mm rolling ball), and how much larger
lung_pleura is on the normal slabs. With --wall, also the probe docs/RESULTS.md reports: the raw blobness peak of
each nodule against the normal slab's maximum, as is and with the HU outside lung_pleura set to air before the
Hessian. With --notch, the thickest dense notch (tissue above -400 HU that the rolling ball adds to the lungs) in
each nodule against the normal slab's thickest. With --tophat, the blobness peaks after a white top-hat of each
slice (the slice less its grey opening with a disc of MM radius). --spacing runs every probe on a finer or coarser
model grid.
The cases come from chest_ct_01 (see ../shared/data/SOURCES.md for its provenance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerMedAnomaly"))

from medanomaly.bundle import resolve_model  # noqa: E402
from medanomaly.detectors.shape_outlier import blobness  # noqa: E402
from medanomaly.orientation import Reorientation  # noqa: E402
from medanomaly.preprocess import InputSpec, prepare_slices, with_context  # noqa: E402


def white_top_hat(hu: torch.Tensor, radius_mm: float, spacing_mm: float) -> torch.Tensor:
    """Each slice less its grey opening with a disc of `radius_mm`: what is narrower than the disc (a nodule's bump,
    a vessel) stays, what is wider (the chest wall, the mediastinum) goes to zero."""
    r = int(round(radius_mm / spacing_mm))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (yy**2 + xx**2) <= r * r
    arr = hu.numpy()
    out = np.stack([arr[z] - ndi.grey_opening(arr[z], footprint=disc, mode="nearest") for z in range(arr.shape[0])])
    return torch.from_numpy(out) - 1000.0  # the same range as HU over air (a constant: the Hessian ignores it)


def blob_volume(slices, card_arch: dict, air_outside: bool, tophat_mm: float = 0.0) -> np.ndarray:
    """Raw blobness of every region voxel, as the shape outlier computes it (before the per-class scale)."""
    hu = slices.hu.clone()
    if air_outside:
        hu[~torch.from_numpy(slices.region)] = -1000.0
    if tophat_mm:
        hu = white_top_hat(hu, tophat_mm, slices.spacing_mm[1])
    out = np.zeros(slices.region.shape, np.float32)
    with torch.inference_mode():
        for start in range(0, hu.shape[0], 8):
            index = range(start, min(start + 8, hu.shape[0]))
            response = blobness(with_context(hu, index, 3), card_arch["sigmas_mm"], slices.spacing_mm[1],
                                slices.spacing_mm[0], True, "blob")
            out[start:start + len(index)] = response[:, 0].numpy()
    return out * slices.region


def notch_thickness(lung, wide) -> np.ndarray:
    """In-plane thickness (mm, twice the distance to its edge) of the dense tissue that the rolling ball adds to the
    lungs: lung_pleura, less the lung mask, above -400 HU. A nodule on the pleura is a bump there; the probe asks
    whether normal CT has bumps as thick."""
    notch = wide.region & ~lung.region & (wide.hu.numpy() > -400.0)
    out = np.zeros(notch.shape, np.float32)
    for z in np.nonzero(notch.reshape(notch.shape[0], -1).any(1))[0]:
        out[z] = 2.0 * ndi.distance_transform_edt(notch[z], sampling=wide.spacing_mm[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="runs/lab-pleural")
    ap.add_argument("--wall", action="store_true", help="also the wall-masking probe (slower)")
    ap.add_argument("--notch", action="store_true", help="also the probe of the dense notches the rolling ball fills")
    ap.add_argument("--tophat", type=float, nargs="*", default=[], metavar="MM",
                    help="also the probe of blobness after a white top-hat of each slice with a disc of MM radius")
    ap.add_argument("--spacing", type=float, default=None, metavar="MM",
                    help="the model grid's pixel size for every probe (default: the card's; the field of view is kept)")
    args = ap.parse_args()
    card = resolve_model("chest-ct-shape-outlier").card
    grid = {}
    if args.spacing:  # the same field of view on a finer or coarser grid
        grid = {"spacing_mm": args.spacing, "size": int(round(card["input"]["size"] * card["input"]["spacing_mm"]
                                                                 / args.spacing))}
    base = InputSpec.from_card(dict(card["input"], region="lung", **grid))
    pleura = InputSpec.from_card(dict(card["input"], region="lung_pleura", **grid))
    cases = json.loads((Path(args.cases) / "cases.json").read_text())["cases"]
    shares, normal_peak, peaks = {"lung": [], "lung_pleura": []}, {}, []
    notch_normal, notch_peaks = {}, []
    tophat_normal, tophat_peaks = {}, []
    for case in cases:
        image = sitk.ReadImage(str(Path(args.cases) / case["volume"]))
        r = Reorientation.for_image(image)
        hu = r.to_canonical(sitk.GetArrayFromImage(image))
        shared: dict = {}
        lung, wide = (prepare_slices(hu, r.canonical_spacing, spec, shared) for spec in (base, pleura))
        if case["normal"]:
            print(f"{case['case']}: lung_pleura / lung region voxels {wide.region.sum() / lung.region.sum():.4f}")
            if args.wall:
                normal_peak[case["group"]] = {m: blob_volume(wide, card["architecture"], m).max() for m in (0, 1)}
            for mm in args.tophat:
                tophat_normal[(case["group"], mm)] = blob_volume(wide, card["architecture"], False, mm).max()
            if args.notch:
                thickness = notch_thickness(lung, wide)
                components, n = ndi.label(thickness > 0)
                tops = sorted(ndi.maximum(thickness, components, range(1, n + 1)), reverse=True)[:5] if n else [0.0]
                notch_normal[case["group"]] = tops[0]
                print(f"{case['case']}: dense notches {n}, thickest (mm) {', '.join(f'{t:.1f}' for t in tops)}")
            continue
        if not case["lesions"][0]["kind"].startswith("nodule"):
            continue
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(args.cases) / case["labels"])))
        mask = np.ascontiguousarray(r.to_canonical(labels).astype(np.float32))
        lesion = lung.grid.to_model(torch.from_numpy(mask), 0.0).numpy() > 0.5
        shares["lung"].append(float(lung.region[lesion].mean()))
        shares["lung_pleura"].append(float(wide.region[lesion].mean()))
        print(f"{case['case']}: share in lung {shares['lung'][-1]:.2f}, in lung_pleura {shares['lung_pleura'][-1]:.2f}")
        if args.notch:
            notch_peaks.append((case["group"], case["case"], float(notch_thickness(lung, wide)[lesion].max())))
        if args.wall:
            peaks.append((case["group"], {m: blob_volume(wide, card["architecture"], m)[lesion].max() for m in (0, 1)}))
        for mm in args.tophat:
            peak = blob_volume(wide, card["architecture"], False, mm)[lesion].max()
            tophat_peaks.append((case["group"], mm, peak))
            print(f"{case['case']}: top-hat {mm:g} mm: nodule peak {peak:.1f}, normal slab's maximum "
                  f"{tophat_normal[(case['group'], mm)]:.1f}")
    for name, values in shares.items():
        print(f"{name}: nodule share in the region median {np.median(values):.2f}, range {min(values):.2f}-"
              f"{max(values):.2f} ({len(values)} nodules)")
    if args.notch:
        for group, name, value in notch_peaks:
            print(f"{name}: thickest dense notch in the nodule {value:.1f} mm (normal slab: {notch_normal[group]:.1f})")
        above = sum(value > notch_normal[group] for group, _, value in notch_peaks)
        print(f"dense notches: {above}/{len(notch_peaks)} nodules thicker than the normal slab's thickest")
    for mm in args.tophat:
        above = sum(p > tophat_normal[(group, mm)] for group, m, p in tophat_peaks if m == mm)
        print(f"top-hat {mm:g} mm: {above}/{len(peaks) or len(tophat_peaks) // len(args.tophat)} nodule peaks above "
              "the normal slab's maximum")
    for masked in (0, 1) if args.wall else ():
        above = sum(p[masked] > normal_peak[group][masked] for group, p in peaks)
        print(f"{'air outside the region' if masked else 'as is'}: {above}/{len(peaks)} nodule peaks above the "
              "normal slab's maximum")


if __name__ == "__main__":
    main()
