"""The Slicer module outside Slicer: the process runner with real child processes, results put into a real MRML
scene from slicer-core, and static checks of the module's parameters, resources and extension entry."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT

sys.path.insert(0, str(ROOT / "SlicerMedAnomaly"))
from SlicerMedAnomalyLib.install import SLICER_OWNED, requirements  # noqa: E402
from SlicerMedAnomalyLib.parameters import PARAMETERS  # noqa: E402
from SlicerMedAnomalyLib.process import ProcessRunner, detect_command  # noqa: E402

MODULE = ROOT / "SlicerMedAnomaly"

PROGRESS_SCRIPT = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild to clean up
print(child.pid, flush=True)
for i in range(1, 5):
    print(f"PROGRESS network {i / 4:.3f}", flush=True)
    time.sleep(0.05)
if len(sys.argv) > 1 and sys.argv[1] == "fail":
    print("medanomaly: error: input.nii.gz: no such file or folder; check the path", flush=True)
    child.kill()
    sys.exit(2)
if len(sys.argv) > 1 and sys.argv[1] == "hang":
    time.sleep(60)
child.kill()
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def env():
    return dict(os.environ, PYTHONPATH=str(MODULE))


def test_runner_reports_progress_and_success():
    runner = ProcessRunner([sys.executable, "-c", PROGRESS_SCRIPT])
    state = runner.wait(timeout=60)
    assert state.returncode == 0 and state.error == ""
    assert state.stage == "network" and state.fraction == 1.0


def test_runner_reports_the_error_line():
    state = ProcessRunner([sys.executable, "-c", PROGRESS_SCRIPT, "fail"]).wait(timeout=60)
    assert state.returncode == 2
    assert state.error == "input.nii.gz: no such file or folder; check the path"


def test_cancel_ends_the_whole_process_tree_within_2_seconds():
    runner = ProcessRunner([sys.executable, "-c", PROGRESS_SCRIPT, "hang"])
    deadline = time.monotonic() + 30
    while runner.poll().fraction < 1.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int(runner.state.log[0])
    t0 = time.monotonic()
    runner.cancel()
    assert time.monotonic() - t0 < 2.0
    time.sleep(0.2)
    assert not alive(grandchild), "the grandchild process survived the cancel"
    assert runner.poll().finished and runner.state.returncode != 0


@pytest.fixture(scope="module")
def case_from_real_command(small_ct, default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer")
    from test_outputs import insert_nodule

    image, _ = insert_nodule(small_ct, radius_mm=10.0, hu=1000.0)
    path = root / "patient.nrrd"
    sitk.WriteImage(image, str(path))
    command = detect_command(sys.executable, str(path), str(root / "out"), model=str(default_model),
                             sensitivity=0.9)
    state = ProcessRunner(command, env=env()).wait(timeout=300)
    assert state.returncode == 0, "\n".join(state.log)
    assert any(line.startswith("PROGRESS network") for line in state.log)
    return root / "out" / "patient", path


def test_results_into_mrml_scene(case_from_real_command):
    slicer = pytest.importorskip("slicer")
    import vtk

    from SlicerMedAnomalyLib.scene import TABLE_COLUMNS, load_case_into_scene

    case, input_path = case_from_real_command
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(input_path))
    assert storage.ReadData(volume)
    nodes = load_case_into_scene(scene, str(case), volume)
    summary = json.loads((case / "findings.json").read_text())
    findings = summary["findings"]
    assert findings
    assert nodes["warnings"] == summary["warnings"]  # the module shows them under its status line
    # heatmap on the input's geometry
    heat = nodes["heatmap"]
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(heat.GetSpacing(), volume.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(heat.GetOrigin(), volume.GetOrigin(), atol=1e-6)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    heat.GetIJKToRASMatrix(a)
    volume.GetIJKToRASMatrix(b)
    assert all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))
    from vtk.util.numpy_support import vtk_to_numpy

    # shown as significance from the detection threshold up: every finding voxel is shown, colours up to the peak
    assert nodes["heatmap_units"] == "significance"
    display = heat.GetDisplayNode()
    assert summary["threshold_significance"] - 0.01 <= display.GetLowerThreshold() <= summary["threshold_significance"]
    shown = vtk_to_numpy(heat.GetImageData().GetPointData().GetScalars()) >= display.GetLowerThreshold()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nrrd"))).ravel()
    assert shown[labels > 0].all()
    assert display.GetWindowLevelMax() >= max(f["peak_significance"] for f in findings) - 0.01
    # segmentation: names, terminology, reference geometry from the input
    segmentation = nodes["segmentation"].GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(findings)
    for i, f in enumerate(findings):
        segment = segmentation.GetNthSegment(i)
        assert segment.GetName() == f"Anomaly {f['id']}"
        tag = vtk.reference("")
        assert segment.GetTag("TerminologyEntry", tag) and "Morphologically Altered Structure" in str(tag)
    geometry = nodes["segmentation"].GetNodeReferenceID("referenceImageGeometryRef")
    assert geometry == volume.GetID()
    # table: one row per finding, values from findings.json
    table = nodes["table"].GetTable()
    assert table.GetNumberOfRows() == len(findings)
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == [c for c, _ in TABLE_COLUMNS]
    column = {table.GetColumn(i).GetName(): i for i in range(table.GetNumberOfColumns())}
    for row, f in enumerate(findings):
        assert table.GetValue(row, column["name"]).ToString() == f["name"]
        assert table.GetValue(row, column["flagged_by"]).ToString() == f["flagged_by"] == summary["model"]["name"]
        assert table.GetValue(row, column["p_value"]).ToDouble() == pytest.approx(f["p_value"])
        assert table.GetValue(row, column["volume_mm3"]).ToDouble() == pytest.approx(f["volume_mm3"])
        assert table.GetValue(row, column["r_mm"]).ToDouble() == pytest.approx(f["centroid_ras_mm"][0])
    assert nodes["reconstruction"] is not None
    # everything sits beside the input in the subject hierarchy
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))
    for key in ("heatmap", "segmentation", "table", "reconstruction"):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(nodes[key])) == parent


def test_results_of_an_earlier_version_show_the_probability_heatmap(case_from_real_command, tmp_path):
    """A case written before significance.nrrd existed: the probability heatmap is shown, from its threshold as the
    float32 file holds it, so that every finding voxel shows."""
    slicer = pytest.importorskip("slicer")
    from vtk.util.numpy_support import vtk_to_numpy

    from SlicerMedAnomalyLib.scene import load_case_into_scene

    case, _ = case_from_real_command
    old = tmp_path / "old"
    shutil.copytree(case, old)
    (old / "significance.nrrd").unlink()
    summary = json.loads((old / "findings.json").read_text())
    del summary["threshold_significance"]
    (old / "findings.json").write_text(json.dumps(summary))
    scene = slicer.vtkMRMLScene()
    nodes = load_case_into_scene(scene, str(old))
    assert nodes["heatmap_units"] == "probability"
    display = nodes["heatmap"].GetDisplayNode()
    assert display.GetLowerThreshold() == float(np.float32(summary["threshold"]))
    heat = vtk_to_numpy(nodes["heatmap"].GetImageData().GetPointData().GetScalars())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(old / "labels.nrrd"))).ravel()
    assert (heat[labels > 0] >= display.GetLowerThreshold()).all()


def test_detect_command_matches_the_cli():
    from medanomaly.cli import _parser

    command = detect_command("python", "in.nii.gz", "out", model="m", device="cpu", sensitivity=0.7,
                             min_size_mm3=30)
    args = _parser().parse_args(command[3:])
    assert args.inputs == ["in.nii.gz"] and args.output == "out" and args.model == "m"
    assert args.sensitivity == 0.7 and args.min_size_mm3 == 30 and args.progress_lines


def test_ui_parameter_names_match_the_parameter_node():
    tree = ET.parse(MODULE / "Resources" / "UI" / "SlicerMedAnomaly.ui")
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound == set(PARAMETERS)
    source = ast.parse((MODULE / "SlicerMedAnomaly.py").read_text())
    wrapper = next(n for n in ast.walk(source) if isinstance(n, ast.ClassDef)
                   and n.name == "SlicerMedAnomalyParameterNode")
    annotated = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert annotated == set(PARAMETERS)


def test_module_follows_the_scripted_module_template():
    source = ast.parse((MODULE / "SlicerMedAnomaly.py").read_text())
    classes = {n.name for n in source.body if isinstance(n, ast.ClassDef)}
    assert {"SlicerMedAnomaly", "SlicerMedAnomalyWidget", "SlicerMedAnomalyLogic", "SlicerMedAnomalyTest"} <= classes
    logic = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == "SlicerMedAnomalyLogic")
    assert {"process", "processFiles"} <= {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}


def test_extension_index_entry():
    entry = json.loads((ROOT / "MedAnomaly.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    for key in ("build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_url", "tier"):
        assert key in entry, key
    assert "PyTorch" in entry["build_dependencies"]
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', (ROOT / "CMakeLists.txt").read_text())


def test_icon_is_128_square():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "SlicerMedAnomaly.png") as icon:
        assert icon.size == (128, 128)
    assert (ROOT / "Resources" / "overview.png").is_file(), "the screenshot named in CMakeLists.txt"


def test_requirements_never_replace_slicers_own_packages():
    lines = requirements(str(MODULE / "Resources" / "requirements.txt"))
    names = {re.split(r"[<>=\[~]", line)[0].strip().lower() for line in lines}
    assert not names & SLICER_OWNED
    assert "monai" in names and "slicerio" in names
