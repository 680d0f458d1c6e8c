"""Declared options: one definition per option, from which everything else is derived.

An option is a dataclass field made with `option(...)`: its type (the annotation), its default, its
accepted values (choices, a numeric range, an extra check) and a one-line description. From that one
place come

* `coerce` + `check`: a YAML or command-line value turned into the field's type and validated, with an
  error naming the key, the value and where it came from (`OptionError`, exit status 2);
* `add_arguments`: the argparse flags of a command, whose ``--help`` shows every option's description,
  default and accepted values;
* `help_text` / `markdown_table`: the same text for Dagster run-config descriptions and docs/configuration.md.

Values are never guessed: a string for an integer option must be an integer literal, a number is not
accepted where a string is expected (YAML turns ``1.10`` into 1.1), a scalar is not a list.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NULL_WORDS = ("none", "null", "")


class OptionError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range (exit status 2)."""


@dataclass(frozen=True)
class Spec:
    """What `option()` stores in a field's metadata (see `option` for the meaning of each part)."""

    help: str
    choices: tuple | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    check: Callable[[Any], str | None] | None = None
    accepts: str | None = None
    default_text: str | None = None
    switch: bool = False
    positional: bool = False
    metavar: str | None = None
    cli: bool = True
    required: bool = False
    cli_kwargs: tuple = ()


def option(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,
           choices: Iterable | None = None, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None, check: Callable[[Any], str | None] | None = None,
           accepts: str | None = None, default_text: str | None = None, switch: bool = False,
           positional: bool = False, metavar: str | None = None, cli: bool = True, required: bool = False,
           cli_kwargs: dict | None = None) -> Any:
    """A dataclass field carrying its own description and accepted values.

    `choices`: the only values allowed; `gt`/`ge`/`lt`/`le`: numeric bounds (of each element, for a
    list); `check(value) -> problem or None`: anything else (`accepts` says in words what it allows);
    `default_text`: how to show the default when the value itself says little (None meaning "inferred");
    `switch`: a ``--flag`` without a value (bool, default False); `positional`: an argument without
    ``--``; `cli=False`: not offered on the command line; `required`: a command-line flag that must be given;
    `cli_kwargs`: extra argparse arguments for an unusual flag (e.g. ``nargs=2, action="append"``).
    """
    spec = Spec(help=help, choices=tuple(choices) if choices is not None else None, gt=gt, ge=ge, lt=lt, le=le,
                check=check, accepts=accepts, default_text=default_text, switch=switch, positional=positional,
                metavar=metavar, cli=cli, required=required, cli_kwargs=tuple((cli_kwargs or {}).items()))
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": spec})


