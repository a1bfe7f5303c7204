"""Running Triton kernels in CPU tests: the interpreter (``TRITON_INTERPRET=1``) only works when the variable is set
before triton itself is first imported (triton's own library functions are decorated then), so the first test module
importing this one sets it. If some other module imported triton earlier in the process, the kernel tests of a module
are skipped in-process and ``run_module_in_subprocess`` runs that module again in a fresh interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNELS_RUN_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

kernel_test = pytest.mark.skipif(
    not KERNELS_RUN_HERE, reason="triton was imported before TRITON_INTERPRET=1; the module reruns in a subprocess"
)
only_if_kernels_skipped = pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests ran in this process")


def run_module_in_subprocess(test_file: str) -> None:
    """Run the CPU (non-``gpu``) tests of ``test_file`` under the interpreter in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(Path(test_file))]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
