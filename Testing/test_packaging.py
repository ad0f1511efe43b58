"""Static checks of the extension: CMake lists every file, the .ui parses, module files compile, core purity."""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET

from conftest import ROOT

MODULE = ROOT / "SlicerMedAnomaly"


def cmake_list(name: str) -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "SlicerMedAnomaly") for line in block.splitlines() if line.strip()}


def test_every_python_file_is_listed_in_cmake():
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    listed = cmake_list("MODULE_PYTHON_SCRIPTS")
    assert on_disk == listed, f"unlisted: {on_disk - listed}, listed but absent: {listed - on_disk}"


def test_every_resource_is_listed_in_cmake():
    on_disk = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert on_disk == cmake_list("MODULE_PYTHON_RESOURCES")


def test_shipped_models_are_installed_where_the_core_looks():
    """CMake copies models/ to <module>/Resources/models (build tree and install), the place that
    repository_models_dir() searches in an installed extension, and every catalog entry is a folder there."""
    import json

    text = (MODULE / "CMakeLists.txt").read_text()
    source = re.search(r"set\(MODULE_MODELS_DIR (\S+)\)", text).group(1).replace("${CMAKE_CURRENT_SOURCE_DIR}", str(MODULE))
    assert (ROOT / "models").resolve() == __import__("pathlib").Path(source).resolve()
    assert "Resources/models" in re.search(r"install\(DIRECTORY \$\{MODULE_MODELS_DIR\}/(.*?)\)", text, re.S).group(1)
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/models" in text
    from medanomaly import bundle

    core = (MODULE / "medanomaly" / "bundle.py").read_text()
    assert '"Resources" / "models"' in core and bundle.CATALOG_NAME == "catalog.json"
    for entry in json.loads((ROOT / "models" / "catalog.json").read_text())["models"]:
        assert (ROOT / "models" / entry["path"] / "model_card.json").is_file()


def test_root_cmake_names_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(MedAnomaly)" in text
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({field} \".+\"\)", text), field
    assert "add_subdirectory(SlicerMedAnomaly)" in text


def test_module_files_compile(tmp_path):
    for path in MODULE.rglob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_ui_parses_and_names_widgets_the_module_uses():
    tree = ET.parse(MODULE / "Resources" / "UI" / "SlicerMedAnomaly.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    module_source = (MODULE / "SlicerMedAnomaly.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", module_source))
    assert used <= names, used - names


def test_core_never_imports_slicer_or_qt():
    for path in (MODULE / "medanomaly").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & {"slicer", "qt", "ctk", "vtk", "PythonQt"}, f"{path}: imports {roots}"


def test_no_unsafe_weight_loading():
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in match.group(1), f"{path}: {match.group(0)}"
        unpickling = "pickle" + ".load"  # spelled in two parts so that this test does not match itself
        assert unpickling not in text, f"{path}: unpickles"
