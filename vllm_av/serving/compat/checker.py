"""Check every patch point against a vLLM release's sources -- a wheel or a directory -- without importing it.

    python -m vllm_av.serving.compat.checker --wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m vllm_av.serving.compat.checker --installed
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import zipfile
from pathlib import Path

from vllm_av.serving.compat.patch_points import ALL, PatchPoint
from vllm_av.serving.compat.version import VERSION_RE, SUPPORTED, series_of, supported_text

class _Source:
    """vLLM's Python sources in a wheel (zip) or a directory holding the ``vllm`` package."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None
        self._trees: dict[str, ast.Module | None] = {}

    def read(self, relative: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relative).decode()
            except KeyError:
                return None
        file = self.path / relative
        return file.read_text() if file.is_file() else None

    def module(self, name: str) -> ast.Module | None:
        if name not in self._trees:
            base = name.replace(".", "/")
            text = self.read(f"{base}.py") or self.read(f"{base}/__init__.py")
            self._trees[name] = ast.parse(text) if text is not None else None
        return self._trees[name]

    def version(self) -> str:
        match = VERSION_RE.search(self.read("vllm/_version.py") or "")
        return match[1] if match else "unknown"


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    args = func.args
    return tuple(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))


def _assigns_attr(cls: ast.ClassDef, attr: str) -> bool:
    """Whether ``cls`` declares ``attr`` (a class-level field or ``self.attr = ...`` in a method)."""
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id == attr:
                return True
            if (isinstance(target, ast.Attribute) and target.attr == attr
                    and isinstance(target.value, ast.Name) and target.value.id == "self"):
                return True
    return False


def _find(body: list[ast.stmt], name: str):
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
        if isinstance(node, (ast.ImportFrom, ast.Import)) and any((a.asname or a.name) == name for a in node.names):
            return node
        if isinstance(node, (ast.If, ast.Try)):  # definitions under `if` / `try` (platform guards)
            found = _find(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []), name)
            if found is not None:
                return found
    return None


def check_point(source: _Source, point: PatchPoint) -> str | None:
    """None if ``point`` is in ``source`` as we use it, else what is wrong."""
    tree = source.module(point.module)
    if tree is None:
        return f"module {point.module} is missing"
    node, parent, scope = None, None, tree.body
    parts = point.qualname.split(".")
    for i, part in enumerate(parts):
        node = _find(scope, part)
        if node is None:
            if point.use == "read" and isinstance(parent, ast.ClassDef) and _assigns_attr(parent, part):
                return None
            return f"{'.'.join(parts[: i + 1])} is missing"
        parent = node
        scope = getattr(node, "body", [])
    if point.params is not None and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        found = _params(node)
        if found[: len(point.params)] != point.params:
            return f"signature changed: expected ({', '.join(point.params)}, ...), found ({', '.join(found)})"
    return None


def check(path: Path) -> tuple[str, list[tuple[PatchPoint, str | None]]]:
    """``(version, [(point, problem or None)])`` for every point that applies to the release at ``path``."""
    source = _Source(path)
    version = source.version()
    series = series_of(version)
    return version, [(point, check_point(source, point)) for point in ALL if point.applies_to(series)]


def installed_source() -> Path | None:
    """The directory holding the installed ``vllm`` package (its sources, not imported), or None."""
    spec = importlib.util.find_spec("vllm")
    return Path(next(iter(spec.submodule_search_locations))).parent if spec is not None else None


def report(path: Path) -> tuple[str, bool]:
    """A markdown report of :func:`check` and whether every point is present."""
    version, results = check(path)
    problems = [(p, why) for p, why in results if why]
    lines = [f"# vLLM {version}: {len(results) - len(problems)}/{len(results)} patch points as expected", ""]
    if series_of(version) not in SUPPORTED:
        lines += [f"**{version} is not a supported release** ({supported_text()}).", ""]
    lines += ["| symbol | use | status |", "|---|---|---|"]
    for point, why in results:
        lines.append(f"| `{point.name}` | {point.use} | {why or 'ok'} |")
    return "\n".join(lines) + "\n", not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_av.serving.compat.checker", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--wheel", type=Path, help="a vLLM wheel (.whl) or a directory holding its vllm/ package")
    where.add_argument("--installed", action="store_true", help="the vLLM installed here (its sources, not imported)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.installed:
        path = installed_source()
        if path is None:
            parser.error("vLLM is not installed")
    else:
        path = args.wheel
        if not path.exists():
            parser.error(f"{path}: not found")
    text, ok = report(path)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
