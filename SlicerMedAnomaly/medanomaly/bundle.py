"""Model bundles: a folder with safetensors weights and a JSON model card, found by name through model catalogs.

Weights are only ever read from safetensors, after their SHA-256 matches the card: a bundle cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema

from . import __version__
from .errors import ModelError

if TYPE_CHECKING:  # torch loads with the weights, not with the catalog (batch's main process never needs it)
    import torch

CARD_NAME = "model_card.json"
CATALOG_NAME = "catalog.json"
CARD_FORMAT = 1  # bumped when a card can no longer be read by older code

CARD_SCHEMA = {
    "type": "object",
    "required": ["card_format", "name", "version", "method", "min_software_version", "input", "architecture",
                 "weights", "calibration", "training"],
    "properties": {
        "card_format": {"type": "integer"},
        "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"},
        "version": {"type": "string"},
        "method": {"type": "string"},
        "min_software_version": {"type": "string"},
        "description": {"type": "string"},
        "input": {
            "type": "object",
            "required": ["size", "spacing_mm", "window_hu", "region", "body_region"],
            "properties": {
                "size": {"type": "integer", "minimum": 16},
                "spacing_mm": {"type": "number", "exclusiveMinimum": 0},
                "window_hu": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                "region": {"enum": ["body", "lung", "lung_pleura"]},
                "body_region": {"type": "string"},
                "smoothing_mm": {"type": "number", "minimum": 0},
                "line_mm": {"type": "number", "minimum": 0},
                "slice_mm": {"type": "number", "minimum": 0},
                "context_slices": {"type": "integer", "minimum": 0, "maximum": 8},
            },
        },
        "architecture": {"type": "object"},
        "weights": {"type": "object", "minProperties": 1,
                    "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "calibration": {
            "type": "object",
            "required": ["voxel_quantiles", "voxel_levels", "fp_thresholds", "fp_per_cm", "fp_tail_slope",
                         "voxel_tail_scale", "default_fp_per_volume", "min_size_mm3"],
        },
        "training": {"type": "object"},
        "evaluation": {"type": "object"},
    },
}


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a volume file, or of a DICOM folder's file names and contents."""
    if not Path(path).is_dir():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.name.encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


