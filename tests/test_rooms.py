"""How the rooms meet, read from the source (AST, no imports: well under a second): no module reaches
into another's ``_private`` names, and the components below the entry point take the config slices
they read (typed), not the whole run config; the loop's seams are typed by Protocols, not ``Any``."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "launch", "data_shards", "benchmarks")
#: an annotation that stands for the whole tree or for anything at all
WHOLE_OR_ANY = {"RunConfig", "Any", "DictConfig"}


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, ast.Module]:
    """Every module of ours, by dotted name (benchmarks are scripts: named by path)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _private_uses(name: str, tree: ast.Module) -> list[str]:
    """``from m import _x``, ``import m._x`` and ``m._x`` (``m`` a name of ours bound by an import)."""
    bad, bound, attributes = [], {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            attributes.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module) and node.level == 0:
            bad += [f"{name}:{node.lineno} from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    bad += [f"{name}:{node.lineno} import {a.name}"] if any(map(_private, a.name.split("."))) else []
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for a in attributes:  # m._x, or m.sub._x after ``import m.sub``
        base = a.value
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id in bound:
            bad.append(f"{name}:{a.lineno} {ast.unparse(a)} ({bound[base.id]})")
    return bad


def test_no_module_imports_another_modules_private_names():
    bad = [use for name, tree in _modules().items() for use in _private_uses(name, tree)]
    assert not bad, bad


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Top-level functions and methods (``Class.method``) of a module."""
    out = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        out.update({f"{cls.name}.{n.name}": n for n in cls.body if isinstance(n, ast.FunctionDef)})
    return out


def _params(fn: ast.FunctionDef) -> dict[str, str]:
    """Parameter (not self) -> its annotation as written ("" when none)."""
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    return {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in args if a.arg != "self"}


def _names(annotation: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(annotation)) if isinstance(n, ast.Name)} if annotation else set()


def _slice_typed(where: str, fn: ast.FunctionDef, allow: tuple[str, ...] = ()) -> list[str]:
    """Parameters of ``fn`` that are unannotated, or typed as the whole tree or as anything."""
    bad = []
    for param, annotation in _params(fn).items():
        if param in allow:
            continue
        if not annotation:
            bad.append(f"{where}({param}): no annotation")
        elif WHOLE_OR_ANY & _names(annotation) and annotation not in ("dict[str, Any]", "list[dict[str, Any]]"):
            bad.append(f"{where}({param}: {annotation})")
    return bad


def test_components_below_the_entry_point_take_config_slices():
    modules = _modules()
    bad = []
    tracker = _functions(modules["trainer.tracking.tracker"])["create_tracker"]
    bad += _slice_typed("create_tracker", tracker)
    assert _params(tracker).get("tracking") == "TrackingConfig", _params(tracker)
    tasks = [m for m in modules if m.startswith("trainer.tasks.")]
    constructors = {f"{m}.{k}": fn for m in tasks for k, fn in _functions(modules[m]).items()
                    if k.endswith("Task.__init__")}
    assert len(constructors) == 5, sorted(constructors)  # the base Task and depth, flow, classification, segmentation
    for where, fn in constructors.items():
        bad += _slice_typed(where, fn)
        assert _params(fn).get("model") == "ModelConfig" and "run_cfg" not in _params(fn), (where, _params(fn))
    checks = {k: fn for k, fn in _functions(modules["trainer.preflight"]).items() if k.startswith("check_")}
    assert len(checks) >= 10, sorted(checks)
    for where, fn in checks.items():
        bad += _slice_typed(f"preflight.{where}", fn)
    assert not bad, bad


def test_the_loops_seams_are_protocols_not_any():
    """In loop.py no parameter, field or return is a bare ``Any`` (a metric / state dict may hold anything)."""
    tree = _modules()["trainer.loop"]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            annotations = [*(a.annotation for a in node.args.args + node.args.kwonlyargs), node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        else:
            continue
        for a in annotations:
            if a is not None and ast.unparse(a) in ("Any", "Optional[Any]"):
                bad.append(f"loop.py:{a.lineno} {ast.unparse(a)}")
    assert not bad, bad
