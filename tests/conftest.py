import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def corpus(tmp_path):
    """Twelve small text files of growing length (tests of sources, packing and resume)."""
    d = tmp_path / "txt"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(f"document {i} " * (5 + 3 * i))
    return d
