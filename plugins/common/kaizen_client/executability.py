"""Would a completed file run? A check for code that no test exercised.

:func:`check_source` looks at a Python file (a completion in its context) in the environment
where it is called: does it parse, do its imports resolve, do the attribute chains it uses on
imported modules exist, and do its calls of imported callables bind to their signatures
(:func:`inspect.signature`)? Imports are really imported, so call it only where importing the
project's modules is what the caller means to do: in the project's CI environment (the pytest
plugin), or inside Kaizen's sandbox (the trainer, for self-contained tasks, where
:func:`run_source` also runs the file).

Standard library only and Python 3.9+: this module ships to users' CI and, as a file, into the
trainer's sandbox, where it is imported without the rest of the package.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import runpy
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Executability", "check_source", "check_untested", "main", "run_source"]

MAX_PROBLEMS = 20
"""Problems kept per file; the first ones are what a reader needs."""


@dataclass
class Executability:
    """What :func:`check_source` (and :func:`run_source`) found about one file.

    ``None`` means not checked: ``imports``/``api`` when the file does not parse, ``runs`` when
    it was not run (the static check never runs anything) or its run was inconclusive.
    """

    parses: bool
    imports: bool | None = None
    api: bool | None = None
    runs: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def executable(self) -> bool:
        """Parses, its imports resolve, its API use binds, and no run of it failed."""
        return bool(self.parses and self.imports and self.api and self.runs is not False)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "executable": self.executable}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Executability:
        return cls(
            parses=bool(data["parses"]),
            imports=data.get("imports"),
            api=data.get("api"),
            runs=data.get("runs"),
            problems=[str(p) for p in data.get("problems") or []],
        )


class _Placeholder:
    """An argument value for binding a call to a signature (only the shape matters)."""


def _guarded_by_import_error(tree: ast.AST) -> set:
    """Import nodes inside ``try`` blocks that handle ImportError: optional imports."""
    guarded = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = set()
        for handler in node.handlers:
            kinds = handler.type
            elts = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
            for kind in elts:
                if kind is None:
                    names.add("*")
                elif isinstance(kind, ast.Name):
                    names.add(kind.id)
        if names & {"*", "ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
            for stmt in node.body:
                for inner in ast.walk(stmt):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        guarded.add(id(inner))
    return guarded


def _rebound_names(tree: ast.AST) -> set:
    """Names the file binds other than by an import: such a name may not be the module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def _import(name: str, problems: list[str]) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
        problems.append(f"import {name}: {type(exc).__name__}: {exc}")
        return None


def _resolve_imports(tree: ast.AST, problems: list[str]) -> tuple[bool, dict[str, Any]]:
    """Import every module the file imports; the names they bind -> objects."""
    guarded = _guarded_by_import_error(tree)
    bound: dict[str, Any] = {}
    ok = True
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = _import(alias.name, problems if id(node) not in guarded else [])
                if module is None:
                    ok = ok and id(node) in guarded
                    continue
                if alias.asname:
                    bound[alias.asname] = module
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = sys.modules.get(top, module)
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                continue  # relative: the file's package is not known here
            sink = problems if id(node) not in guarded else []
            module = _import(node.module, sink)
            if module is None:
                ok = ok and id(node) in guarded
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                if hasattr(module, alias.name):
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
                    continue
                sub = _import(f"{node.module}.{alias.name}", [])
                if sub is not None:
                    bound[alias.asname or alias.name] = sub
                else:
                    sink.append(f"from {node.module} import {alias.name}: no such name")
                    ok = ok and id(node) in guarded
    return ok, bound


def _chain(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything that is not a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _lookup(parts: list[str], bound: dict[str, Any], problems: list[str]) -> tuple[bool, Any]:
    """Follow ``parts`` from a bound name: (found, object). A missing attribute counts only on a
    module or a class (an instance may set attributes at run time)."""
    obj = bound[parts[0]]
    for i, attr in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, attr)
        except Exception:  # noqa: BLE001 - a property may raise anything
            if inspect.ismodule(obj) or inspect.isclass(obj):
                problems.append(f"{'.'.join(parts[:i])} has no attribute {attr!r}")
                return False, None
            return True, None
    return True, obj


