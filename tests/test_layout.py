"""The package layering of near_jax/, checked statically with `ast` (nothing is imported).

The rules follow the Layout table of DESIGN.md; each check lists every violation, one per line.
"""

import ast
import functools
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "near_jax"

# Target layers, bottom up: entry i lists the dotted prefixes of layer i. A module's layer is
# that of its LONGEST matching prefix; the bare package name matches only the package __init__.
# A module may import its own layer or lower ones (never in a cycle); a module that matches
# nothing is itself a violation.
LAYERS = (
    # 0 base: the package __init__, atomic writes, config schema, CLI plumbing, mesh + rules,
    # accelerator specs, run directories, and the codec format spec that config validates.
    "near_jax near_jax._io near_jax.config near_jax.cli near_jax.sharding near_jax.hardware"
    " near_jax.workdir near_jax.diloco.codec.spec",
    # 1 the model, the data pipeline, and the codec/outer-step numerics the train step uses.
    "near_jax.model near_jax.data near_jax.diloco.codec near_jax.diloco.outer",
    # 2 training: state, step, optimizer, loop, checkpoints, multi-host start-up, metrics.
    "near_jax.train",
    # 3 users of a trained run: inference, evaluation, HF interop, the planner, plots, growth.
    "near_jax.infer near_jax.eval near_jax.hf near_jax.plan near_jax.plot near_jax.grow",
    # 4 low-communication training: codec, protocol, store, islands, aggregator.
    "near_jax.diloco",
    # 5 contributors: identities, screening, scoring, ledger, rewards.
    "near_jax.contrib",
    # 6 serving: the API, continuous batching, metering, signed replies, attestation, payouts.
    "near_jax.serve",
    # 7 programs: every module whose last component is `__main__`, plus these. Programs may
    # import any layer; nothing may import a program.
    "near_jax.generate near_jax.plot",
)
LAYER_OF = {prefix: i for i, prefixes in enumerate(LAYERS) for prefix in prefixes.split()}
PROGRAM_LAYER = len(LAYERS) - 1
PROGRAMS = frozenset(LAYERS[PROGRAM_LAYER].split())

# Function-level imports of near_jax modules: (importer, imported) -> reason. The good reasons:
# keeping a heavy optional dependency (torch, transformers) or a program's slow path off the
# import path of the common one.
_PLAN_START = "python -m near_jax.plan without --compile starts without grain/orbax (+0.6 s CPU)"
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("near_jax.plan.__main__", "near_jax.plan.compiled"): "only the --compile worker compiles",
    ("near_jax.plan.planner", "near_jax.data.tokenizer"): _PLAN_START,
    ("near_jax.plan.planner", "near_jax.train.step"): _PLAN_START,
}

# Program support: a bottom-layer module that may exit (usage errors exit 2) and read flags,
# because only programs import it.
PROGRAM_SUPPORT = frozenset({"near_jax.cli"})

MAX_LINES = 500
SCANNED_DIRS = ("near_jax", "tests", "bench", "launch", "configs")
FMT_SKIP = re.compile(r"#\s*fmt:\s*" + "skip")  # built at runtime so this file stays clean


class Import(NamedTuple):
    """One import statement's edge between two near_jax modules."""

    importer: str
    imported: str
    where: str  # path:line, relative to the repository
    lazy: bool  # inside a function body


@functools.cache
def sources(root: Path = ROOT) -> dict[str, tuple[Path, ast.Module]]:
    """Every module under root (a package directory) by dotted name: its path and syntax tree."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(), filename=str(path)))
    return found


def _where(root: Path, path: Path, line: int) -> str:
    return f"{path.relative_to(root.parent)}:{line}"


def _sorted(lines: list[str]) -> list[str]:
    """Distinct lines ordered by file, then line number."""
    key = re.compile(r"^([^:]*):?(\d*)")
    return sorted(set(lines), key=lambda s: (key.match(s)[1], int(key.match(s)[2] or 0), s))


def is_program(module: str) -> bool:
    """Whether the module is a program: a `__main__` or one of PROGRAMS."""
    return module.rpartition(".")[2] == "__main__" or module in PROGRAMS


def layer_of(module: str) -> int | None:
    """The module's layer (longest matching prefix), or None when no entry matches."""
    if is_program(module):
        return PROGRAM_LAYER
    package = module.partition(".")[0]
    matches = [p for p in LAYER_OF if module == p or (p != package and module.startswith(p + "."))]
    return LAYER_OF[max(matches, key=len)] if matches else None


