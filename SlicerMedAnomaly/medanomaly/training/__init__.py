"""The companion training package: `medanomaly train --method M --data PATHS -o BUNDLE`.

Each method registers a trainer; this module does what they share: data, checkpoints, calibration, the bundle.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..bundle import CARD_FORMAT, CARD_NAME, ModelBundle, replace_dir, sha256_of, staging_dir
from ..calibration import Calibration, contiguous_runs
from ..detectors import Detector, build_detector as build_detector_from, detector_class
from ..engine import pick_device, score_slices
from ..errors import InputError
from ..preprocess import DEFAULT_SLICE_MM, InputSpec
from .data import SliceBuffer

log = logging.getLogger(__name__)

TRAINER_MODULES = {"vqvae-recon": "medanomaly.training.vqvae_recon", "hu-outlier": "medanomaly.training.hu_outlier",
                   "vqvae-fs": "medanomaly.training.vqvae_fs", "deep-knn": "medanomaly.training.deep_knn",
                   "stylegan2": "medanomaly.training.stylegan2", "shape-outlier": "medanomaly.training.shape_outlier",
                   "stylegan2-encoder": "medanomaly.training.stylegan2_encoder"}
WEIGHTS_NAME = "weights.safetensors"


def default_input() -> dict:
    """The input spec of a new model, unless the run gives one: the default InputSpec, slices DEFAULT_SLICE_MM thick."""
    return InputSpec(slice_mm=DEFAULT_SLICE_MM).to_card()


@dataclass
class TrainConfig:
    """Every knob of a training run; the whole config is written into the model card."""

    method: str = "vqvae-recon"
    name: str = "custom-model"
    version: str = "0.1.0"
    steps: int = 4000  # optimisation steps
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0
    input: dict = field(default_factory=lambda: default_input())
    architecture: dict = field(default_factory=dict)
    min_size_mm3: float = 65.0  # default smallest finding
    default_fp_per_volume: float = 0.32
    checkpoint_every: int = 250
    split_block: int = 20  # slab split of single-patient data (see data.slab_split)
    split_every: int = 3
    split_margin: int = 3
    description: str = ""
    device: str = "auto"


def trainer_for(method: str):
    if method not in TRAINER_MODULES:
        raise InputError(f"--method {method}: no trainer for it (known: {', '.join(TRAINER_MODULES)})")
    return importlib.import_module(TRAINER_MODULES[method])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors (model and optimizer), JSON for the rest. Never pickle.


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    losses: list[dict], config: TrainConfig, generator: torch.Generator, seconds: float = 0.0,
                    devices: Sequence[dict] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.generator"] = generator.get_state()
    tmp = folder / f".checkpoint.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    meta = {"step": step, "losses": losses, "param_groups": state["param_groups"], "config": config.__dict__,
            "seconds": seconds, "devices": list(devices)}
    tmp_meta = folder / f".checkpoint.json.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp, folder / "checkpoint.safetensors")
    os.replace(tmp_meta, folder / "checkpoint.json")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> tuple[int, list[dict], float, list[dict]]:
    """Restore a checkpoint; returns the step, the loss log, the training seconds spent before it and the devices
    that ran the steps so far."""
    meta = json.loads((folder / "checkpoint.json").read_text())
    tensors = load_file(str(folder / "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng.generator"])
    return int(meta["step"]), meta["losses"], float(meta.get("seconds", 0.0)), list(meta.get("devices", []))


# ----------------------------------------------------------------------------------------------------------------
# The shared run: data, optimisation loop with checkpoints, calibration on held-out normal slabs, bundle.


def slab_references(smoothed: np.ndarray, slices, z: np.ndarray) -> list:
    """(smoothed scores, region, spacing) of each run of contiguous slices `z` of a volume scored whole: the normal
    references Calibration.fit takes."""
    return [(smoothed[run], slices.region[run], slices.spacing_mm) for run in contiguous_runs(z)]


def calibrate(detector: Detector, buffer: SliceBuffer, calibration_paths: Sequence[str], config: TrainConfig,
              device: torch.device) -> tuple[Calibration, dict]:
    """Fit the calibration on held-out normal slices: separate volumes if given, else the held-out slabs."""
    references, slice_scores = [], []
    sources = buffer.heldout() if buffer is not None else []
    if calibration_paths:
        from .data import load_sources

        sources = ((s.slices, s.train_z) for s in load_sources(calibration_paths, detector.spec, split=False))
    for slices, z in sources:
        smoothed, _, engine = score_slices(detector, slices, device=device)
        references += slab_references(smoothed, slices, z)
        if engine.slice_scores is not None:
            slice_scores.append(engine.slice_scores[z])
    if not references:
        raise InputError("no held-out normal slices for calibration; give --calibration-data or more slices")
    calibration = Calibration.fit(references, min_size_mm3=config.min_size_mm3,
                                  default_fp_per_volume=config.default_fp_per_volume,
                                  slice_scores=np.concatenate(slice_scores) if slice_scores else None)
    summary = {"reference_slabs": len(references), "reference_slices": int(sum(r[0].shape[0] for r in references)),
               "reference_voxels": int(sum(r[1].sum() for r in references)),
               "source": "held-out volumes" if calibration_paths else "held-out slabs of the training volumes"}
    return calibration, summary


def write_bundle(output: Path, detector: Detector, card: dict) -> ModelBundle:
    """Write weights and card into a staging folder, then move it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(output.parent, output.name)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "name": card["name"]})
        os.chmod(staging / WEIGHTS_NAME, 0o644)
        card = dict(card, weights={WEIGHTS_NAME: sha256_of(staging / WEIGHTS_NAME)})
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        ModelBundle.load(staging).verify()
        replace_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelBundle.load(output)


