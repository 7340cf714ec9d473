"""Imports run one way, down the flow: ingest -> prompt -> native, models, quant -> attention -> engine ->
runtime -> tasks -> serve -> cli. A module may import its own room and any room below it, never one
above (a lazy import inside a function counts too: it is how cycles hide)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "longdoc"

# Lowest first. The base room holds what every layer may use: errors, the configuration, the CPU's
# flags, the disk rules, safe text and terminal output.
LAYERS: list[tuple[str, ...]] = [
    ("longdoc.errors", "longdoc.config", "longdoc.cpu", "longdoc.sanitize", "longdoc.store", "longdoc.render"),
    ("longdoc.ingest",),
    ("longdoc.prompt", "longdoc.tokens"),
    ("longdoc.native",),
    ("longdoc.models",),
    ("longdoc.quant",),
    ("longdoc.attention",),
    ("longdoc.engine",),
    ("longdoc.runtime",),
    ("longdoc.tasks", "longdoc.evals"),
    ("longdoc.serve",),
    ("longdoc.cli",),
]
# The package's own __init__ (the ISA cap, before torch loads) and ``python -m longdoc`` stand outside.
OUTSIDE = ("longdoc", "longdoc.__main__")


def rank(module: str) -> int | None:
    """The layer of a ``longdoc`` module (its room's), or None for one outside the layers."""
    for i, rooms in enumerate(LAYERS):
        if any(module == room or module.startswith(room + ".") for room in rooms):
            return i
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every ``longdoc`` module that ``source`` imports, anywhere in it: (line, module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level-1 more
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # ``from longdoc import runtime`` imports the room itself; ``from longdoc.x import y``, x's room
            found += [(node.lineno, f"longdoc.{a.name}" if base == "longdoc" else base) for a in node.names]
    return [(line, name) for line, name in found if name == "longdoc" or name.startswith("longdoc.")]


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``source`` (module ``module``) that run up the layers, as 'line: a -> b'."""
    own = rank(module)
    if own is None:
        return []
    return [
        f"{line}: {module} -> {name}"
        for line, name in imported(source, module, is_package)
        if (target := rank(name)) is not None and target > own
    ]


def test_every_module_has_a_layer():
    modules = [module_name(p, PACKAGE) for p in sorted(PACKAGE.rglob("*.py"))]
    assert [m for m in modules if rank(m) is None and m not in OUTSIDE] == []


def test_imports_run_down_the_layers():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path, PACKAGE)
        found += upward_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert found == []


def test_an_upward_import_is_caught():
    """The check itself: an engine module reaching into the runtime, at the top or lazily, absolute or
    relative, is reported; a downward one is not."""
    lazy = "def f():\n    from longdoc.runtime.local import Session\n"
    assert upward_imports(lazy, "longdoc.engine.decode") == ["2: longdoc.engine.decode -> longdoc.runtime.local"]
    assert upward_imports("from longdoc import cli\n", "longdoc.tasks.chat") == ["1: longdoc.tasks.chat -> longdoc.cli"]
    assert upward_imports("from ..runtime import machine\n", "longdoc.engine.decode") == [
        "1: longdoc.engine.decode -> longdoc.runtime"
    ]
    assert upward_imports("import longdoc.serve\n", "longdoc.ingest.pdf") == ["1: longdoc.ingest.pdf -> longdoc.serve"]
    assert upward_imports("from longdoc.attention.dca import ChunkLayout\n", "longdoc.engine.decode") == []
    assert upward_imports("from longdoc.errors import UsageError\n", "longdoc.ingest.pdf") == []
