"""3D Slicer module: Detect Anomalies on a loaded CT. Thin: all detection is in the `medanomaly` core, and putting
results into the scene is in SlicerMedAnomalyLib.scene (MRML only, no Qt), both testable outside Slicer."""

import os
import tempfile

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(__file__)


class SlicerMedAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedAnomaly"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedAnomaly developers"]
        self.parent.helpText = ("Finds what looks abnormal in a CT volume, learned from normal CT: a calibrated "
                                "heatmap, one segment per finding and a findings table.")
        self.parent.acknowledgementText = ("Default models are trained on public CT; see the README for sources "
                                           "and licences.")


class SlicerMedAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        VTKObservationMixin.__init__(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SlicerMedAnomaly.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerMedAnomalyLogic()
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.layout.addStretch(1)

    def onDetect(self):
        volume = self.ui.inputSelector.currentNode()
        if volume is None:
            slicer.util.errorDisplay("Select a CT volume first.")
            return
        with slicer.util.tryWithErrorDisplay("Anomaly detection failed.", waitCursor=True):
            self.logic.process(volume, sensitivity=self.ui.sensitivitySlider.value)


class SlicerMedAnomalyLogic(ScriptedLoadableModuleLogic):
    """Console API: `SlicerMedAnomalyLogic().process(volumeNode, model=None, sensitivity=None)` blocks and returns
    the created nodes."""

    def process(self, volumeNode, model=None, sensitivity=None, device="auto"):
        import medanomaly
        from SlicerMedAnomalyLib.scene import load_case_into_scene

        with tempfile.TemporaryDirectory(prefix="medanomaly-") as tmp:
            path = os.path.join(tmp, "input.nrrd")
            slicer.util.exportNode(volumeNode, path)
            output = os.path.join(tmp, "out")
            medanomaly.detect(path, output, model=model, sensitivity=sensitivity, device=device)
            return load_case_into_scene(slicer.mrmlScene, os.path.join(output, "input"), volumeNode)


class SlicerMedAnomalyTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_detect_on_demo()

    def test_detect_on_demo(self):
        demo = os.path.join(MODULE_DIR, "Resources", "Data", "chest_ct_demo.nii.gz")
        if not os.path.exists(demo):
            demo = os.path.join(MODULE_DIR, "..", "Testing", "Data", "chest_ct_demo.nii.gz")
        volume = slicer.util.loadVolume(demo)
        nodes = SlicerMedAnomalyLogic().process(volume)
        self.assertIsNotNone(nodes["heatmap"])
        self.assertIsNotNone(nodes["segmentation"])
        self.assertEqual(nodes["table"].GetNumberOfRows(), nodes["segmentation"].GetSegmentation().GetNumberOfSegments())
