"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Imports flow one way (STYLE 1, DESIGN): helpers -> kernels -> specs -> files -> resolution ->
the call's pipeline -> context parallelism -> ops -> the compiled op -> layer -> the package; the
tuner and the benchmarks sit on top and never import each other; the CLI and the docs generator
sit on top of everything and nothing imports them. No module of the package imports the tests, no
module imports another module's underscored names, and the import graph has no cycle.
Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gdn2_kernels"

# Lowest first; a module may import its own layer (no cycles) and the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("helpers", ("gdn2_kernels._env", "gdn2_kernels._launch", "gdn2_kernels._precision",
                 "gdn2_kernels._segments", "gdn2_kernels._varlen", "gdn2_kernels._gate_check",
                 "gdn2_kernels._interpreter", "gdn2_kernels.reference", "gdn2_kernels.accuracy",
                 "gdn2_kernels.inputs", "gdn2_kernels.options", "gdn2_kernels.provenance",
                 "gdn2_kernels.timing")),
    ("device", ("gdn2_kernels._device", "gdn2_kernels._parallel", "gdn2_kernels.gpu")),
    ("kernels", ("gdn2_kernels.kernels", "gdn2_kernels.kernels.*")),
    ("specs", ("gdn2_kernels.configs",)),
    ("files", ("gdn2_kernels.config_schema", "gdn2_kernels.config_files",
               "gdn2_kernels.exported")),
    ("resolution", ("gdn2_kernels.dispatch",)),
    ("pipeline", ("gdn2_kernels.checks", "gdn2_kernels._fla_args", "gdn2_kernels.pipeline")),
    ("cp", ("gdn2_kernels.cp", "gdn2_kernels.cp.*")),
    ("ops", ("gdn2_kernels.ops",)),
    ("compiled", ("gdn2_kernels.custom_ops",)),
    ("layer", ("gdn2_kernels.layer", "gdn2_kernels.integrations", "gdn2_kernels.integrations.*")),
    ("package", ("gdn2_kernels",)),
    ("toolkit", ("gdn2_kernels.tuner", "gdn2_kernels.tuner.*", "gdn2_kernels.bench",
                 "gdn2_kernels.bench.*")),
    ("cli", ("gdn2_kernels.cli", "gdn2_kernels.docs")),
)
# Inside the toolkit layer: neither side imports the other.
APART = (("gdn2_kernels.tuner", "gdn2_kernels.bench"),)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it")


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, name or None, line)`` of every runtime import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:  # ``from pkg import module``
                    out.append((f"{target}.{a.name}", None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def _ours(name: str) -> str | None:
    """The package module an import refers to (the longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def graph() -> dict[str, set[str]]:
    return {m: {t for name, _, _ in imports(m) if (t := _ours(name)) and t != m}
            for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_go_down_the_layers_only():
    upward = []
    for module in MODULES:
        for name, _, line in imports(module):
            target = _ours(name)
            if target is None or target == module:
                continue
            if layer_of(target) > layer_of(module):
                where = f"{MODULES[module].relative_to(ROOT)}:{line}"
                upward.append(f"{where} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_tuner_and_bench_do_not_import_each_other():
    crossing = []
    for a, b in APART:
        for one, other in ((a, b), (b, a)):
            for module in MODULES:
                if module == one or module.startswith(one + "."):
                    for name, _, line in imports(module):
                        if name == other or name.startswith(other + "."):
                            crossing.append(f"{module}:{line} imports {name}")
    assert not crossing, "\n".join(crossing)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_module_imports_the_tests():
    bad = [f"{m}:{line} imports {name}" for m in MODULES for name, _, line in imports(m)
           if name.split(".")[0] in ("tests", "conftest")]
    assert not bad, "\n".join(bad)


def test_no_module_takes_another_modules_underscored_names():
    """``from x import _name`` and ``x._name`` across modules (underscored *modules* such as
    ``_device`` are the package's private helpers and may be imported inside it)."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for name, attr, line in imports(module):
            target = _ours(name)
            if target is None:
                continue
            if attr is not None and attr.startswith("_") and not attr.startswith("__"):
                bad.append(f"{module}:{line} imports {attr} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", node)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in MODULES:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and f"{aliases[node.value.id]}.{node.attr}" not in MODULES):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_distribution_holds_only_the_gdn2_kernels_namespace():
    """setuptools' package discovery, as pyproject.toml configures it, finds only
    ``gdn2_kernels`` and its subpackages, and the console script is ``gdn2``."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = project["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_packages(str(ROOT), include=find["include"],
                                     exclude=find.get("exclude", ()))
    assert found and all(p == "gdn2_kernels" or p.startswith("gdn2_kernels.") for p in found)
    assert {m for m in MODULES if (MODULES[m].name == "__init__.py")} <= set(found)
    assert project["project"]["scripts"] == {"gdn2": "gdn2_kernels.cli:main"}
    assert importlib.util.find_spec("gdn2_kernels.cli") is not None


def test_a_built_wheel_installs_only_the_namespace_and_the_gdn2_script(tmp_path):
    """``pip wheel`` of the repository's files (copied, so the checkout gets no build folder):
    top-level entries are the package, its dist-info and the data (shipped profiles)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from its tracked files)")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    src = tmp_path / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    stem = "-".join(wheel.name.split("-")[:2])
    assert tops == {"gdn2_kernels", f"{stem}.dist-info", f"{stem}.data"}, tops
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode().split()
    assert scripts == ["[console_scripts]", "gdn2", "=", "gdn2_kernels.cli:main"]
