"""Streaming normal CT slices for training and calibration, with bounded memory and a leakage-free slab split."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..bundle import content_hash
from ..errors import InputError
from ..orientation import Reorientation
from ..preprocess import InputSpec, ModelSlices, prepare_slices, with_context

log = logging.getLogger(__name__)


def slab_split(n_slices: int, block: int = 20, every: int = 3, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Split one patient's slices into training and held-out slabs along z.

    Every `every`-th block of `block` slices is held out; `margin` slices on each side of a held-out block are used
    for neither, so that no training slice lies within `margin` slices of a held-out one.
    """
    z = np.arange(n_slices)
    held = (z // block) % every == every - 1
    near = np.zeros(n_slices, bool)
    for i in np.nonzero(held)[0]:
        near[max(0, i - margin):i + margin + 1] = True
    train = ~held & ~near
    return z[train], z[held]


@dataclass
class SourceVolume:
    path: str
    sha256: str | None  # of the file's content, when asked for (it costs a full read)
    slices: ModelSlices
    train_z: np.ndarray
    heldout_z: np.ndarray


def load_sources(paths: Sequence[str], spec: InputSpec, *, split: bool, block: int = 20, every: int = 3,
                 margin: int = 3, with_hash: bool = False) -> Iterator[SourceVolume]:
    """One volume at a time on the model grid; `split` applies the slab split, otherwise all slices train."""
    from ..volumes import read_volume  # here, not above: training from prepared slices reads no image file

    for path in paths:
        volume = read_volume(path)
        reorientation = Reorientation.for_image(volume.image)
        slices = prepare_slices(reorientation.to_canonical(volume.hu), reorientation.canonical_spacing, spec)
        n = slices.hu.shape[0]
        # slices without body teach nothing and would dilute the calibration
        has_body = slices.body.reshape(n, -1).mean(axis=1) > 0.02
        if split:
            train_z, held_z = slab_split(n, block, every, margin)
        else:
            train_z, held_z = np.arange(n), np.arange(0)
        yield SourceVolume(path=str(path), sha256=content_hash(path) if with_hash else None,
                           slices=slices, train_z=train_z[has_body[train_z]], heldout_z=held_z[has_body[held_z]])


class SliceBuffer:
    """Training slices streamed from many volumes with bounded memory.

    Volumes are read one at a time. At most `max_slices` slices are held (a uniform random reservoir over everything
    read); when the data hold more, the buffer streams: every `refresh_every` batches it re-reads the next volume
    (round robin) and swaps that volume's share of the reservoir (max_slices * its slices / all slices) for freshly
    drawn slices of it, so that over a run every slice of every volume is seen while memory stays at one reservoir
    plus one volume. Held-out slabs are not kept: `heldout()` re-reads them when calibration asks.
    """

    def __init__(self, paths: Sequence[str], spec: InputSpec, *, split: bool, max_slices: int = 4096,
                 seed: int = 0, block: int = 20, every: int = 3, margin: int = 3, refresh_every: int = 50):
        if split and spec.context_slices > margin:
            raise InputError(f"input.context_slices {spec.context_slices} reaches past the slab split's margin of "
                             f"{margin} slices, so training slices would see held-out ones; use at most {margin}, or "
                             f"give --calibration-data (no slab split)")
        self.paths, self.spec, self.split, self.max_slices = list(paths), spec, split, max_slices
        self.split_args = {"block": block, "every": every, "margin": margin}
        self.refresh_every, self.batches_served, self.next_volume = refresh_every, 0, 0
        self.rng = np.random.default_rng(seed)
        self.records: list[dict] = []
        self.heldout_paths: list[str] = []
        self.counts: list[int] = []  # training slices per volume
        images, regions, origins = [], [], []
        for v, source in enumerate(load_sources(self.paths, spec, split=split, with_hash=True, **self.split_args)):
            self.records.append({"file": Path(source.path).name, "sha256": source.sha256,
                                 "train_slices": int(source.train_z.size),
                                 "heldout_slices": int(source.heldout_z.size),
                                 "slice_spacing_mm": round(float(source.slices.spacing_mm[0]), 6)})
            self.counts.append(int(source.train_z.size))
            if source.heldout_z.size:
                self.heldout_paths.append(source.path)
            images.append(network_input(source.slices, spec, source.train_z))
            regions.append(torch.from_numpy(source.slices.body[source.train_z]))
            origins.append(torch.stack([torch.full((source.train_z.size,), v), torch.from_numpy(source.train_z)], 1))
            if sum(len(i) for i in images) > max_slices:  # keep a uniform random subset
                keep = torch.from_numpy(self.rng.choice(sum(len(i) for i in images), max_slices, replace=False))
                images, regions, origins = ([torch.cat(images)[keep]], [torch.cat(regions)[keep]],
                                            [torch.cat(origins)[keep]])
        if not images or sum(len(i) for i in images) == 0:
            raise ValueError("no training slices with body found in the given data")
        self.images = torch.cat(images)  # [N, C, H, W]: C = spec.channels
        self.regions = torch.cat(regions)[:, None]
        self.origins = torch.cat(origins)  # [N, 2]: volume index and slice index of every held slice
        self.streaming = sum(self.counts) > max_slices
        if self.streaming:
            log.info("streaming: %d of %d training slices held, refreshed every %d batches", max_slices,
                     sum(self.counts), refresh_every)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.streaming and self.batches_served and self.batches_served % self.refresh_every == 0:
            self.refresh()
        self.batches_served += 1
        idx = torch.randint(len(self.images), (size,), generator=generator)
        return self.images[idx], self.regions[idx]

    def slice_spacing_mm(self) -> np.ndarray:
        """[N] spacing along S (mm) of every held slice's volume on the model grid (the spacing of its context
        slices); buffers saved before it was recorded take the spec's slice thickness."""
        fallback = self.spec.slice_mm or self.spec.spacing_mm
        per_volume = np.array([float(r.get("slice_spacing_mm", fallback)) for r in self.records])
        return per_volume[self.origins[:, 0].numpy()]

    def refresh(self) -> None:
        """Re-read the next volume and swap its share of the reservoir for fresh slices of it."""
        v = self.next_volume
        self.next_volume = (v + 1) % len(self.paths)
        share = max(1, round(self.max_slices * self.counts[v] / sum(self.counts)))
        source = next(load_sources([self.paths[v]], self.spec, split=self.split, **self.split_args))
        if source.train_z.size == 0:
            return
        z = self.rng.choice(source.train_z, min(share, source.train_z.size), replace=False)
        slots = torch.from_numpy(self.rng.choice(len(self.images), z.size, replace=False))
        self.images[slots] = network_input(source.slices, self.spec, z)
        self.regions[slots, 0] = torch.from_numpy(source.slices.body[z])
        self.origins[slots] = torch.stack([torch.full((z.size,), v), torch.from_numpy(z)], 1)

    def save(self, path: str | Path) -> None:
        """Write the held training slices (safetensors) with the data records, so that the gradient steps can run
        where the volumes (or an image reader) are not, for example on a GPU node. Only a buffer that holds all its
        slices can be saved: a streaming one would need its volumes again."""
        if self.streaming:
            raise ValueError("a streaming buffer cannot be saved: it re-reads its volumes while training")
        meta = {"records": self.records, "paths": self.paths, "spec": self.spec.to_card(), "split": self.split,
                "max_slices": self.max_slices, "split_args": self.split_args, "counts": self.counts}
        save_file({"images": self.images.contiguous(), "regions": self.regions.contiguous(),
                   "origins": self.origins.contiguous()}, str(path), metadata={"slice_buffer": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, spec: InputSpec, seed: int = 0) -> "SliceBuffer":
        """A buffer written by `save`; it must be for the same input spec as the model it trains."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["slice_buffer"])
        if InputSpec.from_card(meta["spec"]) != spec:
            raise ValueError(f"{path}: slices prepared for input {meta['spec']}, the model expects {spec.to_card()}")
        tensors = load_file(str(path))
        buffer = cls.__new__(cls)
        buffer.paths, buffer.spec, buffer.split, buffer.max_slices = meta["paths"], spec, meta["split"], meta["max_slices"]
        buffer.split_args, buffer.refresh_every, buffer.batches_served, buffer.next_volume = meta["split_args"], 50, 0, 0
        buffer.rng = np.random.default_rng(seed)
        buffer.records, buffer.counts, buffer.streaming = meta["records"], meta["counts"], False
        buffer.heldout_paths = [p for p, r in zip(meta["paths"], meta["records"]) if r["heldout_slices"]]
        buffer.images, buffer.regions, buffer.origins = tensors["images"], tensors["regions"], tensors["origins"]
        return buffer

    def heldout(self) -> Iterator[tuple[ModelSlices, np.ndarray]]:
        """(slices, held-out slice indices) of every volume with held-out slabs, read again one at a time."""
        for source in load_sources(self.heldout_paths, self.spec, split=True, **self.split_args):
            if source.heldout_z.size:
                yield source.slices, source.heldout_z


def network_input(slices: ModelSlices, spec: InputSpec, index) -> torch.Tensor:
    """[N, C, H, W] windowed slices `index` as the network takes them (with the spec's context slices)."""
    return with_context(slices.windowed(spec), index, spec.context_slices)


def augment(images: torch.Tensor, generator: torch.Generator, max_rotation_deg: float = 7.0,
            scale_range: float = 0.08, max_shift: float = 0.05) -> torch.Tensor:
    """Small random rotations, scalings and shifts (no left-right flips: anatomy is not symmetric)."""
    b = images.shape[0]
    rnd = lambda: torch.rand(b, generator=generator) * 2 - 1  # noqa: E731
    angle = rnd() * max_rotation_deg * np.pi / 180
    scale = 1 + rnd() * scale_range
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, rnd() * max_shift], 1),
                         torch.stack([sin, cos, rnd() * max_shift], 1)], 1)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
