"""The package's layering, checked on its source: one module calls the kernels and reads the backend, and the
subpackages import each other in one direction only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gemma3_jax"
BOUNDARY = "gemma3_jax.model.kernels"
# model <- preprocessing <- checkpoints <- runtime <- server. The one exception: a Checkpoint builds requests with the
# runtime's sampling value types (runtime.sampling, which imports nothing of gemma3_jax).
MAY_IMPORT = {
    "model": {"model"},
    "preprocessing": {"preprocessing", "model"},
    "checkpoints": {"checkpoints", "model", "preprocessing", "runtime.sampling"},
    "runtime": {"runtime", "model", "checkpoints", "preprocessing"},
    "server": {"server", "runtime", "model", "checkpoints", "preprocessing"},
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text())


def imported(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_one_module_imports_the_kernels():
    users = sorted(name for name, tree in modules() if any(m.split(".")[0] == "pallas_kernels" for m in imported(tree)))
    assert users == [BOUNDARY]


def test_one_module_reads_the_backend():
    readers = sorted(name for name, tree in modules() for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and node.attr in ("default_backend", "platform")
                     and isinstance(node.value, ast.Name) and node.value.id in ("jax", "device"))
    assert set(readers) == {BOUNDARY}


def test_subpackages_import_in_one_direction():
    bad = []
    for name, tree in modules():
        parts = name.split(".")
        if len(parts) < 3:
            continue  # gemma3_jax/__init__ and the subpackages' own __init__ files re-export only
        allowed = MAY_IMPORT[parts[1]]
        for m in imported(tree):
            target = m.split(".")
            if target[0] != "gemma3_jax" or len(target) < 2 or target[1] not in MAY_IMPORT:
                continue
            if target[1] not in allowed and ".".join(target[1:3]) not in allowed:
                bad.append(f"{name} imports {m}")
    assert not bad, bad


def test_sampling_is_a_leaf():
    tree = dict(modules())["gemma3_jax.runtime.sampling"]
    assert not [m for m in imported(tree) if m.startswith("gemma3_jax")]
