"""A static look at a completion before the sandbox judges it: tricks that fake a pass.

:meth:`trainer.sandbox.Sandbox.run_test` flags (and never runs) a program whose syntax tree
shows a way to end or subvert the run before or around the test: leaving the interpreter
(``exit``, ``quit``, ``sys.exit``, ``os._exit``, ``os.abort``, signals to itself), ``atexit``,
raising ``SystemExit``/``KeyboardInterrupt``/``BaseException`` or subclassing them, touching
``builtins``/``__builtins__``/``sys.modules`` or assigning into an imported module, frame and
GC introspection (``sys._getframe``, ``inspect``, ``gc``, ``tb_frame``...), tracing, ``ctypes``,
new processes, signal handlers, dynamic imports, and reading the harness, ``/proc`` or its own
file. It is one layer: a program that hides such a call from the parser (``getattr`` with a
computed name, ``eval``) still meets the harness's audit hook and its seal
(:mod:`trainer.sandbox_harness`).

It must not flag honest code: ``import sys`` with ``sys.maxsize`` or ``sys.setrecursionlimit``,
``math``, ``re``, ``collections``, ``eval`` of data are all fine. On the canonical solutions of
MBPP+ (301) and HumanEval (164) it flags none (``tests/trainer/test_sandbox_hostile.py``).
"""

from __future__ import annotations

import ast

__all__ = ["scan"]

# Modules whose mere import is a way around the test (or out of the sandbox).
_MODULES = {
    "atexit": "registers exit handlers (atexit)",
    "builtins": "imports builtins",
    "ctypes": "uses ctypes",
    "_ctypes": "uses ctypes",
    "cffi": "uses cffi",
    "gc": "inspects the garbage collector (gc)",
    "inspect": "inspects frames (inspect)",
    "signal": "handles signals (signal)",
    "_signal": "handles signals (signal)",
    "subprocess": "starts processes (subprocess)",
    "_posixsubprocess": "starts processes (_posixsubprocess)",
    "multiprocessing": "starts processes (multiprocessing)",
    "pty": "starts processes (pty)",
    "importlib": "imports modules dynamically (importlib)",
    "_imp": "uses the import machinery (_imp)",
    "_thread": "uses _thread",
    "faulthandler": "uses faulthandler",
    "_testcapi": "uses _testcapi",
    "_testinternalcapi": "uses _testinternalcapi",
    "_xxsubinterpreters": "uses subinterpreters",
    "posix": "uses posix directly",
}
# Attribute calls/reads on a module: (module, attribute) -> reason.
_ATTRIBUTES = {
    ("sys", "exit"): "calls sys.exit",
    ("sys", "modules"): "touches sys.modules",
    ("sys", "_getframe"): "walks frames (sys._getframe)",
    ("sys", "_current_frames"): "walks frames (sys._current_frames)",
    ("sys", "settrace"): "installs a trace function (sys.settrace)",
    ("sys", "setprofile"): "installs a profile function (sys.setprofile)",
    ("sys", "addaudithook"): "installs an audit hook",
    ("sys", "excepthook"): "replaces sys.excepthook",
    ("sys", "stdout"): None,  # reading or replacing output is honest enough
    ("os", "_exit"): "calls os._exit",
    ("os", "abort"): "calls os.abort",
    ("os", "kill"): "sends a signal (os.kill)",
    ("os", "killpg"): "sends a signal (os.killpg)",
    ("os", "fork"): "forks (os.fork)",
    ("os", "forkpty"): "forks (os.forkpty)",
    ("os", "system"): "runs a shell command (os.system)",
    ("os", "popen"): "runs a shell command (os.popen)",
    ("os", "posix_spawn"): "spawns a process",
    ("os", "posix_spawnp"): "spawns a process",
    ("os", "dup2"): "redirects a file descriptor (os.dup2)",
    ("os", "close"): "closes a file descriptor (os.close)",
    ("os", "closerange"): "closes file descriptors (os.closerange)",
    ("os", "symlink"): "creates a symbolic link",
    ("threading", "settrace"): "installs a trace function (threading.settrace)",
    ("threading", "setprofile"): "installs a profile function (threading.setprofile)",
    ("traceback", "walk_stack"): "walks frames (traceback.walk_stack)",
    ("traceback", "extract_stack"): "walks frames (traceback.extract_stack)",
    ("traceback", "print_stack"): "walks frames (traceback.print_stack)",
}
_EXEC_PREFIXES = ("exec", "spawn")  # os.execv, os.spawnl, ...
_FRAME_ATTRIBUTES = {
    "tb_frame",
    "gi_frame",
    "cr_frame",
    "ag_frame",
    "f_back",
    "f_locals",
    "f_globals",
    "f_builtins",
    "f_trace",
}
_EXITING_EXCEPTIONS = {"SystemExit", "KeyboardInterrupt", "BaseException", "GeneratorExit"}
_EXIT_CALLS = {"exit": "calls exit()", "quit": "calls quit()", "breakpoint": "calls breakpoint()"}
_NAMES = {
    "__builtins__": "touches __builtins__",
    "__import__": "imports dynamically (__import__)",
    "__file__": "reads its own file name (__file__)",
    "__loader__": "touches its loader",
    "__spec__": "touches its module spec",
}
# String constants that name what the program must not read.
_PATH_HINTS = ("/proc/", "/dev/fd", "main.py", "sandbox_harness", "sandbox_supervisor")


