"""Calls handled in the caller's task: which handlers may be, and their one step.

A persisted call costs two task switches: the caller's message wakes the server's
task, and the commit's callback wakes the caller. When the server's task is only
waiting for a message and its ``handle_call`` cannot suspend, the first is not
needed: the caller's task runs the handler itself, at once, exactly as the server's
task would have run it, and the server's task stays parked (`Activation.handle_inline`).

"Cannot suspend" is read from the handler's code, not guessed from its past: a
coroutine frame gives control back to trio only at a yield instruction (an ``await``,
``async with`` or ``async for`` compiles to one), so an ``async def`` whose code has
none runs from its first instruction to its ``return`` or ``raise`` in one
``send(None)``, with no checkpoint: no other task runs meanwhile, nothing can cancel
it, and whatever it reaches of trio it reaches as the server's task would (its
``contextvars`` are the server task's), but for what is tied to the task itself
(`trio.lowlevel.current_task`, a `trio.Lock` it acquires). A handler that awaits
anything is always handled by the server's task.
"""

from __future__ import annotations

import dis
import inspect
import types
import weakref
from collections.abc import Coroutine
from typing import Any

#: The instructions at which a frame can suspend: ``YIELD_FROM`` up to Python 3.10,
#: ``YIELD_VALUE`` (after ``SEND``) since 3.11.
_SUSPENDS = frozenset({"YIELD_VALUE", "YIELD_FROM"})

_checked: weakref.WeakKeyDictionary[types.CodeType, bool] = weakref.WeakKeyDictionary()


def cannot_suspend(hook: Any) -> bool:
    """Whether *hook*, a bound method, is an ``async def`` with no instruction that can
    suspend it. Anything else (a wrapper, a callable object, a generator-based
    coroutine, an async generator) is False: handled by the server's task."""
    if type(hook) is not types.MethodType:
        return False
    function = hook.__func__
    if type(function) is not types.FunctionType:
        return False
    code = function.__code__
    known = _checked.get(code)
    if known is None:
        known = _checked[code] = bool(code.co_flags & inspect.CO_COROUTINE) and not any(
            instruction.opname in _SUSPENDS for instruction in dis.get_instructions(code)
        )
    return known


def first_step(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run *coroutine* (of a handler that `cannot_suspend`) to its end; its result,
    or its exception. Called KeyboardInterrupt-protected, as a server task's
    handlers run (its task is): a Ctrl-C goes to the main task at its next
    checkpoint, never into the handler."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()  # unreachable for a checked handler; never left half run
    raise RuntimeError(f"{coroutine!r} suspended, though its code has no await")
