"""A tool's options as one dataclass, and the command-line flags made from it.

Each field is one option: its name (``calib_windows`` is ``--calib-windows``), its default, its
help (the attribute docstring under the field) and its value check (:func:`option`'s ``parse``,
else the field's type) are read from the field by :func:`add_options`, so an option is declared
once. A field holding another options dataclass embeds that tool's options (the frontier embeds
the planner's). A count of 0 or a negative learning rate is refused while the command line is
parsed, before a model is loaded, with one line that names the option and what it accepts.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not valid; give an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse ``type``: a finite number for which ``check`` holds, ``what`` saying which."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"{text} is not valid; give {what}")
        return value

    parse.__name__ = what
    return parse


positive_float = finite_float(lambda value: value > 0, "a finite number > 0")
non_negative_float = finite_float(lambda value: value >= 0, "a finite number >= 0")


def names_from(valid: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type``: comma-separated names, each one of ``valid``, each once, in the order given."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        if not names or set(names) - set(valid):
            raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(valid)}")
        return names

    parse.__name__ = f"names from {', '.join(valid)}"
    return parse


def index_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated layer indices or counts (integers >= 0), e.g. ``2,6,10``."""
    try:
        return [non_negative_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid; give comma-separated integers >= 0, e.g. 2,6,10"
        ) from None


class OneLineParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line (rc 2), like every other
    ``lp-fx`` error; ``--help`` still shows the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------- options as fields


def option(
    default: Any = MISSING, *, parse: Callable[[str], Any] | None = None, choices: Any = None,
    flags: tuple[str, ...] = (), metavar: str | None = None, action: str | None = None, nargs: str | None = None,
    group: str | None = None, exclusive: str | None = None, required: bool = False, factory: Any = MISSING,
    renames: dict[str, str] | None = None,
) -> Any:
    """A field that is a command-line option: ``parse`` turns the text into the value (and refuses
    a bad one); ``flags`` replace the ``--field-name`` flag; ``group`` titles a help section;
    fields with the same ``exclusive`` name are mutually exclusive (a ``required`` one: one of
    them must be given). A field whose default is an options dataclass embeds its options,
    ``renames`` giving some of them another name on this command line."""
    metadata = {"parse": parse, "choices": choices, "flags": flags, "metavar": metavar, "action": action,
                "nargs": nargs, "group": group, "exclusive": exclusive, "required": required, "renames": renames or {}}
    return field(default=default, default_factory=factory, metadata=metadata)


def docstrings(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases, each as one line."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                out[node.target.id] = " ".join(after.value.value.split())
    return out


def default_of(f: Field) -> Any:
    """A field's default value (a factory's product)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def flag_fields(cls: type, renames: dict[str, str] | None = None) -> list[tuple[Field, str, str]]:
    """``(field, help, name on the command line)`` of every option of ``cls``, embedded options
    dataclasses included (their fields, under their ``renames``)."""
    helps = docstrings(cls)
    out: list[tuple[Field, str, str]] = []
    for f in fields(cls):
        if is_dataclass(default_of(f)):
            out += flag_fields(type(default_of(f)), f.metadata.get("renames"))
        else:
            out.append((f, helps.get(f.name, ""), (renames or {}).get(f.name, f.name)))
    return out


def _embedded_defaults(cls: type) -> dict[str, Any]:
    """The defaults an embedding gives to its options (``field(factory=lambda: Options(x=1))``)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        value = default_of(f)
        if is_dataclass(value):
            renames = f.metadata.get("renames") or {}
            out.update({renames.get(g.name, g.name): getattr(value, g.name) for g in fields(value)})
            out.update(_embedded_defaults(type(value)))
    return out


def _argument(f: Field, help_text: str, name: str, default: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": name, "default": default, "help": help_text}
    action = meta.get("action") or ("store_true" if isinstance(default, bool) else None)
    if action:
        kwargs["action"] = action
    if action != "store_true":
        kwargs["type"] = meta.get("parse") or _type_of(default)
    for key in ("choices", "metavar", "nargs"):
        if meta.get(key) is not None:
            kwargs[key] = meta[key]
    if meta.get("required") and not meta.get("exclusive"):
        kwargs["required"] = True
    return tuple(meta.get("flags") or (f"--{name.replace('_', '-')}",)), kwargs


def _type_of(default: Any) -> Callable[[str], Any] | None:
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def flag_defaults(cls: type) -> dict[str, Any]:
    """The default of each option of ``cls`` by its name on the command line."""
    embedded = _embedded_defaults(cls)
    return {name: embedded.get(name, default_of(f)) for f, _, name in flag_fields(cls)}


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of ``cls`` (:func:`flag_fields`), with its default (:func:`flag_defaults`),
    its help and its check."""
    defaults = flag_defaults(cls)
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for f, help_text, name in flag_fields(cls):
        flags, kwargs = _argument(f, help_text, name, defaults[name])
        target = parser
        if f.metadata.get("group"):
            target = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if f.metadata.get("exclusive"):
            key = f.metadata["exclusive"]
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group(required=f.metadata.get("required", False))
            target = exclusive[key]
        target.add_argument(*flags, **kwargs)


def options_from(cls: type, args: argparse.Namespace, renames: dict[str, str] | None = None, **given: Any) -> Any:
    """An instance of ``cls`` from parsed flags (embedded options dataclasses filled alike); ``given``
    values win over the flags."""
    values = {}
    for f in fields(cls):
        name = (renames or {}).get(f.name, f.name)
        if f.name in given:
            values[f.name] = given[f.name]
        elif is_dataclass(default_of(f)):
            values[f.name] = options_from(type(default_of(f)), args, f.metadata.get("renames"))
        elif hasattr(args, name):
            values[f.name] = getattr(args, name)
    return cls(**values)
