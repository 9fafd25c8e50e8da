"""What travels between cluster nodes: requests, replies and errors, as JSON.

A message's value (a request, a reply, `start` arguments) crosses as the JSON of its
unstructured form (cattrs, with the supervisor's converter): str, int, float, bool,
None, lists and dicts with str keys as they are; tuples stay tuples (so that
``case ("add", int(n))`` and a tuple reply mean the same on every node); anything
else (an attrs instance, bytes, a datetime) arrives unstructured (a dict, a str).
A value that cannot be encoded raises `MessageEncodingError` where it was sent.

Errors cross as data too: trio-pgs's own by name; a `RequestError` subclass by its
qualified name and arguments, rebuilt on the caller's node if that class is loaded
there (the same code runs on every node), else as a plain `RequestError` with the
same message. Nothing received is ever imported or evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import _errors as errors
from ._encoding import dumps, loads

#: The tag of a tuple (a dict with this one key), and of a dict whose keys could be
#: mistaken for a tag.
_TUPLE, _DICT = "\0t", "\0d"
_PLAIN = (str, int, bool, type(None))
#: The integers every JSON reader here takes (orjson's range).
_SMALLEST, _LARGEST = -(2**63), 2**64 - 1

Unstructure = Callable[[Any], Any]


def pack(value: Any, unstructure: Unstructure) -> Any:
    """*value* as plain JSON data (tuples tagged); `MessageEncodingError` if it has
    no JSON form."""
    try:
        return _pack(value, unstructure, 0)
    except errors.MessageEncodingError:
        raise
    except Exception as exc:
        raise errors.MessageEncodingError(
            f"{_short(value)} cannot be sent to another node: {exc}"
        ) from exc


def _pack(value: Any, unstructure: Unstructure, depth: int) -> Any:
    if depth > 200:
        raise errors.MessageEncodingError(f"{_short(value)} is nested too deeply")
    kind = type(value)
    if kind is int and not _SMALLEST <= value <= _LARGEST:
        raise errors.MessageEncodingError(
            f"the integer {_short(value)} is beyond 64 bits: it has no portable JSON form"
        )
    if kind is str:
        _check_text(value)
        return value
    if kind in _PLAIN:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise errors.MessageEncodingError(f"{value!r} has no JSON form")
        return value
    if kind is tuple:
        return {_TUPLE: [_pack(item, unstructure, depth + 1) for item in value]}
    if kind is list:
        return [_pack(item, unstructure, depth + 1) for item in value]
    if kind is dict:
        return _pack_dict(value, unstructure, depth)
    raw = unstructure(value)
    if raw is value or type(raw) not in (*_PLAIN, float, list, dict, tuple):
        raise errors.MessageEncodingError(
            f"{_short(value)} (a {kind.__qualname__}) has no JSON form: give the "
            "supervisor a cattrs converter that unstructures it, or send plain data"
        )
    return _pack(raw, unstructure, depth + 1)


def _pack_dict(value: dict[Any, Any], unstructure: Unstructure, depth: int) -> Any:
    packed = {}
    for name, item in value.items():
        if type(name) is not str:
            raise errors.MessageEncodingError(
                f"a dict key {name!r} is not a str: only str keys cross to another node"
            )
        _check_text(name)
        packed[name] = _pack(item, unstructure, depth + 1)
    return {_DICT: packed} if any(name.startswith("\0") for name in packed) else packed


def _check_text(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise errors.MessageEncodingError(
            f"{_short(text)} holds a lone surrogate: it is not text that UTF-8 can carry"
        ) from None


def unpack(data: Any) -> Any:
    """The value `pack` made *data* from (tuples back as tuples)."""
    kind = type(data)
    if kind is list:
        return [unpack(item) for item in data]
    if kind is dict:
        if len(data) == 1:
            if _TUPLE in data:
                return tuple(unpack(item) for item in data[_TUPLE])
            if _DICT in data:
                return {name: unpack(item) for name, item in data[_DICT].items()}
        return {name: unpack(item) for name, item in data.items()}
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode(message: dict[str, Any]) -> bytes:
    return dumps(message)


def decode(body: bytes) -> dict[str, Any]:
    """A message of the wire, which must be a JSON object (ValueError otherwise)."""
    message = loads(body)
    if not isinstance(message, dict):
        raise ValueError("a wire message must be a JSON object")
    return message


# -- errors ---------------------------------------------------------------------------

#: trio-pgs's errors that cross by name (with their message).
_BY_NAME: dict[str, type[errors.TrioPGSError]] = {
    cls.__name__: cls for cls in (
        errors.ServerNotFound, errors.ServerCrashed, errors.ServerQuarantined,
        errors.ActivationFailed, errors.PersistenceError, errors.OutcomeUnknown,
        errors.ConflictError, errors.StateEncodingError, errors.CallCycleError,
        errors.UnknownKind, errors.SupervisorNotRunning, errors.MessageEncodingError,
        errors.TrioPGSError,
    )
}


def pack_error(exc: BaseException, unstructure: Unstructure) -> dict[str, Any]:
    """*exc*, raised on this node for a remote caller, as data."""
    message = str(exc)
    cause = exc.__cause__
    if cause is not None and isinstance(exc, errors.ServerCrashed) and repr(cause) not in message:
        message = f"{message} (cause: {cause!r})"
    if isinstance(exc, errors.RequestError):
        cls = type(exc)
        try:
            args = pack(list(exc.args), unstructure)
            fields = pack(dict(vars(exc)), unstructure)
        except errors.MessageEncodingError:
            args = fields = None
        return {"type": "RequestError", "class": f"{cls.__module__}:{cls.__qualname__}",
                "args": args, "fields": fields, "message": message}
    if isinstance(exc, errors.AlreadyStarted):
        return {"type": "AlreadyStarted", "message": message}
    if isinstance(exc, errors.NodeUnavailable):
        return {"type": "NodeUnavailable", "message": message, "sent": exc.sent}
    for cls in type(exc).__mro__:
        if cls.__name__ in _BY_NAME and _BY_NAME[cls.__name__] is cls:
            return {"type": cls.__name__, "message": message}
    if type(exc) in (ValueError, TypeError):  # misuse (release of an active server...)
        return {"type": type(exc).__name__, "message": message}
    return {"type": "ServerCrashed", "message": f"{type(exc).__name__}: {message}"}


def unpack_error(data: Any, ref: Any, where: str) -> BaseException:
    """The error that *data* describes, for the caller of *ref* (on node *where*)."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return errors.NodeUnavailable(f"{ref}: node {where} answered garbage", sent=True)
    name, message = data.get("type"), data["message"]
    if name == "RequestError":
        return _request_error(data, message)
    if name == "AlreadyStarted":
        return errors.AlreadyStarted(message, ref)
    if name == "NodeUnavailable":
        return errors.NodeUnavailable(message, sent=bool(data.get("sent", True)))
    if name in ("ValueError", "TypeError"):
        return ValueError(message) if name == "ValueError" else TypeError(message)
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    return (cls or errors.ServerCrashed)(message)


def _request_error(data: dict[str, Any], message: str) -> errors.RequestError:
    """The error as the handler raised it: its class (if loaded here), its ``args``
    and its attributes, set as they were; its ``__init__`` is not run again (it may
    take other arguments than the ``args`` it passed on)."""
    wanted = data.get("class")
    found = _loaded_request_errors().get(wanted) if isinstance(wanted, str) else None
    args, fields = data.get("args"), data.get("fields")
    if found is None or not isinstance(args, list) or not isinstance(fields, dict):
        return errors.RequestError(message)
    try:
        error = found.__new__(found)
        error.args = tuple(unpack(args))
        error.__dict__.update(unpack(fields))
    except Exception:  # a class that cannot be made so: the plain form
        return errors.RequestError(message)
    return error


def _loaded_request_errors() -> dict[str, type[errors.RequestError]]:
    """Every subclass of `RequestError` defined so far, by ``module:qualname``."""
    found: dict[str, type[errors.RequestError]] = {}
    todo: list[type[errors.RequestError]] = [errors.RequestError]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}:{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found
