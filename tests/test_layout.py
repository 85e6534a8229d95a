"""The package layout: every module imports in a fresh interpreter, no import cycle, vLLM reached
only through the patch-point module.

The cycle check walks every ``import`` statement of every module (those inside functions too)
and looks for a cycle among the package's own modules.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"vllm_av": ROOT / "vllm_av", "vllm_av.kernels": ROOT / "kernels"}
# Modules allowed to import vLLM directly: the patch-point module names every symbol the plugin
# patches or reads; the CPU blend probes vLLM's optional oneDNN ops.
VLLM_IMPORTERS = {"vllm_av.serving.compat.patch_points", "vllm_av.serving.blend.dense"}


def package_modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    modules = {}
    for package, folder in SOURCES.items():
        for file in sorted(folder.rglob("*.py")):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = file
    return modules


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """The package modules ``file`` imports anywhere (top level or inside functions)."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the deepest package module the import names (``a.b.c`` -> ``a.b`` if ``c`` is an attribute)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, file, known) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package's own ``__init__`` parents excluded), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a module importing its own parent package: not a cycle of ours
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["vllm_av.format.names"] = graph["vllm_av.format.names"] | {"vllm_av.serving.front.mix"}  # mix imports names
    assert find_cycle(graph) is not None


def test_every_from_import_of_the_package_names_a_module():
    """``from vllm_av.x import y`` (imports inside functions too) names a module that exists."""
    modules = package_modules()
    missing = []
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("vllm_av"):
                if node.module not in modules:
                    missing.append(f"{name}:{node.lineno} imports from {node.module}")
    assert not missing, missing


def test_only_the_patch_point_module_imports_vllm():
    offenders = []
    for name, file in package_modules().items():
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "vllm" or n.startswith("vllm.") for n in names) and name not in VLLM_IMPORTERS:
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"import vLLM through vllm_av.serving.compat.patch_points: {offenders}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in sorted(package_modules())
             if not n.startswith("vllm_av.kernels.blend") or importlib.util.find_spec("triton")]
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
