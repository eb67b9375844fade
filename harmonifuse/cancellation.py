"""Stopping inference that nobody waits for any more.

A caller that may lose interest (the service: a client that disconnected, a request past its
deadline) runs the work inside :func:`cancel_when` with a check that returns a reason to stop, or
None to go on. The long loops of inference call :func:`checkpoint` between their steps: blocks
of a long recording, batches of segments, tasks, and every token of the beam search. Outside
:func:`cancel_when` a checkpoint costs one context-variable lookup and never raises.

The check travels in a :class:`contextvars.ContextVar`, so it belongs to the thread (or task)
that set it: the service's inference thread can be stopped while another caller's work in
another thread is not.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

StopCheck = Callable[[], "str | None"]

_check: contextvars.ContextVar[StopCheck | None] = contextvars.ContextVar("harmonifuse_stop_check", default=None)


class Cancelled(Exception):
    """The work was stopped at a checkpoint; the message says why."""


@contextlib.contextmanager
def cancel_when(check: StopCheck) -> Iterator[None]:
    """Within: :func:`checkpoint` raises :class:`Cancelled` once ``check()`` returns a reason."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)


def checkpoint() -> None:
    """Raise :class:`Cancelled` when the enclosing :func:`cancel_when` says to stop."""
    check = _check.get()
    if check is not None:
        reason = check()
        if reason:
            raise Cancelled(reason)
