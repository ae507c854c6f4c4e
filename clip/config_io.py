"""Typed configs from TOML files: dataclass schemas, `a.b=value` overrides, and a TOML writer.

Every config is a tree of plain dataclasses. Values read from a file or the command line are checked
against the field types; an unknown key is an error that names the closest valid key. The supported field
types are int, float, str, bool, `X | None`, `Literal[...]`, `list[T]`, `tuple[T, ...]`, unions of those,
nested dataclasses and lists of dataclasses (TOML arrays of tables).

TOML has no null, so a field whose type allows None takes the string "none" (any case) for None, in a file
(`grad_clip_norm = "none"`) and in an override (`optimizer.grad_clip_norm=none`); `to_toml` writes None the
same way, so a written config reads back equal. Such a field therefore cannot hold the string "none" itself.

A config built in Python (`TrainLoopConfig(batch_size="32")`, `dataclasses.replace`) is checked the same way:
each config dataclass's `__post_init__` starts with `check_field_types(self)`, which gives the same errors as a
file's values get (naming the field within its dataclass), and `rechecked` checks a whole config again, with
full dotted keys, for the values assigned after it was built. There a `pathlib.Path` is taken as its text
wherever a string is (the config is recorded as TOML, which has no paths).

Range checks live in each config dataclass's `__post_init__`, which raises `InvalidValue` naming the field
relative to its dataclass; `from_dict` adds the path of the table it was read from, so the message names
the full dotted key ("optimizer.lr must be a finite number > 0, got 0.0").

A schema dataclass may offer a hint to a user who wrote a setting as another library does (open_clip's
`precision = "amp_bf16"`, `[train] epochs = 2`), so that this module knows no library's names: a static method
`config_hint(key, value) -> str`, asked when its field `key` refuses `value` by its type, and when `key` is not
one of its fields (`value` is what was given for it). Its text ("" for none) is added to the error in
parentheses; for an unknown key the error then lists the table's valid keys rather than guess at a spelling. A
key that another section has is named instead (by `load_config`), so hints are for names that are keys
nowhere. The schema above a table is not asked about an error inside it, which is about a key of the table's
own schema. Checks in `__post_init__` write their own messages.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import numbers
import os
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class UnknownKey(ConfigError):
    """A key that its section does not have: `name` is its dotted path, `key` its last part."""

    def __init__(self, message: str, name: str, key: str, in_tables: bool = False) -> None:
        super().__init__(message)
        # in_tables: a field of the section's arrays of tables, which the message names
        self.name, self.key, self.in_tables = name, key, in_tables


# The string that stands for None, which TOML cannot write (compared case-insensitively).
NONE_SENTINEL = "none"


class InvalidValue(ConfigError):
    """A field value that its config dataclass rejects. `key` is the field's name within that dataclass
    (or a dotted path below it); `from_dict` re-raises it under the full dotted key of the file."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key} {problem}")

    def under(self, where: str) -> InvalidValue:
        """The same error, with `where` (the path of the enclosing table) in front of its key."""
        return InvalidValue(f"{where}.{self.key}" if where else self.key, self.problem)


def require(key: str, value: Any, ok: bool, rule: str) -> None:
    """Raises InvalidValue "KEY must be RULE, got VALUE" unless `ok`. Write `ok` so that NaN fails it
    (`0 < x`, not `not x <= 0`): every comparison with NaN is false."""
    if not ok:
        raise InvalidValue(key, f"must be {rule}, got {short_repr(value)}")


# The most DataLoader workers a setting takes (data.workers, eval.workers, the commands' --workers): above the
# hardware threads of the largest machines (a few hundred), so no count that could help is refused, while a slip of
# the keyboard (99999999999999999999) is one line instead of a run starting processes until the machine refuses
# more. prefetch_factor likewise: 10**8 batches of prefetch took a run to 22 GB before its first step.
MAX_WORKERS = 1024
MAX_PREFETCH_FACTOR = 1024


def require_workers(key: str, value: int) -> None:
    """A DataLoader worker count in [0, MAX_WORKERS]."""
    require(key, value, 0 <= value <= MAX_WORKERS, f"in [0, {MAX_WORKERS}] (0 = decode in the main process)")


_INT64_LIMIT = 1 << 63
_SHOWN_CHARACTERS = 60


