"""Preprocessing driven by a model card: resampling to the model grid (in plane, and thin slices to the model's slice
thickness), HU window, body and region masks.

Everything here works on canonical [S, P, L] arrays (see orientation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

AIR_HU = -1024.0
# the slice thickness that new models train and detect at unless their input spec says otherwise: that of the
# shipped models' training CT, about their in-plane pixel (1.75 mm at 256 x 256)
DEFAULT_SLICE_MM = 2.0
BODY_THRESHOLD_HU = -500.0
LUNG_THRESHOLD_HU = -400.0
# gas in the stomach or bowel, not lung: an air component whose median is below this (lung's vessels and parenchyma
# keep its median near -800 to -850 HU; a pocket of gas is nearly pure air) and that is much smaller than the largest
# air component (GAS_MAX_SHARE of it), so that an emphysematous lung, or one of two, is never taken for gas
GAS_MEDIAN_HU = -950.0
GAS_MAX_SHARE = 0.25
# region "lung_pleura": the lungs closed in plane with a rolling ball of this radius, so that a nodule on the pleura,
# which the -400 HU threshold leaves outside the lung, is scored as well (a notch up to twice as wide is filled)
PLEURA_CLOSING_MM = 15.0


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: a square in-plane grid of `size` pixels of `spacing_mm`, HU window, region mask."""

    size: int = 128
    spacing_mm: float = 3.5
    window_hu: tuple[float, float] = (-1000.0, 500.0)
    region: str = "body"  # "body", "lung" or "lung_pleura" (lungs and nodules on the pleura): where scores count
    smoothing_mm: float = 3.0  # 3D Gaussian sigma applied to slice-wise maps
    body_region: str = "chest"
    line_mm: float = 0.0  # > 0: also in-plane line means (Gaussian of this sigma along the line) keep thin straight
    #                       structures such as needles, which the 3D smoothing erases; the map is the larger of both
    slice_mm: float = 0.0  # > 0: slices thinner than this are averaged to this thickness first, the thickness the
    #                        model was trained and calibrated on (thinner slices are noisier); 0: native slices
    context_slices: int = 0  # > 0: the network sees this many neighbouring model slices on each side as extra
    #                          channels (2.5D): a nodule ends within a few slices, a vessel seen end-on does not

    @property
    def channels(self) -> int:
        """Input channels of the network: the slice and its context slices, in order along S."""
        return 1 + 2 * self.context_slices

    @classmethod
    def from_card(cls, spec: dict) -> "InputSpec":
        return cls(size=int(spec["size"]), spacing_mm=float(spec["spacing_mm"]),
                   window_hu=tuple(float(v) for v in spec["window_hu"]), region=spec.get("region", "body"),
                   smoothing_mm=float(spec.get("smoothing_mm", 3.0)), body_region=spec.get("body_region", "chest"),
                   line_mm=float(spec.get("line_mm", 0.0)), slice_mm=float(spec.get("slice_mm", 0.0)),
                   context_slices=int(spec.get("context_slices", 0)))

    def to_card(self) -> dict:
        card = {"size": self.size, "spacing_mm": self.spacing_mm, "window_hu": list(self.window_hu),
                "region": self.region, "smoothing_mm": self.smoothing_mm, "body_region": self.body_region}
        if self.line_mm > 0:
            card["line_mm"] = self.line_mm
        if self.slice_mm > 0:
            card["slice_mm"] = self.slice_mm
        if self.context_slices > 0:
            card["context_slices"] = self.context_slices
        return card


