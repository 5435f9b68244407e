"""One definition per stage's settings: a dataclass, from which come the command's flags, the config schema
block of that stage and the argv a workflow rule passes for the block.

Each field carries its type, its default and `metadata` (write it with `setting(...)` or by hand):

    help               one line for --help and the schema's description (required)
    choices            allowed values
    odd=True           an odd integer (kernel sizes that must have a centre pixel)
    minimum, maximum, exclusive_minimum, exclusive_maximum    numeric bounds
    key                config key and flag name when they differ from the field name (fmt -> format)
    flag               the flag when it differs from --key (`features.checkpoint` is --encoder-checkpoint)
    aliases            older spellings of the flag, still accepted and not shown in --help
    config=False       not a config key: a path the rule supplies, a test hook, a launcher setting
    cli=False          not a flag either (the command fills it another way)

Types: bool, int, float, str, `Literal[...]` (its values are the choices), `X | None` (the default must then
be None, so that leaving a key out and passing None mean the same), fixed-length `tuple[X, X]` and `list[X]`.

- `add_arguments(parser, cls)`: `--name VALUE` flags; booleans as `--x/--no-x` so `false` can be passed; the
  help shows the default; bounds and choices are checked when parsing.
- `given(cls, namespace)`: the field values given on the command line (flags default to "not given", so a
  YAML file or a preset can sit under them); `from_arguments` builds the dataclass.
- `schema_block(cls)`: the JSON-schema block of the stage's config section (types, bounds, defaults, help).
- `config_argv(values)`: the argv for a config block: every key that is present is passed (`--x=1`,
  `--no-flag`, `--pair 1 2`); None means "the command's default" and is left out.

`python -m wsicore.settings SCHEMA.yaml [--check]` regenerates the stage blocks of a schema file from the
dataclasses each block names (`x-source: module:Class`). Standard library only: the Snakefile imports this
module from the checkout, also under `--use-conda` where our package may not be importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from dataclasses import MISSING, dataclass
from functools import cache
from typing import Any, Iterable, Mapping

from wsicore.files import write_text

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_BOUNDS = {"minimum": "minimum", "maximum": "maximum", "exclusive_minimum": "exclusiveMinimum",
           "exclusive_maximum": "exclusiveMaximum"}
_METADATA_KEYS = {"help", "choices", "key", "flag", "aliases", "config", "cli", "odd", *_BOUNDS}


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **metadata: Any) -> Any:
    """A dataclass field with its help text and optional choices / bounds / key / config / cli (see module doc)."""
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        raise TypeError(f"setting(): unknown metadata {sorted(unknown)}; known: {sorted(_METADATA_KEYS)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class Option:
    """One field of a settings dataclass as flag and config key."""

    name: str  # field name (argparse dest)
    key: str  # config key; the flag is --key with '-' for '_'
    kind: type  # bool, int, float or str
    optional: bool  # `X | None`
    length: int | None  # None: one value; n: a tuple of n; -1: a list
    default: Any
    required: bool
    help: str
    choices: tuple | None
    bounds: tuple[tuple[str, float], ...]
    config: bool
    cli: bool
    flag: str
    aliases: tuple[str, ...] = ()
    odd: bool = False


def _unwrap(annotation: Any, where: str) -> tuple[type, bool, int | None, tuple | None]:
    """(scalar type, optional, length, Literal choices) of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {annotation}")
        optional, annotation, origin = True, args[0], typing.get_origin(args[0])
    length = None
    if origin is tuple:
        args = typing.get_args(annotation)
        if not args or Ellipsis in args or len(set(args)) != 1:
            raise TypeError(f"{where}: tuples must be fixed-length of one type, got {annotation}")
        annotation, length = args[0], len(args)
    elif origin is list:
        (annotation,) = typing.get_args(annotation)
        length = -1
    choices = None
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    if annotation not in _JSON_TYPES or (annotation is bool and length is not None):
        raise TypeError(f"{where}: type {annotation} is not a setting type (bool, int, float, str, Literal[...], "
                        f"X | None, tuple[X, X], list[X] of non-bool); mark the field config=False, cli=False")
    return annotation, optional, length, choices


