"""Running the `fastvae` command line in a subprocess, as a user runs it (shared by the CLI tests)."""

import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastvae", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)
