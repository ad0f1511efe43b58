"""Non-Qt helpers of the MedAnomaly Slicer module (MRML scene loading); importable outside Slicer with slicer-core."""
