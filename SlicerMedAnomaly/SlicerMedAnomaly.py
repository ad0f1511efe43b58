"""3D Slicer module: Detect Anomalies on a loaded CT.

Thin by design: detection is the `medanomaly` command run in a separate process (the same function the command line
and the Python API call), putting results into the scene is SlicerMedAnomalyLib.scene (MRML only), process handling
is SlicerMedAnomalyLib.process; both are tested outside Slicer.
"""

import logging
import math
import os
import sys
import tempfile

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(__file__)
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SlicerMedAnomalyLib.parameters import DEFAULTS  # noqa: E402
from SlicerMedAnomalyLib.process import ProcessRunner, detect_command  # noqa: E402


class SlicerMedAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedAnomaly"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedAnomaly developers"]
        self.parent.helpText = (
            "Finds what looks abnormal in a CT volume, learned from normal CT without labelled lesions: a calibrated "
            "heatmap, one segment per finding and a findings table. Select a CT and click Detect Anomalies.")
        self.parent.acknowledgementText = (
            "Default models are trained on public CT (ITKElastix example data); see the README for sources.")


@parameterNodeWrapper
class SlicerMedAnomalyParameterNode:
    """The module's parameters, bound to the .ui widgets by SlicerParameterName (see SlicerMedAnomalyLib.parameters)."""

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: str = DEFAULTS["device"]
    sensitivity: float = DEFAULTS["sensitivity"]
    minSizeMm3: float = DEFAULTS["minSizeMm3"]
    heatmapOpacity: float = DEFAULTS["heatmapOpacity"]
    showReconstruction: bool = DEFAULTS["showReconstruction"]


def slicer_python():
    """The Python that runs Slicer's modules (PythonSlicer next to the running interpreter, else sys.executable)."""
    folder = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return sys.executable


