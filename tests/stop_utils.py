"""Start a real `megatron-prune` process, wait (without timing assumptions) until it has made progress, stop it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable


class CliRun:
    """A CLI process whose stdout and stderr go to files (a pipe nobody reads could block it)."""

    def __init__(self, cmd: list[str], logdir: Path, env: dict):
        logdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logdir / "stdout.txt", logdir / "stderr.txt"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)

    def output(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def wait_for(self, ready: Callable[[], bool], what: str, limit_s: float = 600.0) -> None:
        """Poll until ``ready()`` while the process runs; ``limit_s`` only guards against a hang."""
        deadline = time.monotonic() + limit_s
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {limit_s} s:\n{self.output()[-3000:]}"
            time.sleep(0.02)

    def stop(self, sig, limit_s: float = 600.0) -> tuple[int, str, str]:
        """Send ``sig``, wait for the exit; (exit code, stdout, stderr)."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=limit_s)
        return self.proc.returncode, self.out_path.read_text(), self.err_path.read_text()