@dataclass(frozen=True)
class Option:
    """One declared option: its name, parsed type and `Spec`."""

    name: str
    base: type  # int, float, str or bool (of each element, for a list)
    is_list: bool
    optional: bool  # None allowed
    spec: Spec
    default: Any

    # ------------------------------------------------------------------ text
    def type_words(self) -> str:
        word = {int: "integer", float: "number", str: "text", bool: "true|false"}[self.base]
        if self.spec.choices is not None:
            word = "|".join(_show(c) for c in self.spec.choices)
        return word

    def accepted(self) -> str:
        """Accepted values in words: ``integer >= 1``, ``number in (0, 1)``, ``a|b``, ``list of ...``."""
        words = self.type_words()
        bounds = _bounds_text(self.spec)
        if bounds:
            words = f"{words} {bounds}"
        if self.spec.accepts:
            words = self.spec.accepts if self.base is str and self.spec.choices is None else f"{words} ({self.spec.accepts})"
        if self.is_list and "nargs" not in dict(self.spec.cli_kwargs):
            words = f"list of {words} (space- or comma-separated)"
        elif self.is_list:
            words = f"list of {words}"
        if self.optional:
            words += ", or none"
        return words

    def default_words(self) -> str:
        if self.spec.default_text is not None:
            return self.spec.default_text
        return _show(self.default_value())

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def help_text(self) -> str:
        """One line: description, default, accepted values."""
        if self.spec.switch:
            return f"{self.spec.help} (default: off)"
        if self.spec.required or self.spec.positional:
            return f"{self.spec.help} (required; accepts {self.accepted()})"
        return f"{self.spec.help} (default: {self.default_words()}; accepts {self.accepted()})"

    def metavar(self) -> str:
        if self.spec.metavar:
            return self.spec.metavar
        if self.spec.choices is not None or self.base is bool:
            return self.type_words()
        return {int: "INT", float: "NUMBER", str: "TEXT"}[self.base]

    # ------------------------------------------------------------------ values
    def coerce(self, value: Any, where: str = "") -> Any:
        """`value` (YAML or a command-line string) as this option's type; OptionError naming the key and value."""
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS and self.base is not str):
            if self.optional:
                return None
            raise self.error(value, "a value is required", where)
        if self.is_list:
            if isinstance(value, str):
                items: list = self.split(value)
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise self.error(value, f"expected a list ({self.type_words()} each)", where)
            return [self._scalar(v, value, where) for v in items]
        return self._scalar(value, value, where)

    def split(self, text: str) -> list[str]:
        """A list written as text: comma-separated (numbers and booleans also space-separated)."""
        if self.base is not str:
            text = text.replace(",", " ")
            return text.split()
        return [v.strip() for v in text.split(",") if v.strip()]

    def from_command_line(self, value: Any) -> Any:
        """argparse's value (a string, or a list option's tokens, each possibly comma-separated)."""
        if self.is_list and isinstance(value, list):
            return [item for token in value for item in (self.split(token) if isinstance(token, str) else [token])]
        return value

    def _scalar(self, v: Any, whole: Any, where: str) -> Any:
        base = self.base
        if base is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return v.strip().lower() in TRUE_WORDS
            raise self.error(whole, "expected true or false", where)
        if base is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, str):
                try:
                    return int(v.strip(), 10)
                except ValueError:
                    pass
            raise self.error(whole, "expected an integer", where)
        if base is float:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out = float(v)
            elif isinstance(v, str):
                try:
                    out = float(v.strip())
                except ValueError:
                    raise self.error(whole, "expected a number", where) from None
            else:
                raise self.error(whole, "expected a number", where)
            if not math.isfinite(out):
                raise self.error(whole, "must be a finite number", where)
            return out
        # text: a YAML boolean may name a choice ("true"/"false"); numbers are refused, since YAML
        # has already changed them (1.10 -> 1.1, 0123 -> 83)
        choices = self.spec.choices
        if isinstance(v, bool) and choices is not None and str(v).lower() in choices:
            return str(v).lower()
        if not isinstance(v, str):
            if choices is not None:
                raise self.error(whole, f"must be one of {self.type_words()}", where)
            raise self.error(whole, "expected text; quote it in YAML", where)
        if choices is not None:
            # choice names are lower-case words: 'Auto' means 'auto'; where the choices include true and
            # false, the words a boolean option takes (yes/no/on/off/1/0) name them too
            word = v.strip().lower()
            if word in choices:
                return word
            if "true" in choices and "false" in choices and word in TRUE_WORDS + FALSE_WORDS:
                return "true" if word in TRUE_WORDS else "false"
        return v

    def check(self, value: Any, where: str = "") -> Any:
        """Raise OptionError unless `value` (already coerced) is accepted; returns it."""
        if value is None:
            if not self.optional:
                raise self.error(value, "a value is required", where)
            return value
        items = value if self.is_list else [value]
        if self.is_list:
            if not items:
                raise self.error(value, "must not be empty", where)
            seen = set()
            for v in items:
                if v in seen:
                    raise self.error(value, f"lists {_show(v)} twice", where)
                seen.add(v)
        for v in items:
            if self.spec.choices is not None and v not in self.spec.choices:
                raise self.error(value, f"must be one of {self.type_words()}", where)
            if self.base in (int, float) and not _in_bounds(v, self.spec):
                raise self.error(value, f"must be {_bounds_text(self.spec)}", where)
            problem = self.spec.check(v) if self.spec.check else None
            if problem:
                raise self.error(value, problem, where)
        return value

    def parse(self, value: Any, where: str = "") -> Any:
        return self.check(self.coerce(value, where), where)

    def error(self, value: Any, problem: str, where: str) -> OptionError:
        source = f" ({where})" if where else ""
        return OptionError(f"{self.name} = {_show(value)}{source}: {problem}")


