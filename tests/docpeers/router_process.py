"""The real router as a child process (the only use of the project here: its CLI)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_STARTED = re.compile(r"router started incarnation=(\S+)")


class RouterProcess:
    """``credit-router serve`` on fixed endpoints; ``ready_at``/``incarnation`` come from its
    "router started" log line (monotonic clock of this process)."""

    def __init__(self, workers: str, producers: str, *extra: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "credit_router",
            "serve",
            "--workers",
            workers,
            "--producers",
            producers,
            "--http-port",
            "0",
            *extra,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.ready_at: float | None = None
        self.incarnation: str | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    def start(self, timeout_s: float = 15.0) -> RouterProcess:
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> RouterProcess:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        self.ready_at, self.incarnation = None, None
        self._ready.clear()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def wait_ready(self, timeout_s: float = 15.0) -> RouterProcess:
        if not self._ready.wait(timeout_s):
            self.kill()
            raise RuntimeError("router did not start:\n" + "".join(self.lines[-20:]))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            self._read_lines(proc.stderr)

    def _read_lines(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)
            match = _STARTED.search(line)
            if match and not self._ready.is_set():
                self.ready_at = time.monotonic()
                self.incarnation = match.group(1)
                self._ready.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._join_reader()

    def _join_reader(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(5)

    def terminate(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self._join_reader()
        return rc