@cache
def options(cls: type) -> tuple[Option, ...]:
    """The flags / config keys of a settings dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        where = f"{cls.__name__}.{f.name}"
        if not meta.get("cli", True) and not meta.get("config", True):
            continue
        if "help" not in meta:
            raise TypeError(f"{where}: needs metadata help (a one-line description; see wsicore.settings)")
        kind, optional, length, literal = _unwrap(hints[f.name], where)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        if optional and default is not None:
            raise TypeError(f"{where}: an optional setting defaults to None (None = the command's default)")
        out.append(Option(
            name=f.name, key=meta.get("key", f.name), kind=kind, optional=optional, length=length, default=default,
            required=f.default is MISSING and f.default_factory is MISSING, help=meta["help"],
            choices=tuple(meta["choices"]) if meta.get("choices") is not None else literal,
            bounds=tuple((k, meta[k]) for k in _BOUNDS if k in meta), config=meta.get("config", True),
            cli=meta.get("cli", True), flag=meta.get("flag") or _default_flag(meta.get("key", f.name)),
            aliases=tuple(meta.get("aliases", ())), odd=bool(meta.get("odd", False)),
        ))
    return tuple(out)


def _default_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_value_text(v) for v in value)
    return str(value)


class _Value:
    """argparse `type=`: converts one word and checks the field's bounds, naming them when it refuses."""

    def __init__(self, option: Option) -> None:
        self.option = option
        self.__name__ = option.kind.__name__  # argparse says "invalid int value: 'x'"

    def __call__(self, text: str) -> Any:
        value = self.option.kind(text)
        for name, bound in self.option.bounds:
            ok = {"minimum": value >= bound, "maximum": value <= bound, "exclusive_minimum": value > bound,
                  "exclusive_maximum": value < bound}[name]
            if not ok:
                raise argparse.ArgumentTypeError(f"{text} is out of range ({name.replace('_', ' ')} {bound})")
        if self.option.odd and value % 2 == 0:
            raise argparse.ArgumentTypeError(f"{text} is even; it must be an odd number")
        return value


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  presets: Mapping[str, Any] | None = None) -> None:
    """Add a flag per field of `cls` (and `--preset` when it has presets). Flags not given stay absent."""
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            help="named set of values; flags given as well override it")
    for opt in options(cls):
        if not opt.cli:
            continue
        shown = opt.default not in (None, "")
        help_text = f"{opt.help} (default: {_value_text(opt.default)})" if shown else opt.help
        help_text = help_text.replace("%", "%%")  # argparse %-formats help; metadata stays plain text for the schema
        kw: dict[str, Any] = dict(dest=opt.name, default=argparse.SUPPRESS, help=help_text)
        if opt.required:
            kw["required"] = True
        if opt.kind is bool and opt.length is None:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _Value(opt)
            if opt.choices is not None:
                kw["choices"] = opt.choices
            else:
                kw["metavar"] = opt.flag[2:].replace("-", "_").upper()
            if opt.length is not None:
                kw["nargs"] = "*" if opt.length == -1 else opt.length
        parser.add_argument(opt.flag, **kw)
        for alias in opt.aliases:  # accepted, not shown
            parser.add_argument(alias, **{**kw, "help": argparse.SUPPRESS, "required": False})


