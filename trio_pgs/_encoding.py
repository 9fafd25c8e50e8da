"""From a live state to stored bytes and back: transformation, cattrs, JSON, migrations."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

try:  # the `orjson` extra: about 3 x faster encoding, the same bytes
    import orjson
except ImportError:  # pragma: no cover - depends on the installation
    orjson = None  # type: ignore[assignment]

import cattrs
from cattrs.preconf.json import make_converter

from ._errors import StateEncodingError
from ._json_keys import check_keys
from ._shaping import with_ephemeral_hooks

_default_converter = make_converter()

#: Which JSON library writes and reads states: "orjson" when installed, else "json".
JSON_BACKEND = "json" if orjson is None else "orjson"


def _dumps_json(raw: Any) -> bytes:
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _dumps_orjson(raw: Any) -> bytes:
    try:
        data: bytes = orjson.dumps(raw, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        return _dumps_json(raw)  # an int of 64 bits or more: the same bytes, slower
    # orjson writes NaN and infinities as null; the json backend refuses them. Keep
    # one behaviour: look for them only when a null was written. (`find`, not `in`:
    # bytes' `in` first tries its operand as an int, and costs twice as much.)
    if data.find(b"null") != -1 and _has_non_finite(raw):
        raise ValueError("Out of range float values are not JSON compliant")
    if len(data) < 2048:
        # orjson's result keeps its 4 KiB output buffer allocated, and an active
        # server holds its last committed bytes: an exact copy is a thousandth of that.
        # (Made by formatting: a sixth of the cost of bytes(memoryview(data)).)
        return b"%b" % data
    return data


def dumps(raw: Any) -> bytes:
    """The stored bytes of an unstructured state: compact JSON, UTF-8, no NaN."""
    return _dumps_orjson(raw) if JSON_BACKEND == "orjson" else _dumps_json(raw)


#: A number that orjson may not read exactly: it reads an int beyond 64 bits as a
#: float. Any run of 19 digits sends the bytes to the json module (a float's long
#: fraction, a string of digits too: read the same, only slower).
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def loads(data: bytes) -> Any:
    if JSON_BACKEND == "orjson" and _LONG_NUMBER.search(data) is None:
        return orjson.loads(data)
    return json.loads(data)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):  # keys too: orjson writes an infinite key as "null"
        return any(_has_non_finite(key) or _has_non_finite(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(item) for item in value)
    return False


class DecodingError(ValueError):
    """A stored state could not be turned back into a live one (the message says where)."""


class Codec:
    """Encodes and decodes one server class's state under one supervisor.

    The live state is transformed (``to_persisted``) if the class declares a persisted
    shape, unstructured by cattrs (ephemeral fields left out) and written as JSON.
    Decoding runs the migrations from the stored ``state_version`` to the class's.
    """

    def __init__(
        self,
        state_type: Any,
        converter: cattrs.Converter | None,
        state_version: int,
        migrations: Mapping[int, Callable[[Any], Any]],
        persisted_type: Any = None,
        to_persisted: Callable[[Any], Any] | None = None,
        from_persisted: Callable[[Any], Any] | None = None,
    ) -> None:
        self.converter = with_ephemeral_hooks(converter or _default_converter)
        self.stored_type = state_type if persisted_type is None else persisted_type
        if converter is None:  # a converter of the user's may have hooks for them
            check_keys(self.stored_type)
        self.state_version = state_version
        self.migrations = migrations
        self.to_persisted = to_persisted
        self.from_persisted = from_persisted

    def encode(self, state: Any, where: object) -> bytes:
        """Return the stored form of *state*; `StateEncodingError` names *where* (the
        server: formatted only then) and why."""
        try:
            if self.to_persisted is not None:
                state = self.to_persisted(state)
            raw = self.converter.unstructure(state, unstructure_as=self.stored_type)
        except Exception as exc:
            raise StateEncodingError(
                f"{where}: the state could not be unstructured: {exc!r}. Give its type a "
                "cattrs hook (converter=...) or mark the field ephemeral."
            ) from exc
        try:
            return dumps(raw)
        except (TypeError, ValueError) as exc:
            path = _bad_path(raw, "$") or "$"
            raise StateEncodingError(
                f"{where}: the state cannot be stored as JSON at {path}: {exc}. "
                "Use a type cattrs converts (attrs classes, lists, dicts, str, numbers, "
                "datetime, enums...), register a hook (converter=...), or keep the "
                "value out of the stored state (trio_pgs.ephemeral)."
            ) from exc

    def decode(self, data: bytes, stored_version: int, where: str) -> tuple[Any, bool]:
        """Return the live state stored as *data*, and whether it was migrated.

        Raises `DecodingError` naming *where*, the versions or the path of a bad field.
        """
        current = self.state_version
        if stored_version > current:
            raise DecodingError(
                f"{where}: the record is at state_version {stored_version}, newer than "
                f"this code's state_version {current}; run the newer code"
            )
        try:
            raw = loads(data)
        except ValueError as exc:
            raise DecodingError(f"{where}: the stored state is not JSON: {exc}") from exc
        for version in range(stored_version, current):
            step = self.migrations.get(version)
            if step is None:
                raise DecodingError(
                    f"{where}: the record is at state_version {stored_version}, the code at "
                    f"{current}, and there is no migration from version {version}; add "
                    f"migrations[{version}]"
                )
            try:
                raw = step(raw)
            except Exception as exc:
                raise DecodingError(
                    f"{where}: migration {version} -> {version + 1} raised {exc!r} "
                    f"(record at state_version {stored_version}, code at {current})"
                ) from exc
        try:
            state = self.converter.structure(raw, self.stored_type)
        except Exception as exc:
            details = "; ".join(cattrs.transform_error(exc))
            if raw is None and stored_version < current:  # the last migration's result
                details += f" (migration {current - 1} -> {current} returned None: no return?)"
            raise DecodingError(
                f"{where}: the stored state does not fit {_name(self.stored_type)}: {details}"
            ) from exc
        if self.from_persisted is not None:
            try:
                state = self.from_persisted(state)
            except Exception as exc:
                raise DecodingError(f"{where}: from_persisted raised {exc!r}") from exc
        return state, stored_version < current


def _name(cls: Any) -> str:
    return getattr(cls, "__qualname__", None) or repr(cls)


def _bad_path(value: Any, path: str) -> str:
    """Find where in an unstructured value JSON gives up, as ``$.field[3]``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path} (key {key!r})"
            found = _bad_path(item, f"{path}.{key}")
            if found:
                return found
        return ""
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _bad_path(item, f"{path}[{index}]")
            if found:
                return found
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} ({value}: JSON has no NaN or infinity)"
    if value is None or isinstance(value, str | int | float | bool):
        return ""
    return f"{path} ({type(value).__name__})"
