"""MedAnomaly: unsupervised anomaly detection in CT, learned from normal scans.

The core never imports Slicer or Qt; the Slicer module and the `medanomaly` command both call `detect`.
"""

__version__ = "0.6.1"

__all__ = ["detect", "detect_volume", "__version__"]


def __getattr__(name: str):
    """`medanomaly.detect` and `detect_volume` import the pipeline (image I/O included) on first use, so that a
    submodule such as the training package loads without it, for example on a GPU node that only runs steps."""
    if name in ("detect", "detect_volume"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'medanomaly' has no attribute {name!r}")
