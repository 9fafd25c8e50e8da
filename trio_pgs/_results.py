"""What a handler returns: `Reply`, `NoReply` or `Stop` (`CallResult`, `CastResult`)."""

from __future__ import annotations

from typing import Any, Final, Generic, TypeAlias, TypeVar

import attrs

S = TypeVar("S")


class _NoReplyGiven:
    def __repr__(self) -> str:
        return "NO_REPLY"


#: Marker for a `Stop` that gives its caller no value (the caller gets ``None``).
NO_REPLY: Final = _NoReplyGiven()


@attrs.frozen
class Reply(Generic[S]):
    """Answer the call with *value* and continue with *state*.

    Only valid from `handle_call`. With ``persist=False`` the new state is not written.
    """

    value: Any
    state: S
    persist: bool = attrs.field(default=True, kw_only=True)


@attrs.frozen
class NoReply(Generic[S]):
    """Continue with *state*, answering nobody now.

    From `handle_call` this defers the reply: take `trio_pgs.current_caller()` and
    ``await caller.reply(value)`` later.
    """

    state: S
    persist: bool = attrs.field(default=True, kw_only=True)


@attrs.frozen
class Stop(Generic[S]):
    """Stop the server with *reason* after committing *state*.

    ``reason="normal"`` wipes the record; other reasons follow the restart table.
    A caller gets *reply* (``None`` if not given).
    """

    state: S
    reason: str = attrs.field(default="normal", kw_only=True)
    reply: Any = attrs.field(default=NO_REPLY, kw_only=True)
    persist: bool = attrs.field(default=True, kw_only=True)


#: What `handle_call` returns: ``Reply[S] | NoReply[S] | Stop[S]``. Annotate a handler
#: as ``async def handle_call(self, request: object, state: Player) ->
#: CallResult[Player]``.
CallResult: TypeAlias = Reply[S] | NoReply[S] | Stop[S]

#: What `handle_cast` and `handle_info` return: ``NoReply[S] | Stop[S]`` (a `Reply`
#: there is a crash, and a type error).
CastResult: TypeAlias = NoReply[S] | Stop[S]
