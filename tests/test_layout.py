"""The folders tell which process a module runs in: the design's import rules, checked.

The front end (daemon/, cost/, prewarm/, the CLI, the client) never loads torch or the worker's
code: the CUDA process is a fresh interpreter (`python -m ondemand.worker`) and everything GPU
lives under worker/ and model/.  The core modules at the top of the package are shared by both
processes, so they import nothing above them.

Every import counts: module level, inside functions (lazy), under `if TYPE_CHECKING`, relative
ones, and `importlib.import_module(...)` with a string literal or a loop over a list of literals.
A failure lists every violation as `file:line`.  The runtime check at the end proves the same for
what is really loaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ondemand

PKG = Path(ondemand.__file__).resolve().parent
ENTRY_POINTS = ("cli.py", "__main__.py", "client.py")  # top-level modules that are not core
CORE = "<core>"  # top-level modules other than ENTRY_POINTS: config, errors, audio, gpu, ...
EVERYWHERE = "<all>"
FRONT_END_PACKAGES = ("ondemand.daemon", "ondemand.console", "ondemand.cost", "ondemand.prewarm",
                      "ondemand.commands", "ondemand.cli", "ondemand.client")
WORKER_SIDE = ("ondemand.worker", "ondemand.model")
# cluster/ runs in the front end, except agent.py (its own process, the one Ray driver); its
# messages.py and wire.py are pure like core: the agent and the replica import them too.
CLUSTER_PURE = ("cluster/messages.py", "cluster/wire.py")


@dataclass(frozen=True)
class Rule:
    name: str
    who: tuple[str, ...]  # "daemon/" (a folder), "client.py" (a module), CORE, EVERYWHERE
    never: tuple[str, ...]  # modules (and their submodules) these may not import
    but_not: tuple[str, ...] = ()  # folders exempt from `who`
    lazily: tuple[tuple[str, str], ...] = ()  # (file, import) allowed inside a function only
    allowed: tuple[tuple[str, str], ...] = ()  # (file, import): a documented exception


RULES = (
    Rule("torch only in the worker process",
         who=(EVERYWHERE,), but_not=("worker/", "model/"), never=("torch",)),
    Rule("the front end never imports the worker's code",
         who=("daemon/", "console/", "cost/", "prewarm/", "commands/", "cluster/", CORE,
              *ENTRY_POINTS),
         never=WORKER_SIDE,
         # `ondemand infer` / `make-test-model` run the engine in the CLI's own process; lazily,
         # so `ondemand serve` (same parser) stays torch-free.  The cluster agent (a process of
         # its own) creates the replicas' registry actor and deploys ray_replica by name.
         lazily=(("commands/engine_cmds.py", "ondemand.model"),
                 ("cluster/agent.py", "ondemand.worker"))),
    Rule("ray only in the cluster agent and the replica, and only lazily",
         who=(EVERYWHERE,), never=("ray", "starlette"),
         lazily=(("cluster/agent.py", "ray"), ("worker/ray_replica.py", "ray"),
                 ("worker/ray_replica.py", "starlette"))),
    Rule("the replica imports only the pure cluster modules",
         who=("worker/", "model/"), never=("ondemand.cluster",),
         allowed=(("worker/ray_replica.py", "ondemand.cluster.messages"),
                  ("worker/ray_replica.py", "ondemand.cluster.wire"))),
    Rule("the worker process never imports the front end",
         who=("worker/", "model/"), never=FRONT_END_PACKAGES),
    # The client package runs in the user's program: core (errors, config) and itself only
    Rule("the SDK imports only core modules",
         who=("sdk/",), never=FRONT_END_PACKAGES + WORKER_SIDE),
    Rule("core modules import only core modules",
         # prewarm/rules.py is here because core imports it: it must be as pure as core
         who=(CORE, "client.py", "prewarm/rules.py", *CLUSTER_PURE),
         never=(*FRONT_END_PACKAGES, *WORKER_SIDE, "ondemand.cluster.agent",
                "ondemand.cluster.link", "ondemand.cluster.dispatch", "ondemand.cluster.api"),
         # config validates [[prewarm]] with the pure rules module (docs/design.md)
         allowed=(("config.py", "ondemand.prewarm.rules"),)),
)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the package: "daemon/app.py"
    line: int
    module: str  # absolute dotted name
    lazy: bool  # inside a function

    def __str__(self) -> str:
        return f"ondemand/{self.file}:{self.line} imports {self.module}"


def module_name(rel: Path) -> str:
    parts = ("ondemand", *rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    """Whether `dotted` names a module or package of ours (vs. an attribute of one)."""
    if not dotted.startswith("ondemand."):
        return False
    path = PKG.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _literals(node: ast.AST | None) -> list[ast.Constant]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [e for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


class _Scanner(ast.NodeVisitor):
    """Collects imports; `unreadable` gets dynamic imports whose target is not a literal."""

    def __init__(self, rel: Path, tree: ast.Module) -> None:
        self.rel = rel
        name = module_name(rel)
        self.package = name if rel.name == "__init__.py" else name.rsplit(".", 1)[0]
        self.found: list[Import] = []
        self.unreadable: list[int] = []
        self._depth = 0
        self._loops: dict[str, ast.AST] = {}  # loop variable -> what it iterates over
        self._constants = {  # module-level NAME = [...] / (...) of string literals
            t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name)
        }

    def _add(self, line: int, module: str) -> None:
        imp = Import(self.rel.as_posix(), line, module, self._depth > 0)
        if imp not in self.found:  # `from x import a, b` is one import of x
            self.found.append(imp)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _loop(self, node: ast.For | ast.AsyncFor | ast.comprehension) -> None:
        if isinstance(node.target, ast.Name):
            self._loops[node.target.id] = node.iter
        self.generic_visit(node)

    visit_For = visit_AsyncFor = visit_comprehension = _loop

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node.lineno, sub if is_module(sub) else base)

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) \
            else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            targets = _literals(arg)
            if not targets and isinstance(arg, ast.Name):
                source = self._loops.get(arg.id)
                if isinstance(source, ast.Name):
                    source = self._constants.get(source.id)
                targets = _literals(source)
            if not targets:
                self.unreadable.append(node.lineno)
            for lit in targets:
                self._add(lit.lineno, str(lit.value))
        self.generic_visit(node)


def scan_source(rel: Path, source: str) -> tuple[list[Import], list[int]]:
    tree = ast.parse(source, filename=str(rel))
    scanner = _Scanner(rel, tree)
    scanner.visit(tree)
    return scanner.found, scanner.unreadable


def all_modules() -> Iterator[Path]:
    yield from sorted(p.relative_to(PKG) for p in PKG.rglob("*.py"))


def imports() -> list[Import]:
    out: list[Import] = []
    for rel in all_modules():
        found, unreadable = scan_source(rel, (PKG / rel).read_text(encoding="utf-8"))
        assert not unreadable, (f"ondemand/{rel}:{unreadable}: import_module() of a name these "
                                "rules cannot read; use a literal or a list of literals")
        out.extend(found)
    return out


def covered(rule: Rule, file: str) -> bool:
    def match(sel: str) -> bool:
        if sel == EVERYWHERE:
            return True
        if sel == CORE:
            return "/" not in file and file not in ENTRY_POINTS
        return file.startswith(sel) if sel.endswith("/") else file == sel

    return any(match(s) for s in rule.who) and not any(file.startswith(s) for s in rule.but_not)


def within(module: str, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if module == n or module.startswith(n + ".")), None)


def violations(rule: Rule, found: list[Import]) -> list[tuple[Import, str]]:
    """(import, the forbidden name it falls under) for each import that breaks `rule`."""
    bad = []
    for imp in found:
        hit = within(imp.module, rule.never)
        if hit is None or not covered(rule, imp.file):
            continue
        if imp.lazy and (imp.file, hit) in rule.lazily:
            continue
        bad.append((imp, hit))
    return bad


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name.replace(" ", "-"))
def test_import_rule(rule: Rule) -> None:
    bad = violations(rule, imports())

    def excepted(imp: Import, entry: tuple[str, str]) -> bool:
        return imp.file == entry[0] and within(imp.module, (entry[1],)) is not None

    new = [imp for imp, _ in bad if not any(excepted(imp, a) for a in rule.allowed)]
    assert not new, f"{rule.name}:\n" + "\n".join(f"  {v}" for v in new)
    unused = [a for a in rule.allowed if not any(excepted(imp, a) for imp, _ in bad)]
    assert not unused, f"{rule.name}: no longer needed, drop from `allowed`: {unused}"


def test_rules_cover_every_module() -> None:
    """Every module is under some folder the rules know: a new folder gets a line in RULES."""
    known = ("daemon/", "console/", "cost/", "prewarm/", "commands/", "worker/", "model/", "sdk/",
             "cluster/")
    for rel in all_modules():
        file = rel.as_posix()
        assert "/" not in file or file.startswith(known), f"ondemand/{file}: add it to RULES"


def test_the_scanner_sees_every_kind_of_import() -> None:
    """Not vacuous: lazy, relative, from-package, dynamic and TYPE_CHECKING imports are seen."""
    source = (
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import torch.nn\n"
        "from ondemand import model\n"
        "from . import worker\n"
        "from ..gpu import probe\n"
        "PLUGINS = ['ondemand.model.engine']\n"
        "def f():\n"
        "    from torch import cuda\n"
        "    importlib.import_module('torch')\n"
        "    for name in PLUGINS:\n"
        "        importlib.import_module(name)\n"
        "    importlib.import_module(f'x{1}')\n"
    )
    found, unreadable = scan_source(Path("daemon/x.py"), source)
    got = {(i.line, i.module, i.lazy) for i in found}
    assert {(4, "torch.nn", False), (5, "ondemand.model", False), (6, "ondemand.daemon", False),
            (7, "ondemand.gpu", False), (10, "torch", True), (11, "torch", True),
            (8, "ondemand.model.engine", True)} <= got, got
    assert unreadable == [14]
    assert [str(v) for v, _ in violations(RULES[0], found) if v.line == 10] == [
        "ondemand/daemon/x.py:10 imports torch"]


def test_the_scanner_reads_this_tree() -> None:
    """The real tree, as the rules see it: the known lazy and dynamic imports are found."""
    found = {(i.file, i.module, i.lazy) for i in imports()}
    assert ("worker/backend.py", "torch", True) in found
    assert ("commands/engine_cmds.py", "ondemand.model.engine", True) in found
    assert ("cli.py", "ondemand.commands.daemon_cmds", True) in found  # import_module over a list


# -- what really gets loaded -----------------------------------------------------------------
def test_front_end_never_loads_torch_or_the_worker() -> None:
    """Import every module outside worker/ and model/ (and build the CLI parser, as `ondemand
    serve` does) in a fresh interpreter: neither torch nor any worker-side module is loaded."""
    names = [module_name(rel) for rel in all_modules()
             if not rel.as_posix().startswith(("worker/", "model/")) and rel.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "import ondemand.cli; ondemand.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.',"
        " 'ondemand.worker', 'ondemand.model')))\n"
        "print(len(sys.modules), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(names) > 30 and "ondemand.daemon.app" in names


def test_worker_process_never_loads_the_front_end() -> None:
    """The worker's protocol loop and backend (torch itself loads on the first `load`) pull in
    neither the daemon's packages nor its HTTP stack."""
    code = (
        "import sys, ondemand.worker.main, ondemand.worker.backend\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('aiohttp', 'torch', "
        f"{', '.join(repr(p) for p in FRONT_END_PACKAGES)})))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_local_mode_never_loads_ray() -> None:
    """Every module outside worker/ and model/, the CLI parser and the whole app built with the
    default config (`cluster.backend = "local"`): nothing of Ray is loaded (issue 13)."""
    names = [module_name(rel) for rel in all_modules()
             if not rel.as_posix().startswith(("worker/", "model/")) and rel.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "import ondemand.cli; ondemand.cli.build_parser()\n"
        "from ondemand.config import Config\n"
        "from ondemand.daemon.app import build_app\n"
        "build_app(Config())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'starlette'))\n"
        "assert not bad, bad[:10]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ondemand.cluster.dispatch" in names and "ondemand.cluster.agent" in names


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in conftest.py or a helper module (tests/contract.py, ...), never
    in a test module another test imports (issue 9)."""
    tests = Path(__file__).resolve().parent
    bad = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_"):
                bad.append(f"tests/{path.name}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import):
                bad += [f"tests/{path.name}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.startswith("tests.test_")]
    assert bad == [], "\n".join(bad)