def with_context(slices: torch.Tensor, index, context: int) -> torch.Tensor:
    """[Z, H, W] slices -> [N, 1 + 2 * context, H, W]: for each slice in `index`, itself and `context` neighbours on
    each side, in order along S; beyond the first and last slice the edge slice is repeated."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    if context <= 0:
        return slices[index][:, None]
    shifts = torch.arange(-context, context + 1)
    return slices[(index[:, None] + shifts).clamp_(0, slices.shape[0] - 1)]


def window(hu, window_hu) -> torch.Tensor | np.ndarray:
    """HU to [0, 1] through the window (lo, hi); values outside are clipped."""
    lo, hi = window_hu
    return ((hu - lo) / (hi - lo)).clip(0, 1)


def unwindow(image, window_hu) -> torch.Tensor | np.ndarray:
    """The inverse of `window` inside it: [0, 1] window units back to HU."""
    lo, hi = window_hu
    return image * (hi - lo) + lo


@dataclass(frozen=True)
class ModelGrid:
    """Resize of every canonical slice to the model spacing, then a crop/pad of `size` x `size` centred on the body;
    with `model_slices` < `native_slices`, thin slices averaged along S to fewer, thicker ones (resample_slices)."""

    native_shape: tuple[int, int]  # (P, L) pixels of the canonical slice
    resized_shape: tuple[int, int]  # after resampling to the model spacing
    offset: tuple[int, int]  # top-left of the model window in the resized slice (may be negative: padding)
    size: int
    native_slices: int = 0  # canonical slices; 0: as many as model slices
    model_slices: int = 0

    @property
    def resamples_slices(self) -> bool:
        return 0 < self.model_slices != self.native_slices

    def to_model(self, slices: torch.Tensor, fill: float) -> torch.Tensor:
        """[Z, P, L] native slices -> [Z', size, size] on the model grid."""
        resized = _resize(slices, self.resized_shape)
        if self.resamples_slices:
            resized = resample_slices(resized, self.model_slices)
        return _window_crop(resized, self.offset, self.size, fill)

    def native_slice_index(self) -> np.ndarray:
        """For every canonical slice, the model slice whose centre is nearest along S."""
        if not self.resamples_slices:
            return np.arange(self.model_slices or self.native_slices)
        centres = (np.arange(self.native_slices) + 0.5) * self.model_slices / self.native_slices
        return np.clip(np.floor(centres), 0, self.model_slices - 1).astype(np.intp)

    def to_native(self, maps: torch.Tensor) -> torch.Tensor:
        """[Z', size, size] model-grid maps -> [Z, P, L] native slices (zero outside the model window); model slices
        are interpolated linearly along S back onto the native ones."""
        if self.resamples_slices:
            maps = resample_slices(maps, self.native_slices)
        z = maps.shape[0]
        canvas = maps.new_zeros((z,) + self.resized_shape)
        (y0, x0), s = self.offset, self.size
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + s, self.resized_shape[0]), min(x0 + s, self.resized_shape[1])
        canvas[:, ys:ye, xs:xe] = maps[:, ys - y0:ye - y0, xs - x0:xe - x0]
        return _resize(canvas, self.native_shape)


def _resize(slices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(slices.shape[-2:]) == tuple(shape):
        return slices
    down = shape[0] < slices.shape[-2] or shape[1] < slices.shape[-1]
    return F.interpolate(slices[:, None], size=shape, mode="bilinear", align_corners=False, antialias=down)[:, 0]


def resample_slices(slices: torch.Tensor, count: int) -> torch.Tensor:
    """[Z, H, W] -> [count, H, W] along the first axis, slice centres spread evenly over the same extent. Fewer
    slices: antialiased linear (a triangle profile as wide as the new slice spacing at half height, as a CT
    reconstruction of that thickness has); more: linear interpolation."""
    z, h, w = slices.shape
    if count == z:
        return slices
    flat = slices.reshape(1, 1, z, h * w)
    out = F.interpolate(flat, size=(count, h * w), mode="bilinear", align_corners=False, antialias=count < z)
    return out.reshape(count, h, w)


def model_slice_count(slices: int, spacing_mm: float, slice_mm: float) -> int:
    """How many model slices `slices` canonical ones of `spacing_mm` become: as many as fit at `slice_mm`, when
    that is fewer (thin slices averaged); otherwise unchanged (thick slices are not interpolated)."""
    if slice_mm <= 0:
        return slices
    return min(slices, max(1, int(round(slices * spacing_mm / slice_mm))))


def _window_crop(slices: torch.Tensor, offset, size: int, fill: float) -> torch.Tensor:
    (y0, x0) = offset
    h, w = slices.shape[-2:]
    out = slices.new_full((slices.shape[0], size, size), fill)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = slices[:, ys:ye, xs:xe]
    return out


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Body of the patient in a canonical [S, P, L] HU array: the largest 3D component above -500 HU, holes filled
    per slice; thin structures such as the couch are opened away first."""
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = ndi.generate_binary_structure(2, 1)
    mask = ndi.binary_opening(hu > BODY_THRESHOLD_HU, structure=inplane, iterations=1)
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(sizes.argmax())
    return ndi.binary_fill_holes(mask, structure=inplane)


def close_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing of each [S] slice of a [S, P, L] mask with a disc of `radius` pixels (yy^2 + xx^2 <= radius^2),
    as if the slice went on with background beyond its edges. By distance transforms, a dilation to distance <= radius
    and an erosion of what lies farther than radius from it: the same voxels as ndi.binary_closing with that disc,
    in a time that does not grow with the radius (3x faster at a radius of 9)."""
    pad = radius + 1
    out = np.zeros_like(mask)
    for z in np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]:
        padded = np.pad(mask[z], pad)
        dilated = ndi.distance_transform_edt(~padded) <= radius
        out[z] = (ndi.distance_transform_edt(dilated) > radius)[pad:-pad, pad:-pad]
    return out


