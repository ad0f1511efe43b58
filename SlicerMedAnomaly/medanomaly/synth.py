"""Realistic synthetic lesions in real CT, in HU, with exact masks: the anomaly lab's ground truth.

Every insertion works in canonical [S, P, L] orientation (so "dependent" means posterior for a supine patient),
stays inside its anatomy (lung, body), is deterministic for a seed, and returns the new volume, the mask of exactly
the voxels that changed, and a record of its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .orientation import Reorientation
from .preprocess import body_mask, lung_mask

LESION_KINDS = ("nodule_solid", "nodule_part_solid", "nodule_juxtapleural", "ggo", "consolidation", "needle",
                "effusion", "ascites", "mood_intensity", "mood_noise", "mood_deformation", "mood_mirror")
LUNG_KINDS = {"nodule_solid", "nodule_part_solid", "nodule_juxtapleural", "ggo", "consolidation", "effusion"}


@dataclass
class Insertion:
    """A volume with one lesion more: `volume` and `mask` in the input's [k, j, i] order."""

    volume: np.ndarray
    mask: np.ndarray
    record: dict = field(default_factory=dict)


def _trim(occupancy: np.ndarray, floor: float = 0.02) -> np.ndarray:
    """Occupancy below `floor` becomes 0, so soft edges do not spread sub-HU changes (and mask voxels) far out."""
    return np.where(occupancy >= floor, occupancy, 0.0).astype(np.float32)


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 as x goes from negative to positive, over about `width`."""
    return 1.0 / (1.0 + np.exp(-np.clip(x / max(width, 1e-6), -30, 30)))


class LesionInserter:
    """Insert lesions into one CT. Anatomy masks and the noise level are computed once, at native resolution."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.reorientation = Reorientation.for_image(image)
        self.spacing = np.asarray(self.reorientation.canonical_spacing)  # (S, P, L) mm
        original = sitk.GetArrayFromImage(image)
        self.dtype = original.dtype
        self.original = original
        self.hu = np.ascontiguousarray(self.reorientation.to_canonical(original), dtype=np.float32)
        self.body = body_mask(self.hu)
        self.lung = lung_mask(self.hu, self.body, tuple(self.spacing))
        self.noise_hu = self._noise_level()
        self.psf_sigma_vox = 0.45  # edges blurred to about one voxel, the scanner's resolution at this sampling

    # --------------------------------------------------------------------------------------------------------------
    # shared pieces

    def _noise_level(self) -> float:
        """Noise std of homogeneous soft tissue: robust spread of a high-pass image in voxels of -150..150 HU."""
        tissue = self.body & (self.hu > -150) & (self.hu < 150)
        tissue = ndi.binary_erosion(tissue, iterations=2)
        if tissue.sum() < 100:
            return 10.0
        highpass = self.hu - ndi.uniform_filter(self.hu, size=(1, 3, 3))
        values = highpass[tissue]
        mad = np.median(np.abs(values - np.median(values)))
        return float(1.4826 * mad * np.sqrt(9 / 8))  # the 3x3 mean removes 1/9 of the variance

    def _depth(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance in mm of each voxel of `region` from its border, on a coarse grid of about 2 mm, and the grid's
        step in voxels."""
        step = np.maximum(1, np.round(2.0 / self.spacing).astype(int))
        coarse = region[::step[0], ::step[1], ::step[2]]
        if not coarse.any():
            raise ValueError("the anatomy for this lesion is absent from the volume")
        return ndi.distance_transform_edt(coarse, sampling=self.spacing * step), step

    def _pick_centre(self, region: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
        """A random voxel of `region` at least `radius_mm` from its border (on a coarse grid), else any voxel."""
        depth, step = self._depth(region)
        candidates = np.argwhere(depth >= radius_mm)
        if candidates.size == 0:
            candidates = np.argwhere(depth >= depth.max() * 0.8)
        return candidates[rng.integers(len(candidates))] * step

    def _pick_pleural_centre(self, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
        """A random lung voxel 0.3-0.6 `radius_mm` inside the lung's border (on a coarse grid), so that a nodule of
        that radius centred there abuts the pleura: the chest wall, mediastinum or diaphragm."""
        depth, step = self._depth(self.lung)
        nearest = depth[depth > 0].min()  # the border voxels themselves, for nodules too small to reach 0.6 radii in
        candidates = np.argwhere((depth >= 0.3 * radius_mm) & (depth <= max(0.6 * radius_mm, nearest)))
        return candidates[rng.integers(len(candidates))] * step

    def _crop(self, centre: np.ndarray, half_mm: float) -> tuple[slice, ...]:
        half = np.ceil(half_mm / self.spacing).astype(int) + 2
        return tuple(slice(max(0, int(c - h)), min(n, int(c + h + 1))) for c, h, n in zip(centre, half, self.hu.shape))

    def _coords_mm(self, crop: tuple[slice, ...], centre: np.ndarray) -> np.ndarray:
        grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in crop], indexing="ij")
        return np.stack([(g - c) * sp for g, c, sp in zip(grids, centre, self.spacing)], axis=-1)

    def _psf(self, occupancy: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(occupancy, self.psf_sigma_vox, mode="constant")

    def _texture(self, shape, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        noise = ndi.gaussian_filter(rng.normal(size=shape).astype(np.float32), 0.6)
        return noise / (noise.std() + 1e-6) * self.noise_hu * scale

    def _finish(self, new_canonical: np.ndarray, record: dict) -> Insertion:
        new = self.reorientation.to_input(new_canonical)
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            new = np.clip(np.rint(new), info.min, info.max)
        new = np.ascontiguousarray(new.astype(self.dtype))
        mask = new != self.original
        record["changed_voxels"] = int(mask.sum())
        record["volume_mm3"] = round(float(mask.sum() * np.prod(self.spacing)), 2)
        return Insertion(volume=new, mask=mask, record=record)

    def _centre_record(self, centre) -> list[float]:
        kji = self.reorientation.input_index(centre, self.hu.shape)
        return [round(float(v), 2) for v in self.image.TransformContinuousIndexToPhysicalPoint(kji[::-1].tolist())]

    # --------------------------------------------------------------------------------------------------------------
    # lesion kinds

    def insert(self, kind: str, seed: int, **params) -> Insertion:
        """Insert one lesion of `kind` (see LESION_KINDS) drawn with `seed`; `params` override drawn values."""
        if kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}; choose from {', '.join(LESION_KINDS)}")
        rng = np.random.default_rng(seed)
        insertion = getattr(self, f"_insert_{kind.split('_')[0] if kind.startswith('mood') else kind}")(
            kind, rng, **params)
        insertion.record.update(kind=kind, seed=seed)
        return insertion

    def _insert_nodule_solid(self, kind, rng, **p):
        return self._nodule(kind, rng, part_solid=False, **p)

    def _insert_nodule_part_solid(self, kind, rng, **p):
        return self._nodule(kind, rng, part_solid=True, **p)

    def _insert_nodule_juxtapleural(self, kind, rng, **p):
        """A solid nodule on the pleura: centred just inside the lung's border, the part beyond it cut off by the
        lung (as a nodule growing against the chest wall is flattened there)."""
        return self._nodule(kind, rng, part_solid=False, pleural=True, **p)

    def _nodule(self, kind, rng, part_solid: bool, diameter_mm: float | None = None, hu: float | None = None,
                shape: str | None = None, pleural: bool = False):
        diameter = float(diameter_mm if diameter_mm is not None else rng.uniform(3.0, 30.0))
        radius = diameter / 2
        shape = shape or rng.choice(["lobulated", "spiculated"])
        hu = float(hu if hu is not None else rng.uniform(20.0, 60.0))
        centre = self._pick_pleural_centre(radius, rng) if pleural else self._pick_centre(self.lung, radius * 0.9, rng)
        reach = radius * (2.2 if shape == "spiculated" else 1.5) + 3
        crop = self._crop(centre, reach)
        xyz = self._coords_mm(crop, centre)
        dist = np.linalg.norm(xyz, axis=-1) + 1e-6
        unit = xyz / dist[..., None]
        # lobulation: a low-frequency radius function on the sphere
        r = np.full(dist.shape, radius, np.float32)
        for _ in range(4):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            r *= 1 + rng.uniform(0.04, 0.12) * np.cos(rng.integers(2, 4) * np.arccos(np.clip(unit @ v, -1, 1)))
        occupancy = _soft_step(r - dist, 0.3)
        if shape == "spiculated":  # thin tapering spikes out of the surface
            for _ in range(int(rng.integers(5, 11))):
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                along = xyz @ v
                off = np.linalg.norm(xyz - along[..., None] * v, axis=-1)
                length = radius * rng.uniform(0.4, 1.0)
                width = 0.6 * np.clip(1 - (along - radius) / length, 0, 1)
                spike = (along > 0) & (along < radius + length) & (off < width + 0.3)
                occupancy = np.maximum(occupancy, spike * _soft_step(width + 0.3 - off, 0.2))
        occupancy = _trim(self._psf(occupancy) * self.lung[crop])
        new = self.hu.copy()
        region = new[crop]
        target = hu + self._texture(region.shape, rng)
        if part_solid:
            core = _soft_step(0.5 * r - dist, 0.3)
            ground_glass = rng.uniform(-650.0, -450.0)
            target = np.where(core > 0.5, target, np.maximum(region, ground_glass + self._texture(region.shape, rng)))
        new[crop] = region * (1 - occupancy) + target * occupancy
        return self._finish(new, {"diameter_mm": round(diameter, 2), "hu": round(hu, 1), "shape": str(shape),
                                  "centre_lps_mm": self._centre_record(centre), "region": "lung"})

    def _blob(self, rng, radius: float, crop, centre) -> np.ndarray:
        """A smooth irregular occupancy: a smoothed random field inside a soft ellipsoid."""
        xyz = self._coords_mm(crop, centre)
        axes = radius * rng.uniform(0.7, 1.3, size=3)
        ellipsoid = 1 - np.sqrt(((xyz / axes) ** 2).sum(-1))
        sigma = np.maximum(radius / 4 / self.spacing, 0.5)
        field_ = ndi.gaussian_filter(rng.normal(size=ellipsoid.shape).astype(np.float32), sigma)
        field_ /= field_.std() + 1e-6
        return _soft_step(ellipsoid + 0.25 * field_, 0.08)

    def _insert_ggo(self, kind, rng, diameter_mm=None, hu=None):
        return self._opacity(kind, rng, diameter_mm, hu if hu is not None else rng.uniform(-700.0, -300.0))

    def _insert_consolidation(self, kind, rng, diameter_mm=None, hu=None):
        return self._opacity(kind, rng, diameter_mm, hu if hu is not None else rng.uniform(0.0, 50.0))

    def _opacity(self, kind, rng, diameter_mm, hu):
        diameter = float(diameter_mm if diameter_mm is not None else rng.uniform(15.0, 50.0))
        centre = self._pick_centre(self.lung, diameter / 2 * 0.7, rng)
        crop = self._crop(centre, diameter * 0.8 + 3)
        occupancy = _trim(self._psf(self._blob(rng, diameter / 2, crop, centre)) * self.lung[crop])
        new = self.hu.copy()
        region = new[crop]
        target = hu + self._texture(region.shape, rng)
        # only raises density: vessels denser than the target stay visible inside the opacity
        new[crop] = region + occupancy * np.maximum(target - region, 0)
        return self._finish(new, {"diameter_mm": round(diameter, 2), "hu": round(float(hu), 1),
                                  "centre_lps_mm": self._centre_record(centre), "region": "lung"})

    def _insert_needle(self, kind, rng, diameter_mm=None, hu=None, length_mm=None, streaks: bool | None = None):
        width = float(diameter_mm if diameter_mm is not None else rng.uniform(1.0, 2.0))
        hu = float(hu if hu is not None else rng.uniform(2000.0, 3000.0))
        length = float(length_mm if length_mm is not None else rng.uniform(40.0, 100.0))
        streaks = bool(rng.random() < 0.5) if streaks is None else streaks
        # from a point on the body surface towards the body's interior
        surface = self.body & ~ndi.binary_erosion(self.body)
        z_ok = np.zeros(self.hu.shape[0], bool)
        margin = int(np.ceil(length / 2 / self.spacing[0]))
        z_ok[margin:max(margin + 1, self.hu.shape[0] - margin)] = True
        points = np.argwhere(surface & z_ok[:, None, None])
        if points.size == 0:
            points = np.argwhere(surface)
        entry = points[rng.integers(len(points))].astype(float)
        inside = np.argwhere(ndi.binary_erosion(self.body, iterations=3)[::2, ::4, ::4]) * [2, 4, 4]
        toward = inside[rng.integers(len(inside))].astype(float)
        direction = (toward - entry) * self.spacing
        direction[0] *= 0.3  # needles enter mostly in-plane
        direction /= np.linalg.norm(direction)
        centre = entry + direction * (length / 2) / self.spacing
        crop = self._crop(centre, length / 2 + 3)
        xyz = self._coords_mm(crop, centre)
        along = xyz @ direction
        off = np.linalg.norm(xyz - along[..., None] * direction, axis=-1)
        segment = np.abs(along) <= length / 2
        occupancy = _trim(self._psf(segment * _soft_step(width / 2 - off, 0.15)) * self.body[crop])
        new = self.hu.copy()
        region = new[crop]
        new[crop] = region * (1 - occupancy) + hu * occupancy
        if streaks:  # bright and dark streaks radiating from the metal in each slice it crosses
            for z in np.nonzero(occupancy.max(axis=(1, 2)) > 0.3)[0]:
                yx = np.argwhere(occupancy[z] > 0.3).mean(0) + [crop[1].start, crop[2].start]
                yy, xx = np.mgrid[0:self.hu.shape[1], 0:self.hu.shape[2]]
                dy, dx = (yy - yx[0]) * self.spacing[1], (xx - yx[1]) * self.spacing[2]
                r = np.hypot(dy, dx) + 1e-6
                streak = np.zeros_like(r, dtype=np.float32)
                for k in range(6):
                    theta = rng.uniform(0, np.pi)
                    perp = np.abs(-np.sin(theta) * dx + np.cos(theta) * dy)
                    streak += (1 if k % 2 else -1) * 150 * np.exp(-perp**2 / 2) * np.exp(-r / 40.0)
                zz = crop[0].start + z
                new[zz] += streak * self.body[zz] * (r > width)
        return self._finish(new, {"diameter_mm": round(width, 2), "length_mm": round(length, 1), "hu": round(hu, 1),
                                  "streaks": streaks, "centre_lps_mm": self._centre_record(centre),
                                  "region": "body"})

    def _insert_effusion(self, kind, rng, depth_mm=None, hu=None):
        """Pleural effusion: the dependent (posterior) part of one lung filled with fluid, with a smooth border."""
        depth = float(depth_mm if depth_mm is not None else rng.uniform(10.0, 40.0))
        hu = float(hu if hu is not None else rng.uniform(0.0, 20.0))
        labels, n = ndi.label(self.lung)
        if n == 0:
            raise ValueError("the anatomy for this lesion is absent from the volume")
        sizes = np.bincount(labels.ravel())[1:]
        lung_id = 1 + int(rng.choice(np.argsort(sizes)[-2:]))  # one of the two largest lung components
        side = labels == lung_id
        zs = np.nonzero(side.any(axis=(1, 2)))[0]
        extent = (zs.max() - zs.min() + 1)
        z0 = zs.min() + int(rng.uniform(0.0, 0.4) * extent)
        z1 = min(zs.max(), z0 + max(2, int(rng.uniform(0.4, 0.8) * extent)))
        # per (z, x) column: posterior-most lung voxel, fluid fills up to `depth` above it, tapered in z
        y = np.arange(self.hu.shape[1])[None, :, None]
        posterior = np.where(side.any(axis=1), (side * y).max(axis=1), -1)  # (z, x)
        taper = np.zeros(self.hu.shape[0], np.float32)
        zz = np.arange(z0, z1 + 1)
        taper[zz] = np.sin(np.pi * (zz - z0 + 0.5) / (z1 - z0 + 1))
        level = posterior - (depth * taper)[:, None] / self.spacing[1]  # (z, x) in rows
        occupancy = _trim(_soft_step((y - level[:, None, :]) * self.spacing[1], 1.5) * side * (taper[:, None, None] > 0))
        new = self.hu.copy()
        target = hu + self._texture(new.shape, rng, 0.7)
        new = new * (1 - occupancy) + target * occupancy
        centre = np.argwhere(occupancy > 0.5).mean(0) if (occupancy > 0.5).any() else np.array([z0, 0, 0])
        return self._finish(new, {"depth_mm": round(depth, 1), "hu": round(hu, 1), "slices": [int(z0), int(z1)],
                                  "centre_lps_mm": self._centre_record(centre), "region": "lung"})

    def _insert_ascites(self, kind, rng, thickness_mm=None, hu=None):
        """Ascites: a fluid layer under the dependent and lateral abdominal wall, replacing soft tissue and fat."""
        thickness = float(thickness_mm if thickness_mm is not None else rng.uniform(5.0, 20.0))
        hu = float(hu if hu is not None else rng.uniform(0.0, 20.0))
        wall = 12.0
        step = np.maximum(1, np.round(2.0 / self.spacing).astype(int))
        depth = ndi.zoom(ndi.distance_transform_edt(self.body[::step[0], ::step[1], ::step[2]],
                                                    sampling=self.spacing * step),
                         np.array(self.hu.shape) / np.array(self.body[::step[0], ::step[1], ::step[2]].shape), order=1)
        depth = depth[:self.hu.shape[0], :self.hu.shape[1], :self.hu.shape[2]]
        soft = (self.hu > -150) & (self.hu < 150) & ~ndi.binary_dilation(self.lung, iterations=3)
        zs = np.nonzero((soft & self.body).any(axis=(1, 2)))[0]
        if zs.size == 0:
            raise ValueError("the anatomy for this lesion is absent from the volume")
        z0 = int(rng.choice(zs))
        z1 = min(self.hu.shape[0] - 1, z0 + int(rng.uniform(20.0, 60.0) / self.spacing[0]))
        rows = np.arange(self.hu.shape[1])[None, :, None]
        centre_row = np.argwhere(self.body).mean(0)[1]
        dependent = rows >= centre_row - 10.0 / self.spacing[1]
        band = _soft_step(depth - wall, 1.0) * _soft_step(wall + thickness - depth, 1.0)
        zmask = np.zeros(self.hu.shape[0], bool)
        zmask[z0:z1 + 1] = True
        occupancy = _trim(band * soft * dependent * zmask[:, None, None] * self.body)
        new = self.hu.copy()
        target = hu + self._texture(new.shape, rng, 0.7)
        new = new * (1 - occupancy) + target * occupancy
        centre = np.argwhere(occupancy > 0.5).mean(0) if (occupancy > 0.5).any() else np.array([z0, 0, 0])
        return self._finish(new, {"thickness_mm": round(thickness, 1), "hu": round(hu, 1),
                                  "slices": [int(z0), int(z1)], "centre_lps_mm": self._centre_record(centre),
                                  "region": "body"})

    def _insert_mood(self, kind, rng, diameter_mm=None, **p):
        """The MOOD challenge's kinds, in the body: intensity-shifted sphere, noise sphere, sink/source
        deformation, locally mirrored region."""
        diameter = float(diameter_mm if diameter_mm is not None else rng.uniform(10.0, 40.0))
        radius = diameter / 2
        centre = self._pick_centre(self.body, radius, rng)
        crop = self._crop(centre, radius + 3)
        xyz = self._coords_mm(crop, centre)
        dist = np.linalg.norm(xyz, axis=-1)
        inside = _trim(_soft_step(radius - dist, 0.5) * self.body[crop])
        new = self.hu.copy()
        region = new[crop]
        record = {"diameter_mm": round(diameter, 2), "centre_lps_mm": self._centre_record(centre), "region": "body"}
        if kind == "mood_intensity":
            shift = float(p.get("shift_hu", rng.choice([-1, 1]) * rng.uniform(150.0, 500.0)))
            new[crop] = region + shift * inside
            record["shift_hu"] = round(shift, 1)
        elif kind == "mood_noise":
            noise = rng.uniform(-1000.0, 1000.0, size=region.shape).astype(np.float32)
            new[crop] = region * (1 - inside) + noise * inside
        elif kind == "mood_deformation":
            gamma = float(p.get("gamma", rng.choice([0.5, 2.0])))  # < 1: source (expands), > 1: sink
            scale = np.where(dist < radius, (np.clip(dist, 1e-6, None) / radius) ** (gamma - 1), 1.0)
            source = centre[None, None, None, :] - np.array([s.start for s in crop]) + xyz * scale[..., None] / self.spacing
            warped = ndi.map_coordinates(region, np.moveaxis(source, -1, 0), order=1, mode="nearest")
            new[crop] = np.where(self.body[crop], warped, region)
            record["gamma"] = gamma
        elif kind == "mood_mirror":
            axis = int(p.get("axis", rng.integers(0, 3)))
            cube = tuple(slice(max(0, int(c - np.ceil(radius / s))), int(c + np.ceil(radius / s)) + 1)
                         for c, s in zip(centre, self.spacing))
            block = new[cube]
            new[cube] = np.where(self.body[cube], np.flip(block, axis), block)
            record["axis"] = ["S", "P", "L"][axis]
        else:
            raise ValueError(kind)
        return self._finish(new, record)


def thinner_slices(image: sitk.Image, factor: int, noise_hu: float = 0.0, noise_sigma_px: float = 0.0,
                   seed: int = 0) -> sitk.Image:
    """The CT as if reconstructed `factor` times thinner along its slice axis (k), over the same extent: linear
    interpolation between its slices (the nearest slice beyond the outer ones) plus, because thin slices are noisier
    than thick ones of the same scan, independent Gaussian noise of `noise_hu` std in every new slice, correlated
    in-plane like a reconstruction kernel (Gaussian of `noise_sigma_px` pixels; 0: white). Of a slice noise sigma0
    at thickness t, a thickness t / factor has sigma0 * sqrt(factor): add noise_hu = sigma0 * sqrt(factor - 1)."""
    spacing = np.array(image.GetSpacing())
    new_spacing = spacing / [1, 1, factor]
    new_size = [int(v) for v in np.array(image.GetSize()) * [1, 1, factor]]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # the first thin slice's centre lies (factor - 1) / 2 thin spacings before the first thick one's
    origin = np.array(image.GetOrigin()) - direction[:, 2] * new_spacing[2] * (factor - 1) / 2.0
    resample = sitk.ResampleImageFilter()
    resample.SetSize(new_size)
    resample.SetOutputSpacing(new_spacing.tolist())
    resample.SetOutputOrigin(origin.tolist())
    resample.SetOutputDirection(image.GetDirection())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetOutputPixelType(sitk.sitkFloat32)
    resample.UseNearestNeighborExtrapolatorOn()
    thin = sitk.GetArrayFromImage(resample.Execute(image))
    if noise_hu > 0:
        noise = np.random.default_rng(seed).standard_normal(thin.shape, dtype=np.float32)
        if noise_sigma_px > 0:
            noise = ndi.gaussian_filter(noise, (0, noise_sigma_px, noise_sigma_px))
            noise /= noise.std()
        thin += noise_hu * noise
    out = sitk.GetImageFromArray(np.clip(np.rint(thin), -32768, 32767).astype(np.int16))
    out.SetSpacing(new_spacing.tolist())
    out.SetOrigin(origin.tolist())
    out.SetDirection(image.GetDirection())
    return out


def insert_lesions(image: sitk.Image, kinds: list[str], seed: int) -> tuple[sitk.Image, np.ndarray, list[dict]]:
    """Insert several lesions in turn; returns the new image (same grid), a label map (lesion i = label i, later
    lesions over earlier ones) and their records. With no kinds the image comes back unchanged."""
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    records = []
    current = image
    for i, kind in enumerate(kinds, start=1):
        inserter = LesionInserter(current)
        insertion = inserter.insert(kind, seed=seed * 1000 + i)
        labels[insertion.mask] = i
        records.append(dict(insertion.record, label=i))
        current = sitk.GetImageFromArray(insertion.volume)
        current.CopyInformation(image)
    return current, labels, records
