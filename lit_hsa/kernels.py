"""Compute kernels of lit-hsa: each op has a PyTorch reference and (where it pays) a Triton kernel.

They live in the repository's top-level ``kernels/`` folder and are imported as ``lit_hsa.kernels``
(``from lit_hsa.kernels.hsa import hsa_attention``). The top-level name ``kernels`` belongs to a PyPI package that
``transformers`` requires; ``kernels/`` has no ``__init__.py``, so where both are on ``sys.path`` (the repository root
is, for ``python main.py`` and ``pytest``) the installed package keeps its name and ``transformers`` imports.
"""
from pathlib import Path

# This module serves as the package of that folder: its submodules are looked up there.
__path__ = [str(Path(__file__).resolve().parent.parent / "kernels")]