@dataclass
class ModelBundle:
    """A validated bundle folder. `tensors()` loads its weights only after checking every SHA-256."""

    path: Path
    card: dict

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def method(self) -> str:
        return self.card["method"]

    @property
    def model_id(self) -> str:
        return f"{self.card['name']}@{self.card['version']}"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelBundle":
        path = Path(path)
        card_path = path / CARD_NAME
        if not card_path.is_file():
            raise ModelError(f"{path}: not a model bundle (no {CARD_NAME}); give a bundle folder or a catalog name")
        try:
            card = json.loads(card_path.read_text())
            jsonschema.validate(card, CARD_SCHEMA)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{card_path}: model card is not valid JSON ({exc}); re-import the bundle") from None
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "card"
            raise ModelError(f"{card_path}: model card is invalid at {where}: {exc.message}; re-import the bundle") from None
        if card["card_format"] != CARD_FORMAT:
            raise ModelError(f"{path}: model card format {card['card_format']} is not supported by medanomaly "
                             f"{__version__} (reads format {CARD_FORMAT}); use a matching medanomaly version")
        if _version_tuple(card["min_software_version"]) > _version_tuple(__version__):
            raise ModelError(f"{path}: model {card['name']} needs medanomaly >= {card['min_software_version']} "
                             f"(this is {__version__}); upgrade medanomaly")
        return cls(path=path, card=card)

    def verify(self) -> None:
        """Check every weight file against the SHA-256 in the card."""
        for filename, expected in self.card["weights"].items():
            file = self.path / filename
            if Path(filename).name != filename or not file.is_file():
                raise ModelError(f"{self.path}: weight file {filename!r} is missing; re-import the bundle")
            if sha256_of(file) != expected:
                raise ModelError(f"{file}: SHA-256 does not match the model card (corrupt or tampered); "
                                 "re-download or re-import the bundle")

    def tensors(self, filename: str | None = None) -> dict[str, torch.Tensor]:
        self.verify()
        filename = filename or next(iter(self.card["weights"]))
        from safetensors.torch import load_file

        return load_file(str(self.path / filename), device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Catalogs and the search path


def repository_models_dir() -> Path:
    """`models/` of a source checkout (SlicerMedAnomaly/medanomaly -> ../../models) or of an installed extension."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "models", here.parent / "Resources" / "models"):
        if (candidate / CATALOG_NAME).is_file():
            return candidate
    return here.parent.parent / "models"


def user_models_dir() -> Path:
    """Per-user cache shared by every Slicer and Python version: $MEDANOMALY_HOME or ~/.cache/medanomaly/models."""
    base = os.environ.get("MEDANOMALY_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "medanomaly")
    return Path(base) / "models"


def model_dirs() -> list[Path]:
    """Catalog folders searched in order: $MEDANOMALY_MODELS entries, the user cache, the shipped models."""
    dirs = [Path(p) for p in os.environ.get("MEDANOMALY_MODELS", "").split(os.pathsep) if p]
    return dirs + [user_models_dir(), repository_models_dir()]


def read_catalog(folder: Path, key: str = "models") -> list[dict]:
    """The catalog's model entries, or with key "ensembles" its recommended ensembles."""
    file = folder / CATALOG_NAME
    if not file.is_file():
        return []
    try:
        entries = json.loads(file.read_text()).get(key, [])
    except (json.JSONDecodeError, AttributeError):
        raise ModelError(f"{file}: catalog is not valid JSON; fix or delete it") from None
    return [dict(entry, catalog=str(folder)) for entry in entries]


def list_models() -> list[dict]:
    """Every catalog entry on the search path; an earlier folder shadows a later one with the same name."""
    seen, out = set(), []
    for folder in model_dirs():
        for entry in read_catalog(folder):
            if entry["name"] not in seen:
                seen.add(entry["name"])
                out.append(entry)
    return out


def list_ensembles(models: list[dict] | None = None) -> list[dict]:
    """The recommended ensembles of every catalog on the search path (entries with a `name` such as
    "ensemble-max:A,B", usable wherever a model name is), those whose members are all installed (`models`: the
    list_models() already read, if any); an earlier folder shadows a later one with the same name."""
    from .ensemble import parse_spec  # here: ensemble imports this module

    installed = {m["name"] for m in (list_models() if models is None else models)}
    seen, out = set(), []
    for folder in model_dirs():
        for entry in read_catalog(folder, "ensembles"):
            spec = parse_spec(entry["name"])
            if entry["name"] in seen or spec is None or not set(spec[1]) <= installed:
                continue
            seen.add(entry["name"])
            out.append(entry)
    return out


def ensemble_for_alias(name: str) -> str | None:
    """The ensemble spec ("ensemble-max:A,B,...") that a recommended ensemble's `alias` in a catalog stands for, or
    None when `name` is no such alias; a bundle folder or installed model of that name comes first."""
    if Path(name).is_dir():
        return None
    models = list_models()
    if any(m["name"] == name for m in models):
        return None
    return next((e["name"] for e in list_ensembles(models) if e.get("alias") == name), None)


def default_model_name() -> str:
    models = list_models()
    defaults = [m for m in models if m.get("default")]
    if not (defaults or models):
        raise ModelError("no model is installed; import one with `medanomaly models import BUNDLE`")
    return (defaults or models)[0]["name"]


def resolve_model(model: str | os.PathLike | None) -> ModelBundle:
    """A bundle from a folder path, a catalog name, or the catalog's default when `model` is None."""
    if model is not None and Path(model).is_dir():
        return ModelBundle.load(model)
    name = str(model) if model is not None else default_model_name()
    for entry in list_models():
        if entry["name"] == name:
            return ModelBundle.load(Path(entry["catalog"]) / entry["path"])
    known = ", ".join(m["name"] for m in list_models()) or "none"
    raise ModelError(f"unknown model {name!r} (installed: {known}); see `medanomaly models list`")


def catalog_entry(bundle: ModelBundle, path: str, default: bool = False) -> dict:
    card = bundle.card
    return {"name": card["name"], "path": path, "method": card["method"], "version": card["version"],
            "body_region": card["input"]["body_region"], "description": card.get("description", ""),
            "default": default}


def write_catalog(folder: Path, entries: list[dict], ensembles: list[dict] | None = None) -> None:
    """Write the catalog's model entries; its recommended ensembles are kept as they are unless given."""
    strip = lambda items: [{k: v for k, v in e.items() if k != "catalog"} for e in items]  # noqa: E731
    ensembles = read_catalog(folder, "ensembles") if ensembles is None else ensembles
    catalog = {"models": strip(entries), **({"ensembles": strip(ensembles)} if ensembles else {})}
    atomic_write_text(folder / CATALOG_NAME, json.dumps(catalog, indent=2) + "\n")


def import_model(source: str | os.PathLike, destination: Path | None = None) -> ModelBundle:
    """Verify a bundle and copy it into the user cache (or `destination`), then list it in that catalog."""
    bundle = ModelBundle.load(source)
    bundle.verify()
    folder = destination or user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / bundle.name
    staging = staging_dir(folder, bundle.name)
    try:
        for file in [CARD_NAME, *bundle.card["weights"]]:
            shutil.copy2(bundle.path / file, staging / file)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entries = [e for e in read_catalog(folder) if e["name"] != bundle.name]
    imported = ModelBundle.load(target)
    write_catalog(folder, entries + [catalog_entry(imported, bundle.name)])
    return imported


def download_model(url: str, sha256: str, destination: Path | None = None, *, timeout_s: float = 60.0,
                   progress=None) -> ModelBundle:
    """Download a bundle archive (.zip, .tar.gz/.tgz or .tar) from `url` only because the user asked, check the
    archive against the SHA-256 they give (published with the model), unpack it safely and import the bundle into
    the user cache (or `destination`), where every Slicer and Python version finds it.

    Nothing is written into the catalog unless every check passes; partial downloads are removed.
    """
    import tarfile
    import urllib.error
    import urllib.request
    import zipfile

    sha256 = (sha256 or "").strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ModelError("--sha256: give the 64-hex-digit SHA-256 published with the model archive")
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        raise ModelError(f"{url}: not a model archive; give a .zip, .tar.gz or .tar of a bundle folder")
    folder = destination or user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download.partial.", dir=folder))
    try:
        archive = work / name
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None and total:
                        progress("download", done / total)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ModelError(f"{url}: download failed ({reason}); check the address or download it yourself "
                             "and use `medanomaly models import`") from None
        if digest.hexdigest() != sha256:
            raise ModelError(f"{url}: SHA-256 {digest.hexdigest()[:12]}... does not match the one given "
                             f"({sha256[:12]}...); the file is corrupt or not the published model")
        unpacked = work / "unpacked"
        unpacked.mkdir()
        try:
            if name.endswith(".zip"):
                with zipfile.ZipFile(archive) as z:
                    members = z.namelist()
                    _refuse_unsafe_members(members, url)
                    z.extractall(unpacked)
            else:
                with tarfile.open(archive) as t:
                    members = t.getmembers()
                    _refuse_unsafe_members([m.name for m in members], url)
                    if any(not (m.isfile() or m.isdir()) for m in members):
                        raise ModelError(f"{url}: archive holds links or devices; a model archive holds files only")
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and patched 3.8+): refuse anything odd
                        t.extractall(unpacked, filter="data")
                    else:
                        t.extractall(unpacked)
        except (zipfile.BadZipFile, tarfile.TarError) as exc:
            raise ModelError(f"{url}: not a readable archive ({exc})") from None
        cards = sorted(unpacked.rglob(CARD_NAME))
        if len(cards) != 1:
            raise ModelError(f"{url}: the archive holds {len(cards)} model cards; it must hold one bundle folder")
        return import_model(cards[0].parent, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _refuse_unsafe_members(names: list[str], url: str) -> None:
    for member in names:
        parts = Path(member).parts
        if Path(member).is_absolute() or ".." in parts:
            raise ModelError(f"{url}: archive member {member!r} would be written outside its folder; refused")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def staging_dir(parent: Path, name: str) -> Path:
    """A fresh hidden folder beside the final `parent/name`, with the permissions a plain mkdir would give."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.partial.", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished folder into place; an older one at `target` is removed only after the new one is there."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