# ---------------------------------------------------------------------- declarations


def _parse_type(tp: Any) -> tuple[type, bool, bool]:
    """(base type, is_list, optional) of an annotation such as ``int | None`` or ``list[float]``."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        (tp,) = args
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (elem, *_rest) = typing.get_args(tp)
        return elem, True, optional
    return tp, False, optional


def options_of(cls: type) -> dict[str, Option]:
    """Every declared option of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None:
            continue
        base, is_list, optional = _parse_type(hints[f.name])
        if base not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: options are int, float, str or bool (or lists of them)")
        default = f.default if f.default is not MISSING else (
            f.default_factory if f.default_factory is not MISSING else None)
        out[f.name] = Option(f.name, base, is_list, optional, spec, default)
    return out


def check_all(obj: Any, where: dict[str, str] | None = None) -> None:
    """Check every declared option of a dataclass instance (OptionError on the first bad one)."""
    where = where or {}
    for name, opt in options_of(type(obj)).items():
        opt.check(getattr(obj, name), where.get(name, ""))


#: A key echoed back in an error looks like a key name; anything else is counted, never printed.
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def close_key(key: object, known: Iterable[str]) -> str | None:
    """The declared key `key` is probably a misspelling of, or None."""
    close = difflib.get_close_matches(str(key)[:100], list(known), n=1)
    return close[0] if close else None


def unknown_keys_error(unknown: Iterable[str], known: Iterable[str], what: str, where: str) -> OptionError:
    """``unknown config key(s) in x.yaml: num_layer (did you mean num_layers?)``. Keys that do not look
    like key names (control characters, long lines of some other file) are counted, not shown."""
    known, unknown = list(known), list(unknown)
    names = sorted(str(k) for k in unknown if _KEY_NAME.fullmatch(str(k)))
    others = len(unknown) - len(names)
    parts = []
    for key in names[:10]:
        close = close_key(key, known)
        parts.append(f"{key} (did you mean {close}?)" if close else key)
    if len(names) > 10:
        parts.append(f"... ({len(names)} in all)")
    if others:
        parts.append(f"{others} key(s) that are not key names (not shown)")
    return OptionError(f"{what}{f' in {where}' if where else ''}: {', '.join(parts)}")


# ---------------------------------------------------------------------- command line


def _argparse_help(opt: "Option") -> str:
    """The option's help for argparse, which formats help text with ``%`` (``%(default)s``):
    a literal percent sign (a "95% interval") is doubled."""
    return opt.help_text().replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, *, typed: bool = True, dest_prefix: str = "",
                  spelling: str = "dash", only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
    """Add the declared options of `cls` to an argparse parser (or argument group).

    `typed=True`: argparse coerces and checks each value (`Option.parse`) and the defaults are the
    declared ones, so the parsed namespace holds ready values. `typed=False`: values stay strings and
    the default is None ("not given"), to be merged with a YAML file and checked there.
    Every option gets both spellings, ``--run-id`` and ``--run_id``; `spelling` ("dash", "underscore",
    "both" = underscore first) says which --help shows first.
    """
    chosen = options_of(cls)
    names = list(only) if only is not None else [n for n in chosen if n not in set(exclude)]
    for name in names:
        opt = chosen[name]
        if not opt.spec.cli:
            continue
        dest = dest_prefix + name
        if opt.spec.positional:
            parser.add_argument(dest, help=_argparse_help(opt), metavar=opt.spec.metavar or name,
                                **({"type": _argparse_type(opt, element=False)} if typed else {}))
            continue
        flags = _flag_names(name, spelling)
        if opt.spec.switch:
            parser.add_argument(*flags, dest=dest, action="store_true", help=_argparse_help(opt))
            continue
        kwargs: dict[str, Any] = {"dest": dest, "metavar": opt.metavar(), "help": _argparse_help(opt)}
        custom = dict(opt.spec.cli_kwargs)
        if opt.is_list and "nargs" not in custom:
            kwargs["nargs"] = "+"
            if typed:
                kwargs["action"] = _ListAction
        elif opt.base is bool:  # `--flag` alone means true
            kwargs.update(nargs="?", const=True if typed else "true")
        if typed:
            kwargs["type"] = _argparse_type(opt, element=opt.is_list, split="nargs" not in custom)
            kwargs["default"] = opt.default_value()
        else:
            kwargs["default"] = None
        if opt.spec.required:
            kwargs["required"] = True
        kwargs.update(custom)
        parser.add_argument(*flags, **kwargs)


