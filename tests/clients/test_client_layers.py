"""The Python client package's imports go one way: wire/errors/sources/reconstruction -> stream -> client ->
the package. Every import counts, also those inside functions and under `if TYPE_CHECKING:` (a circle hidden
in a function is still a circle). No Ray, no server."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "da3_client"
BOTTOM = {"errors", "wire", "sources", "reconstruction", "corrections"}  # know neither stream nor client


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports, anywhere in its source ('__init__' for the package)."""
    name = package.name
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the package
                    base = ".".join([name, *(node.module.split(".") if node.module else [])])
                else:
                    base = node.module or ""
                # `from pkg import x`: x may be a module; `from pkg.mod import x`: the module is pkg.mod
                targets = [f"{base}.{a.name}" for a in node.names] if base == name else [base]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] != name:
                    continue
                dep = parts[1] if len(parts) > 1 and parts[1] in modules else "__init__"
                if dep != path.stem:
                    deps.add(dep)
        graph[path.stem] = deps
    return graph


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    """Modules with what they import first; raises graphlib.CycleError on a circle."""
    return list(TopologicalSorter(graph).static_order())


def test_client_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert {"client", "stream", "wire", "errors"} <= set(graph)
    order = dependency_order(graph)  # raises CycleError, naming the circle
    assert order.index("stream") < order.index("client") < order.index("__init__")


def test_client_package_layers():
    graph = import_graph(PACKAGE)
    assert "client" not in graph["stream"], "stream.py must not import client.py (client -> stream only)"
    for module in BOTTOM & set(graph):
        assert not graph[module] & {"stream", "client", "__init__"}, (module, graph[module])
    assert graph["__init__"] >= {"client", "stream", "wire", "errors", "sources", "reconstruction"}


def test_client_package_never_imports_serve_app():
    """The client ships without the server: no module of it imports serve_app (or Ray)."""
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [n for n in names if n.split(".")[0] in ("serve_app", "ray")], (path.name, names)


def test_the_check_finds_a_circle(tmp_path):
    """The guard can fail: a package whose modules import each other (one of them lazily) is a cycle."""
    pkg = tmp_path / "circ"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from circ.a import A\n")
    (pkg / "a.py").write_text("from circ.b import B\nclass A: pass\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\nclass B: pass\n")
    graph = import_graph(pkg)
    assert graph == {"__init__": {"a"}, "a": {"b"}, "b": {"a"}}
    with pytest.raises(CycleError):
        dependency_order(graph)


# Imports one module without running the package's __init__ (which imports everything), then prints which of
# the package's modules got loaded.
ALONE = """
import importlib, sys, types
pkg = types.ModuleType("da3_client")
pkg.__path__ = [sys.argv[1]]
sys.modules["da3_client"] = pkg
importlib.import_module("da3_client." + sys.argv[2])
print(" ".join(sorted(m.split(".", 1)[1] for m in sys.modules if m.startswith("da3_client."))))
"""


def test_each_module_imports_alone_in_dependency_order():
    """Each module in a fresh interpreter, lowest layer first, without the package __init__: it imports, and it
    loads only the modules below it (importing stream never loads client)."""
    graph = import_graph(PACKAGE)
    order = [m for m in dependency_order(graph) if m != "__init__"]
    for module in order:
        below = {module}
        todo = [module]
        while todo:
            for dep in graph[todo.pop()] - below:
                below.add(dep)
                todo.append(dep)
        proc = subprocess.run([sys.executable, "-c", ALONE, str(PACKAGE), module], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
        loaded = set(proc.stdout.split())
        assert module in loaded and loaded <= below, (module, loaded, below)
    assert order.index("stream") < order.index("client")


# --- the browser client (serve_app/static): the same layering, checked on its ES module imports ---------------
STATIC = ROOT / "serve_app" / "static"
JS_IMPORT = re.compile(r"^(?:import|export)\s+(?:\{([^}]*)\}|\*(?:\s+as\s+\w+)?|\w+)\s+from\s+'(\./[^']+)';",
                       re.MULTILINE)
JS_EXPORT = re.compile(r"^export\s+(?:async\s+)?(?:function|class|const|let)\s+(\w+)", re.MULTILINE)
JS_EXPORT_LIST = re.compile(r"^export\s+\{([^}]*)\}", re.MULTILINE)


def js_exports(text: str) -> set[str] | None:
    """Names a module exports; None when it re-exports everything of another (`export * from`)."""
    if re.search(r"^export\s+\*", text, re.MULTILINE):
        return None
    names = set(JS_EXPORT.findall(text))
    for group in JS_EXPORT_LIST.findall(text):
        names |= {n.strip().split(" as ")[-1].strip() for n in group.split(",") if n.strip()}
    return names


def js_modules() -> dict[str, str]:
    return {p.name: p.read_text() for p in STATIC.glob("*.js")}


def test_browser_modules_import_what_exists_without_a_circle():
    """Every relative import names a module that is there and exports the names asked for; no circle; stream.js
    knows neither the page nor the HTTP client, sources.js and viewer.js import nothing of the client."""
    mods = js_modules()
    graph: dict[str, set[str]] = {}
    for name, text in mods.items():
        graph[name] = set()
        for names, target in JS_IMPORT.findall(text):
            target = target.removeprefix("./")
            if target.startswith("vendor/"):
                assert (STATIC / target).is_file(), (name, target)
                continue
            assert target in mods, f"{name} imports {target}, which is missing"
            exported = js_exports(mods[target])
            wanted = {n.strip().split(" as ")[0].strip() for n in names.split(",") if n.strip()}
            assert exported is None or wanted <= exported, (name, target, wanted - (exported or set()))
            graph[name].add(target)
    dependency_order(graph)  # raises CycleError
    assert graph["stream.js"] <= {"errors.js", "protocol.js"}, graph["stream.js"]
    assert graph["sources.js"] == set() and graph["viewer.js"] == set()
    assert "settings.js" in graph["app.js"] and "settings.js" in graph["dashboard.js"]


def test_pages_share_one_copy_of_the_connection_settings():
    """The storage keys and the key guard live in settings.js only (the dashboard had its own copy)."""
    for name, text in js_modules().items():
        if name == "settings.js":
            continue
        for needle in ("localStorage", "sessionStorage", "'da3.token'", "'da3.url'", "confirm("):
            assert needle not in text, (name, needle)
    for page in ("index.html", "dashboard.html"):
        html = (STATIC / page).read_text()
        assert re.findall(r'<script type="module" src="static/(\w+\.js)"></script>', html), page