def _walk_imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement and whether it sits inside a function body."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            funcs = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            stack.append((child, lazy or isinstance(child, funcs)))


def _known(name: str, known: dict) -> str:
    """The longest prefix of a dotted name that is a module under the root."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def _targets(node: ast.Import | ast.ImportFrom, own_package: str, known: dict) -> list[str]:
    """Dotted names an import statement names: `from a import b` is a.b if that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = own_package.split(".")
        up = ".".join(parts[: len(parts) - node.level + 1])
        base = f"{up}.{base}" if base else up
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


@functools.cache
def imports(root: Path = ROOT) -> list[Import]:
    """Distinct imports of modules under root by modules under root (implicit parents not)."""
    known, package, edges = sources(root), root.name, {}
    for module, (path, tree) in known.items():
        own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, lazy in _walk_imports(tree):
            for name in _targets(node, own_package, known):
                if name == package or name.startswith(package + "."):
                    where = _where(root, path, node.lineno)
                    edges[Import(module, _known(name, known), where, lazy)] = None
    return list(edges)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules reachable from start by one or more import edges."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycle_violations(root: Path = ROOT) -> list[str]:
    """Each import on a cycle (a -> b with a reachable from b); one's own ancestors aside."""
    edges = [e for e in imports(root) if not (e.importer + ".").startswith(e.imported + ".")]
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    reach = {v: _reachable(graph, v) for v in graph}
    out = []
    for e in edges:
        if e.importer in reach.get(e.imported, ()):
            cycle = sorted(w for w in reach[e.importer] if e.importer in reach.get(w, ()))
            rule = f"cycle among {', '.join(cycle)}"
            out.append(f"{e.where}: {e.importer} imports {e.imported}: {rule}")
    return _sorted(out)


def layer_violations(root: Path = ROOT) -> list[str]:
    """Modules in no layer, imports pointing up the layer order, and imports of programs."""
    out = [
        f"{_where(root, path, 1)}: {module} is in no layer: add it to LAYERS"
        for module, (path, _) in sources(root).items()
        if layer_of(module) is None
    ]
    for e in imports(root):
        low, high = layer_of(e.importer), layer_of(e.imported)
        if is_program(e.imported):
            out.append(f"{e.where}: {e.importer} imports {e.imported}: nothing imports a program")
        elif e.imported in PROGRAM_SUPPORT and not is_program(e.importer):
            rule = "only programs import program support"
            out.append(f"{e.where}: {e.importer} imports {e.imported}: {rule}")
        elif low is not None and high is not None and high > low:
            rule = f"upward import (layer {low} -> {high})"
            out.append(f"{e.where}: {e.importer} imports {e.imported}: {rule}")
    return _sorted(out)