def lung_mask(hu: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
              min_volume_ml: float = 20.0, closing_mm: float = 6.0) -> np.ndarray:
    """Lungs from HU thresholds and connectivity: air inside the body, in components of at least `min_volume_ml`
    that are not pockets of gas (see GAS_MEDIAN_HU), closed in plane with a disc of radius `closing_mm` so that
    vessels and nodules inside the lung are part of it (with PLEURA_CLOSING_MM, a rolling ball that takes in nodules on
    the pleura too)."""
    air = (hu < LUNG_THRESHOLD_HU) & body
    labels, n = ndi.label(air)
    if n == 0:
        return air
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    sizes = np.bincount(labels.ravel()) * voxel_ml
    sizes[0] = 0
    keep = sizes >= min_volume_ml
    candidates = np.nonzero(keep & (sizes < GAS_MAX_SHARE * sizes.max()))[0]
    if candidates.size:  # pockets of gas below the diaphragm (stomach, colon) are not lung
        medians = np.asarray(ndi.median(hu, labels, candidates))
        keep[candidates[medians < GAS_MEDIAN_HU]] = False
    lungs = keep[labels]
    lungs = close_in_plane(lungs, max(1, int(round(closing_mm / spacing_mm[1]))))
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = ndi.generate_binary_structure(2, 1)
    return ndi.binary_fill_holes(lungs, structure=inplane) & body


@dataclass
class ModelSlices:
    """A volume on the model grid: HU slices, the mask where scores count, and how to map back."""

    hu: torch.Tensor  # [Z, size, size] float32
    region: np.ndarray  # [Z, size, size] bool
    body: np.ndarray  # [Z, size, size] bool
    grid: ModelGrid
    spacing_mm: tuple[float, float, float]  # (S, P, L) spacing of the model grid
    coverage: dict = field(default_factory=dict)  # how much of the body lies outside the model window (coverage())
    cut: dict = field(default_factory=dict)  # where the body is cut off (cut_edges)

    def windowed(self, spec: InputSpec) -> torch.Tensor:
        return window(self.hu, spec.window_hu)


def prepare_slices(canonical_hu: np.ndarray, canonical_spacing, spec: InputSpec,
                   shared: dict | None = None) -> ModelSlices:
    """Resample canonical HU slices to the model's in-plane spacing (and thin slices to its slice thickness) and crop
    the model window around the body.

    `shared`: a dict kept by the caller for one volume, so that models on the same grid (an ensemble's members, which
    differ in window and method) resample the volume and find its body and region once. What is returned is then
    shared between them: read it, never write to it."""
    if shared is None:
        return _prepare_slices(canonical_hu, canonical_spacing, spec)
    key = (spec.size, spec.spacing_mm, spec.slice_mm, spec.region)
    if key not in shared:
        grid_key = key[:3]
        same_grid = next((v for k, v in shared.items() if k[:3] == grid_key), None)
        if same_grid is None:
            shared[key] = _prepare_slices(canonical_hu, canonical_spacing, spec)
        else:  # only the region differs
            shared[key] = replace(same_grid, region=_region(same_grid.hu.numpy(), same_grid.body,
                                                            same_grid.spacing_mm, same_grid.cut, spec.region))
    return shared[key]


def _region(hu: np.ndarray, body: np.ndarray, spacing_mm, cut: dict, region: str) -> np.ndarray:
    """Where scores count: the body or the lungs, less the bands along cut edges (_without_cut_edges)."""
    if region == "lung":
        mask = lung_mask(hu, body, spacing_mm)
    elif region == "lung_pleura":
        mask = lung_mask(hu, body, spacing_mm, closing_mm=PLEURA_CLOSING_MM)
    elif region == "body":
        mask = body
    else:
        raise ValueError(f"unknown region mask {region!r}")
    return _without_cut_edges(mask, cut, spacing_mm)


def _prepare_slices(canonical_hu: np.ndarray, canonical_spacing, spec: InputSpec) -> ModelSlices:
    sz, sy, sx = canonical_spacing
    z, h, w = canonical_hu.shape
    resized_shape = (max(1, int(round(h * sy / spec.spacing_mm))), max(1, int(round(w * sx / spec.spacing_mm))))
    vol = torch.from_numpy(np.ascontiguousarray(canonical_hu, dtype=np.float32)).clamp_(min=AIR_HU)
    resized = _resize(vol, resized_shape)
    model_z = model_slice_count(z, sz, spec.slice_mm)
    resized = resample_slices(resized, model_z)
    body_resized = body_mask(resized.numpy())
    if body_resized.any():
        cy, cx = (np.nonzero(body_resized.any(axis=0)))
        centre = ((cy.min() + cy.max()) / 2.0, (cx.min() + cx.max()) / 2.0)
    else:
        centre = ((resized_shape[0] - 1) / 2.0, (resized_shape[1] - 1) / 2.0)
    offset = (int(round(centre[0] - spec.size / 2.0)), int(round(centre[1] - spec.size / 2.0)))
    grid = ModelGrid(native_shape=(h, w), resized_shape=resized_shape, offset=offset, size=spec.size,
                     native_slices=z, model_slices=model_z)
    hu = _window_crop(resized, offset, spec.size, AIR_HU)
    body = _window_crop(torch.from_numpy(body_resized), offset, spec.size, False).numpy()
    cut = cut_edges(body_resized, offset, spec.size)
    examined = coverage(body_resized, int(body.sum()), offset, spec, cut)
    model_spacing = (z * float(sz) / model_z, h * sy / resized_shape[0], w * sx / resized_shape[1])
    region = _region(hu.numpy(), body, model_spacing, cut, spec.region)
    return ModelSlices(hu=hu, region=region, body=body, grid=grid, spacing_mm=model_spacing, coverage=examined,
                       cut=cut)