def scan(code: str) -> str | None:
    """Why ``code`` is flagged ("calls os._exit (line 3)"), or None. Code that does not parse
    is not flagged: running it gives the honest SyntaxError."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    try:
        return _Scanner().check(tree)
    except RecursionError:
        return "is nested too deeply to check"


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.modules: dict[str, str] = {}  # local name -> module it names
        self.found: list[tuple[int, str]] = []

    def check(self, tree: ast.AST) -> str | None:
        # Imports first, so that `math.isclose = ...` is known to target a module wherever the
        # import sits; then everything.
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.modules[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    self.modules[alias.asname or alias.name] = full
        self.visit(tree)
        if not self.found:
            return None
        line, why = min(self.found)
        return f"{why} (line {line})"

    def flag(self, node: ast.AST, why: str) -> None:
        self.found.append((getattr(node, "lineno", 0), why))

    # -- imports ------------------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            self._module(node, node.module)
            for alias in node.names:
                self._attribute(node, node.module.split(".")[-1], alias.name)
                if alias.name in _FRAME_ATTRIBUTES or alias.name in _NAMES:
                    self.flag(node, _NAMES.get(alias.name, "reads frames"))

    def _module(self, node: ast.AST, name: str) -> None:
        top = name.split(".")[0]
        if top in _MODULES:
            self.flag(node, _MODULES[top])

    def _attribute(self, node: ast.AST, module: str, attribute: str) -> None:
        why = _ATTRIBUTES.get((module, attribute))
        if why:
            self.flag(node, why)
        elif module == "os" and attribute.startswith(_EXEC_PREFIXES):
            self.flag(node, f"executes another program (os.{attribute})")

    # -- names, attributes, calls -------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in _NAMES:
            self.flag(node, _NAMES[node.id])
        elif node.id in _EXIT_CALLS:
            self.flag(node, _EXIT_CALLS[node.id])
        elif node.id == "ctypes":
            self.flag(node, "uses ctypes")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in _FRAME_ATTRIBUTES:
            self.flag(node, f"reads frames (.{node.attr})")
        if isinstance(node.value, ast.Name) and node.value.id in self.modules:
            module = self.modules[node.value.id].split(".")[-1]
            self._attribute(node, module, node.attr)
            if isinstance(node.ctx, ast.Store | ast.Del):
                self.flag(node, f"changes the module {module} ({node.value.id}.{node.attr} =)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Name) and target.id in self.modules:
                self.flag(node, f"changes the module {target.id} ({func.id})")
        if isinstance(func, ast.Name) and func.id == "open" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Attribute) and first.attr == "argv":
                self.flag(node, "reads its own file (sys.argv)")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and any(h in node.value for h in _PATH_HINTS):
            self.flag(node, f"names a file it must not read ({node.value[:40]!r})")

    # -- exceptions ---------------------------------------------------------------------------

    def visit_Raise(self, node: ast.Raise) -> None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in _EXITING_EXCEPTIONS:
            self.flag(node, f"raises {exc.id}")
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in _EXITING_EXCEPTIONS:
                self.flag(node, f"subclasses {base.id}")
        self.generic_visit(node)
