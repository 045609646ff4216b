"""Fixtures for multi-rank tests: ``ranks`` runs a function on W ranks of the parametrized backend."""

from __future__ import annotations

import pytest

from .harness import Pools, backend_available

BACKENDS = ("gloo", "nccl")


@pytest.fixture(scope="session")
def pools():
    shared = Pools()
    yield shared
    shared.close()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def skip_unless_available(backend: str, world_size: int) -> None:
    if not backend_available(backend, world_size):
        pytest.skip(f"{backend} needs {world_size} GPUs; {backend} is not available with that many here")


@pytest.fixture
def ranks(pools, backend):
    """``ranks(W, fn, *args)`` runs ``fn`` on W ranks and returns the per-rank results."""

    def run(world_size, fn, *args, **kwargs):
        skip_unless_available(backend, world_size)
        return pools.run(world_size, fn, *args, backend=backend, **kwargs)

    return run