CUT_EDGE_MM = 15.0  # where the body is cut off (by the model window or the scan's own field of view), this band
#                     along the cut is not scored either


def cut_edges(body: np.ndarray, offset: tuple[int, int], size: int) -> dict[str, tuple[np.ndarray, int]]:
    """Where the examined part of each resized slice cuts the body off: for each side (anterior, posterior, right,
    left), which slices have body on the first examined row or column of that side or beyond it, and where that row
    or column lies in the model window. The examined part ends at the window's edge, or at the image's edge where the
    window reaches past the image: a scan whose field of view truncated the patient cuts the body off too."""
    (y0, x0), (z, h, w) = offset, body.shape
    first_row, last_row = max(y0, 0), min(y0 + size, h) - 1
    first_col, last_col = max(x0, 0), min(x0 + size, w) - 1
    parts = {"anterior": (body[:, :first_row + 1], first_row - y0), "posterior": (body[:, last_row:], last_row - y0),
             "right": (body[:, :, :first_col + 1], first_col - x0), "left": (body[:, :, last_col:], last_col - x0)}
    return {side: (part.reshape(z, -1).any(axis=1), edge) for side, (part, edge) in parts.items()}


def _without_cut_edges(region: np.ndarray, cut: dict[str, tuple[np.ndarray, int]],
                       spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The region less the voxels within about CUT_EDGE_MM of where the body is cut off (a band inside the cut edge,
    in the cut slices and as many mm above and below them): there the model sees the body end abruptly in air, a
    skin line that no normal CT has, and would report it as a finding."""
    if not any(flags.any() for flags, _ in cut.values()):
        return region
    reach, rows, cols = (int(np.ceil(CUT_EDGE_MM / s)) for s in spacing_mm)
    region = region.copy()
    for side, (flags, edge) in cut.items():
        if not flags.any():
            continue
        band = {"anterior": np.s_[:, edge:edge + rows], "posterior": np.s_[:, max(edge - rows + 1, 0):edge + 1],
                "right": np.s_[:, :, edge:edge + cols], "left": np.s_[:, :, max(edge - cols + 1, 0):edge + 1]}[side]
        near = ndi.binary_dilation(flags, iterations=reach) if reach > 0 else flags
        part = region[near]
        part[band] = False
        region[near] = part
    return region


def coverage(body: np.ndarray, body_in_window: int, offset: tuple[int, int], spec: InputSpec,
             cut: dict[str, tuple[np.ndarray, int]]) -> dict:
    """How much of the body (on the resized slices) the model window of `spec.size` pixels at `offset` leaves out:
    the share of body voxels outside it, how far the body reaches past each of its edges, in mm (canonical rows run
    anterior to posterior, columns patient right to left), and the sides where the body is cut off (`cut`, from
    cut_edges: by the window or by the scan's own field of view). A trunk wider than the window (size x spacing,
    448 mm for the shipped models) is examined only within it."""
    total = int(body.sum())
    beyond = dict.fromkeys(("anterior", "posterior", "right", "left"), 0.0)
    if total:
        rows, cols = np.nonzero(body.any(axis=(0, 2)))[0], np.nonzero(body.any(axis=(0, 1)))[0]
        (y0, x0), size = offset, spec.size
        pixels = {"anterior": y0 - rows[0], "posterior": rows[-1] + 1 - (y0 + size),
                  "right": x0 - cols[0], "left": cols[-1] + 1 - (x0 + size)}
        beyond = {side: round(max(0, int(px)) * spec.spacing_mm, 1) for side, px in pixels.items()}
    return {"field_of_view_mm": round(spec.size * spec.spacing_mm, 1),
            "body_share_outside": round(1.0 - body_in_window / total, 5) if total else 0.0, "beyond_mm": beyond,
            "cut_off": [side for side, (flags, _) in cut.items() if flags.any()]}
