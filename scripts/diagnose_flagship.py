"""Why the flagship misses the lab's small nodules and needles: where each stage of the model sees a lesion, measured
against the same slab's normal case (the lab inserts every lesion into a held-out slab that also has a normal case,
so the two model inputs differ only where the lesion is).

For every lesion of the sensitivity target (nodules >= 6 mm, needles) it reports, on the lesion's tokens (where the
windowed model input changed by more than 0.02, about 30 HU):
- codes: how many of those tokens changed VQ code;
- quantization error ||e - q||: its maximum there, against the normal case's maximum over the body (is the lesion
  novel to the codebook?);
- token probability P of the classifier: its maximum there, and the share of the normal case's body tokens with a
  probability at least as high (the lesion's rank among normal anatomy: what the map must beat);
- the same probability with a second pass shifted by half a token and the two maps' maximum (does the token grid's
  phase hide small lesions?);
- the pixel map (probability x residual) before and after the detector's 3D smoothing, and its best in-plane line
  mean (engine.line_scores, sigma LINE_MM along the line: does a needle survive where it is straight?), mapped back
  to the case's grid: its maximum on the lesion's label against the normal case's 99.9th percentile and maximum over
  the body (the finding threshold sits near there).

    python scripts/diagnose_flagship.py [--cases runs/lab-cases] [--model NAME] [--json OUT]

Build the cases first with scripts/benchmark_lab.py (they come from ../shared).
"""

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medanomaly.bundle import resolve_model
from medanomaly.detectors import build_detector
from medanomaly.engine import line_scores, smooth_scores, to_native
from medanomaly.lab import TARGET_SUBSETS
from medanomaly.orientation import Reorientation
from medanomaly.preprocess import prepare_slices, with_context
from medanomaly.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
CHANGED = 0.02  # window units: about 30 HU in the default's [-1000, 500] window
LINE_MM = 4.0  # sigma along the line of the in-plane line means


def token_maps(detector, path: Path, batch: int = 16) -> dict:
    """Model-grid input, codes, quantization error, token probability (and with a half-token shift) of a case."""
    volume = read_volume(str(path))
    reorientation = Reorientation.for_image(volume.image)
    slices = prepare_slices(reorientation.to_canonical(volume.hu), reorientation.canonical_spacing, detector.spec)
    windowed = slices.windowed(detector.spec)
    image = with_context(windowed, range(len(windowed)), detector.spec.context_slices)  # [Z, C, H, W]
    half = detector.stride // 2
    region = torch.from_numpy(slices.region[:, None])
    out = {"image": [], "codes": [], "qerr": [], "p": [], "p_shifted": [], "score": []}
    window = int(detector.arch["detection_window"])  # the token probability exactly as the map has it
    with torch.inference_mode():
        for start in range(0, len(image), batch):
            x = image[start:start + batch]
            out["score"].append(detector.score(x, region[start:start + batch]).score[:, 0].float().numpy())
            encodings, quantized, codes = detector.encode(x)
            out["image"].append(x[:, detector.middle].numpy())
            out["codes"].append(codes.numpy())
            out["qerr"].append((encodings - quantized).norm(dim=1).numpy())
            out["p"].append(detector.classifier.probability(quantized, window)[:, 0].numpy())
            # shifted by half a token: its token (i, j) covers pixels from (i, j) of the unshifted grid plus half
            _, shifted, _ = detector.encode(torch.roll(x, (half, half), (2, 3)))
            p = detector.classifier.probability(shifted, window)
            p = torch.nn.functional.interpolate(p, scale_factor=detector.stride, mode="nearest")
            p = torch.roll(p, (-half, -half), (2, 3))
            out["p_shifted"].append(torch.nn.functional.max_pool2d(p, detector.stride)[:, 0].numpy())
    maps = {k: np.concatenate(v) for k, v in out.items()}
    maps["body"] = torch.nn.functional.avg_pool2d(region.float(), detector.stride)[:, 0].numpy() > 0.5
    smoothed = smooth_scores(maps["score"], slices.region, slices.spacing_mm, detector.spec.smoothing_mm)
    line = line_scores(maps["score"], slices.region, slices.spacing_mm, LINE_MM)
    native = {"raw": maps.pop("score"), "smoothed": smoothed, "line": line, "region": slices.region.astype(np.float32)}
    for name, values in native.items():  # back on the case's own grid, where its label lies
        maps[f"{name}_input"] = reorientation.to_input(to_native(values, slices))
    maps["region_input"] = maps["region_input"] > 0.5
    return maps


