"""The import rules of guides/architecture.md, read off the source with ast (fast, no import).

Every module of the package belongs to one layer; a module imports only modules of its own layer
or of layers below it, and the imports form no circle. The layers, bottom up:

- base: errors, version, the canonical JSON both sides hash;
- policy: pure decisions (when to save, what to keep, per-rank state, how a ref reads): no torch,
  and triggers, retention and ranks not even ``os``;
- storage: bytes and paths (``weightslab/storage``, the background writer, the ledger): no torch
  (numpy is allowed: the lossless encodings shuffle bytes with it);
- training: torch objects, no paths: only the bridges (``tensors``, ``distributed.sharded``) touch
  storage modules;
- orchestration: the system and its collaborators, the only modules that join training and storage;
- surface: what a user imports (``wl.*``, the root operations, the command line).

"Runtime import" below means any ``import`` statement outside an ``if TYPE_CHECKING:`` block,
at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from .support import REPO, run_python

PACKAGE = REPO / "weightslab"

LAYERS: dict[str, list[str]] = {
    "base": ["errors", "_version", "canonical", "units"],
    "policy": ["triggers", "retention", "refs", "distributed.ranks"],
    "storage": ["storage", "storage.identifiers", "storage.atomic", "storage.layout", "storage.encoding",
                "storage.store", "storage.manifest", "storage.shardfiles", "storage.experiment", "storage.names",
                "storage.remote", "storage.root", "storage.lossy", "storage.archive", "storage.manager", "storage.garbage",
                "storage.claim", "writer",
                "ledger"],
    "training": ["hyperparams", "configfile", "codec", "rng", "data", "fingerprint", "change", "binding", "surgery",
                 "tensors", "snapshot", "state", "preemption", "distributed", "distributed.world",
                 "distributed.sharded"],
    "orchestration": ["config", "events", "failures", "provenance", "clock", "lineage", "watch", "attachments",
                      "distributed.job", "saver",
                      "restorer", "system"],
    "surface": ["process", "registration", "maintenance", "portable", "components", "cli", "cli.commands",
                "integrations", "integrations.transformers", "integrations.accelerate", "integrations.lightning",
                "cli.catalog", "cli.comparison", "ui", "ui.site", "ui.page", "ui.server", "__init__", "__main__"],
}
LEVEL = {module: level for level, modules in enumerate(LAYERS.values()) for module in modules}
TORCH_FREE = set(LAYERS["base"] + LAYERS["policy"] + LAYERS["storage"])
PURE = {"triggers", "retention", "distributed.ranks"}  # not even os
BRIDGES = {"tensors", "distributed.sharded"}  # training modules allowed to use storage modules
HEAVY = {"torch", "safetensors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) that one import statement brings in."""
    inside, outside = set(), set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("weightslab."):
                inside.add(alias.name[len("weightslab."):])
            else:
                outside.add(alias.name.split(".")[0])
        return inside, outside
    if node.level == 0:
        name = node.module or ""
        if name == "weightslab" or name.startswith("weightslab."):
            base = name[len("weightslab."):] if name != "weightslab" else ""
        else:
            outside.add(name.split(".")[0])
            return inside, outside
    else:
        here = module.split(".") if module not in ("__init__", "__main__") else []
        is_package = (PACKAGE / module.replace(".", "/") / "__init__.py").exists()
        anchor = here if is_package else here[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    for alias in node.names:  # `from . import codec` names a module; `from .x import y` names x
        candidate = f"{base}.{alias.name}" if base else alias.name
        inside.add(candidate if candidate in LEVEL else (base or "__init__"))
    return inside, outside


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        inside, outside = set(), set()
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            i, o = _targets(module, node)
            inside |= i
            outside |= o
        inside.discard(module)
        graph[module] = (inside, outside)
    return graph


GRAPH = _graph()


def test_every_module_has_a_layer_and_every_layer_entry_exists():
    assert sorted(set(GRAPH) - set(LEVEL)) == [], "add the new module to a layer here and in guides/architecture.md"
    assert sorted(set(LEVEL) - set(GRAPH)) == [], "a module in the table no longer exists"


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
              for m, (inside, _) in GRAPH.items() for t in sorted(inside) if LEVEL[t] > LEVEL[m]]
    assert upward == []


def test_there_is_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []
    circles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module][0]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2
    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert circles == []


def test_torch_free_layers_import_no_torch_anywhere():
    heavy = [f"{m} imports {sorted(GRAPH[m][1] & HEAVY)}" for m in sorted(TORCH_FREE) if GRAPH[m][1] & HEAVY]
    assert heavy == []
    # (with no upward import, what they import is torch-free too: the closure is)


def test_policy_is_pure():
    banned = HEAVY | {"numpy", "os"}
    impure = [f"{m} imports {sorted(GRAPH[m][1] & banned)}" for m in sorted(PURE) if GRAPH[m][1] & banned]
    assert impure == []


def test_the_training_side_knows_no_paths_but_through_the_bridges():
    storage = set(LAYERS["storage"]) - {"writer", "ledger"}
    joined = [f"{m} imports {sorted(GRAPH[m][0] & storage)}" for m in LAYERS["training"]
              if m not in BRIDGES and GRAPH[m][0] & storage]
    assert joined == []


def test_only_the_distributed_package_touches_torch_distributed():
    touching = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "distributed" or module.startswith("distributed."):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                touching.append(f"{module}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                touching += [f"{module}:{node.lineno}" for n in names if n.startswith("torch.distributed")]
    assert touching == []


def _layer(module: str) -> str:
    return list(LAYERS)[LEVEL[module]]


@pytest.mark.skipif(sys.platform == "win32", reason="posix paths")
def test_the_listing_commands_run_where_torch_cannot_be_imported(root: Path):
    import torch

    import weightslab as wl

    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(torch.nn.Linear(2, 2))
    wl.checkpoint_on_step(1, metrics={"loss": 0.5})
    system.close()
    out = run_python(f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from weightslab.cli import main
for command in (["ls"], ["log"], ["reindex"], ["ls", "--json"]):
    assert main(["--root", {str(root)!r}, *command]) == 0, command
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
""").stdout
    assert out.strip().endswith("ok")