def size_violations(root: Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """Modules longer than the limit."""
    out = []
    for module, (path, _) in sources(root).items():
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{_where(root, path, n)}: {module} has {n} lines: over {limit}")
    return _sorted(out)


def lazy_import_violations(
    root: Path = ROOT, allowed: dict[tuple[str, str], str] = ALLOWED_LAZY
) -> list[str]:
    """Function-level imports of near_jax modules not in the allowlist, and stale entries."""
    lazy = [e for e in imports(root) if e.lazy]
    out = [
        f"{e.where}: {e.importer} imports {e.imported}: function-level import not in ALLOWED_LAZY"
        for e in lazy
        if (e.importer, e.imported) not in allowed
    ]
    used = {(e.importer, e.imported) for e in lazy}
    out += [
        f"ALLOWED_LAZY{k}: stale entry: no such function-level import"
        for k in allowed
        if k not in used
    ]
    return _sorted(out)


def _exit_or_flags(node: ast.AST) -> str | None:
    """What the node does that only a program may (read absl flags, exit), or None."""
    if isinstance(node, ast.Attribute) and node.attr == "FLAGS":
        return "reads absl FLAGS"
    if isinstance(node, ast.ImportFrom) and node.module == "absl.flags":
        if any(a.name == "FLAGS" for a in node.names):
            return "imports absl FLAGS"
    if isinstance(node, ast.Raise) and node.exc is not None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id == "SystemExit":
            return "raises SystemExit"
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    if isinstance(f, ast.Name) and f.id in ("exit", "quit"):
        return f"calls {f.id}()"
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else getattr(f.value, "attr", "")
        if (owner, f.attr) in (("sys", "exit"), ("os", "_exit"), ("app", "run")):
            return f"calls {owner}.{f.attr}()"
    return None


def program_only_violations(root: Path = ROOT) -> list[str]:
    """Library (non-program) modules that read absl flags, exit, or run an absl app."""
    out = []
    for module, (path, tree) in sources(root).items():
        if is_program(module) or module in PROGRAM_SUPPORT:
            continue
        for node in ast.walk(tree):
            if what := _exit_or_flags(node):
                where = _where(root, path, node.lineno)
                out.append(f"{where}: {module} {what}: only programs read flags or exit")
    return _sorted(out)


def fmt_skip_violations(repo: Path = REPO, dirs: tuple[str, ...] = SCANNED_DIRS) -> list[str]:
    """Comments that switch the formatter off for a line, in the repository's Python files."""
    out = []
    for d in dirs:
        for path in sorted((repo / d).rglob("*.py")):
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            for tok in tokens:
                if tok.type == tokenize.COMMENT and FMT_SKIP.search(tok.string):
                    where = f"{path.relative_to(repo)}:{tok.start[0]}"
                    out.append(f"{where}: {tok.string!r}: let the formatter format the line")
    return _sorted(out)


def package_doc_violations(root: Path = ROOT) -> list[str]:
    """Package directories (any .py below them) without an __init__.py that has a docstring."""
    out = []
    for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if "__pycache__" in d.parts or not any(d.rglob("*.py")):
            continue
        init = d / "__init__.py"
        if not init.exists():
            out.append(f"{d.relative_to(root.parent)}/: package directory has no __init__.py")
        elif not ast.get_docstring(ast.parse(init.read_text())):
            out.append(f"{_where(root, init, 1)}: no docstring (the package's map)")
    return _sorted(out)


# The real tree. These fail until near_jax/ has the target layout.


def _check(violations: list[str], rule: str) -> None:
    if violations:
        lines = "\n".join(violations)
        pytest.fail(f"{len(violations)} violation(s) of: {rule}\n{lines}", pytrace=False)


def test_no_import_cycles() -> None:
    _check(cycle_violations(), "no import cycles among near_jax modules")


def test_imports_point_down_the_layers() -> None:
    _check(layer_violations(), "imports go to the same or a lower layer; nothing imports a program")


def test_modules_are_short() -> None:
    _check(size_violations(), f"no module over {MAX_LINES} lines")


def test_function_level_imports_are_allowlisted() -> None:
    _check(lazy_import_violations(), "function-level near_jax imports only where ALLOWED_LAZY says")


def test_only_programs_read_flags_or_exit() -> None:
    _check(program_only_violations(), "library modules take arguments and raise")


def test_no_formatter_opt_outs() -> None:
    _check(fmt_skip_violations(), "no formatter opt-out comments")


def test_packages_have_docstring_maps() -> None:
    _check(package_doc_violations(), "every package has an __init__.py with a docstring")


# The checker itself, on synthetic trees ("=== path" starts each file).

GOOD = """
=== near_jax/__init__.py
\"\"\"Root.\"\"\"
=== near_jax/config.py
from near_jax.diloco.codec import spec  # runs diloco's __init__ (layer 4): not an edge
=== near_jax/diloco/__init__.py
\"\"\"DiLoCo.\"\"\"
from near_jax.diloco import island
=== near_jax/diloco/codec/__init__.py
\"\"\"Codec.\"\"\"
=== near_jax/diloco/codec/spec.py
NAMES = ()
=== near_jax/diloco/island.py
from near_jax import diloco  # its own package's __init__: no cycle
from ..train import loop
=== near_jax/diloco/__main__.py
import sys
from absl import app, flags
from near_jax.diloco import island
def main(argv):
    print(flags.FLAGS.x)
    sys.exit(0)
app.run(main)
=== near_jax/train/__init__.py
\"\"\"Train.\"\"\"
=== near_jax/train/loop.py
from typing import TYPE_CHECKING
from near_jax import config
if TYPE_CHECKING:
    from near_jax.model import core
def define():
    from absl import flags
    flags.DEFINE_string("x", None, "X.")
=== near_jax/model/__init__.py
\"\"\"Model.\"\"\"
=== near_jax/model/core.py
import jax
=== near_jax/evaltasks/tasks.jsonl
{}
"""

BAD = """
=== near_jax/__init__.py
\"\"\"Root.\"\"\"
=== near_jax/config.py
from absl import flags
from near_jax.train import loop
V = flags.FLAGS.v
=== near_jax/train/__init__.py
x = 1
=== near_jax/train/loop.py
import near_jax.train.step
def f():
    from near_jax.model import core
=== near_jax/train/step.py
import os
from . import loop
os._exit(1)
=== near_jax/model/__init__.py
\"\"\"Model.\"\"\"
=== near_jax/model/core.py
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from near_jax.diloco import island  MARKER
=== near_jax/diloco/island.py
import sys
from near_jax.diloco import __main__
sys.exit(1)
=== near_jax/diloco/__main__.py
\"\"\"Program.\"\"\"
=== near_jax/cli.py
import sys
def usage_error(message):
    sys.exit(2)
=== near_jax/model/cli_user.py
from near_jax import cli
"""


def _tree(tmp_path: Path, spec: str) -> Path:
    """Writes the files of spec under tmp_path; returns the package directory."""
    for block in spec.split("=== ")[1:]:
        name, _, text = block.partition("\n")
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path / "near_jax"


def _at(violations: list[str], fragment: str) -> list[str]:
    """The path:line of each violation, after checking that each names the rule fragment."""
    assert all(fragment in v for v in violations), violations
    return [v.split(": ")[0] for v in violations]


def test_checker_passes_a_good_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD)
    assert cycle_violations(root) == []
    assert layer_violations(root) == []
    assert size_violations(root) == []
    assert lazy_import_violations(root, {}) == []
    assert program_only_violations(root) == []
    assert fmt_skip_violations(tmp_path, ("near_jax",)) == []
    assert package_doc_violations(root) == []


