"""From a live state to stored bytes and back: cattrs, then JSON."""

from __future__ import annotations

import json
from typing import Any

import cattrs
from cattrs.preconf.json import make_converter

from ._errors import StateEncodingError

_default_converter = make_converter()


def default_converter() -> cattrs.Converter:
    """The converter used when none is given: cattrs' JSON preconf converter."""
    return _default_converter


class Codec:
    """Encodes and decodes one server class's state, as declared by its type."""

    def __init__(self, state_type: Any, converter: cattrs.Converter | None = None) -> None:
        self.state_type = state_type
        self.converter = converter or _default_converter

    def encode(self, state: Any, where: str) -> bytes:
        """Return the stored form of *state*; `StateEncodingError` names *where* and why."""
        try:
            raw = self.converter.unstructure(state, unstructure_as=self.state_type)
        except Exception as exc:
            raise StateEncodingError(
                f"{where}: the state could not be unstructured by cattrs: {exc!r}. "
                "Give its type a cattrs hook (converter=...) or mark the field ephemeral."
            ) from exc
        try:
            return json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            path = _bad_path(raw, "$") or "$"
            raise StateEncodingError(
                f"{where}: the state cannot be stored as JSON at {path}: {exc}. "
                "Use a type cattrs converts (attrs classes, lists, dicts, str, numbers, "
                "datetime, enums...), register a hook (converter=...), or keep the "
                "value out of the stored state."
            ) from exc

    def decode(self, data: bytes) -> Any:
        """Return the live state stored as *data*; errors are cattrs' or JSON's."""
        return self.converter.structure(json.loads(data), self.state_type)


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
    if value is None or isinstance(value, str | int | float | bool):
        return ""
    return f"{path} ({type(value).__name__})"