def lesion_tokens(case: dict, normal: dict, stride: int) -> np.ndarray:
    changed = np.abs(case["image"] - normal["image"]) > CHANGED
    z, h, w = changed.shape
    return changed.reshape(z, h // stride, stride, w // stride, stride).any((2, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default=str(ROOT / "runs" / "lab-cases"))
    ap.add_argument("--model", default=None, help="a flagship (vqvae-fs) model; default: the catalog's default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases_dir = Path(args.cases)
    manifest = json.loads((cases_dir / "cases.json").read_text())
    bundle = resolve_model(args.model)
    detector = build_detector(bundle)
    detector.eval()
    if bundle.method != "vqvae-fs":
        raise SystemExit(f"{bundle.name} is a {bundle.method} model; give a vqvae-fs (flagship) model")
    normals = {c["group"]: token_maps(detector, cases_dir / c["volume"]) for c in manifest["cases"] if c["normal"]}
    rows = []
    for case in manifest["cases"]:
        subsets = [name for lesion in case["lesions"] for name, test in TARGET_SUBSETS.items() if test(lesion)]
        if case["normal"] or not subsets:
            continue
        normal = normals[case["group"]]
        maps = token_maps(detector, cases_dir / case["volume"])
        tokens = lesion_tokens(maps, normal, detector.stride)
        body = normal["body"]
        p_max = float(maps["p"][tokens].max())
        p_shift_max = float(np.maximum(maps["p"], maps["p_shifted"])[tokens].max())
        normal_shift = np.maximum(normal["p"], normal["p_shifted"])[body]
        lesion = case["lesions"][0]
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(cases_dir / case["labels"]))) > 0
        inside = normal["region_input"]
        rows.append({
            "case": case["case"], "subset": subsets[0], "kind": lesion["kind"],
            "diameter_mm": lesion.get("diameter_mm"), "lesion_tokens": int(tokens.sum()),
            "codes_changed": int((maps["codes"] != normal["codes"])[tokens].sum()),
            "qerr_max": float(maps["qerr"][tokens].max()), "normal_qerr_max": float(normal["qerr"][body].max()),
            "p_max": p_max, "normal_share_at_or_above": float((normal["p"][body] >= p_max).mean()),
            "p_max_with_shift": p_shift_max,
            "normal_share_at_or_above_with_shift": float((normal_shift >= p_shift_max).mean()),
            "raw_map_on_label": float(maps["raw_input"][label].max()),
            "normal_raw_map_p999": float(np.quantile(normal["raw_input"][inside], 0.999)),
            "smoothed_map_on_label": float(maps["smoothed_input"][label].max()),
            "normal_smoothed_map_p999": float(np.quantile(normal["smoothed_input"][inside], 0.999)),
            "line_map_on_label": float(maps["line_input"][label].max()),
            "normal_line_map_p999": float(np.quantile(normal["line_input"][inside], 0.999)),
            "normal_line_map_max": float(normal["line_input"][inside].max()),
        })
        r = rows[-1]
        print(f"{r['case']:<38} {r['lesion_tokens']:>3} tokens, {r['codes_changed']:>3} codes changed; qerr "
              f"{r['qerr_max']:.2f} (normal max {r['normal_qerr_max']:.2f}); P {r['p_max']:.3f}, normal body tokens "
              f"at or above: {100 * r['normal_share_at_or_above']:.2f}%; with the shifted pass P {r['p_max_with_shift']:.3f}, "
              f"{100 * r['normal_share_at_or_above_with_shift']:.2f}%; map on the label {r['raw_map_on_label']:.3f} "
              f"(normal 99.9th percentile {r['normal_raw_map_p999']:.3f}), smoothed {r['smoothed_map_on_label']:.3f} "
              f"({r['normal_smoothed_map_p999']:.3f}), line mean {r['line_map_on_label']:.3f} "
              f"({r['normal_line_map_p999']:.3f}, normal max {r['normal_line_map_max']:.3f})", flush=True)
    for group, normal in normals.items():
        p = normal["p"][normal["body"]]
        print(f"normal {group}: {normal['body'].sum()} body tokens; P >= 0.5 on {100 * (p >= 0.5).mean():.2f}%, "
              f">= 0.9 on {100 * (p >= 0.9).mean():.2f}%")
    for subset in TARGET_SUBSETS:
        chosen = [r for r in rows if r["subset"] == subset]
        if chosen:
            print(f"{subset}: median share of normal body tokens at or above the lesion's P: "
                  f"{100 * statistics.median(r['normal_share_at_or_above'] for r in chosen):.2f}% "
                  f"({100 * statistics.median(r['normal_share_at_or_above_with_shift'] for r in chosen):.2f}% with "
                  f"the shifted pass); lesions above every normal code's quantization error: "
                  f"{sum(r['qerr_max'] > r['normal_qerr_max'] for r in chosen)} of {len(chosen)}; lesions whose map "
                  f"exceeds the normal 99.9th percentile: {sum(r['raw_map_on_label'] > r['normal_raw_map_p999'] for r in chosen)}"
                  f" before smoothing, {sum(r['smoothed_map_on_label'] > r['normal_smoothed_map_p999'] for r in chosen)}"
                  f" after smoothing, {sum(r['line_map_on_label'] > r['normal_line_map_p999'] for r in chosen)} in the "
                  f"line means ({sum(r['line_map_on_label'] > r['normal_line_map_max'] for r in chosen)} above the "
                  f"normal maximum)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": bundle.card["name"], "cases": str(cases_dir),
                                               "lesions": rows}, indent=1))


if __name__ == "__main__":
    main()