def device_name(device: torch.device) -> str:
    """'cpu' or 'cuda (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def train(method: str, data: Sequence[str], output: str | Path, *, calibration_data: Sequence[str] = (),
          resume: bool = False, progress: Callable[[int, int, dict], None] | None = None,
          init_from: str | Path | None = None, init_prefixes: Sequence[str] | None = None,
          slices: SliceBuffer | None = None, finish: bool = True, **overrides) -> ModelBundle | None:
    """Train a bundle of `method` on normal CT volumes `data` and write it to `output`.

    With a single patient and no `calibration_data`, slices are split into training and held-out slabs with a margin
    between them (data.slab_split), and the held-out slabs calibrate the model. `init_from` starts from the weights
    of another bundle whose names begin with `init_prefixes` (by default the trainer's INIT_PREFIXES, for example the
    trained stage 1 of a vqvae-fs model, or every tensor); a bundle that holds none of them is refused.
    `slices` (a SliceBuffer.load) replaces reading `data` for the gradient steps; with `finish=False` the run stops
    after them, leaving the final checkpoint, and a later run with `resume=True` on the volumes calibrates and writes
    the bundle (the steps on a GPU node, calibration where the data are).
    """
    config = TrainConfig(method=method, **overrides)
    trainer = trainer_for(method)
    if not data and slices is None:
        raise InputError("no training data; pass normal CT volumes with --data")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = pick_device(config.device)
    output = Path(output)
    checkpoint_dir = output.with_name(output.name + ".checkpoint")
    spec = InputSpec.from_card(config.input)
    t0 = time.perf_counter()
    split_args = {"block": config.split_block, "every": config.split_every, "margin": config.split_margin}
    if slices is not None and (slices.split_args != split_args or slices.split != (not calibration_data)):
        raise InputError(f"the prepared slices were split with {slices.split_args} (split: {slices.split}); this run "
                         f"splits with {split_args} (split: {not calibration_data}): prepare them again")
    buffer = slices if slices is not None else SliceBuffer(
        data, spec, split=not calibration_data, seed=config.seed, block=config.split_block, every=config.split_every,
        margin=config.split_margin)
    log.info("training on %d slices from %d volume(s)", len(buffer), len(buffer.records))

    card_method = getattr(trainer, "CARD_METHOD", method)  # a trainer may train one part of another method's model
    card = {"card_format": CARD_FORMAT, "name": config.name, "version": config.version, "method": card_method,
            "min_software_version": __version__, "description": config.description, "input": spec.to_card(),
            "architecture": trainer.architecture(config.architecture)}
    detector = detector_class(card_method)(dict(card, calibration={}, weights={}, training={}))
    if hasattr(trainer, "fit"):  # statistics, not gradient steps
        detector.to(device)
        report = trainer.fit(detector, buffer)
        return _finish_bundle(output, detector, card, trainer, buffer, calibration_data, config, device,
                              time.perf_counter() - t0, [], dict(report), checkpoint_dir)
    if init_from is not None:
        source = ModelBundle.load(init_from).tensors()
        init_prefixes = tuple(init_prefixes if init_prefixes is not None else getattr(trainer, "INIT_PREFIXES", ("",)))
        own = detector.state_dict()
        chosen = {k: v for k, v in source.items() if k.startswith(init_prefixes) and k in own}
        if not chosen:
            raise InputError(f"--init-from {init_from}: the bundle holds no {method} weights named "
                             f"{' or '.join(repr(p + '*') for p in init_prefixes)}; start from a bundle of this method")
        missing = detector.load_state_dict(chosen, strict=False)
        log.info("initialised %d tensors from %s (%d left as built)", len(chosen), init_from,
                 len(missing.missing_keys))
        card["training_init"] = {"bundle": Path(init_from).name, "prefixes": list(init_prefixes)}
    model = trainer.trainable(detector)
    optimizer = (trainer.optimizer(model, config) if hasattr(trainer, "optimizer")
                 else torch.optim.Adam(model.parameters(), lr=config.learning_rate))
    scheduler = lambda step: 0.5 * (1 + np.cos(np.pi * min(step, config.steps) / config.steps))  # noqa: E731
    generator = torch.Generator().manual_seed(config.seed)
    step, losses, devices = 0, [], []
    if resume and (checkpoint_dir / "checkpoint.json").is_file():
        step, losses, seconds_before, devices = load_checkpoint(checkpoint_dir, model, optimizer, generator)
        t0 -= seconds_before  # the card reports the whole run's time
        for entry in devices:  # a run cut after this checkpoint ran no further steps that count
            entry["last_step"] = min(entry["last_step"], step)
        log.info("resumed from %s at step %d", checkpoint_dir, step)
    model.to(device).train()
    if step < config.steps:  # where these steps run, for the card
        devices.append({"device": device_name(device), "first_step": step + 1, "last_step": config.steps})
    rank, world = distributed_rank_and_size()
    if world > 1:  # each rank draws its own batches; DDP averages the gradients
        generator.manual_seed(config.seed + 1000 * rank)
        runner = DistributedDataParallel(LossModule(trainer, model),
                                         find_unused_parameters=getattr(trainer, "UNUSED_PARAMETERS", False))
    else:
        runner = LossModule(trainer, model)
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = group.get("base_lr", config.learning_rate) * scheduler(step)
        images, regions = buffer.batch(config.batch_size, generator)
        loss, parts = runner(images.to(device), regions.to(device), generator, step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if world > 1:
            sync_non_trainable(model)
        step += 1
        if step % 50 == 0 or step == config.steps:
            losses.append({"step": step, **{k: round(float(v), 6) for k, v in parts.items()}})
        if rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
            save_checkpoint(checkpoint_dir, model, optimizer, step, losses, config, generator,
                            seconds=time.perf_counter() - t0, devices=devices)
        if progress is not None and rank == 0:
            progress(step, config.steps, parts)
    model.eval()
    if not finish:
        log.info("stopped after %d steps; the checkpoint is in %s", step, checkpoint_dir)
        return None
    if hasattr(trainer, "finalize"):  # after the gradient steps, for example a memory of normal features
        report = trainer.finalize(detector, buffer, config)
        card["architecture"].update(report.pop("architecture", {}))
        report.update(trainer.training_report(detector, buffer))
    else:
        report = trainer.training_report(detector, buffer)
    if world > 1:
        report["distributed"] = {"world_size": world, "backend": dist.get_backend(),
                                 "max_parameter_divergence": parameter_divergence(model)}
        if rank != 0:  # rank 0 calibrates and writes the bundle
            dist.barrier()
            return None
    if devices:
        report["step_devices"] = devices
    bundle = _finish_bundle(output, detector, card, trainer, buffer, calibration_data, config, device,
                            time.perf_counter() - t0, losses, report, checkpoint_dir)
    if world > 1:
        dist.barrier()
    return bundle


# ----------------------------------------------------------------------------------------------------------------
# Distributed training (torchrun): DistributedDataParallel over a module whose forward is the trainer's loss


class LossModule(torch.nn.Module):
    """DDP synchronises gradients through a module's forward; this forward computes the trainer's loss."""

    def __init__(self, trainer, model: torch.nn.Module):
        super().__init__()
        self.trainer = trainer
        self.model = model

    def forward(self, images, regions, generator, step, config):
        return self.trainer.loss(self.model, images, regions, generator, step=step, config=config)


def distributed_rank_and_size() -> tuple[int, int]:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def sync_non_trainable(model: torch.nn.Module) -> None:
    """Parameters updated outside the optimizer (EMA codebooks, dead-code restarts) follow rank 0."""
    for p in model.parameters():
        if not p.requires_grad:
            dist.broadcast(p.data, src=0)
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


@torch.no_grad()
def parameter_divergence(model: torch.nn.Module) -> float:
    """Largest absolute difference of any parameter between this rank and rank 0, over all ranks."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _finish_bundle(output, detector, card, trainer, buffer, calibration_data, config, device, train_seconds,
                   losses, report, checkpoint_dir) -> ModelBundle:
    """Calibrate on held-out normal CT, write the card and weights, drop the checkpoint."""
    detector.to(device).eval()
    calibration, cal_summary = calibrate(detector, buffer, list(calibration_data), config, device)
    card.update(
        calibration=calibration.to_card(**cal_summary),
        training={"data": buffer.records, "calibration_data": [Path(p).name for p in calibration_data],
                  "config": config.__dict__, "seconds": round(train_seconds, 1), "device": str(device),
                  "torch": torch.__version__, "final_losses": losses[-1] if losses else {},
                  "losses": losses[::max(1, len(losses) // 40)], **report},
        evaluation={},
        memory_per_slice_mb=trainer.memory_per_slice_mb(),
    )
    bundle = write_bundle(output, detector.cpu(), card)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return bundle


def recalibrate(bundle_path: str | Path, *, data: Sequence[str] = (), calibration_data: Sequence[str] = (),
                output: str | Path | None = None) -> ModelBundle:
    """Refit a bundle's calibration without retraining: on `calibration_data` (whole normal volumes, for example a
    site's own), or else on the held-out slabs of `data` (default: the training volumes in the card) split as in
    training. Writes the bundle to `output` (default: in place)."""
    bundle = ModelBundle.load(bundle_path)
    card = bundle.card
    config = TrainConfig(**{k: v for k, v in card["training"]["config"].items() if k in TrainConfig.__dataclass_fields__})
    detector = build_detector_from(bundle)
    device = pick_device(config.device)
    detector.to(device)
    if calibration_data:
        buffer = None
    else:
        if not data:
            files = ", ".join(d["file"] for d in card["training"]["data"])
            raise InputError(f"give --data (the training volumes: {files}) or --calibration-data (normal volumes)")
        paths = list(data)
        buffer = SliceBuffer(paths, detector.spec, split=True, seed=config.seed, block=config.split_block,
                             every=config.split_every, margin=config.split_margin)
    calibration, summary = calibrate(detector, buffer, list(calibration_data), config, device)
    card = dict(card, calibration=calibration.to_card(**summary))
    return write_bundle(Path(output or bundle.path), detector.cpu(), card)
