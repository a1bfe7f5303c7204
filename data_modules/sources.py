"""Where documents come from: the embedded default corpus (the Python standard library's own source files, present
on every machine) or user files, and the deterministic train/validation split."""
from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

# Third-party packages live inside the stdlib folder on many installs; they differ per machine, so leave them out.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """Input data is missing or unusable; the message names the file or key."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library (sorted), third-party folders excluded."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    if not files:
        raise DataError(f"the embedded corpus is empty: no .py files under {root}")
    return files


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Files, directories (all files below, recursively) or glob patterns → sorted unique files."""
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
            if not matches:
                raise DataError(f"data.paths: pattern '{pattern}' matches no files")
            found.update(m for m in matches if m.is_file())
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise DataError(f"data.paths: '{pattern}' does not exist")
    if not found:
        raise DataError(f"data.paths {patterns} contain no files")
    return sorted(found)


def split_train_val(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by a hash of the file name and parent, so it does not depend on the file list's order,
    the install prefix, or which other files exist."""
    def bucket(p: Path) -> float:
        key = f"{p.parent.name}/{p.name}".encode()
        return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2**64

    if len(files) < 2:
        raise DataError(f"need at least 2 documents for a train/validation split, found {len(files)}")
    ranked = sorted(files, key=bucket)
    # At least one document on each side, however small the corpus.
    n_val = min(max(1, sum(bucket(p) < val_fraction for p in files)), len(files) - 1)
    val = set(ranked[:n_val])
    return [p for p in files if p not in val], [p for p in files if p in val]
