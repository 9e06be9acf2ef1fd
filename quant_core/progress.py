"""Progress and interruption inside long core loops (GPTQ columns, k-means iterations, searches,
optimisation steps, calibration calls).

The public verbs take ``on_progress(stage, done, total)``; while they run it is installed here and
every long loop calls :func:`report` at a fine grain (each call is cheap when nobody listens). A GUI
updates its progress bar from it and raises from it to stop the work (ComfyUI's Cancel): the
exception propagates out of the verb, leaving resumable work files as they were last saved.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

ProgressHook = Callable[[str, int, int], None]

_HOOK: ContextVar[ProgressHook | None] = ContextVar("ditq_progress", default=None)


def report(stage: str, done: int, total: int) -> None:
    """Tell the listener (if any) that ``done`` of ``total`` units of ``stage`` are finished."""
    hook = _HOOK.get()
    if hook is not None:
        hook(stage, done, total)


@contextmanager
def reporting(on_progress: ProgressHook | None) -> Iterator[None]:
    """Install ``on_progress`` for the duration (None keeps an outer listener)."""
    if on_progress is None:
        yield
        return
    token = _HOOK.set(on_progress)
    try:
        yield
    finally:
        _HOOK.reset(token)