def _flag_names(name: str, spelling: str) -> list[str]:
    """Both spellings are always accepted (a researcher types ``--max-tokens-per-head`` as readily as the
    config key ``--max_tokens_per_head``); `spelling` picks the one --help shows first."""
    dashed, under = "--" + name.replace("_", "-"), "--" + name
    if dashed == under:
        return [under]
    return [dashed, under] if spelling == "dash" else [under, dashed]


def unknown_flags_message(unknown: Iterable[str], flags: Iterable[str]) -> str:
    """``unrecognized arguments: --max-token (did you mean --max-tokens-per-head?)``: each unknown
    ``--flag`` (its value after ``=`` ignored) with the closest flag of the command, as YAML typos get."""
    flags = [f for f in flags if f.startswith("--")]
    parts = []
    for word in unknown:
        close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6) \
            if word.startswith("--") else []
        parts.append(f"{word} (did you mean {close[0]}?)" if close else word)
    return "unrecognized arguments: " + " ".join(parts)


def _argparse_type(opt: Option, element: bool, split: bool = True) -> Callable[[str], Any]:
    """An argparse `type=`: one command-line token, coerced and checked; for a list, the token's items
    (``--metrics entropy,k_eff`` or ``--metrics entropy k_eff``, joined by `_ListAction`)."""
    single = dataclasses.replace(opt, is_list=False) if element else opt

    def one(text: str) -> Any:
        value = single.coerce(text, "command line")
        if single.spec.choices is not None or single.base in (int, float) or single.spec.check:
            single.check(value, "command line")
        return value

    def convert(text: str) -> Any:
        try:
            return [one(item) for item in opt.split(text)] if element and split else one(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = opt.type_words()
    return convert


class _ListAction(argparse.Action):
    """Stores a list option's items from all its tokens (each converted to a list), replacing the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for token in values for item in token])


# ---------------------------------------------------------------------- documentation


def markdown_table(cls: type) -> str:
    """| key | default | accepts | what | table of the declared options of `cls` (README, docs)."""
    rows = ["| key | default | accepts | what |", "|---|---|---|---|"]
    for opt in options_of(cls).values():
        cells = [f"`{opt.name}`", opt.default_words(), opt.accepted(), opt.spec.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    if isinstance(v, str):
        return repr(v) if (v == "" or v != v.strip() or any(c in v for c in ",|\n")) else v
    return str(v)


def _bounds_text(spec: Spec) -> str:
    lo = (spec.gt, "(") if spec.gt is not None else (spec.ge, "[") if spec.ge is not None else None
    hi = (spec.lt, ")") if spec.lt is not None else (spec.le, "]") if spec.le is not None else None
    if lo and hi:
        return f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
    if lo:
        return f"{'>' if lo[1] == '(' else '>='} {_num(lo[0])}"
    if hi:
        return f"{'<' if hi[1] == ')' else '<='} {_num(hi[0])}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _in_bounds(v: float, spec: Spec) -> bool:
    return not ((spec.gt is not None and not v > spec.gt) or (spec.ge is not None and not v >= spec.ge)
                or (spec.lt is not None and not v < spec.lt) or (spec.le is not None and not v <= spec.le))
