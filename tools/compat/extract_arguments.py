"""Generate the argument vocabulary data files from Megatron-LM, upstream FlagScale and torchrun.

    python tools/compat/extract_arguments.py --megatron MEGATRON_CLONE --megatron-ref core_v0.16.1 \\
        --flagscale FLAGSCALE_CLONE [--flagscale-ref REF]

Megatron-LM and FlagScale are read with `git show` and parsed with `ast`; nothing of theirs is
imported. What is extracted from a parser-building function, in source order:

* `group.add_argument(...)` calls (literal keyword values only; any other value becomes None,
  and a callable `type` becomes "str");
* `ArgumentGroupFactory(SomeConfig, exclude=[...]).build_group(parser, title)`, which Megatron-LM
  uses to turn dataclass fields into options: the dataclass (with its bases) is found through the
  imports and its fields are turned into options by the same rules the factory applies at run time
  (bool fields become flags, `Optional[X]`/`list[X]`/`Literal[...]`/enums give type, nargs and
  choices, `metadata={"argparse_meta": {...}}` wins);
* calls `helper(parser)` to other functions of the same module, followed recursively.

The Megatron-LM vocabulary is what `pretrain_gpt.py` accepts at the given ref: the functions
`add_megatron_arguments` and `parse_args` call, plus its `extra_args_provider` (ModelOpt options).
FlagScale's additions are found by applying upstream's patches (`flagscale/backends/Megatron-LM/
<path>.patch`) to the Megatron-LM commit its `third_party/Megatron-LM` submodule pins, and diffing
the patched parser against the unpatched one: new options become `source: "flagscale"` entries
(unless Megatron-LM at the ref has them by now), new choices of an existing option are added to the
Megatron-LM entry and listed in its `flagscale_choices`. Options that upstream's own Megatron-based
training programs (`flagscale/train/train_*.py`, e.g. the LLaVA and Qwen2.5-VL trainers) add through
their `extra_args_provider` are flagscale entries too; their group names the programs.

Each option spelling is one entry, keyed by the spelling without its leading dashes and with dashes
turned into underscores (the YAML key); `options` lists every spelling of the argparse action and
`dest` the attribute it sets. `argparse.BooleanOptionalAction` gives a "flag" entry `foo` and a
"negated_flag" entry `no_foo`. torchrun's table comes from the live parser
`torch.distributed.run.get_args_parser()` (with `PET_*` variables cleared, as they change defaults).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[2] / "flagscale" / "config" / "data"
MEGATRON_JSON = DATA_DIR / "megatron_arguments.json"
TORCHRUN_JSON = DATA_DIR / "torchrun_options.json"
ARGUMENTS_MODULE = "megatron.training.arguments"
ENTRY_FUNCTIONS = ("add_megatron_arguments", "parse_args")
TRAIN_PROGRAM = "pretrain_gpt.py"
TRAIN_PROGRAMS = "flagscale/train"
PATCH_ROOT = "flagscale/backends/Megatron-LM"
SUBMODULE = "third_party/Megatron-LM"
STDLIB_ENUM_MODULES = frozenset({"signal", "enum", "logging"})
FLAG_ACTIONS = {"store_true": "flag", "store_false": "negated_flag", "store_const": "flag", "count": "flag"}
MISSING = object()


class ExtractError(Exception):
    """The sources do not look the way this generator expects."""


# ----------------------------------------------------------------------------- git access


@dataclasses.dataclass
class GitTree:
    """One commit of a git repository, read with `git show`; `patches` rewrite files on the fly."""

    repo: Path
    ref: str
    patcher: Any = None
    _cache: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def commit(self) -> str:
        return _git(self.repo, "rev-parse", f"{self.ref}^{{commit}}").strip()

    def read(self, path: str) -> str | None:
        if path not in self._cache:
            text = _git_maybe(self.repo, "show", f"{self.ref}:{path}")
            if text is not None and self.patcher is not None:
                text = self.patcher(path, text)
            self._cache[path] = text
        return self._cache[path]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _git_maybe(repo: Path, *args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def submodule_commit(repo: Path, ref: str, path: str) -> str:
    """The commit a superproject's gitlink at `path` pins."""
    fields = _git(repo, "ls-tree", ref, path).split()
    if len(fields) < 3 or fields[1] != "commit":
        raise ExtractError(f"{path} is not a submodule at {ref}")
    return fields[2]


