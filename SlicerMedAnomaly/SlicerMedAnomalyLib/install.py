"""Installing the core's dependencies inside Slicer, after the user agrees. Slicer's own numpy, SimpleITK and VTK
are never replaced; torch comes from the PyTorch extension, which picks the right CUDA build."""

from __future__ import annotations

import importlib.util

# Packages Slicer already ships: never reinstalled, whatever requirements.txt says
SLICER_OWNED = {"numpy", "simpleitk", "vtk", "torch"}


def requirements(path: str) -> list[str]:
    """Lines of Resources/requirements.txt without comments and without the packages Slicer owns."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = line.split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower()
            if name not in SLICER_OWNED:
                out.append(line)
    return out


def missing_modules(modules: dict[str, str]) -> list[str]:
    """Requirement lines whose import module is not importable; `modules` maps import name -> requirement."""
    return [req for module, req in modules.items() if importlib.util.find_spec(module) is None]


def ensure_dependencies(slicer, requirements_path: str, confirm) -> bool:
    """Install what is missing after `confirm(message)` returns True. `slicer` is passed in so that this runs
    (and is tested) without Slicer."""
    import_names = {"monai": "monai", "scipy": "scipy", "skimage": "scikit-image", "nrrd": "pynrrd",
                    "slicerio": "slicerio", "nibabel": "nibabel", "einops": "einops", "safetensors": "safetensors",
                    "jsonschema": "jsonschema", "tqdm": "tqdm", "matplotlib": "matplotlib"}
    wanted = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower(): line
              for line in requirements(requirements_path)}
    needed = [wanted.get(req.lower(), req) for req in missing_modules(import_names)]
    torch_missing = importlib.util.find_spec("torch") is None
    if not needed and not torch_missing:
        return True
    message = "MedAnomaly needs to install: " + ", ".join((["torch (PyTorch extension)"] if torch_missing else [])
                                                          + needed) + ". Install now?"
    if not confirm(message):
        return False
    if torch_missing:
        import PyTorchUtils  # from the PyTorch extension, a dependency of MedAnomaly

        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    if needed:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
            packaging.pip_ensure(needed)
        else:
            slicer.util.pip_install(" ".join(needed))
    return True