def test_checker_reports_a_bad_tree(tmp_path: Path) -> None:
    marker = "# fmt" + ": skip"
    root = _tree(
        tmp_path, BAD.replace("MARKER", marker) + "=== near_jax/stray.py\n" + "x = 1\n" * 501
    )
    cycle = "cycle among near_jax.train.loop, near_jax.train.step"
    assert _at(cycle_violations(root), cycle) == [
        "near_jax/train/loop.py:1",
        "near_jax/train/step.py:2",
    ]
    assert layer_violations(root) == [
        "near_jax/config.py:2: near_jax.config imports near_jax.train.loop: "
        "upward import (layer 0 -> 2)",
        "near_jax/diloco/island.py:2: near_jax.diloco.island imports near_jax.diloco.__main__: "
        "nothing imports a program",
        "near_jax/model/cli_user.py:1: near_jax.model.cli_user imports near_jax.cli: "
        "only programs import program support",
        "near_jax/model/core.py:3: near_jax.model.core imports near_jax.diloco.island: "
        "upward import (layer 1 -> 4)",
        "near_jax/stray.py:1: near_jax.stray is in no layer: add it to LAYERS",
    ]
    assert _at(size_violations(root), "over 500") == ["near_jax/stray.py:501"]
    lazy = "near_jax.train.loop imports near_jax.model.core: function-level"
    assert _at(lazy_import_violations(root, {}), lazy) == ["near_jax/train/loop.py:3"]
    allowed = {("near_jax.train.loop", "near_jax.model.core"): "r", ("a", "b"): "gone"}
    assert _at(lazy_import_violations(root, allowed), "stale") == ["ALLOWED_LAZY('a', 'b')"]
    assert _at(program_only_violations(root), "only programs") == [
        "near_jax/config.py:3",
        "near_jax/diloco/island.py:3",
        "near_jax/train/step.py:3",
    ]
    assert _at(fmt_skip_violations(tmp_path, ("near_jax",)), marker) == ["near_jax/model/core.py:3"]
    assert package_doc_violations(root) == [
        "near_jax/diloco/: package directory has no __init__.py",
        "near_jax/train/__init__.py:1: no docstring (the package's map)",
    ]
