"""Running `medanomaly` in a separate process: line-based progress, readable errors, cancellation of the whole
process tree. No Qt: the widget polls `poll()` from a timer, tests drive it with a real child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ProcessState:
    stage: str = "starting"
    fraction: float = 0.0
    finished: bool = False
    returncode: int | None = None
    error: str = ""  # the last "medanomaly: error: ..." line, for the user
    log: list[str] = field(default_factory=list)  # every line, for the log


class ProcessRunner:
    """Start a command without blocking; `poll()` returns the state, parsed from 'PROGRESS <stage> <fraction>'."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None):
        self.command = command
        self.state = ProcessState()
        self._lines: deque[str] = deque()
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=cwd,
            start_new_session=(os.name != "nt"),
            creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) if os.name == "nt" else 0)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self._lines.append(line.rstrip("\r\n"))

    def poll(self) -> ProcessState:
        while self._lines:
            line = self._lines.popleft()
            self.state.log.append(line)
            parts = line.split()
            if len(parts) == 3 and parts[0] == "PROGRESS":
                try:
                    self.state.stage, self.state.fraction = parts[1], float(parts[2])
                except ValueError:
                    pass
            elif line.startswith("medanomaly: error:"):
                self.state.error = line[len("medanomaly: error:"):].strip()
        code = self._process.poll()
        if code is not None and not self._reader.is_alive() and not self._lines and not self.state.finished:
            self.state.finished, self.state.returncode = True, code
            if code != 0 and not self.state.error:
                self.state.error = f"medanomaly exited with code {code}; see the log for details"
        return self.state

    def wait(self, timeout: float | None = None) -> ProcessState:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.command[0]} did not finish in {timeout} s")
            time.sleep(0.05)
        return self.state

    def cancel(self, grace_seconds: float = 1.0) -> None:
        """End the process and its children: SIGTERM to the group, SIGKILL after `grace_seconds`."""
        if self._process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.wait()
        self.state.error = self.state.error or "cancelled"


def detect_command(python: str, input_path: str, output_dir: str, *, model: str | None = None,
                   device: str = "auto", sensitivity: float | None = None,
                   min_size_mm3: float | None = None) -> list[str]:
    """The `medanomaly detect` command line the module runs, the same one users run."""
    command = [python or sys.executable, "-m", "medanomaly.cli", "detect", input_path, "-o", output_dir,
               "--progress-lines", "--device", device]
    if model:
        command += ["--model", model]
    if sensitivity is not None:
        command += ["--sensitivity", f"{sensitivity:g}"]
    if min_size_mm3 is not None:
        command += ["--min-size-mm3", f"{min_size_mm3:g}"]
    return command
