"""The layering (README, Development), enforced: each module imports only earlier stages; `import spectra` is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from builders import make_analysis
from spectra import save_analysis

ROOT = Path(__file__).resolve().parents[1]
# each unit (a top-level module or a subpackage of spectra) may import only the units listed before it, and itself
ORDER = [
    "errors",
    "records",
    "names",
    "io",
    "peft",
    "plan",
    "engine",
    "analysis",
    "lora",
    "pipeline",
    "compare",
    "trajectory",
    "report",
]
# modules that must run without torch (records and everything after the engine hold numpy)
TORCH_FREE = {
    "errors",
    "records",
    "names",
    "io/hub",
    "io/store",
    "io/files",
    "peft/layout",
    "peft/config",
    "analysis",
    "lora/recommend",
    "lora/allocate",
    "report",
}


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "spectra")
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def spectra_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "spectra":
            found.add("__init__")
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


LIBRARY = sorted(p for p in (ROOT / "spectra").rglob("*.py") if p != ROOT / "spectra" / "__init__.py")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT / "spectra")))
def test_modules_import_only_earlier_stages(path: Path) -> None:
    unit = unit_of(path)
    assert unit in ORDER, f"add {unit} to ORDER in {Path(__file__).name}"
    allowed = set(ORDER[: ORDER.index(unit) + 1])
    assert spectra_imports(path) <= allowed, f"{path.name} imports a later stage: {spectra_imports(path) - allowed}"
    assert not {"spectra_cli", "spectra_demo"} & top_level_imports(path)
    rel = str(path.relative_to(ROOT / "spectra").with_suffix(""))
    if unit in TORCH_FREE or rel in TORCH_FREE:
        assert "torch" not in top_level_imports(path), f"{rel} must run without torch"


def all_imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in `path` (function bodies included), absolute imports only."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_demo_reaches_the_library_only_through_spectra() -> None:
    for path in (ROOT / "demo").glob("*.py"):
        imported = all_imports(path)
        assert not {"cli", "spectra_cli"} & top_level_imports(path), f"{path.name}: the demo does not use the CLI"
        assert not {m for m in imported if m.startswith("spectra.")}, f"{path.name}: use `from spectra import ...`"


def test_cli_reaches_the_library_only_through_spectra() -> None:
    for path in (ROOT / "cli").glob("*.py"):
        imported = all_imports(path)
        assert "cli" not in top_level_imports(path), f"{path.name} imports `cli`; use spectra_cli"
        assert not {m for m in imported if m.startswith("spectra.")}, f"{path.name}: use `from spectra import ...`"
        assert not {"demo", "spectra_demo"} & {m.split(".")[0] for m in imported}, (
            f"{path.name}: import the demo lazily"
        )


def environment_writes(path: Path) -> list[int]:
    """Lines that change the process environment: os.environ[...] = / del, its mutating methods, os.putenv."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else []
        if isinstance(node, ast.AugAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript) and ast.unparse(target.value).endswith("environ"):
                lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, method = ast.unparse(node.func.value), node.func.attr
            mutators = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__"}
            if (owner.endswith("environ") and method in mutators) or method in {"putenv", "unsetenv"}:
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("folder", ["spectra", "demo"])
def test_no_environment_variable_is_set(folder: str) -> None:
    """Configuration is passed explicitly (STYLE §6): neither the library nor the demo writes os.environ."""
    found = {str(p.relative_to(ROOT)): lines for p in (ROOT / folder).rglob("*.py") if (lines := environment_writes(p))}
    assert not found


def test_environment_writes_are_detected(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import os\nos.environ["A"] = "1"\nos.environ.setdefault("B", "1")\nos.putenv("C", "1")\n')
    assert environment_writes(sample) == [2, 3, 4]


IMPORT_CHECK = """
import sys
heavy = ("torch", "typer", "rich", "matplotlib", "jinja2", "transformers", "peft", "spectra_cli", "spectra_demo")
import spectra
print(sorted(m for m in heavy if m in sys.modules))
lazy = tuple(spectra._LAZY)  # imported on first use (torch, matplotlib)
print([n for n in spectra.__all__ if n not in lazy and not hasattr(spectra, n)])
from typer.testing import CliRunner
import spectra_cli.app
version = CliRunner().invoke(spectra_cli.app.app, ["--version"])
unloaded = ("torch", "matplotlib", "transformers", "peft", "spectra_demo")
print(version.exit_code, sorted(m for m in unloaded if m in sys.modules))
print(callable(spectra.write_report) and callable(spectra.write_comparison_report), "matplotlib" in sys.modules)
print("torch" in sys.modules, callable(spectra.analyze), "torch" in sys.modules)
"""


def test_imports_stay_light_and_lazy() -> None:
    """`import spectra` loads no torch, CLI, plotting, templating or PEFT stack; `spectra --version` no torch either;
    every name of __all__ exists, the report writers and `analyze` (torch) on first use; the CLI module does not
    load the demo (its command imports it by name)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]", "0 []", "True True", "False True True"]


RECOMMEND_CHECK = """
import sys
from typer.testing import CliRunner
from spectra_cli.app import app
for args in (["recommend", sys.argv[1]], ["report", sys.argv[1], "-o", sys.argv[2]]):
    result = CliRunner().invoke(app, args)
    print(result.exit_code, "torch" in sys.modules)
"""


def test_report_and_recommend_load_no_torch(tmp_path: Path) -> None:
    """`spectra report` and `spectra recommend` read a saved analysis: numpy records, no torch (start-up < 0.5 s)."""
    saved = save_analysis(make_analysis(), tmp_path / "a.json")
    cmd = [sys.executable, "-c", RECOMMEND_CHECK, str(saved), str(tmp_path / "r.html")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["0 False", "0 False"]
