"""Dataclasses on the hot path spell out their __init__.

Compiled with mypyc, a dataclass keeps the __init__ the dataclasses module generates,
and that runs as interpreted Python, about ten times slower than a written one
compiled to C (proxy.session.datapath._Pending.__init__). A written __init__ must stay
exactly the generated one: the same parameters in the same order with the same
defaults, each field set once from its own parameter, and no __post_init__ it would
silently skip. This test holds every written-out dataclass __init__ of the compiled
modules (proxy._native.COMPILED_MODULES) to that, from the source, so it covers both
builds. (proxy.audit.records.AuditRecord checks its fields first, so it is not the
generated one: tests/unit/test_audit_chain.py compares it with the generated one and the
checks it replaces.)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy._native import COMPILED_MODULES

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WrittenInit:
    where: str  # module.class
    frozen: bool
    fields: list[ast.AnnAssign]
    init: ast.FunctionDef
    methods: set[str]


def _dataclass_decorator(cls: ast.ClassDef) -> ast.expr | None:
    for deco in cls.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if ast.unparse(target) in ("dataclass", "dataclasses.dataclass"):
            return deco
    return None


def _keyword_true(call: ast.expr | None, name: str) -> bool:
    return isinstance(call, ast.Call) and any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _is_classvar(node: ast.AnnAssign) -> bool:
    return "ClassVar" in ast.unparse(node.annotation)


def written_inits() -> list[WrittenInit]:
    found = []
    for module in COMPILED_MODULES:
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(), str(path))
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            deco = _dataclass_decorator(cls)
            methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
            if deco is None or "__init__" not in methods:
                continue
            inits = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
            assert len(inits) == 1, f"{module}.{cls.name}: one __init__ (Python keeps the last)"
            assert not _keyword_true(deco, "kw_only"), f"{module}.{cls.name}: kw_only"
            init = inits[0]
            fields = [
                n
                for n in cls.body
                if isinstance(n, ast.AnnAssign)
                and isinstance(n.target, ast.Name)
                and not _is_classvar(n)
            ]
            where = f"{module}.{cls.name}"
            found.append(WrittenInit(where, _keyword_true(deco, "frozen"), fields, init, methods))
    return found


# Written out with checks first, and compared with the generated one elsewhere (module doc).
WITH_CHECKS = {"proxy.audit.records.AuditRecord"}
WRITTEN = [w for w in written_inits() if w.where not in WITH_CHECKS]


# Built per message or per statement: each written out (a scan that found nothing would
# pass everything, and a class that lost its __init__ would only be slower).
HOT = {
    "proxy.session.datapath": {"_Pending", "_Statement", "_Portal", "_Reader", "AuditNote"},
    "proxy.session.tenant": {"_State"},
    "proxy.session.connection": {"WriteAudit"},
    "proxy.wire.messages": {
        "Query",
        "Parse",
        "Bind",
        "Describe",
        "Close",
        "Execute",
        "FieldDescription",
        "RowDescription",
        "DataRow",
        "ParameterDescription",
        "CommandComplete",
    },
}


def test_the_hot_classes_are_written_out() -> None:
    found = {w.where for w in WRITTEN}
    expected = {f"{module}.{name}" for module, names in HOT.items() for name in names}
    assert expected <= found, sorted(expected - found)
    assert WITH_CHECKS <= {w.where for w in written_inits()}, "still written out, still compiled"


def _field_name(node: ast.AnnAssign) -> str:
    assert isinstance(node.target, ast.Name)
    return node.target.id


def _field_call(value: ast.expr | None) -> ast.Call | None:
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        return value
    return None


# What `{} if x is None else x` must make for each default_factory.
_FRESH = {"dict": "{}", "list": "[]", "set": "set()"}


def _default_factory(value: ast.expr | None) -> str | None:
    """The fresh value written for a field(default_factory=...), or None if it has none."""
    call = _field_call(value)
    if call is None:
        return None
    factory = next((k.value for k in call.keywords if k.arg == "default_factory"), None)
    if factory is None:
        return None
    return _FRESH.get(ast.unparse(factory), f"<default_factory {ast.unparse(factory)}>")


def _plain_default(value: ast.expr | None) -> ast.expr | None:
    """A field's default as the generated __init__ would have it (field(default=X): X)."""
    call = _field_call(value)
    if call is not None:
        return next((k.value for k in call.keywords if k.arg == "default"), None)
    return value


def _assigned_field(stmt: ast.stmt, frozen: bool) -> tuple[str, ast.expr] | None:
    """(field, value) for `self.f = v`, or `object.__setattr__(self, "f", v)` when frozen."""
    if not frozen and isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        ):
            return target.attr, stmt.value
    if frozen and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        if ast.unparse(call.func) == "object.__setattr__" and len(call.args) == 3:
            owner, name, value = call.args
            if (
                isinstance(owner, ast.Name)
                and owner.id == "self"
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
            ):
                return name.value, value
    return None


@pytest.mark.parametrize("written", WRITTEN, ids=[w.where for w in WRITTEN])
def test_a_written_init_is_the_generated_one(written: WrittenInit) -> None:
    args = written.init.args
    assert not args.posonlyargs and not args.kwonlyargs and not args.vararg and not args.kwarg
    params = args.args[1:]
    assert [p.arg for p in params] == [_field_name(f) for f in written.fields], (
        "parameters must be the fields, in order"
    )
    defaults: list[ast.expr | None] = [None] * (len(params) - len(args.defaults))
    defaults += args.defaults
    factories: dict[str, str] = {}
    for node, param, default in zip(written.fields, params, defaults, strict=True):
        name = _field_name(node)
        fresh = _default_factory(node.value)
        # Compiled, a native class checks each stored value against the field's type;
        # mypy cannot see a mismatch through object.__setattr__. (A default_factory field
        # takes `T | None`: None makes a fresh value.)
        expected_type = ast.unparse(node.annotation) + (" | None" if fresh is not None else "")
        assert param.annotation is not None and ast.unparse(param.annotation) == expected_type, (
            f"{name}: the parameter must be annotated {expected_type}"
        )
        call = _field_call(node.value)
        assert call is None or not _keyword_true(call, "kw_only"), f"{name}: kw_only"
        assert call is None or all(k.arg != "init" for k in call.keywords), f"{name}: init="
        if fresh is not None:
            factories[name] = fresh
            assert isinstance(default, ast.Constant) and default.value is None, (
                f"{name}: a default_factory field is taken as None, then made fresh"
            )
            continue
        expected = _plain_default(node.value)
        if expected is None:
            assert default is None, f"{name}: the field has no default"
        else:
            assert default is not None and ast.dump(default) == ast.dump(expected), (
                f"{name}: default {ast.unparse(default) if default else None} "
                f"!= the field's {ast.unparse(expected)}"
            )
    assigned: list[str] = []
    for stmt in written.init.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        found = _assigned_field(stmt, written.frozen)
        assert found is not None, f"line {stmt.lineno}: a written __init__ only sets fields" + (
            " (object.__setattr__: the class is frozen)" if written.frozen else ""
        )
        name, value = found
        if name in factories:
            assert ast.unparse(value) == f"{factories[name]} if {name} is None else {name}", (
                f"{name}: a fresh {factories[name]} when not given"
            )
        else:
            assert isinstance(value, ast.Name) and value.id == name, (
                f"{name} must be set from its own parameter"
            )
        assigned.append(name)
    assert assigned == [_field_name(f) for f in written.fields], "each field set once, in order"
    assert "__post_init__" not in written.methods, "a written __init__ would skip it"