def short_repr(value: Any) -> str:
    """repr(value), cut to a readable length (a value may be a 400-digit number or a long string)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARACTERS else f"{text[:_SHOWN_CHARACTERS]}... ({len(text)} characters)"


def home_expanded(path: str) -> str:
    """`path` with a leading "~" read as the home folder, as a shell would have read it; so is each folder of
    a "::"-joined list of shard folders. No shell expands a value in a TOML file (nor one written --opt=~/x):
    "~/data/train.tsv" was said not to exist. (A config's pathlib.Path is text by then: check_field_types.)"""
    return "::".join(os.path.expanduser(part) for part in path.split("::"))


def require_utf8_text(values: Any, where: str = "") -> None:
    """Refuses text in `values` (a config's `to_dict`) that holds bytes which are not UTF-8: a shell passes an
    argument not in the locale's encoding undecoded (a file name on Linux is any bytes), and a config that is
    written down as TOML (a training run's config.toml, UTF-8) ended its run on a traceback there."""
    if isinstance(values, dict):
        for key, value in values.items():
            require_utf8_text(value, f"{where}.{key}" if where else str(key))
    elif isinstance(values, list | tuple):
        for index, value in enumerate(values):
            require_utf8_text(value, f"{where}[{index}]")
    elif isinstance(values, str):
        try:
            values.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidValue(where, f"{values!r} holds bytes that are not UTF-8 text, which the run's config.toml "
                               f"(UTF-8) cannot record: give it in UTF-8, or rename the file or folder") from None


def relative_path_note(path: str) -> str:
    """For a message that `path` is missing: where a relative path was looked for. A config's relative paths are
    read from the folder the run is started in, not the config file's: "manifest data/train.csv does not exist",
    of a file that plainly exists beside the config, left the user to guess which folder it meant."""
    if os.path.isabs(path) or "://" in path or path.startswith("pipe:"):
        return ""
    return f" (a relative path, read from the folder the command runs in, {os.getcwd()})"


def _is_none_sentinel(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == NONE_SENTINEL


def _closest(key: str, valid: typing.Iterable[str], table: str = "") -> str:
    """A suggestion among the keys beside `key` (the same dotted parent), compared by their last part: whole
    dotted names all share their prefix, so "eval.retrieval.0.path" was closest to "eval.retrieval.0.split".
    `table`: the path of the table that bare `key` and `valid` are in, named when the valid keys are listed."""
    parent, _, leaf = key.rpartition(".")
    siblings = {name.rpartition(".")[2]: name for name in valid if name.rpartition(".")[0] == parent}
    if not siblings:
        match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
        # a quoted TOML key holding a dot ("batch.size" = 8) has no siblings among the table's bare keys
        return f" Did you mean {match[0]!r}?" if match else _valid_keys(table, valid)
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
    if match:
        return f" Did you mean {siblings[match[0]]!r}?"
    return _valid_keys(parent or table, siblings)


def _valid_keys(table: str, names: typing.Iterable[str]) -> str:
    return f" Valid keys{f' in {table}' if table else ''}: {', '.join(sorted(names))}."


def _schema_hint(schema: Any, key: str, value: Any) -> str:
    """The schema's `config_hint` about `key` and `value` (see the module's docstring), "" where it has none."""
    hint = getattr(schema, "config_hint", None)
    return hint(key, value) if hint is not None else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        items = [a for a in typing.get_args(tp) if a is not Ellipsis]
        of = f" of {_type_name(items[0])}" if len(set(items)) == 1 else ""
        return f"list{of} (written [a, b, ...])"  # as a TOML value and in an override
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _with_article(name: str) -> str:
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the type `tp` and returns it in that type (e.g. a TOML list as a tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or _is_none_sentinel(value)):
            return None
        errors = []
        # Try the more specific members first so `int | tuple[int, ...]` keeps ints as ints.
        for member in args:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except ConfigError as error:
                errors.append(str(error))
        expected = " or ".join(_type_name(a) for a in args if a is not type(None))
        if type(None) in args:
            expected += f' or "{NONE_SENTINEL}"'
        raise ConfigError(f"{where}: {short_repr(value)} is not {_with_article(expected)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {short_repr(value)} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            tables = origin is list and args and dataclasses.is_dataclass(args[0]) and isinstance(value, dict)
            # [data.sources] (one bracket) is one table; an array of tables is written [[data.sources]]
            header = f" (an array of tables: each one headed [[{where}]], with two brackets)" if tables else ""
            raise ConfigError(f"{where}: expected a list{header}, got {short_repr(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of {tp.__name__} fields, got {short_repr(value)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        # numpy's bool (what a notebook's `array.any()` gives; "bool_" before numpy 2) is read as a bool, as a
        # numpy integer is read as an int; it is no numbers.Integral, and a bool field refused it
        if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
    if tp is int:
        # numbers.Integral: a notebook's numpy integer is an integer (never from a file, whose are ints)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
            if not -_INT64_LIMIT <= value < _INT64_LIMIT:  # TOML's integers are 64-bit; Python's parser's are not
                raise ConfigError(f"{where}: {short_repr(value)} is too large (integers must fit in 64 bits)")
            return value
        raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float's range
                raise ConfigError(f"{where}: {short_repr(value)} is too large for a number") from None
        note = ""
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                pass
            else:
                try:
                    tomllib.loads(f"number = {value.strip()}")
                except tomllib.TOMLDecodeError:  # Python reads '.5' and '5.'; TOML, the files' and overrides', not
                    if value.strip().startswith((".", "-.", "+.")) or value.strip().endswith("."):
                        note = " (written as TOML writes numbers: digits on both sides of a '.', such as 0.5 or 5.0)"
                else:  # lr = "0.5" in a file: a text
                    note = " (a text: write the number without quotes)"
        raise ConfigError(f"{where}: expected a number, got {short_repr(value)}{note}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):  # built in Python, see above
            return os.fspath(value)
        raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def from_dict(schema: type[T], data: dict, where: str = "") -> T:
    """Builds the dataclass `schema` from nested dicts, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        name = f"{where}.{key}" if where else key
        hint = _schema_hint(schema, key, data[key])
        tables = [f"[[{where}.{name}]]" if where else f"[[{name}]]" for name in _arrays_of_tables_with(schema, key)]
        if hint:
            advice = f" ({hint}).{_valid_keys(where, fields)}"
        elif tables:  # [data] path = ...: a field of each [[data.sources]] table, which no spelling near it finds
            advice = f". Did you mean {key!r} in {' or '.join(f'a {table} table' for table in tables)}?"
        else:
            advice = f".{_closest(key, fields, table=where)}"
        raise UnknownKey(f"unknown config key {name!r}{advice}", name, key, in_tables=bool(tables) and not hint)
    return _built(schema, _checked_values(schema, data, where), where)


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    """The field types of a config dataclass, resolved once: every config built in Python checks its fields."""
    return typing.get_type_hints(schema)


def _checked_values(schema: type, values: dict, where: str) -> dict:
    """`values` (field name: value) of `schema`, each checked against its field's type and put in it."""
    hints = _field_types(schema)
    return {key: _coerce_field(schema, key, value, hints[key], f"{where}.{key}" if where else key)
            for key, value in values.items()}


def _built(schema: type[T], kwargs: dict, where: str) -> T:
    """schema(**kwargs), whose errors name the key under `where`, the path of its table."""
    try:
        return schema(**kwargs)
    except InvalidValue as error:
        raise error.under(where) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or schema.__name__}: {error}") from error


def _init_values(config: Any) -> dict:
    return {item.name: getattr(config, item.name) for item in dataclasses.fields(config) if item.init}


def check_field_types(config: Any) -> None:
    """Checks every field of the config dataclass `config` against its type, as `from_dict` checks a file's
    values, and puts it in that type as `from_dict` would have (a list as a tuple, an int as a float, a table's
    dict as its dataclass, a pathlib.Path as its text). Each config dataclass calls it first in `__post_init__`:
    one built in Python (`TrainLoopConfig(batch_size="32")`, `dataclasses.replace`) has not been through
    `from_dict`, and its checks failed on a wrong type with a TypeError of their own ('>=' not supported between
    'str' and 'int'), or let it through (32.0, True, a misspelt Literal) to fail or do something else later. The
    error names the field within its dataclass, as a range check's does. A value of the right type is kept as
    it is, the same object."""
    given = _init_values(config)
    for key, value in _checked_values(type(config), given, "").items():
        if not _unchanged(value, given[key]):
            object.__setattr__(config, key, value)  # the model's configs are frozen


def _unchanged(checked: Any, given: Any) -> bool:
    """Whether `checked`, what `_coerce` made of `given`, is `given` as it was: of the same types all through.
    Equality alone is not that: a tuple of numpy integers equals the tuple of ints it becomes, and was kept,
    numpy scalars and all, which to_toml cannot write and a checkpoint's weights_only load refuses."""
    if checked is given:
        return True
    if type(checked) is not type(given):
        return False
    if isinstance(checked, (list, tuple)):
        return len(checked) == len(given) and all(map(_unchanged, checked, given))
    return checked == given


def rechecked(config: T, where: str = "") -> T:
    """`config` (a config dataclass) built again from its current values, through every check that a file's
    values go through (types, then each dataclass's own), with errors that name the full dotted key as for a
    file ("train.batch_size: expected an integer, got '8'"). For entry points given a config built in Python:
    a value assigned after the config was built (`config.train.batch_size = "8"`, a pathlib.Path) was never
    checked. `where`: the path of `config`'s table in a larger config."""
    values = _init_values(config)
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if _is_config(value):
            values[key] = rechecked(value, name)
        elif isinstance(value, (list, tuple)) and any(map(_is_config, value)):
            # an array of tables ([[data.sources]]), named element by element as from_dict names them
            values[key] = type(value)(rechecked(item, f"{name}[{index}]") if _is_config(item) else item
                                      for index, item in enumerate(value))
    return _built(type(config), _checked_values(type(config), values, where), where)


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _coerce_field(schema: type, key: str, value: Any, tp: Any, name: str) -> Any:
    """`_coerce` for the field `key` of `schema`, whose hint joins the error when the field refuses its value.
    Not for a table's value: its error is about a key inside, which the table's own schema was asked about."""
    try:
        return _coerce(value, tp, name)
    except ConfigError as error:
        hint = "" if isinstance(value, dict) or _tables(value) else _schema_hint(schema, key, value)
        if not hint:
            raise
        raise ConfigError(f"{error} ({hint})") from None


def to_dict(config: Any) -> dict:
    """The config as plain nested dicts and lists (tuples become lists), ready for TOML or a checkpoint."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def differences(before: dict, after: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) for every value that differs between two nested config dicts."""
    found = []
    for key in sorted(set(before) | set(after)):
        name = f"{prefix}{key}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, name + ".")
        elif _tables(old) and _tables(new) and len(old) == len(new):
            # Arrays of tables ([[data.sources]]) element by element, named as overrides name them: one changed
            # weight is "data.sources.0.weight", not the whole list twice
            for index, (old_table, new_table) in enumerate(zip(old, new, strict=True)):
                found += differences(old_table, new_table, f"{name}.{index}.")
        elif old != new:
            found.append((name, old, new))
    return found


def _tables(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


# tomllib's int() raised ValueError, with advice to call sys.set_int_max_str_digits, out of clip-train's traceback
_TOO_MANY_DIGITS = f"holds an integer of more than {sys.get_int_max_str_digits()} digits, more than Python reads"


def _parse_override_value(text: str) -> Any:
    # An override's value is read as a TOML value (numbers, booleans, lists, quoted strings); anything
    # that is not valid TOML is taken as a bare string, so `data.path=/tmp/x.csv` needs no quotes.
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:  # tomllib parses nested arrays recursively
        raise ConfigError(f"override value {short_repr(text)} nests lists or tables too deeply") from None
    except ValueError:  # int() refused a number past Python's digit limit (TOMLDecodeError is caught above)
        raise ConfigError(f"override value {short_repr(text)} {_TOO_MANY_DIGITS}") from None


# What `_SetBy` holds for a list that an index override found missing and took from the field's default.
_DEFAULT = object()
# Dotted path -> the override that last set the value there whole (or _DEFAULT); paths absent are the file's.
# Errors about a value then blame whoever gave it: `data.sources=[]` then `data.sources.0.weight=2` said the
# array had "0 entries in the config file".
_SetBy = dict[str, object]


def _record_set(set_by: _SetBy, path: str, origin: object) -> None:
    """`path` now holds what `origin` gave it; what earlier overrides set below it is gone with the old value."""
    for below in [earlier for earlier in set_by if earlier.startswith(path + ".")]:
        del set_by[below]
    set_by[path] = origin


def _origin(set_by: _SetBy, path: str) -> object:
    """Who gave `path` its value: the override that set it or a table above it whole, _DEFAULT, or None for the
    file. `_record_set` drops paths below a newer one, so the deepest path recorded is the newest."""
    keys = path.split(".")
    for end in range(len(keys), 0, -1):
        origin = set_by.get(".".join(keys[:end]))
        if origin is not None:
            return origin
    return None


def _list_to_override(
    node: dict, field: dataclasses.Field, name: str, assignment: str, set_by: _SetBy
) -> tuple[list, object]:
    """The array of tables that an index override changes, and where it came from (see `_origin`): the file's
    or an earlier override's, or else a copy of the field's default, put into `node`. A file without the array
    gets the default list, so an override of one of its elements changes that default element, as overriding
    a key the file leaves out changes the default value."""
    if field.name not in node:
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        node[field.name] = to_dict(default)
        _record_set(set_by, name, _DEFAULT)
    items, origin = node[field.name], _origin(set_by, name)
    if not isinstance(items, list):
        if origin is None:
            raise ConfigError(
                f"override {assignment!r}: {name} is not an array of tables ([[{name}]]) in the config file"
            )
        raise ConfigError(f"override {assignment!r}: {name} is not an array of tables ([[{name}]]): the earlier "
                          f"override {origin!r} set it to {short_repr(items)}")
    return items, origin


def _missing_element_message(assignment: str, name: str, index: int, count: int, origin: object) -> str:
    entries = "1 entry" if count == 1 else f"{count} entries"
    if origin is None or origin is _DEFAULT:
        where = "in the config file" if origin is None else f"by default (the config file has no [[{name}]] table)"
        to_add = f"add a [[{name}]] table to the config file"
    else:
        where, to_add = f"as the earlier override {origin!r} set it", "write it into the list that override sets"
    return (
        f"override {assignment!r}: {name} has {entries} {where}, no index {index}. An override changes an "
        f"existing element only; to add one, {to_add}"
    )


def apply_override(data: dict, schema: type, assignment: str, set_by: _SetBy | None = None) -> None:
    """Applies one `section.key=value` override to the nested dict `data`, validating the path. `set_by`: what
    the earlier overrides of `data` set (see `_SetBy`), updated with what this one sets."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, text = assignment.split("=", 1)
    set_by = {} if set_by is None else set_by
    _apply_override(data, schema, _override_key(path).split("."), text, assignment, [], set_by)


def _override_key(path: str) -> str:
    """data.sources[0].weight, as error messages name an element, is data.sources.0.weight."""
    return re.sub(r"\[(\d+)\](?=\.|$)", r".\1", path.strip())


def refuse_shell_expanded_range(overrides: typing.Sequence[str]) -> None:
    """A shard pattern left unquoted on a command line reaches us expanded by the shell:
    data.sources.0.path=d/{00000..00009}.tar is ten overrides of one path, and the last one alone would be trained
    on, without a word. Refused where a path key is given more than once with values that differ in their numbers
    alone and hold no brace (the shell's expansion leaves none; a quoted pattern replacing a wrapper's, cc3m's
    range by cc12m's, is a legitimate repeat). (Other repeated keys keep the last value, as a wrapper script that
    appends its own overrides expects.)"""
    values: dict[str, list[str]] = {}
    for assignment in overrides:
        if "=" in assignment:  # (one without is apply_override's error)
            key, text = assignment.split("=", 1)
            values.setdefault(_override_key(key), []).append(text.strip())
    for key, texts in values.items():
        remainders = {re.sub(r"\d+", "", text) for text in texts}
        brace_left = any("{" in text for text in texts)  # quoted: the shell's expansion leaves no brace
        if key.rsplit(".", 1)[-1] != "path" or len(set(texts)) < 2 or len(remainders) != 1 or brace_left:
            continue
        if not _one_counted_number(texts):  # pairs_2019.csv then pairs_2023.csv: a wrapper's path replaced
            continue
        shown = ", ".join([*map(repr, texts[:2]), *(["..."] if len(texts) > 3 else []), *map(repr, texts[2:][-1:])])
        raise ConfigError(
            f"override key {key!r} is given {len(texts)} times ({shown}): the shell expanded an unquoted "
            f"{{first..last}} range into one override per shard, and only the last would be read. Quote the "
            f"override: '{key}=DIR/{{00000..00009}}.tar' (or, where one override was meant to replace another, "
            f"give the key once)"
        )


def _one_counted_number(texts: list[str]) -> bool:
    """Whether `texts` (alike but for their numbers) differ in one number alone, which counts up or down by one
    from each to the next: what the shell's {first..last} gives, in its order."""
    # Compared as numbers where Python converts them (4300 digits at most); a longer one is no shell's count
    try:
        numbers = [[int(group) for group in re.findall(r"\d+", text)] for text in texts]
    except ValueError:
        return False
    varying = [position for position in range(len(numbers[0])) if len({row[position] for row in numbers}) > 1]
    if len(varying) != 1:
        return False
    counted = [row[varying[0]] for row in numbers]
    steps = {after - before for before, after in zip(counted, counted[1:])}
    return steps in ({1}, {-1})


def _apply_override(
    data: dict, schema: type, keys: list[str], text: str, assignment: str, above: list[str], set_by: _SetBy
) -> None:
    """`keys` below `data` (whose own path in the whole config is `above`, e.g. data.sources.0) take `text`."""
    node, node_schema = data, schema
    for depth, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(node_schema)} if dataclasses.is_dataclass(node_schema) else {}
        if key not in fields:
            prefix = ".".join([*above, *keys[:depth]])
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            full = ".".join([*above, *keys[: depth + 1]])
            # batch_size=8, train.lr=1e-4: a key of another section, which no spelling near it finds
            elsewhere = _paths_named(schema, key, above)
            tables = _arrays_of_tables_with(node_schema, key) if dataclasses.is_dataclass(node_schema) else []
            if tables:  # data.path=, data.kind= (open_clip's --train-data habit): a field of each [[data.sources]]
                # and another section's key of that name where there is one (eval.seed: train.seed), not a list of
                # every section's (data.kind: loss.kind, model.vision.kind, schedule.kind)
                nearest = [f"{prefix}.{table}.0.{key}" for table in tables] + (elsewhere if len(elsewhere) == 1 else [])
                advice = f". Did you mean {' or '.join(map(repr, nearest))}?"
            elif elsewhere:
                advice = f". Did you mean {' or '.join(map(repr, elsewhere))}?"
            else:
                hint = _schema_hint(node_schema, key, _parse_override_value(text.strip()))
                advice = f" ({hint}).{_valid_keys(prefix, fields)}" if hint else f".{_closest(full, valid)}"
            raise ConfigError(f"unknown config key {full!r} in override {assignment!r}{advice}")
        field_type = _field_types(node_schema)[key]
        if depth == len(keys) - 1:
            # Spaces around the value go, as around a value in the file; a text field's value of spaces alone
            # stays (`data.sources.0.separator=$'\t'`: stripped, the tab became "", the suffix's separator)
            value = text.strip() or (text if _takes_text(field_type) else "")
            for replaced in _set_override_value(node, key, field_type, value):
                _record_set(set_by, ".".join([*above, *keys[:depth], replaced]), assignment)
            return
        name = ".".join([*above, *keys[: depth + 1]])
        # isdecimal, not isdigit: "²" is a digit that int() refuses, and escaped as a ValueError's traceback
        if typing.get_origin(field_type) is list and not keys[depth + 1].isdecimal():
            element = typing.get_args(field_type)[0]
            known = dataclasses.is_dataclass(element) and keys[depth + 1] in _field_types(element)
            raise ConfigError(f"override {assignment!r}: {name} is a list; name an element by its index from 0, "
                              f"e.g. {name}.0.{keys[depth + 1] if known else '<field>'}=value")
        if typing.get_origin(field_type) is not list and not dataclasses.is_dataclass(field_type):
            raise ConfigError(f"override {assignment!r}: {name} is a value, not a section: write {name}=value")
        if typing.get_origin(field_type) is list:
            # `eval.zeroshot.0.num_samples=100`: an element of an array of tables, by index.
            try:
                index = int(keys[depth + 1])
            except ValueError:  # more digits than Python converts (4300): a ValueError's traceback
                raise ConfigError(f"override {assignment!r}: {name} has no element {keys[depth + 1][:20]}...") from None
            items, origin = _list_to_override(node, fields[key], name, assignment, set_by)
            if index >= len(items):
                raise ConfigError(_missing_element_message(assignment, name, index, len(items), origin))
            rest = keys[depth + 2 :]
            if not rest:
                raise ConfigError(
                    f"override {assignment!r} must name a field of the element: {name}.{index}.<field>=value"
                )
            if not isinstance(items[index], dict):  # `sources = [1]`: its check was an item assignment's TypeError
                element = typing.get_args(field_type)[0]
                raise ConfigError(f"override {assignment!r}: {name}.{index} is {short_repr(items[index])}, not a table "
                                  f"of {element.__name__} fields")
            element_path = [*above, *keys[: depth + 2]]
            _apply_override(items[index], typing.get_args(field_type)[0], rest, text, assignment, element_path, set_by)
            return
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {name} is {short_repr(node)}, not a section")
        node_schema = field_type


def _arrays_of_tables_with(schema: type, key: str) -> list[str]:
    """The fields of `schema` that are arrays of tables whose tables have a field `key` ("sources" for DataConfig
    and "path")."""
    found = []
    for name, field_type in _field_types(schema).items():
        element = typing.get_args(field_type)[0] if typing.get_origin(field_type) is list else None
        if dataclasses.is_dataclass(element) and key in _field_types(element):
            found.append(name)
    return found


def _paths_named(schema: type, name: str, above: list[str]) -> list[str]:
    """The dotted paths of the fields called `name` in `schema`'s sections (arrays of tables left out)."""
    found = []
    for item in dataclasses.fields(schema):
        path = [*above, item.name]
        if item.name == name:
            found.append(".".join(path))
        field_type = _field_types(schema)[item.name]
        if dataclasses.is_dataclass(field_type):
            found += _paths_named(field_type, name, path)
    return sorted(found)


def _set_override_value(node: dict, key: str, field_type: Any, text: str) -> list[str]:
    """node[key] = the override's value. A text field takes the text as written (quotes only where TOML would
    read it as a string): `output_dir=2024` or `eval.zeroshot.0.name=10` is a name, which TOML reads as a number
    and the field then refused. An inline table for a section (`train={seed = 1}`) sets the keys it names and
    keeps the others, as the overrides `train.seed=1` would; it replaced the whole table, so every other
    setting of the file's section went back to its default without a word.
    Returns the dotted keys below `node` whose values it replaced whole."""
    value = _parse_override_value(text)
    if not isinstance(value, str) and _takes_text(field_type):
        value = text
    if isinstance(value, dict) and dataclasses.is_dataclass(field_type) and isinstance(node.get(key), dict):
        return [f"{key}.{below}" for below in _merge_tables(node[key], value)]
    node[key] = value
    return [key]


def _takes_text(tp: Any) -> bool:
    """Whether a field of type `tp` holds text alone: str, or str | None."""
    union = typing.get_origin(tp) in (Union, types.UnionType)
    return tp is str or (union and set(typing.get_args(tp)) == {str, type(None)})


def _merge_tables(into: dict, tables: dict) -> list[str]:
    """`tables` written into `into`, table by table; returns the dotted keys whose values it replaced whole."""
    replaced = []
    for key, value in tables.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            replaced += [f"{key}.{below}" for below in _merge_tables(into[key], value)]
        else:
            into[key] = value
            replaced.append(key)
    return replaced


def load_config(path: str | Path | None, overrides: typing.Sequence[str], schema: type[T],
                given: typing.Mapping[str, Any] | None = None) -> T:
    """Reads a TOML file (or nothing) into `schema`, then applies `a.b=value` overrides, then `given`'s top-level
    values as they are (a command's own option, such as clip-train's --output-dir); all type-checked. An
    error in the file's contents names the file, as a TOML syntax error does: in a cluster job's log "unknown
    config key" did not say which of its recipes held it."""
    file_data: dict = {} if path is None else _read_toml(Path(path))
    data = copy.deepcopy(file_data)
    refuse_shell_expanded_range(overrides)
    set_by: _SetBy = {}
    for assignment in overrides:  # an override's own errors name the override
        apply_override(data, schema, assignment, set_by)
    # Before the checks: put in after them, the file's value was checked first, and one it refused (output_dir =
    # "$SCRATCH/run", whose message says to give --output-dir instead) could not be replaced
    data.update(given or {})
    try:
        return _from_whole_config(schema, data)
    except ConfigError as error:
        # Whether the file holds it: the file alone, without the overrides, fails the same way. (An override
        # may also fix a value the file has wrong, or be what makes a cross-field check fail.)
        # Nor where a value the command gave is at fault (its --output-dir): the file's own value was replaced
        given_at_fault = isinstance(error, InvalidValue) and error.key in (given or {})
        if path is None or given_at_fault or not _fails_alike(schema, file_data, error):
            raise
        raise ConfigError(f"{path}: {error}") from None


def _fails_alike(schema: type, data: dict, error: ConfigError) -> bool:
    try:
        _from_whole_config(schema, data)
    except ConfigError as alone:
        return str(alone) == str(error)
    return False


def _from_whole_config(schema: type[T], data: dict) -> T:
    """`from_dict` for a whole config, whose unknown key may be one of another table's."""
    try:
        return from_dict(schema, data)
    except UnknownKey as error:
        # [train] lr = 1e-5, warmup_steps under [train]: a key of another section, as for an override (whose
        # check names it); its closest sibling ('accumulation_steps') would mislead
        elsewhere = [path for path in _paths_named(schema, error.key, []) if path != error.name]
        if not elsewhere or error.in_tables:  # a field of the section's own [[tables]] is nearer than another's
            raise
        # A top-level key written below a [table] header is read into that table: TOML's rule, not the writer's
        placed = (" (TOML reads a key into the [table] whose header is above it: write top-level keys before "
                  "the first header)" if all("." not in path for path in elsewhere) else "")
        raise ConfigError(f"unknown config key {error.name!r}. Did you mean {' or '.join(map(repr, elsewhere))}?"
                          f"{placed}") from None


def where_not_utf8(error: UnicodeDecodeError) -> str:
    """Where a file's bytes stop being UTF-8, as 'byte N (line L) is 0xNN': enough to find it in an editor."""
    data, start = error.object, error.start
    line = data[:start].count(b"\n") + 1
    return f"byte {start} (line {line}) is 0x{data[start]:02x}"


def _recipes_note(path: Path) -> str:
    """The README's commands name the recipes as configs/NAME.toml, which only a source checkout has: a user who
    installed the package and typed them was told the file does not exist, and not where it is."""
    if path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return ""
    return ("; configs/ is the source repository's folder of recipes, not installed with the package: run the "
            "command in a checkout, or give a recipe of your own (README, Training)")


def _read_toml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory")
    if not path.exists():  # a pipe is read: clip-train <(sed s/a/b/ recipe.toml) was said not to exist
        raise ConfigError(f"config file {str(path)!r} does not exist{_recipes_note(path)}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is no TOML error
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not valid TOML: TOML files are UTF-8, but {where_not_utf8(error)}; save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not valid TOML: its arrays or inline tables nest too deeply") from None
    except ValueError:  # as for an override
        raise ConfigError(f"{path}: {_TOO_MANY_DIGITS}") from None


# A TOML basic string may not hold a control character raw (tab aside), and a config's strings can hold
# any (separator = "\t", a name written with an escape): each is escaped, in TOML's short form where it has
# one, else as \uXXXX.
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_string(text: str) -> str:
    def escape(char: str) -> str:
        if char in _SHORT_ESCAPES:
            return _SHORT_ESCAPES[char]
        if char < " " or char == "\x7f":
            return f"\\u{ord(char):04x}"
        return char

    return '"' + "".join(map(escape, text)) + '"'


def _toml_value(value: Any) -> str:
    if value is None:
        return f'"{NONE_SENTINEL}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def as_toml(value: Any) -> str:
    """`value` as a config file or an override writes it (true, "none", "text", {a = 1}), for messages that name
    settings: Python's False, None and 'text' are spelled otherwise there."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {as_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(as_toml(item) for item in value) + "]"
    try:
        return _toml_value(value)
    except ConfigError:
        return repr(value)


def to_toml(data: dict, table: str = "") -> str:
    """Writes nested dicts as TOML. None is written as the string "none", which `from_dict` reads back as
    None for a field that allows it (TOML has no null; leaving the key out would read back its default)."""
    lines, tables = [], []
    for key, value in data.items():
        name = f"{table}.{key}" if table else key
        if isinstance(value, dict):
            tables.append(f"\n[{name}]\n" + to_toml(value, name))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                tables.append(f"\n[[{name}]]\n" + to_toml(item, name))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    return text + "".join(tables)
