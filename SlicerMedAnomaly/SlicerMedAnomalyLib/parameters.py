"""Names of the module's parameters: the .ui binds widgets to them (SlicerParameterName) and the parameter node
wrapper declares them; a test checks that both agree."""

PARAMETERS = {
    "inputVolume": "vtkMRMLScalarVolumeNode",
    "model": str,
    "device": str,
    "sensitivity": float,
    "minSizeMm3": float,
    "heatmapOpacity": float,
    "showReconstruction": bool,
}
DEFAULTS = {"device": "auto", "sensitivity": 0.5, "minSizeMm3": 65.0, "heatmapOpacity": 0.4,
            "showReconstruction": False}
