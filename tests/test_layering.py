"""The package's imports run one way: kernels ← ops ← losses ← model ← train / eval (← = "is imported by").

Every module of ``mulclip_fast`` (and ``kernels/``, installed as ``mulclip_fast.kernels``) is parsed with
``ast``, imports inside functions included, into a graph of our modules. The test fails, naming the file,
the line and the import, on:

- an import against the direction of the layers below;
- ``reference`` (the plain spec) or ``data`` importing anything of ours outside itself;
- a private name (a module or a symbol with a leading underscore) imported from outside the package that
  owns it (a subpackage is outside too);
- an import cycle between modules of different top-level parts (``train`` ↔ ``eval``, ``ops`` ↔ ``kernels``);
- a module that belongs to no layer (add it to ``LAYERS``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer and the layers below it. The longest matching prefix wins.
LAYERS = {
    # leaves: import nothing of ours outside themselves (the spec and its public checks/masking helpers; the data)
    "mulclip_fast": 0,  # the package's __init__: re-exports a leaf helper
    "mulclip_fast.reference": 0,
    "mulclip_fast.data": 0,
    "mulclip_fast.kernels": 1,
    "mulclip_fast.ops": 2,
    "mulclip_fast.distributed": 3,  # the one gather the loss terms use
    "mulclip_fast.features": 3,
    "mulclip_fast.loss_terms": 3,
    "mulclip_fast.losses": 3,
    "mulclip_fast.model": 4,
    "mulclip_fast.integrations": 4,  # adapters of other trainers' models: a peer of our model
    "mulclip_fast.train": 5,
    "mulclip_fast.eval": 5,
    "mulclip_fast.fine_grained": 5,  # the fine-grained and zero-shot metrics that eval reports
    "mulclip_fast.run_checkpoints": 5,  # the training checkpoint format that train writes and eval reads
    # tools: measure and report on the library; nothing in the library imports them
    "mulclip_fast.profiling": 6,
    "mulclip_fast.bench_report": 6,
    "mulclip_fast.tools": 6,
    "mulclip_fast.op_parity": 6,  # the parity harness of the layout/property tests and the GPU check
    "mulclip_fast.gpu_check": 6,
    "mulclip_fast.export": 6,  # a run's weights as an OpenAI-layout file: reads run checkpoints, writes like train
    "mulclip_fast.study": 6,  # the ablation study: runs train and eval
}
LEAVES = ("mulclip_fast.reference", "mulclip_fast.data")

# Known violations that other branches remove; each entry is (importer, imported module) and says why.
# An entry that no longer matches an import fails the test, so that the list is emptied as they merge.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module of ours it loads
    private_name: str | None  # the private module or symbol it reaches, up to its first private part
    where: str  # path:line
    text: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.text}`"


def discover(root: Path) -> dict[str, Path]:
    """Module name → file for every module of ``mulclip_fast`` and of ``kernels/`` (as ``mulclip_fast.kernels``)."""
    modules = {}
    for package_dir, package in ((root / "mulclip_fast", "mulclip_fast"), (root / "kernels", "mulclip_fast.kernels")):
        for path in sorted(package_dir.rglob("*.py")):
            parts = list(path.relative_to(package_dir).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def owner_of_private(dotted: str, modules: dict[str, Path]) -> str | None:
    """The package that owns the first private component of ``dotted`` (None if none is private): the
    package it is in, or for a private symbol of a module, that module's package."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if is_private(part):
            parent = ".".join(parts[:i])
            return package_of(parent, modules) if parent in modules else parent
    return None