def given(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given as flags (tuples as tuples)."""
    values = {}
    for opt in options(cls):
        if hasattr(namespace, opt.name):
            value = getattr(namespace, opt.name)
            values[opt.name] = tuple(value) if opt.length not in (None, -1) else value
    return values


def from_arguments(cls: type, namespace: argparse.Namespace, base: Mapping[str, Any] | None = None,
                   **fixed: Any) -> Any:
    """`cls` from `base` values (e.g. a YAML file), overridden by the flags given, then by `fixed`."""
    return cls(**{**(base or {}), **given(cls, namespace), **fixed})


def _property(opt: Option) -> dict[str, Any]:
    item: dict[str, Any] = {"type": _JSON_TYPES[opt.kind]}
    if opt.choices is not None:
        item["enum"] = list(opt.choices)
    item.update({_BOUNDS[name]: bound for name, bound in opt.bounds})
    if opt.odd:
        item["not"] = {"multipleOf": 2}
    if opt.length is not None:
        item = {"type": "array", "items": item}
        if opt.length >= 0:
            item.update(minItems=opt.length, maxItems=opt.length)
    if opt.optional:
        item["type"] = [item["type"], "null"]
        if "enum" in item:
            item["enum"] = [None, *item["enum"]]
    if not opt.required:
        item["default"] = list(opt.default) if isinstance(opt.default, tuple) else opt.default
    item["description"] = opt.help
    if opt.flag != _default_flag(opt.key):
        item["x-flag"] = opt.flag
    return item


def schema_block(cls: type, presets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-schema block (draft 2020-12) of the config keys of `cls`. It names no `additionalProperties`:
    the config schema refers to it with `unevaluatedProperties: false`, so a block may add keys of its own."""
    props: dict[str, Any] = {}
    if presets:
        props["preset"] = {"type": ["string", "null"], "enum": [None, *sorted(presets)], "default": None,
                           "description": "named set of values; keys given as well override it"}
    for opt in options(cls):
        if opt.config:
            props[opt.key] = _property(opt)
    block: dict[str, Any] = {"type": "object"}
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        block["description"] = doc[0]
    block["properties"] = props
    required = [o.key for o in options(cls) if o.config and o.required]
    if required:
        block["required"] = required
    return block


def config_argv(values: Mapping[str, Any], keys: Iterable[str] | Mapping[str, str] | None = None) -> list[str]:
    """The argv for a config block: `--key=value` for each key present (only those in `keys` when given; a
    mapping of key -> flag names the flags too), `--flag` / `--no-flag` for booleans, `--key v1 v2` for lists;
    None values are left out."""
    flags = dict(keys) if isinstance(keys, Mapping) else {}
    wanted = None if keys is None else set(keys)
    argv: list[str] = []
    for key, value in values.items():
        if value is None or (wanted is not None and key not in wanted):
            continue
        flag = flags.get(key) or _default_flag(key)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(_value_text(v) for v in value)]
        elif isinstance(value, (int, float, str)):
            argv.append(f"{flag}={value}")
        else:
            raise TypeError(f"config key {key}: {type(value).__name__} values cannot be passed as a flag")
    return argv


def shell_args(values: Mapping[str, Any], keys: Iterable[str] | Mapping[str, str] | None = None) -> str:
    """`config_argv` as one shell-quoted string, for a rule's `params`."""
    return shlex.join(config_argv(values, keys))


# ------------------------------------------------------------------------------------------ schema generator


def _load(ref: str) -> Any:
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def generated_blocks(defs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each block of a schema's `$defs` regenerated from its `x-source` dataclass (and `x-presets`)."""
    out = {}
    for name, block in defs.items():
        source = block["x-source"]
        presets = _load(block["x-presets"]) if "x-presets" in block else None
        head = {"x-source": source, **({"x-presets": block["x-presets"]} if "x-presets" in block else {})}
        out[name] = {**head, **schema_block(_load(source), presets)}
    return out


HEADER = """\
# The config keys of each stage, generated from its settings dataclass (named by x-source): do not edit.
# Change the dataclass field (type, default, metadata help/bounds/choices), then regenerate with
#   python -m wsicore.settings workflow/schemas/stages.schema.yaml
# config.schema.yaml refers to these blocks; tests/test_workflow.py fails when they and the dataclasses differ.
"""


def dump_schema(schema: Mapping[str, Any]) -> str:
    """The schema as YAML for people: a property on one line where it fits, block style where it does not."""
    import yaml  # a dependency of the package; this module's import stays standard-library only

    class Dumper(yaml.SafeDumper):
        pass

    class OneLine(dict):
        pass

    Dumper.add_representer(OneLine, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    doc = {**schema, "$defs": {}}
    for name, block in schema["$defs"].items():
        props = {}
        for key, prop in block.get("properties", {}).items():
            line = yaml.dump(OneLine(prop), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=10**6)
            props[key] = OneLine(prop) if len(key) + len(line) + 6 <= 118 else prop
        doc["$defs"][name] = {**block, "properties": props}
    return HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=118,
                              default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m wsicore.settings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schema", help="YAML schema whose $defs blocks name their dataclass in x-source")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date, write nothing")
    args = parser.parse_args(argv)
    with open(args.schema, encoding="utf-8") as fh:
        text = fh.read()
    current = yaml.safe_load(text)
    wanted = {**current, "$defs": generated_blocks(current["$defs"])}
    new_text = dump_schema(wanted)
    if new_text == text:
        return 0
    if args.check:
        print(f"{args.schema} is out of date: run python -m wsicore.settings {args.schema}", file=sys.stderr)
        return 1
    write_text(args.schema, new_text)
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