def make_patcher(repo: Path, ref: str) -> Any:
    """A function that applies FlagScale's `<path>.patch` (if any) to a Megatron-LM file's text."""

    def patch(path: str, text: str) -> str:
        diff = _git_maybe(repo, "show", f"{ref}:{PATCH_ROOT}/{path}.patch")
        return text if diff is None else apply_patch(path, text, diff)

    return patch


def apply_patch(path: str, text: str, diff: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / path
        target.parent.mkdir(parents=True)
        target.write_text(text)
        (Path(tmp) / "change.patch").write_text(diff)
        subprocess.run(["git", "apply", "--whitespace=nowarn", "change.patch"], cwd=tmp, check=True,
                       capture_output=True, text=True)
        return target.read_text()


# ----------------------------------------------------------------------------- module index


@dataclasses.dataclass
class ModuleIndex:
    """Parsed modules of one tree, by dotted name, with definition lookup through imports."""

    tree: GitTree
    _parsed: dict[str, ast.Module | None] = dataclasses.field(default_factory=dict)

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._parsed:
            base = dotted.replace(".", "/")
            text = self.tree.read(base + ".py") or self.tree.read(base + "/__init__.py")
            self._parsed[dotted] = ast.parse(text) if text is not None else None
        return self._parsed[dotted]

    def is_package(self, dotted: str) -> bool:
        return self.tree.read(dotted.replace(".", "/") + "/__init__.py") is not None

    def find(self, dotted: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """(module, node) of the class or function `name` as seen from module `dotted`."""
        mod = self.module(dotted)
        if mod is None or depth > 8:
            return None
        for node in mod.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return dotted, node
        source = imported_from(mod, dotted, name, self.is_package(dotted))
        return self.find(source, name, depth + 1) if source else None


def imported_from(mod: ast.Module | ast.FunctionDef, dotted: str, name: str, package: bool) -> str | None:
    """The module a `from X import name` in `mod` (any depth) takes `name` from."""
    for node in ast.walk(mod):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return resolve_relative(dotted, node, package)
    return None


def resolve_relative(dotted: str, node: ast.ImportFrom, package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = dotted.split(".")
    keep = len(parts) - node.level + (1 if package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


# ----------------------------------------------------------------------------- literal values


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def literal(node: ast.AST | None, default: Any = None) -> Any:
    """The value of a literal expression (numbers may be combined with + - * / **), else `default`."""
    if node is None:
        return default
    with contextlib.suppress(ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ast.literal_eval(node)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = literal(node.left, MISSING), literal(node.right, MISSING)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            return _BINOPS[type(node.op)](left, right)
    return default


def type_name(node: ast.AST | None) -> str | None:
    """argparse `type=` as data: int/float/str/bool by name, any other callable -> 'str'."""
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in ("int", "float", "str", "bool"):
        return node.id
    return "str"


# ----------------------------------------------------------------------------- argument specs


@dataclasses.dataclass
class Spec:
    """One argparse action as data."""

    options: list[str]
    dest: str
    action: str = "store"
    type: str | None = None
    nargs: int | str | None = None
    default: Any = None
    choices: list[Any] | None = None
    group: str | None = None

    def entries(self, source: str) -> list[dict[str, Any]]:
        """One vocabulary entry per long option spelling (see the module docstring)."""
        names = long_names(self.options)
        if self.action == "boolean_optional":
            negated = ["no_" + n for n in names]
            return [self._entry(n, "flag", source) for n in names] + [
                self._entry(n, "negated_flag", source) for n in negated]
        return [self._entry(n, self.kind(), source) for n in names]

    def kind(self) -> str:
        if self.action in FLAG_ACTIONS:
            return FLAG_ACTIONS[self.action]
        if self.action == "append" or self.nargs in ("*", "+") or isinstance(self.nargs, int):
            return "list"
        return "value"

    def _entry(self, name: str, kind: str, source: str) -> dict[str, Any]:
        flag = kind in ("flag", "negated_flag")
        return {
            "name": name, "options": self.all_options(), "dest": self.dest, "kind": kind,
            "type": "bool" if flag else (self.type or "str"), "nargs": self.nargs,
            "default": jsonable(self.default), "choices": jsonable(self.choices),
            "group": self.group, "source": source,
        }

    def all_options(self) -> list[str]:
        if self.action != "boolean_optional":
            return list(self.options)
        return self.options + ["--no-" + o[2:] for o in self.options if o.startswith("--")]


def long_names(options: list[str]) -> list[str]:
    names: list[str] = []
    for option in options:
        name = option.lstrip("-").replace("-", "_")
        if option.startswith("--") and name not in names:
            names.append(name)
    return names


def jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def implicit_default(action: str) -> Any:
    return {"store_true": False, "store_false": True, "count": None}.get(action)


def spec_from_call(call: ast.Call, group: str | None) -> Spec | None:
    """Spec of a literal `add_argument(...)` call; None for positionals."""
    options = [o for o in (literal(a) for a in call.args) if isinstance(o, str)]
    if not options or not options[0].startswith("-"):
        return None
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    action = action_name(kw.get("action"))
    default = literal(kw["default"]) if "default" in kw else implicit_default(action)
    dest = literal(kw.get("dest")) or (long_names(options) or [options[0].lstrip("-")])[0]
    return Spec(options=options, dest=dest, action=action, type=type_name(kw.get("type")),
                nargs=literal(kw.get("nargs")), default=default, choices=choices_of(kw.get("choices")), group=group)


def action_name(node: ast.AST | None) -> str:
    if node is None:
        return "store"
    if isinstance(node, ast.Attribute) and node.attr == "BooleanOptionalAction":
        return "boolean_optional"
    value = literal(node)
    return value if isinstance(value, str) else "custom"


def choices_of(node: ast.AST | None) -> list[Any] | None:
    value = literal(node)
    return list(value) if isinstance(value, (list, tuple)) else None


# ----------------------------------------------------------------------------- dataclass fields


class TypeInference(Exception):
    """A dataclass field type the factory cannot turn into argparse settings."""


@dataclasses.dataclass
class Field:
    """One dataclass field, as the AST gives it."""

    name: str
    annotation: ast.AST
    module: str
    default: Any = MISSING
    default_node: ast.AST | None = None
    init: bool = True
    meta: dict[str, ast.AST] = dataclasses.field(default_factory=dict)


def dataclass_fields(index: ModuleIndex, module: str, cls: ast.ClassDef) -> list[Field]:
    """Fields of `cls` in `dataclasses.fields` order (bases first, overrides keep their place)."""
    fields: dict[str, Field] = {}
    for base in cls.bases[:1]:
        found = index.find(module, base.id) if isinstance(base, ast.Name) else None
        if found and isinstance(found[1], ast.ClassDef):
            fields.update((f.name, f) for f in dataclass_fields(index, found[0], found[1]))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and not _is_classvar(node):
            fields[node.target.id] = read_field(node, module)
    return list(fields.values())


def _is_classvar(node: ast.AnnAssign) -> bool:
    return "ClassVar" in ast.unparse(node.annotation)


def read_field(node: ast.AnnAssign, module: str) -> Field:
    field = Field(name=node.target.id, annotation=node.annotation, module=module)  # type: ignore[union-attr]
    value = node.value
    if isinstance(value, ast.Call) and _callee(value).endswith("field"):
        kw = {k.arg: k.value for k in value.keywords if k.arg}
        field.init = literal(kw.get("init"), True)
        field.meta = _argparse_meta(kw.get("metadata"))
        if "default" in kw:
            field.default, field.default_node = literal(kw["default"]), kw["default"]
        elif "default_factory" in kw:
            field.default = _factory_value(kw["default_factory"])
    elif value is not None:
        field.default, field.default_node = literal(value), value
    return field


def _callee(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _argparse_meta(node: ast.AST | None) -> dict[str, ast.AST]:
    if not isinstance(node, ast.Dict):
        return {}
    for key, value in zip(node.keys, node.values):
        if literal(key) == "argparse_meta" and isinstance(value, ast.Dict):
            return {literal(k): v for k, v in zip(value.keys, value.values)}
    return {}


def _factory_value(node: ast.AST) -> Any:
    if isinstance(node, ast.Lambda):
        return literal(node.body)
    if isinstance(node, ast.Name):
        return {"list": [], "dict": {}, "tuple": [], "set": []}.get(node.id)
    return None


@dataclasses.dataclass
class FieldType:
    """argparse type settings the factory infers from an annotation."""

    type: str | None
    nargs: str | None = None
    choices: list[Any] | None = None
    enum: bool = False


def infer_type(index: ModuleIndex, module: str, node: ast.AST) -> FieldType:
    """The factory's `_extract_type`, on the annotation's AST."""
    if isinstance(node, ast.Constant) and node.value is None:
        return FieldType(None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _optional(index, module, [node.left, node.right])
    if isinstance(node, ast.Subscript):
        return _generic(index, module, node)
    members = enum_members(index, module, node)
    if members is not None:
        return FieldType("str", choices=members, enum=True)
    if isinstance(node, ast.Name) and node.id in ("int", "float", "str", "bool"):
        return FieldType(node.id)
    if isinstance(node, (ast.Name, ast.Attribute)) and ast.unparse(node).split(".")[-1] not in ("Callable", "Any"):
        return FieldType("str")
    raise TypeInference(ast.unparse(node))


def _generic(index: ModuleIndex, module: str, node: ast.Subscript) -> FieldType:
    origin = ast.unparse(node.value).split(".")[-1]
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if origin == "Optional":
        return infer_type(index, module, items[0])
    if origin == "Union":
        return _optional(index, module, items)
    if origin in ("list", "List") and len(items) == 1:
        inner = infer_type(index, module, items[0])
        return dataclasses.replace(inner, nargs="+")
    if origin == "Literal":
        values = [literal(i) for i in items]
        return FieldType(type(values[0]).__name__, choices=values)
    raise TypeInference(ast.unparse(node))


def _optional(index: ModuleIndex, module: str, items: list[ast.AST]) -> FieldType:
    if len(items) == 2 and isinstance(items[1], ast.Constant) and items[1].value is None:
        return infer_type(index, module, items[0])
    raise TypeInference("union")


def enum_members(index: ModuleIndex, module: str, node: ast.AST) -> list[str] | None:
    """Member names when `node` names an Enum class (of the tree, or a stdlib enum such as signal.Signals)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in STDLIB_ENUM_MODULES:
        value = getattr(importlib.import_module(node.value.id), node.attr, None)
        return [m.name for m in value] if isinstance(value, type) and hasattr(value, "__members__") else None
    found = index.find(module, node.id) if isinstance(node, ast.Name) else None
    if not found or not isinstance(found[1], ast.ClassDef):
        return None
    if not any("Enum" in ast.unparse(b) for b in found[1].bases):
        return None
    return [t.id for s in found[1].body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)]


def field_spec(index: ModuleIndex, field: Field, group: str | None) -> Spec:
    """The factory's `_build_argparse_kwargs_from_field` for one field."""
    default = None if field.default is MISSING else field.default
    spec = Spec(options=["--" + field.name.replace("_", "-")], dest=field.name, default=default, group=group)
    try:
        inferred = infer_type(index, field.module, field.annotation)
        spec.type, spec.nargs, spec.choices = inferred.type, inferred.nargs, inferred.choices
        if inferred.enum and isinstance(field.default_node, ast.Attribute):
            spec.default = field.default_node.attr
        if inferred.type == "bool":
            _bool_field(spec, field)
    except TypeInference:
        if not field.meta:
            raise
    _apply_meta(spec, field.meta)
    return spec


def _bool_field(spec: Spec, field: Field) -> None:
    spec.type = None
    spec.action = "store_true" if field.default == False else "store_false"  # noqa: E712 (the factory's own test)
    if spec.action == "store_false":
        stem = field.name.replace("_", "-")
        spec.options = [f"--no-{stem}", f"--disable-{stem}"]


def _apply_meta(spec: Spec, meta: dict[str, ast.AST]) -> None:
    for key, node in meta.items():
        if key == "arg_names":
            spec.options = list(literal(node))
        elif key == "type":
            spec.type = type_name(node)
        elif key == "action":
            spec.action = action_name(node)
        elif key == "choices":
            spec.choices = choices_of(node)
        elif key in ("default", "nargs", "dest"):
            setattr(spec, key, literal(node))


# ----------------------------------------------------------------------------- parser walker


@dataclasses.dataclass
class Walker:
    """Collects the Specs a parser-building function (and the helpers it calls) adds."""

    index: ModuleIndex
    specs: list[Spec] = dataclasses.field(default_factory=list)
    _done: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def walk(self, module: str, function: str) -> None:
        found = self.index.find(module, function)
        if found is None:
            raise ExtractError(f"no function {function} in {module}")
        if (found[0], function) not in self._done:
            self._done.add((found[0], function))
            self._walk_function(found[0], found[1])

    def _walk_function(self, module: str, fn: ast.FunctionDef) -> None:
        state = _FunctionState(fn)
        for call in sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)), key=_position):
            self._visit(module, fn, call, state)

    def _visit(self, module: str, fn: ast.FunctionDef, call: ast.Call, state: _FunctionState) -> None:
        target, name = state.targets.get(id(call)), _callee(call).split(".")[-1]
        receiver = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else None
        if name == "add_argument_group":
            state.titles[target] = literal(_arg(call, 0, "title"))
        elif name == "add_mutually_exclusive_group":
            state.titles[target] = state.titles.get(receiver)
        elif name == "add_argument":
            spec = spec_from_call(call, state.titles.get(receiver))
            self.specs.extend([spec] if spec else [])
        elif name == "ArgumentGroupFactory":
            state.factories[target] = call
        elif name == "build_group" and receiver in state.factories:
            state.titles[target] = literal(_arg(call, 1, "title"))
            self._factory(module, fn, state, state.factories[receiver], state.titles[target])
        elif isinstance(call.func, ast.Name) and _passes_parser(call):
            self._follow(module, call.func.id)

    def _follow(self, module: str, name: str) -> None:
        found = self.index.find(module, name)
        if found and isinstance(found[1], ast.FunctionDef):
            self.walk(found[0], name)

    def _factory(self, module: str, fn: ast.FunctionDef, state: _FunctionState, call: ast.Call,
                 title: str | None) -> None:
        cls_name = ast.unparse(call.args[0])
        source = imported_from(fn, module, cls_name, False) or module
        found = self.index.find(source, cls_name)
        if not found or not isinstance(found[1], ast.ClassDef):
            raise ExtractError(f"cannot find dataclass {cls_name} used in {module}.{fn.name}")
        exclude = set(state.value(_arg(call, 1, "exclude")) or [])
        for field in dataclass_fields(self.index, found[0], found[1]):
            if field.init and field.name not in exclude:
                self.specs.append(field_spec(self.index, field, title))


@dataclasses.dataclass
class _FunctionState:
    """Per-function bookkeeping: assignment targets of calls, group titles, factories, literals."""

    fn: ast.FunctionDef
    targets: dict[int, str] = dataclasses.field(default_factory=dict)
    titles: dict[str | None, str | None] = dataclasses.field(default_factory=dict)
    factories: dict[str | None, ast.Call] = dataclasses.field(default_factory=dict)
    literals: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in ast.walk(self.fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if isinstance(node.value, ast.Call):
                    self.targets[id(node.value)] = name
                else:
                    self.literals[name] = literal(node.value)

    def value(self, node: ast.AST | None) -> Any:
        if isinstance(node, ast.Name):
            return self.literals.get(node.id)
        return literal(node)


def _position(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset


def _arg(call: ast.Call, position: int, keyword: str) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    positional = [a for a in call.args if not isinstance(a, ast.Starred)]
    return positional[position] if len(positional) > position else None


def _passes_parser(call: ast.Call) -> bool:
    return any(isinstance(a, ast.Name) and a.id == "parser" for a in call.args)


# ----------------------------------------------------------------------------- the two vocabularies


def parser_specs(tree: GitTree, extra_from: str | None) -> list[Spec]:
    """Every option the Megatron-LM parser of `tree` defines (plus the train program's extra provider)."""
    walker = Walker(ModuleIndex(tree))
    for function in ENTRY_FUNCTIONS:
        walker.walk(ARGUMENTS_MODULE, function)
    for module, function in extra_providers(tree, extra_from):
        walker.walk(module, function)
    return walker.specs


def extra_providers(tree: GitTree, program: str | None) -> list[tuple[str, str]]:
    """(module, function) of each name `extra_args_provider=` may take in `program`'s pretrain call."""
    text = tree.read(program) if program else None
    if text is None:
        return []
    mod, own = ast.parse(text), program.removesuffix(".py").replace("/", ".")
    defined = {n.name for n in mod.body if isinstance(n, ast.FunctionDef)}
    found = []
    for kw in (k for n in ast.walk(mod) if isinstance(n, ast.Call) for k in n.keywords):
        if kw.arg == "extra_args_provider":
            for name in (n.id for n in ast.walk(kw.value) if isinstance(n, ast.Name)):
                source = own if name in defined else imported_from(mod, own, name, False)
                found += [(source, name)] if source else []
    return found


def program_entries(flagscale: GitTree) -> dict[str, dict[str, Any]]:
    """Options upstream's own training programs (flagscale/train/train_*.py) add through their
    `extra_args_provider`; the group names the programs. Providers imported from Megatron-LM are skipped."""
    index, merged = ModuleIndex(flagscale), {}
    programs = _git(flagscale.repo, "ls-tree", "--name-only", flagscale.ref, TRAIN_PROGRAMS + "/").split()
    for path in sorted(p for p in programs if Path(p).name.startswith("train_") and p.endswith(".py")):
        for module, function in extra_providers(flagscale, path):
            if not module.startswith("flagscale."):
                continue
            walker = Walker(index)
            walker.walk(module, function)
            for name, entry in table(walker.specs, "flagscale").items():
                merged.setdefault(name, {**entry, "programs": []})["programs"].append(Path(path).name)
    for entry in merged.values():
        entry["group"] = f"{entry['group']} ({', '.join(entry.pop('programs'))})"
    return merged


def table(specs: list[Spec], source: str) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for spec in specs:
        for entry in spec.entries(source):
            if entry["name"] in entries:
                raise ExtractError(f"option {entry['name']} defined twice")
            entries[entry["name"]] = entry
    return entries


def flagscale_changes(megatron: GitTree, flagscale: GitTree) -> tuple[dict[str, dict], dict[str, list], list]:
    """(new entries, new choices per existing name, other differences) of upstream FlagScale's patches."""
    pinned = submodule_commit(flagscale.repo, flagscale.ref, SUBMODULE)
    base = table(parser_specs(GitTree(megatron.repo, pinned), None), "megatron")
    patched_tree = GitTree(megatron.repo, pinned, patcher=make_patcher(flagscale.repo, flagscale.ref))
    patched = table(parser_specs(patched_tree, None), "flagscale")
    added = {n: e for n, e in patched.items() if n not in base}
    choices, other = {}, []
    for name in patched.keys() & base.keys():
        old, new = base[name], patched[name]
        extra = [c for c in new["choices"] or [] if c not in (old["choices"] or [])]
        if extra:
            choices[name] = extra
        other += [(name, k, old[k], new[k]) for k in ("kind", "type", "default", "nargs") if old[k] != new[k]]
    return added, choices, sorted(other)


def megatron_vocabulary(megatron: GitTree, flagscale: GitTree | None) -> tuple[list[dict], list[str]]:
    """Sorted entries and a list of notes for the generator's report."""
    entries = table(parser_specs(megatron, TRAIN_PROGRAM), "megatron")
    notes: list[str] = []
    if flagscale is not None:
        added, choices, other = flagscale_changes(megatron, flagscale)
        notes += [f"FlagScale addition already in Megatron-LM {megatron.ref}: {n}" for n in sorted(added)
                  if n in entries]
        entries.update({n: e for n, e in added.items() if n not in entries})
        programs = program_entries(flagscale)
        notes += [f"{n} of {e['group']} is already a parser option; kept the parser's" for n, e in sorted(
            programs.items()) if n in entries]
        entries.update({n: e for n, e in programs.items() if n not in entries})
        notes += _merge_choices(entries, choices)
        notes += [f"FlagScale changes {n}.{k}: {a!r} -> {b!r} (not applied)" for n, k, a, b in other]
    for entry in entries.values():
        entry.setdefault("flagscale_choices", [])
    return [entries[n] for n in sorted(entries)], notes


def _merge_choices(entries: dict[str, dict], choices: dict[str, list]) -> list[str]:
    notes = []
    for name, extra in sorted(choices.items()):
        entry = entries.get(name)
        if entry is None or entry["choices"] is None:
            notes.append(f"FlagScale choices for {name} have no Megatron-LM choice list to extend: {extra}")
            continue
        new = [c for c in extra if c not in entry["choices"]]
        entry["choices"] = entry["choices"] + new
        entry["flagscale_choices"] = new
    return notes


@contextlib.contextmanager
def _without_pet_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PET_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def torchrun_vocabulary() -> list[dict[str, Any]]:
    """torchrun's options from the live parser (needs torch), sorted by name."""
    from torch.distributed.run import get_args_parser

    with _without_pet_env():
        parser = get_args_parser()
    entries = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        for entry in torchrun_spec(action).entries("torchrun"):
            entries[entry["name"]] = entry
    return [entries[n] for n in sorted(entries)]


def torchrun_spec(action: argparse.Action) -> Spec:
    if action.nargs == 0:
        kind = "store_false" if action.const is False else "store_true"
        return Spec(options=list(action.option_strings), dest=action.dest, action=kind, default=action.default)
    typ = action.type.__name__ if action.type in (int, float, str) else ("str" if action.type else None)
    return Spec(options=list(action.option_strings), dest=action.dest, type=typ, nargs=action.nargs,
                default=action.default, choices=list(action.choices) if action.choices else None)


# ----------------------------------------------------------------------------- output


def command_line(args: argparse.Namespace) -> str:
    parts = ["python tools/compat/extract_arguments.py", "--megatron <Megatron-LM clone>",
             f"--megatron-ref {args.megatron_ref}"]
    if args.flagscale:
        parts += ["--flagscale <FlagScale clone>", f"--flagscale-ref {args.flagscale_ref}"]
    return " ".join(parts)


def write_json(path: Path, meta: dict[str, Any], key: str, entries: list[dict[str, Any]]) -> None:
    """`{"meta": ..., key: [...]}` with one entry a line (small, and diffs line up with options)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in entries)
    meta_text = json.dumps(meta, indent=2, ensure_ascii=False).replace("\n", "\n ")
    path.write_text(f'{{\n "meta": {meta_text},\n "{key}": [\n{lines}\n ]\n}}\n')


def megatron_meta(args: argparse.Namespace, megatron: GitTree, flagscale: GitTree | None, entries: list) -> dict:
    meta: dict[str, Any] = {
        "generated_by": command_line(args),
        "megatron": {"repo": args.megatron_repo, "ref": args.megatron_ref, "commit": megatron.commit(),
                     "files": ["megatron/training/arguments.py (and the config dataclasses it expands)",
                               f"{TRAIN_PROGRAM} extra_args_provider"]},
        "counts": counts(entries),
    }
    if flagscale is not None:
        meta["flagscale"] = {"repo": args.flagscale_repo, "ref": args.flagscale_ref, "commit": flagscale.commit(),
                             "megatron_base": submodule_commit(flagscale.repo, flagscale.ref, SUBMODULE),
                             "patches": f"{PATCH_ROOT}/<path>.patch"}
    return meta


def counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Entries by origin: Megatron-LM, FlagScale's parser patches, FlagScale's own training programs."""
    program = ["(train_" in (e["group"] or "") for e in entries]
    flagscale = [e["source"] == "flagscale" for e in entries]
    return {"megatron": flagscale.count(False),
            "flagscale_patches": sum(f and not p for f, p in zip(flagscale, program)),
            "flagscale_programs": sum(f and p for f, p in zip(flagscale, program))}


def torchrun_meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {"generated_by": command_line(args), "torch": torch.__version__,
            "parser": "torch.distributed.run.get_args_parser() with PET_* variables unset"}


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron", type=Path, required=True, help="Megatron-LM git clone")
    parser.add_argument("--megatron-ref", default="core_v0.16.1")
    parser.add_argument("--megatron-repo", default="NVIDIA/Megatron-LM", help="name recorded in the metadata")
    parser.add_argument("--flagscale", type=Path, help="upstream FlagScale git clone")
    parser.add_argument("--flagscale-ref", default="HEAD")
    parser.add_argument("--flagscale-repo", default="flagos-ai/FlagScale", help="name recorded in the metadata")
    parser.add_argument("--skip-torchrun", action="store_true", help="do not rewrite the torchrun table")
    parser.add_argument("--output-dir", type=Path, default=DATA_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(argv)
    megatron = GitTree(args.megatron, args.megatron_ref)
    flagscale = GitTree(args.flagscale, args.flagscale_ref) if args.flagscale else None
    if flagscale is not None:
        args.flagscale_ref = flagscale.commit()
    entries, notes = megatron_vocabulary(megatron, flagscale)
    write_json(args.output_dir / MEGATRON_JSON.name, megatron_meta(args, megatron, flagscale, entries),
               "arguments", entries)
    for note in notes:
        print(note, file=sys.stderr)
    if not args.skip_torchrun:
        write_json(args.output_dir / TORCHRUN_JSON.name, torchrun_meta(args), "options", torchrun_vocabulary())
    print(f"wrote {len(entries)} Megatron-LM/FlagScale entries to {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
