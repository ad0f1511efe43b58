"""Registry of detection methods. A method registers its Detector class under the card's `method` name."""

from __future__ import annotations

import importlib

from ..bundle import ModelBundle
from ..errors import ModelError
from .base import Detector, DetectorOutput

# method name -> module that defines and registers it (imported on first use, so unused methods cost nothing)
METHOD_MODULES = {
    "vqvae-recon": "medanomaly.detectors.vqvae_recon",
    "hu-outlier": "medanomaly.detectors.hu_outlier",
    "vqvae-fs": "medanomaly.detectors.vqvae_fs",
    "deep-knn": "medanomaly.detectors.deep_knn",
    "stylegan2": "medanomaly.detectors.stylegan2",
    "shape-outlier": "medanomaly.detectors.shape_outlier",
}
_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    _REGISTRY[cls.method] = cls
    return cls


def detector_class(method: str) -> type[Detector]:
    if method not in _REGISTRY and method in METHOD_MODULES:
        importlib.import_module(METHOD_MODULES[method])
    if method not in _REGISTRY:
        known = ", ".join(sorted(METHOD_MODULES))
        raise ModelError(f"model method {method!r} is not known to this medanomaly (knows {known}); upgrade medanomaly")
    return _REGISTRY[method]


def build_detector(bundle: ModelBundle) -> Detector:
    return detector_class(bundle.method).from_bundle(bundle)


__all__ = ["Detector", "DetectorOutput", "register", "detector_class", "build_detector", "METHOD_MODULES"]