def imports_of(module: str, modules: dict[str, Path], root: Path) -> list[Import]:
    path = modules[module]
    source = path.read_text()
    found = []

    def add(node, target_module: str, reached: str):
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        where = f"{path.relative_to(root)}:{node.lineno}"
        parts = reached.split(".")
        first_private = next((i for i, part in enumerate(parts) if is_private(part)), None)
        private = None if first_private is None else ".".join(parts[: first_private + 1])
        found.append(Import(module, target_module, private, where, " ".join(text.split())))

    def known(dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is one of our modules."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = known(alias.name)
                if target:
                    add(node, target, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(module, modules).split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if known(base) is None:
                continue
            for alias in node.names:
                dotted = f"{base}.{alias.name}"
                add(node, dotted if dotted in modules else known(base), dotted)
    return found


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix of ``module`` in ``LAYERS`` (the root package's entry is itself only)."""
    matches = [p for p in LAYERS if module == p or (p != "mulclip_fast" and module.startswith(p + "."))]
    return LAYERS[max(matches, key=len)] if matches else None


def part_of(module: str) -> str:
    """The top-level part of the package a module is in: ``mulclip_fast.ops.matched`` → ``mulclip_fast.ops``."""
    return ".".join(module.split(".")[:2])


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def violations(root: Path, allowed: dict[tuple[str, str], str]) -> tuple[list[str], set[tuple[str, str]]]:
    """Every violation as a message naming the file and the import, and the allow-list entries used."""
    modules = discover(root)
    problems, used = [], set()
    for module in sorted(modules):
        if layer_of(module) is None:
            problems.append(f"{modules[module].relative_to(root)}: module {module} belongs to no layer (see LAYERS)")
    edges: dict[str, set[str]] = {}
    for module in sorted(modules):
        for imp in imports_of(module, modules, root):
            if imp.target == module:
                continue
            if (imp.importer, imp.target) in allowed:
                used.add((imp.importer, imp.target))
                continue
            edges.setdefault(imp.importer, set()).add(imp.target)
            importer_layer, target_layer = layer_of(imp.importer), layer_of(imp.target)
            if None not in (importer_layer, target_layer) and importer_layer < target_layer:
                problems.append(
                    f"{imp} imports {imp.target} (layer {target_layer}) into {imp.importer} (layer {importer_layer}): "
                    "against the direction kernels ← ops ← losses ← model ← train/eval"
                )
            for leaf in LEAVES:
                inside = imp.importer == leaf or imp.importer.startswith(leaf + ".")
                if inside and not (imp.target == leaf or imp.target.startswith(leaf + ".")):
                    problems.append(f"{imp}: {leaf} must import nothing of ours outside itself, got {imp.target}")
            owner = owner_of_private(imp.private_name, modules) if imp.private_name else None
            if owner is not None:
                importer_package = package_of(imp.importer, modules)
                if importer_package != owner:
                    problems.append(
                        f"{imp}: private {imp.private_name} of package {owner} imported from {importer_package}"
                    )
    for cycle in find_cycles(edges):
        if len({part_of(m) for m in cycle}) > 1:
            problems.append(f"import cycle between {', '.join(cycle)}")
    return list(dict.fromkeys(problems)), used  # one message per import, however many names it lists


def test_imports_follow_the_layers_with_no_cycle_and_no_private_name_across_packages():
    problems, used = violations(ROOT, ALLOWED)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that match no import any more, remove them: {stale}"
    assert not problems, "\n".join(problems)


# -- the checker itself, on a made-up package with one violation of each kind ----------------------------


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    (root / "kernels").mkdir(exist_ok=True)
    (root / "kernels" / "__init__.py").write_text("")


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"mulclip_fast/ops/__init__.py": "from ..losses import MulCLIPLoss\n", "mulclip_fast/losses.py": ""},
            "mulclip_fast/ops/__init__.py:1: `from ..losses import MulCLIPLoss` imports mulclip_fast.losses (layer 3)",
        ),
        (
            {
                "mulclip_fast/reference/sap.py": "def f():\n    from mulclip_fast import ops\n",
                "mulclip_fast/ops.py": "",
            },
            "mulclip_fast.reference must import nothing of ours outside itself, got mulclip_fast.ops",
        ),
        (
            {
                "mulclip_fast/reference/_checks.py": "",
                "mulclip_fast/ops/matched.py": "from ..reference._checks import x\n",
            },
            "private mulclip_fast.reference._checks of package mulclip_fast.reference imported from mulclip_fast.ops",
        ),
        (
            {"mulclip_fast/losses.py": "_helper = 1\n", "mulclip_fast/model/clip.py": "from ..losses import _helper\n"},
            "private mulclip_fast.losses._helper of package mulclip_fast imported from mulclip_fast.model",
        ),
        (
            {"mulclip_fast/train.py": "from . import eval\n", "mulclip_fast/eval.py": "import mulclip_fast.train\n"},
            "import cycle between mulclip_fast.eval, mulclip_fast.train",
        ),
        ({"mulclip_fast/newthing.py": ""}, "module mulclip_fast.newthing belongs to no layer"),
    ],
    ids=["against-the-direction", "reference-imports-ours", "private-module", "private-symbol", "cycle", "no-layer"],
)
def test_the_checker_reports_each_kind_of_violation(tmp_path, files, expected):
    write_package(tmp_path, {"mulclip_fast/__init__.py": "", **files})
    problems, _ = violations(tmp_path, {})
    assert any(expected in problem for problem in problems), problems


def test_the_checker_accepts_imports_along_the_layers(tmp_path):
    files = {
        "mulclip_fast/__init__.py": "from .reference.checks import set_finite_checks\n",
        "mulclip_fast/reference/__init__.py": "from .checks import check_tokens\nfrom ._inner import helper\n",
        "mulclip_fast/reference/checks.py": "",
        "mulclip_fast/reference/_inner.py": "",
        "mulclip_fast/ops/__init__.py": "from .. import reference\nfrom ._dispatch import resolve\n",
        "mulclip_fast/ops/_dispatch.py": "",
        "mulclip_fast/losses.py": "from . import ops\nfrom .reference.checks import check_tokens\n",
        "mulclip_fast/model/__init__.py": "from ..losses import MulCLIPLoss\n",
        "mulclip_fast/train.py": "import mulclip_fast.model\n",
    }
    write_package(tmp_path, files)
    assert violations(tmp_path, {}) == ([], set())
