"""lit-hsa's kernels live in the top-level ``kernels/`` folder (the layout the project was asked for) and are the
package ``lit_hsa.kernels``: ``lit_hsa/kernels`` links to that folder, so imports resolve through the file system
alone, for Python, editors and static analysis, and a built wheel installs them under ``lit_hsa/`` only. The PyPI
package named ``kernels`` (a dependency of transformers) keeps its name beside ours, from the repository root or
elsewhere."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

FAKE_PYPI_KERNELS = "VERSION = 'pypi'\n"


def run_python(code: str, cwd, extra_path) -> str:
    env_path = f"import sys; sys.path.insert(1, {str(extra_path)!r}); "
    result = subprocess.run([sys.executable, "-c", env_path + code], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_lit_hsa_kernels_is_the_top_level_folder_through_a_link():
    link = ROOT / "lit_hsa" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()
    assert not (ROOT / "lit_hsa" / "kernels.py").exists()  # no alias module setting __path__
    assert not (ROOT / "kernels" / "__init__.py").exists()  # a regular top-level package would shadow PyPI's


def test_an_installed_kernels_package_keeps_its_name_beside_ours(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(FAKE_PYPI_KERNELS)
    code = ("import lit_hsa.kernels.dispatch as d, lit_hsa.model.transformer, kernels; "
            "print(kernels.VERSION, d.__file__)")
    for cwd in (ROOT, tmp_path):  # the repository root is sys.path[0] there, as for `python main.py`
        version, dispatch_file = run_python(code, cwd, site).split()
        assert version == "pypi"
        assert Path(dispatch_file).parts[-3:] == ("lit_hsa", "kernels", "dispatch.py")


def test_our_modules_are_loaded_once_under_lit_hsa_kernels():
    code = ("import sys, lit_hsa.model.transformer, lit_hsa.inference.fused_step, lit_hsa.inference.static_decode; "
            "print(sorted(n for n, m in list(sys.modules.items()) if 'kernels' in n.split('.')))")
    names = eval(run_python(code, ROOT, ROOT / "nonexistent"))
    assert "lit_hsa.kernels.dispatch" in names and "lit_hsa.kernels.hsa.reference" in names
    assert all(n.startswith("lit_hsa.kernels.") or n == "lit_hsa.kernels" for n in names), names


def kernel_imports() -> set[str]:
    """Every ``from lit_hsa.kernels... import`` module named in the project's code."""
    found = set()
    for path in [*ROOT.glob("lit_hsa/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/**/*.py")]:
        if "kernels" in path.relative_to(ROOT).parts[:2]:
            continue
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] == "from" and words[1].startswith("lit_hsa.kernels."):
                found.add(words[1])
    return found


def test_static_analysis_resolves_kernel_imports():
    """jedi (the engine of many editors' go-to-definition) follows every kernel import of the code to a file
    under ``kernels/``, as it cannot through an alias module."""
    jedi = pytest.importorskip("jedi")
    modules = sorted(kernel_imports())
    assert len(modules) >= 5, modules
    project = jedi.Project(str(ROOT))
    for module in modules:
        source = f"import {module}\n"
        found = jedi.Script(source, path=str(ROOT / "_probe.py"), project=project).goto(1, len(source) - 2,
                                                                                           follow_imports=True)
        assert found and found[0].module_path is not None, module
        assert Path(found[0].module_path).resolve().is_relative_to((ROOT / "kernels").resolve()), (module, found)


@pytest.mark.slow
def test_built_wheel_holds_the_kernels_under_lit_hsa_only(tmp_path):
    source = tmp_path / "src"  # a copy (links kept as links), so the build leaves the checkout untouched
    for name in ("lit_hsa", "kernels", "data_modules"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lit_hsa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"lit_hsa", "data_modules"}, tops
    shipped = {n for n in names if n.startswith("lit_hsa/kernels/")}
    ours = {f"lit_hsa/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert ours and ours <= shipped
