"""MedAnomaly: unsupervised anomaly detection in CT, learned from normal scans.

The core never imports Slicer or Qt; the Slicer module and the `medanomaly` command both call `detect`.
"""

__version__ = "0.1.0"

from .api import detect, detect_volume  # noqa: E402

__all__ = ["detect", "detect_volume", "__version__"]
