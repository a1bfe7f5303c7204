"""lit-hsa's kernels (the top-level kernels/ folder, imported as lit_hsa.kernels) and the PyPI package named `kernels`
(a dependency of transformers) live side by side: neither shadows the other, from the repository root or elsewhere."""
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

FAKE_PYPI_KERNELS = "VERSION = 'pypi'\n"


def run_python(code: str, cwd, extra_path) -> str:
    env_path = f"import sys; sys.path.insert(1, {str(extra_path)!r}); "
    result = subprocess.run([sys.executable, "-c", env_path + code], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_an_installed_kernels_package_keeps_its_name_beside_ours(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(FAKE_PYPI_KERNELS)
    code = ("import lit_hsa.kernels.dispatch as d, lit_hsa.model.transformer, kernels; "
            "print(kernels.VERSION, d.__file__)")
    for cwd in (ROOT, tmp_path):  # the repository root is sys.path[0] there, as for `python main.py`
        version, dispatch_file = run_python(code, cwd, site).split()
        assert version == "pypi"
        # ours, from the checkout that lit_hsa was imported from (elsewhere: the installed one)
        assert Path(dispatch_file).parent.name == "kernels"
        assert (Path(dispatch_file).parents[1] / "lit_hsa" / "kernels.py").is_file()


def test_our_modules_are_loaded_once_under_lit_hsa_kernels():
    code = ("import sys, lit_hsa.model.transformer, lit_hsa.inference.fused_step, lit_hsa.inference.static_decode; "
            f"print(sorted(n for n, m in list(sys.modules.items()) "
            f"if str(getattr(m, '__file__', '') or '').startswith({str(ROOT / 'kernels')!r})))")
    names = run_python(code, ROOT, ROOT / "nonexistent")
    assert "lit_hsa.kernels.dispatch" in names and "lit_hsa.kernels.hsa.reference" in names
    assert all(n.startswith("lit_hsa.kernels.") for n in eval(names)), names
