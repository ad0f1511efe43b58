"""Fuzzing: corrupted headers and bytes of real files never make `detect` crash with a traceback."""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medanomaly.cli import main

TINY_SIZE = (24, 24, 6)


def tiny_files(small_ct) -> dict[str, bytes]:
    image = small_ct[::4, ::4, :6]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, compress in ((".nrrd", False), (".nii.gz", True), (".mha", False)):
            path = Path(tmp) / f"ct{suffix}"
            sitk.WriteImage(image, str(path), compress)
            out[suffix] = path.read_bytes()
    return out


def run_detect(data: bytes, suffix: str, model: Path) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzzed{suffix}"
        path.write_bytes(data)
        err, out = io.StringIO(), io.StringIO()
        with redirect_stderr(err), redirect_stdout(out):
            code = main(["-q", "detect", str(path), "-o", str(Path(tmp) / "out"), "--model", str(model),
                         "--no-overview"])
        return code, err.getvalue()


_FILES: dict[str, bytes] = {}


def test_fuzz_corrupted_files(small_ct, default_model):
    _FILES.update(tiny_files(small_ct))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(suffix=st.sampled_from(sorted(_FILES)), data=st.data())
    def check(suffix, data):
        original = bytearray(_FILES[suffix])
        header_end = min(len(original), 400 if suffix != ".nii.gz" else len(original))
        edits = data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1,
                                   max_size=8))
        for position, value in edits:
            original[position] = value
        if data.draw(st.booleans()):
            original = original[: data.draw(st.integers(0, len(original)))]
        code, err = run_detect(bytes(original), suffix, default_model)
        assert "Traceback" not in err
        assert code in (0, 2), err
        if code:
            assert len(err.strip().splitlines()) == 1, err

    check()