def _binds(call: ast.Call, target: Any, name: str, problems: list[str]) -> bool:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(
        k.arg is None for k in call.keywords
    ):
        return True  # *args / **kwargs: the shape is not known statically
    if not callable(target):
        problems.append(f"{name} is not callable")
        return False
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return True  # no signature to check against (some builtins)
    args = [_Placeholder()] * len(call.args)
    kwargs = {k.arg: _Placeholder() for k in call.keywords if k.arg is not None}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        problems.append(f"{name}{signature}: {exc}")
        return False
    return True


def _check_api(tree: ast.AST, bound: dict[str, Any], problems: list[str]) -> bool:
    ok = True
    checked_calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts = _chain(node.func)
            if parts is None or parts[0] not in bound:
                continue
            checked_calls.add(id(node.func))
            found, target = _lookup(parts, bound, problems)
            if (
                not found
                or target is not None
                and not _binds(node, target, ".".join(parts), problems)
            ):
                ok = False
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and id(node) not in checked_calls
        ):
            parts = _chain(node)
            if parts is None or parts[0] not in bound:
                continue
            before = len(problems)
            found, _ = _lookup(parts, bound, problems)
            if not found:
                ok = False
                # The same missing attribute inside a longer chain is one problem, not two.
                if problems[before:] and problems[before] in problems[:before]:
                    del problems[before:]
    return ok


def check_source(source: str, *, filename: str = "<completion>") -> Executability:
    """The static check of ``source`` (see the module docstring). Imports what it imports;
    runs nothing else. Never raises for what the source holds."""
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        return Executability(parses=False, problems=[f"{type(exc).__name__}: {exc}"])
    problems: list[str] = []
    imports_ok, bound = _resolve_imports(tree, problems)
    for name in _rebound_names(tree):
        bound.pop(name, None)
    api_ok = _check_api(tree, bound, problems)
    return Executability(
        parses=True, imports=imports_ok, api=api_ok, problems=_unique(problems)[:MAX_PROBLEMS]
    )


def _unique(items: list[str]) -> list[str]:
    seen = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def run_source(path: str, *, announce: bool = False) -> Executability:
    """:func:`check_source` of the file at ``path``, then, if it passed, run the file as
    ``__main__``: ``runs`` is False when it raised. Only for a disposable process in a sandbox:
    the file runs here, with this process's rights. With ``announce`` the static result is
    printed (a JSON line) before the run, so a run that never ends still leaves it."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    result = check_source(source, filename=path)
    if announce:
        _print(result)
    if not result.executable:
        return result
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        result.runs = exc.code in (None, 0)
        if not result.runs:
            result.problems.append(f"exited with {exc.code!r}")
    except BaseException as exc:  # noqa: BLE001 - any exception is the finding
        result.runs = False
        result.problems.append(f"raised {type(exc).__name__}: {exc}"[:500])
    else:
        result.runs = True
    return result


def check_untested(
    located: Iterable[Any], completions: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The report's ``executability``: for each located completion (``ledger.Located``) that no
    test exercised (its attributed ``tests`` are empty), the static check of the Python file it
    sits in, in this process's environment (each file checked once)."""
    untested = {(c["completion_id"], c["choice_index"]) for c in completions if not c["tests"]}
    by_path: dict[Any, Executability | None] = {}
    out = []
    for item in located:
        if item.key not in untested or item.path.suffix not in (".py", ".pyi"):
            continue
        if item.path not in by_path:
            try:
                source = item.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                by_path[item.path] = None
            else:
                by_path[item.path] = check_source(source, filename=str(item.path))
        result = by_path[item.path]
        if result is not None:
            out.append(
                {
                    "completion_id": item.entry.completion_id,
                    "choice_index": item.entry.choice_index,
                    "final_text": item.final_text,
                    **result.to_json(),
                }
            )
    return out


def _print(result: Executability) -> None:
    sys.stdout.write("\n" + json.dumps(result.to_json(), sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``python executability.py FILE [--run]``: print the result as a JSON line (with
    ``--run``, the static one before the run and the final one after it: the last counts)."""
    args = list(sys.argv[1:] if argv is None else argv)
    run = "--run" in args
    paths = [a for a in args if a != "--run"]
    if len(paths) != 1:
        sys.stderr.write("usage: executability.py FILE [--run]\n")
        return 2
    if run:
        result = run_source(paths[0], announce=True)
    else:
        with open(paths[0], encoding="utf-8") as handle:
            result = check_source(handle.read(), filename=paths[0])
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
