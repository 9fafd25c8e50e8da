"""Which state types lose their dict keys in JSON: a check made once, at registration.

JSON keeps a dict's keys as strings. The default converter reads ``"false"`` back as
`True` (``bool("false")``) and cannot read ``"null"`` as `None`: a state type with a
dict whose keys may be ``bool`` or ``None`` would commit states that come back
changed, or not at all. `check_keys` walks the declared type (attrs classes,
dataclasses, TypedDicts, generics with their type arguments, unions, NewTypes,
`Annotated`) and names the first such dict.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs


def check_keys(state_type: Any) -> None:
    """`TypeError` naming where *state_type* has a dict whose keys do not survive JSON:
    keys that may be ``bool`` or ``None`` (read back wrong), or of an enum or a
    `Literal` whose values are not all str (read back not at all); nothing if none."""
    walk = _Walk()
    path = walk.bad_keys(state_type, "$", {})
    if path is not None:
        raise TypeError(
            f"the state's dict at {path} has keys {walk.why}, which do not survive JSON "
            "(stored as strings, read back wrong or not at all); use str, int or a "
            "str-valued enum as keys, or give a converter of your own (converter=...)"
        )


class _Walk:
    """One walk of a type. It keeps every type it has looked at alive (and by its id,
    for recursive types): `typing.get_type_hints` makes new alias objects, and the id
    of a freed one is reused by the next."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, ...], Any] = {}
        #: What is wrong with the keys found (for the message).
        self.why = ""

    def bad_keys(self, tp: Any, path: str, env: dict[Any, Any]) -> str | None:
        if isinstance(tp, typing.TypeVar):
            tp = env.get(tp, Any)
        # A type met again under the same type arguments: a recursive one, or shared.
        key = (id(tp), *(id(value) for value in env.values()))
        if key in self.seen:
            return None
        self.seen[key] = (tp, env)
        supertype = getattr(tp, "__supertype__", None)  # a NewType
        if supertype is not None:
            return self.bad_keys(supertype, path, env)
        fields = _fields(tp)
        if fields is not None:
            return self._in_fields(tp, fields, path, _inherited(tp, {}))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is None or not args:
            return None
        if origin is typing.Annotated:
            return self.bad_keys(args[0], path, env)
        fields = _fields(origin)
        if fields is not None:  # a generic class with its type arguments: G[bool]
            parameters = getattr(origin, "__parameters__", ())
            arguments = (_resolved(arg, env) for arg in args)
            given = dict(zip(parameters, arguments, strict=False))
            return self._in_fields(origin, fields, path, _inherited(origin, given))
        if isinstance(origin, type) and issubclass(origin, Mapping):  # Counter[K] too
            return self._in_mapping(args, path, env)
        for arg in args:
            found = self.bad_keys(arg, f"{path}[...]", env)
            if found is not None:
                return found
        return None

    def _in_mapping(self, args: tuple[Any, ...], path: str, env: dict[Any, Any]) -> str | None:
        why = unreadable_key(_resolved(args[0], env))
        if why:
            self.why = why
            return path
        if len(args) < 2:
            return None
        return self.bad_keys(args[1], f"{path}[...]", env)

    def _in_fields(
        self, cls: Any, names: list[str], path: str, env: dict[Any, Any]
    ) -> str | None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # unresolvable annotations: cattrs will say so itself
            return None
        for name in names:
            found = self.bad_keys(hints.get(name, Any), f"{path}.{name}", env)
            if found is not None:
                return found
        return None


def _fields(tp: Any) -> list[str] | None:
    """The field names of an attrs class, a dataclass or a TypedDict; else None."""
    if not isinstance(tp, type):
        return None
    if attrs.has(tp):
        return [field.name for field in attrs.fields(tp)]
    if dataclasses.is_dataclass(tp):
        return [field.name for field in dataclasses.fields(tp)]
    if typing.is_typeddict(tp):
        return list(getattr(tp, "__annotations__", {}))
    return None


def _inherited(cls: type, env: dict[Any, Any]) -> dict[Any, Any]:
    """*env* with the type arguments *cls*'s generic bases give their parameters:
    ``class Votes(Flags[bool])`` makes ``Flags``'s ``K`` a bool in its fields."""
    found = dict(env)
    for base in getattr(cls, "__orig_bases__", ()):
        origin = typing.get_origin(base)
        parameters = getattr(origin, "__parameters__", ())
        arguments = [_resolved(arg, found) for arg in typing.get_args(base)]
        for parameter, argument in zip(parameters, arguments, strict=False):
            found.setdefault(parameter, argument)
        if isinstance(origin, type):
            found = _inherited(origin, found)
    return found


def _resolved(tp: Any, env: dict[Any, Any]) -> Any:
    return env.get(tp, Any) if isinstance(tp, typing.TypeVar) else tp


def unreadable_key(tp: Any) -> str:
    """What is wrong with *tp* as a dict's key type in JSON ("" if nothing)."""
    options = _options(tp)
    if any(_bool_or_none(option) for option in options):
        return "that may be bool or None"
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum) and not all(
            isinstance(member.value, str) for member in option
        ):
            return f"of an enum whose values are not all str ({option.__qualname__})"
        if typing.get_origin(option) is typing.Literal and not all(
            isinstance(value, str | enum.Enum) for value in typing.get_args(option)
        ):
            return "of a Literal whose values are not all str"
    return ""


def _options(tp: Any) -> list[Any]:
    """*tp*, or the members of a union, through NewTypes and `Annotated`."""
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:
        return _options(supertype)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _options(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [option for arg in typing.get_args(tp) for option in _options(arg)]
    return [tp]


def _bool_or_none(option: Any) -> bool:
    """Whether *option* (no union) may be ``bool`` or ``None``."""
    if option is bool or option is None or option is type(None):
        return True
    return typing.get_origin(option) is typing.Literal and any(
        value is None or isinstance(value, bool) for value in typing.get_args(option)
    )
