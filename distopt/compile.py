"""Compiled owner maths: ``@kernel`` marks a pure tensor function that runs under ``torch.compile`` while the owner
route has compilation on (``compiling(True)``), and eagerly otherwise.

Compilation is per function and lazy; shapes are those of whole matrices, which do not change between steps, so a
warm run does not recompile (``dynamic=None`` lets torch mark a dimension dynamic when it sees a second shape,
instead of compiling once per shape). Collectives never run inside a compiled region.
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

_ENABLED = contextvars.ContextVar("distopt_compile", default=False)
#: Environment switch for whole runs: ``DISTOPT_COMPILE=0`` turns compilation off where the constructor did not
#: decide (``compile=None``).
ENV_VAR = "DISTOPT_COMPILE"


def default_enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off", "")


def enabled() -> bool:
    """Whether ``@kernel`` functions compile here (inside the owner route with compilation on)."""
    return _ENABLED.get()


@contextmanager
def compiling(enabled: bool) -> Iterator[None]:
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def kernel(fn: F) -> F:
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _ENABLED.get():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=None))
        return compiled[0](*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
