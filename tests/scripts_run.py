"""The script tests' runner: an entry point run as a user runs it, from the repository root, on the machine's own
devices (not the 8 fake ones conftest.py gives the tests), failing the test with the script's stderr."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, timeout: int = 900) -> str:
  """`python ARGS...` -> its stdout; a non-zero exit fails with the end of its stderr."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout
