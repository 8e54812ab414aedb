"""The architecture of docs/ARCHITECTURE.md, checked: the import-linter layers of pyproject.toml, no project
import hidden inside a function, the size limits of the serving package, and a serving app that loads neither
the training package nor torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uembed"

# Project imports allowed inside a function, by (file, imported module or a package above it). Nothing else may
# sit in a function: an import there to dodge a circle only postpones it to run time.
FUNCTION_IMPORTS_ALLOWED = {
    # Each command imports what it runs: `uembed --help` stays fast, and the serving install (no torch, no
    # training or loadtest extras) can run the serving commands and name the extra a missing command needs. The
    # contract and the CLI's own modules are cheap and torch-free: they are imported at the top.
    ("uembed/cli/model_commands.py", "uembed.model"),
    ("uembed/cli/plan_command.py", "uembed.model"),
    ("uembed/cli/plan_command.py", "uembed.bundle"),
    ("uembed/cli/model_commands.py", "uembed.bundle"),
    ("uembed/cli/model_commands.py", "uembed.serving"),
    ("uembed/cli/service_commands.py", "uembed.model"),
    ("uembed/cli/service_commands.py", "uembed.bundle"),
    ("uembed/cli/service_commands.py", "uembed.serving"),
    ("uembed/cli/service_commands.py", "uembed.loadtest"),
    # Training the demo bundle needs torch, but `uembed serve` on the serving install imports this module to find
    # a demo bundle that already exists: the training modules are imported only when it must be trained.
    ("uembed/model/demo.py", "uembed.model"),
}
MAX_SERVING_MODULE_LINES = 450
MAX_SERVING_CLASS_LINES = 300


def project_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def this_tree_first() -> str:
    """A PYTHONPATH under which a subprocess imports this tree's ``uembed``, whatever the venv's install points at."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imported_modules(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The absolute names an import statement names (a relative one resolved against its file's package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    base = package[: len(package) - (node.level - 1)]
    return [".".join([*base, node.module] if node.module else base)]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function or method of the file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((child.lineno, module) for module in imported_modules(child, path))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def allowed_by(file: str, module: str) -> tuple[str, str] | None:
    for entry in FUNCTION_IMPORTS_ALLOWED:
        allowed_file, allowed_module = entry
        if file == allowed_file and (module == allowed_module or module.startswith(allowed_module + ".")):
            return entry
    return None


def test_the_import_linter_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), f"{lint_imports} is missing: install the dev extra (import-linter)"
    env = {**os.environ, "PYTHONPATH": this_tree_first()}
    command = [str(lint_imports), "--no-cache", "--no-logo"]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_no_project_import_sits_inside_a_function():
    violations, used = [], set()
    for path in project_modules():
        for line, module in function_level_imports(path):
            if module != "uembed" and not module.startswith("uembed."):
                continue  # an optional third-party dependency (torch, cupy, onnx, redis...): allowed anywhere
            entry = allowed_by(relative(path), module)
            if entry is None:
                violations.append(f"{relative(path)}:{line} imports {module} inside a function")
            else:
                used.add(entry)
    assert not violations, "project imports inside functions (move them to the top; a circle is a design fault):\n" + (
        "\n".join(violations)
    )
    assert used == FUNCTION_IMPORTS_ALLOWED, f"allow-list entries that match nothing: {FUNCTION_IMPORTS_ALLOWED - used}"


def test_the_serving_modules_and_classes_stay_small():
    too_big = []
    for path in sorted((PACKAGE / "serving").rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_SERVING_MODULE_LINES:
            too_big.append(f"{relative(path)}: {lines} lines (at most {MAX_SERVING_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            class_lines = node.end_lineno - node.lineno + 1
            if class_lines > MAX_SERVING_CLASS_LINES:
                too_big.append(f"{relative(path)}:{node.lineno} class {node.name}: {class_lines} lines "
                               f"(at most {MAX_SERVING_CLASS_LINES})")  # fmt: skip
    assert not too_big, "\n".join(too_big)


APP_PROBE = """
import json, sys
from uembed.serving.app import create_app
from uembed.serving.settings import ServiceSettings
create_app(ServiceSettings(bundles=[]))
print(json.dumps({"training": sorted(name for name in sys.modules if name.split(".")[:2] == ["uembed", "model"]),
                  "torch": "torch" in sys.modules}))
"""


def test_the_serving_app_imports_no_training_code_and_no_torch():
    env = {name: value for name, value in os.environ.items() if not name.startswith("UEMBED_")}
    env["PYTHONPATH"] = this_tree_first()
    result = subprocess.run([sys.executable, "-c", APP_PROBE], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"training": [], "torch": False}, f"the serving app loaded {loaded}"
