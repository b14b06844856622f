"""The house rules of the layout (README, "Layout"; issue 17), checked on the source itself.

- every module of `engram_cli/`, `commands/` and `kernels/` is named in the README's Layout
  section, with its one job;
- no module is over 800 lines (past that a room holds two jobs);
- no import cycle among the package's modules (module-level imports);
- imports inside functions only for optional extras or a documented start-up cost
  (`LAZY_IMPORTS`), never for the package's own modules, apart from the two the kernels
  need lazily (`LAZY_INTERNAL`);
- `commands/` and `kernels/` import the library by absolute `engram_cli.` names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engram_cli": ROOT / "engram_cli", "engram_cli.commands": ROOT / "commands", "engram_cli.kernels": ROOT / "kernels"}
MAX_LINES = 800
# Imported inside functions on purpose: optional extras (ray, triton, matplotlib), torch and
# polars kept off the build and scale-out path (each ~0.1-1 s of start-up), fcntl (POSIX only).
LAZY_IMPORTS = {"ray", "triton", "matplotlib", "torch", "polars", "fcntl"}
# Package-internal lazy imports: the kernels run where zarr is not installed (tests/kernels), and
# the Triton kernel module imports triton (an optional extra) when the backend is used.
LAZY_INTERNAL = {("engram_cli.kernels.lookup", "engram_cli.store"), ("engram_cli.kernels.registry", "engram_cli.kernels.triton_lookup")}


def module_name(path: Path) -> str:
    for pkg, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([pkg, *parts])
    raise AssertionError(path)


MODULES = {module_name(p): p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))}


def imported(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement names (a `from X import y` may name module X.y)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        is_pkg = MODULES[mod].name == "__init__.py"
        base = mod if is_pkg else mod.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
        names = [target, *(f"{target}.{a.name}" for a in node.names)]
    return [n for n in names if n in MODULES and n != mod]  # `from . import x` in a package names the package itself


def imports(mod: str) -> tuple[set[str], list[tuple[int, str, ast.AST]]]:
    """(package modules imported at module level, [(line, first name, node)] of imports inside functions or classes)."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    top: set[str] = set()
    inner = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if node.col_offset == 0:
            top.update(imported(mod, node))
        else:
            first = node.names[0].name if isinstance(node, ast.Import) else ("." * node.level + (node.module or ""))
            inner.append((node.lineno, first, node))
    return top, inner


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("mod", sorted(m for m, p in MODULES.items() if p.name != "__init__.py"))
def test_every_module_is_named_in_the_readme_layout(mod):
    stem = mod.rsplit(".", 1)[1]
    assert f"`{stem}`" in layout_section() or f"`{stem}.py`" in layout_section(), f"README Layout does not name {mod}"


def test_no_module_over_800_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_no_import_cycles():
    graph = {m: imports(m)[0] for m in MODULES}
    # Every cycle passes through a node that reaches itself: search from each module.
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    pytest.fail(f"import cycle: {' -> '.join([*path, start])}")
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))


def test_imports_inside_functions_are_extras_or_documented_costs():
    bad = []
    for mod in MODULES:
        for line, first, node in imports(mod)[1]:
            own = imported(mod, node) if isinstance(node, ast.ImportFrom) else []
            if own and all((mod, o) in LAZY_INTERNAL for o in own):
                continue
            if first.split(".")[0] in LAZY_IMPORTS or _under_type_checking(mod, line):
                continue
            bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {first}")
    assert not bad, "imports inside functions (move them to the module top): " + "; ".join(bad)


def _under_type_checking(mod: str, line: int) -> bool:
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            if node.lineno <= line <= node.end_lineno:
                return True
    return False


@pytest.mark.parametrize("folder", ["commands", "kernels"])
def test_commands_and_kernels_import_the_library_by_absolute_names(folder):
    relative = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                relative.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not relative, f"relative imports in {folder}/ (use engram_cli. names): {relative}"


def test_every_public_name_of_the_package_resolves():
    import engram_cli

    missing = []
    for name in engram_cli.__all__:
        try:
            getattr(engram_cli, name)
        except (AttributeError, ImportError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"engram_cli exports names that do not resolve: {missing}"
