"""What several test files run: the pipeline's command line from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline <args>`` from the repository root (arguments passed through ``str``);
    the finished process with text stdout and stderr (not checked: the tests read the codes)."""
    cmd = [sys.executable, "-m", "pipeline", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