def child_environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([MODULE_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class SlicerMedAnomalyLogic(ScriptedLoadableModuleLogic):
    """Console API.

    `SlicerMedAnomalyLogic().process(volumeNode, model=None, sensitivity=None)` blocks and returns the created
    nodes; `processFiles(paths, outputDir)` runs many files and returns their case folders.
    """

    def getParameterNode(self):
        return SlicerMedAnomalyParameterNode(super().getParameterNode())

    def startProcess(self, inputPath, outputDir, model=None, device="auto", sensitivity=None, minSizeMm3=None):
        command = detect_command(slicer_python(), inputPath, outputDir, model=model, device=device,
                                 sensitivity=sensitivity, min_size_mm3=minSizeMm3)
        logging.info("MedAnomaly: %s", " ".join(command))
        return ProcessRunner(command, env=child_environment())

    def exportVolume(self, volumeNode, folder):
        """Write the node as NRRD named after it; the case folder takes the same name."""
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName()) or "volume"
        path = os.path.join(folder, f"{name}.nrrd")
        slicer.util.exportNode(volumeNode, path)
        return path

    def loadResults(self, caseDir, volumeNode=None):
        from SlicerMedAnomalyLib.scene import load_case_into_scene

        return load_case_into_scene(slicer.mrmlScene, caseDir, volumeNode)

    def process(self, volumeNode, model=None, sensitivity=None, device="auto", minSizeMm3=None):
        with tempfile.TemporaryDirectory(prefix="medanomaly-") as tmp:
            path = self.exportVolume(volumeNode, tmp)
            output = os.path.join(tmp, "out")
            state = self.startProcess(path, output, model, device, sensitivity, minSizeMm3).wait()
            for line in state.log:
                logging.info("medanomaly: %s", line)
            if state.returncode != 0:
                raise RuntimeError(state.error)
            case = os.path.basename(path)[: -len(".nrrd")]
            return self.loadResults(os.path.join(output, case), volumeNode)

    def processFiles(self, paths, outputDir, model=None, sensitivity=None, device="auto"):
        from medanomaly.volumes import case_name_for

        command = detect_command(slicer_python(), paths[0], outputDir, model=model, device=device,
                                 sensitivity=sensitivity)
        command[4:5] = list(paths)
        state = ProcessRunner(command, env=child_environment()).wait()
        if state.returncode != 0:
            raise RuntimeError(state.error)
        return [os.path.join(outputDir, case_name_for(p)) for p in paths]


class SlicerMedAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        VTKObservationMixin.__init__(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SlicerMedAnomaly.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerMedAnomalyLogic()
        self.runner = None
        self.results = None
        self.tmp = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectOrCancel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onOpacity)
        self.ui.heatmapThresholdSlider.connect("valueChanged(double)", self.onThreshold)
        self.ui.showReconstructionCheckBox.connect("toggled(bool)", self.onShowReconstruction)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        self.refreshModels()
        self.refreshDevices()
        self._parameterNode = self.logic.getParameterNode()
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.layout.addStretch(1)

    def cleanup(self):
        if self.runner is not None:
            self.runner.cancel()
        if getattr(self, "_parameterNode", None) is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self.removeObservers()

    # -- setup helpers -------------------------------------------------------------------------------------------

    def refreshModels(self):
        self.ui.modelSelector.clear()
        try:
            from medanomaly.bundle import list_ensembles, list_models

            for m in list_models():
                self.ui.modelSelector.addItem(f"{m['name']} - {m['body_region']}, {m['method']} {m['version']}",
                                              m["name"])
            for e in list_ensembles():  # recommended combinations, by the --model name the command line takes
                name = e.get("alias") or e["name"]
                self.ui.modelSelector.addItem(f"{name} - {e['body_region']}, ensemble ({e['name']})", name)
        except ImportError:
            self.ui.modelSelector.addItem("(dependencies not installed yet)", "")

    def refreshDevices(self):
        self.ui.deviceSelector.clear()
        for label, value in (("auto", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda")):
            self.ui.deviceSelector.addItem(label, value)
        try:
            import torch

            cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() \
                else "no CUDA device"
            self.ui.deviceInfoLabel.text = f"torch {torch.__version__} - {cuda}"
        except ImportError:
            self.ui.deviceInfoLabel.text = "torch not installed (installed with the PyTorch extension on first use)"

    def ensureDependencies(self):
        from SlicerMedAnomalyLib.install import ensure_dependencies

        return ensure_dependencies(slicer, self.resourcePath("requirements.txt"),
                                   lambda message: slicer.util.confirmOkCancelDisplay(message))

    # -- detection -----------------------------------------------------------------------------------------------

    def onDetectOrCancel(self):
        if self.runner is not None:
            self.runner.cancel()
            self.ui.statusLabel.text = "Cancelled."
            self.finishRun()
            return
        volume = self.ui.inputSelector.currentNode()
        if volume is None:
            slicer.util.errorDisplay("Select a CT volume first.")
            return
        if not self.ensureDependencies():
            return
        self.tmp = tempfile.TemporaryDirectory(prefix="medanomaly-")
        path = self.logic.exportVolume(volume, self.tmp.name)
        self.outputDir = os.path.join(self.tmp.name, "out")
        self.casePath = os.path.join(self.outputDir, os.path.basename(path)[: -len(".nrrd")])
        self.runner = self.logic.startProcess(
            path, self.outputDir, model=self.ui.modelSelector.currentData or None,
            device=self.ui.deviceSelector.currentData, sensitivity=self.ui.sensitivitySlider.value,
            minSizeMm3=self.ui.minSizeSpinBox.value)
        self.ui.detectButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.timer.start()

    def onPoll(self):
        state = self.runner.poll()
        self.ui.progressBar.value = int(100 * state.fraction)
        self.ui.statusLabel.text = f"{state.stage}..."
        if not state.finished:
            return
        for line in state.log:
            logging.info("medanomaly: %s", line)
        if state.returncode == 0:
            self.results = self.logic.loadResults(self.casePath, self.ui.inputSelector.currentNode())
            self.ui.findingsTableView.setMRMLTableNode(self.results["table"])
            lower = self.results["heatmap"].GetDisplayNode().GetLowerThreshold()  # the detection threshold
            slider_value = lower if self.results["heatmap_units"] == "significance" else -math.log10(1.0 - lower)
            wasBlocked = self.ui.heatmapThresholdSlider.blockSignals(True)
            self.ui.heatmapThresholdSlider.value = slider_value
            self.ui.heatmapThresholdSlider.blockSignals(wasBlocked)
            findings = self.results["findings"]
            text = f"{len(findings)} finding(s)."
            if findings and "p_value" in findings[0]:  # the chance that a normal scan this long has one as strong
                text = f"{len(findings)} finding(s); the strongest has p = {findings[0]['p_value']:.2g}"
                # an ensemble's: which member flagged it
                text += f", flagged by {findings[0]['flagged_by']}." if "member_shares" in findings[0] else "."
            for warning in self.results["warnings"]:  # for example slices unlike the model's normal reference
                logging.warning("medanomaly: %s", warning)
            warnings = self.results["warnings"]
            if warnings:
                text += f" Warning: {warnings[0]}"
                if len(warnings) > 1:  # all of them are in the tooltip
                    text += f" ({len(warnings) - 1} more warning(s): hover here)"
            self.ui.statusLabel.text = text
            self.ui.statusLabel.toolTip = "\n\n".join(self.results["warnings"])
        else:
            slicer.util.errorDisplay(f"Anomaly detection failed: {state.error}", detailedText="\n".join(state.log))
            self.ui.statusLabel.text = "Failed; see the log."
        self.finishRun()

    def finishRun(self):
        self.timer.stop()
        self.runner = None
        self.ui.detectButton.text = "Detect Anomalies"
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    # -- results -------------------------------------------------------------------------------------------------

    def onOpacity(self, value):
        for name in ("Red", "Green", "Yellow"):
            composite = slicer.app.layoutManager().sliceWidget(name).mrmlSliceCompositeNode()
            composite.SetForegroundOpacity(value)

    def onThreshold(self, value):
        """The slider is in significance, -log10(1 - probability): 3 shows voxels above 99.9% of normal tissue."""
        if self.results:
            level = value if self.results["heatmap_units"] == "significance" else 1.0 - 10.0 ** -value
            self.results["heatmap"].GetDisplayNode().SetLowerThreshold(level)

    def onShowReconstruction(self, show):
        if not self.results or self.results["reconstruction"] is None:
            return
        if show:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
            slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceCompositeNode().SetBackgroundVolumeID(
                self.results["reconstruction"].GetID())
        else:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)

    def onFindingSelected(self):
        if not self.results:
            return
        rows = self.ui.findingsTableView.selectionModel().selectedRows()
        if not rows:
            return
        finding = self.results["findings"][rows[0].row()]
        slicer.modules.markups.logic().JumpSlicesToLocation(*finding["centroid_ras_mm"], True)
        segmentation = self.results["segmentation"]
        display = segmentation.GetDisplayNode()
        for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            segment_id = segmentation.GetSegmentation().GetNthSegmentID(i)
            display.SetSegmentOpacity2DFill(segment_id, 0.8 if i == rows[0].row() else 0.2)

    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "Model bundle folder (model_card.json + weights)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Importing the model failed.", waitCursor=True):
            from medanomaly.bundle import import_model

            bundle = import_model(folder)
            slicer.util.infoDisplay(f"Imported {bundle.model_id}.")
            self.refreshModels()


class SlicerMedAnomalyTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_detect_on_demo()

    def test_detect_on_demo(self):
        demo = os.path.join(MODULE_DIR, "Resources", "Data", "chest_ct_demo.nii.gz")
        if not os.path.exists(demo):
            demo = os.path.join(MODULE_DIR, "..", "Testing", "Data", "chest_ct_demo.nii.gz")
        volume = slicer.util.loadVolume(demo)
        nodes = SlicerMedAnomalyLogic().process(volume, sensitivity=1.0)
        self.assertIsNotNone(nodes["heatmap"])
        self.assertEqual(nodes["heatmap"].GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        segments = nodes["segmentation"].GetSegmentation().GetNumberOfSegments()
        self.assertEqual(nodes["table"].GetNumberOfRows(), segments)
        self.assertEqual(segments, len(nodes["findings"]))
