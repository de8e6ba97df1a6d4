"""What the study scripts share: run one initsearch command as a user would, echo it, stop on failure."""
from __future__ import annotations

import subprocess
import sys


def run(command: list[str]) -> str:
    """Run ``command``, print it first; its stdout, or exit with its output when it fails."""
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stdout + done.stderr)
    return done.stdout
