"""Put one case's output files (OUT/<case>/) into an MRML scene: heatmap volume, segmentation, findings table and
the reconstruction. MRML API only, so tests run it on a real scene from PyPI's slicer-core."""

import json
import math
import os
import struct

import slicer

HEATMAP_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeInferno", "vtkMRMLColorTableNodeFileInferno.txt",
                          "vtkMRMLColorTableNodeRainbow")
TABLE_COLUMNS = [("id", "int"), ("name", "string"), ("flagged_by", "string"), ("p_value", "double"),
                 ("significance", "double"), ("max_probability", "double"), ("mean_probability", "double"),
                 ("volume_mm3", "double"), ("mean_hu", "double"), ("r_mm", "double"), ("a_mm", "double"),
                 ("s_mm", "double"), ("slice_first", "int"), ("slice_last", "int")]


def _read_node(scene, node_class, storage_class, path, name):
    """A node of `node_class` read from `path` by its MRML storage node, with default display nodes."""
    node = scene.AddNewNodeByClass(node_class, name)
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def _read_volume(scene, path, name):
    return _read_node(scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", path, name)


def _read_segmentation(scene, path, name, reference_volume):
    node = _read_node(scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", path, name)
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    return node


def findings_table(scene, findings, name):
    """A table node with one row per finding (RAS centroid, as Slicer shows coordinates; `flagged_by`, the model or
    the ensemble member that flagged it, empty for cases written before it was recorded)."""
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    makers = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}
    columns = []
    for column_name, kind in TABLE_COLUMNS:
        array = makers[kind]()
        array.SetName(column_name)
        table.AddColumn(array)
        columns.append(array)
    for f in findings:
        r, a, s = f["centroid_ras_mm"]
        values = [f["id"], f["name"], f.get("flagged_by", ""), f.get("p_value", float("nan")),
                  f.get("significance", float("nan")), f["max_probability"], f["mean_probability"], f["volume_mm3"],
                  f["mean_hu"], r, a, s, f["slice_range_k"][0], f["slice_range_k"][1]]
        for array, value in zip(columns, values):
            array.InsertNextValue(value)
    table.Modified()
    return table


def place_under_study(scene, input_volume, nodes):
    """Put result nodes beside the input in the subject hierarchy (under its study, when it has one)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    input_item = hierarchy.GetItemByDataNode(input_volume)
    if not input_item:  # outside Slicer nothing creates items automatically
        input_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), input_volume)
    parent = hierarchy.GetItemParent(input_item)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
        hierarchy.SetItemParent(item, parent)
    return parent


def _read_heatmap(scene, case_dir, summary):
    """The heatmap node to show over the CT, and its units. significance.nrrd (-log10(1 - probability), which keeps
    the calibrated tail that a float32 probability rounds to 1) where the case has it, else heatmap.nrrd. Shown from
    the detection threshold up (every finding's voxels included), coloured up to the volume's peak."""
    case = summary["case"]
    path = os.path.join(case_dir, "significance.nrrd")
    if "threshold_significance" in summary and os.path.exists(path):
        node = _read_volume(scene, path, f"{case} anomaly heatmap (significance)")
        lower = math.floor(summary["threshold_significance"] * 100.0) / 100.0  # the file holds 0.01 steps
        top = max(node.GetImageData().GetScalarRange()[1], lower + 1.0)
        units = "significance"
    else:
        node = _read_volume(scene, os.path.join(case_dir, "heatmap.nrrd"), f"{case} anomaly heatmap")
        # the threshold as the float32 file rounds it: rounding is monotone, so every voxel at or above the
        # threshold reads at or above this
        lower, top = struct.unpack("f", struct.pack("f", summary["threshold"]))[0], 1.0
        units = "probability"
    display = node.GetDisplayNode()
    for color_id in HEATMAP_COLOR_NODE_IDS:
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(lower - 0.3 * (top - lower), top)  # the weakest shown voxel dark red, not black
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(lower)
    display.SetUpperThreshold(1e6 if units == "significance" else 1.0)  # everything above the lower threshold
    return node, units


def load_case_into_scene(scene, case_dir, input_volume=None, heatmap_opacity=0.4):
    """Load OUT/<case>/ into `scene`; returns {"heatmap", "heatmap_units", "segmentation", "table", "reconstruction",
    "findings", "warnings"}."""
    with open(os.path.join(case_dir, "findings.json")) as f:
        summary = json.load(f)
    case = summary["case"]
    heatmap, units = _read_heatmap(scene, case_dir, summary)
    segmentation = _read_segmentation(scene, os.path.join(case_dir, "anomalies.seg.nrrd"), f"{case} anomalies",
                                      input_volume)
    table = findings_table(scene, summary["findings"], f"{case} findings")
    reconstruction = None
    if os.path.exists(os.path.join(case_dir, "reconstruction.nrrd")):
        reconstruction = _read_volume(scene, os.path.join(case_dir, "reconstruction.nrrd"), f"{case} pseudo-healthy")
    created = [heatmap, segmentation, table] + ([reconstruction] if reconstruction is not None else [])
    if input_volume is not None:
        place_under_study(scene, input_volume, created)
    if getattr(slicer, "app", None) is not None and input_volume is not None:  # inside Slicer: heatmap over the CT
        slicer.util.setSliceViewerLayers(background=input_volume, foreground=heatmap,
                                         foregroundOpacity=heatmap_opacity)
    return {"heatmap": heatmap, "heatmap_units": units, "segmentation": segmentation, "table": table,
            "reconstruction": reconstruction, "findings": summary["findings"],
            "warnings": summary.get("warnings", [])}
