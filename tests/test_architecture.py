"""The layering of STYLE.md §1, enforced: each module imports only earlier stages; `import spectra` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each library module may import only modules listed before it (plus itself)
ORDER = ["errors", "records", "hub", "load", "diff", "adapter", "sigma", "spectrum", "metrics", "store", "peft_config",
         "recommend", "pipeline", "plots", "report", "demo_data", "demo_train", "demo"]
TORCH_FREE = {"errors", "records", "hub", "metrics", "peft_config", "recommend", "store", "plots", "report"}


def spectra_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra"):
            found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("spectra.")}
    return found


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "spectra").glob("*.py")), ids=lambda p: p.name)
def test_modules_import_only_earlier_stages(path: Path) -> None:
    name = path.stem
    if name == "__init__":
        return
    assert name in ORDER, f"add spectra/{path.name} to ORDER in {Path(__file__).name}"
    allowed = set(ORDER[: ORDER.index(name) + 1])
    assert spectra_imports(path) <= allowed, f"{name} imports a later stage"
    assert "spectra_cli" not in top_level_imports(path)
    if name in TORCH_FREE:
        assert "torch" not in top_level_imports(path), f"{name} must run without torch"


def test_cli_reaches_the_library_only_through_spectra() -> None:
    for path in (ROOT / "cli").glob("*.py"):
        assert "cli" not in top_level_imports(path), f"{path.name} imports `cli`; use spectra_cli"


def test_import_spectra_is_light() -> None:
    heavy = ("typer", "rich", "matplotlib", "transformers", "peft")
    code = f"import sys, spectra; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
