"""Make the small real CT shipped for the quick start and the tests, from ../shared/data/ct/chest_ct_01.nii.gz.

Slices 30-89 (12 cm of mid-chest), downsampled 2x in-plane with anti-aliasing, stored as int16 NIfTI.
Provenance and licence: Testing/Data/README.md.
"""

import argparse
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "ct" / "chest_ct_01.nii.gz"))
    ap.add_argument("--output", default=str(ROOT / "Testing" / "Data" / "chest_ct_demo.nii.gz"))
    ap.add_argument("--slices", default="30:90")
    args = ap.parse_args()
    image = sitk.ReadImage(args.source)
    z0, z1 = (int(v) for v in args.slices.split(":"))
    image = image[:, :, z0:z1]
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32),
                                               [image.GetSpacing()[0] * 0.85] * 2 + [0.01])
    size = [image.GetSize()[0] // 2, image.GetSize()[1] // 2, image.GetSize()[2]]
    spacing = [image.GetSpacing()[0] * 2, image.GetSpacing()[1] * 2, image.GetSpacing()[2]]
    origin = image.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.0])
    out = sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, image.GetDirection(),
                        -1024.0, sitk.sitkFloat32)
    out = sitk.Cast(sitk.Round(out), sitk.sitkInt16)
    sitk.WriteImage(out, args.output, useCompression=True)
    a = sitk.GetArrayViewFromImage(out)
    print(f"wrote {args.output}: {out.GetSize()} at {out.GetSpacing()} mm, HU {a.min()}..{a.max()}, "
          f"{Path(args.output).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
