"""Spawn W processes joined in one process group (gloo on CPU, NCCL where W GPUs exist) and run test functions.

A :class:`RankPool` keeps its processes and process group alive between calls, so a test module pays for process
start-up and ``init_process_group`` once per world size instead of once per test. Rendezvous goes through a file in a
private temporary directory, so concurrent pytest-xdist workers never clash on a port.

A call fails when any rank raises (the message carries that rank's traceback), when a rank process dies, or when the
call runs past its timeout (a hang, such as a collective that some rank never joins). After a failure the pool is
torn down, because its ranks may be stuck in a collective, and the next call starts a fresh one.

Results and arguments travel pickled by copy (never through a queue's own tensor sharing, which moves storages into
shared memory behind the caller's back). Through :class:`Pools` (the ``ranks`` fixtures), a call in which a rank is
killed by a signal is reported as a warning with that rank's stderr and run once more on fresh processes: CI saw rare
heap corruption (glibc's ``malloc(): unaligned tcache chunk detected``) in long-lived ranks, in a different test each
time and never locally; a crash the call itself causes comes back on the second run and fails the test.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Wall-clock limit of one call; a hang turns into a failure after this.
DEFAULT_TIMEOUT_S = 180.0
#: How long the other ranks get to report after one rank failed, before the pool is killed.
FAILURE_GRACE_S = 5.0


class RankFailure(AssertionError):
    """One or more ranks raised, died or did not finish in time. ``killed``: the ranks a signal ended (rank: signal
    number), each with the start of its stderr."""

    def __init__(self, message: str, killed: dict[int, tuple[int, str]] | None = None):
        super().__init__(message)
        self.killed = killed or {}


def backend_available(backend: str, world_size: int) -> bool:
    if backend == "gloo":
        return dist.is_gloo_available()
    if backend == "nccl":
        return dist.is_nccl_available() and torch.cuda.device_count() >= world_size
    return False


def device() -> torch.device:
    """The device that the calling rank's tensors belong on."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_MESHES: dict = {}
_GROUPS: dict = {}


def mesh(device_type: str, shape: tuple[int, ...], mesh_dim_names: tuple[str, ...] | None = None):
    """A device mesh, made once per rank process and reused by every later test in this pool. Each new 2-D mesh
    creates process groups that live as long as the process (about 10 sockets and 6 threads per rank, measured),
    and a pool runs hundreds of tests: made per test, they pile up."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device_type, tuple(shape), mesh_dim_names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, tuple(shape), mesh_dim_names=mesh_dim_names)
    return _MESHES[key]


def group(key: str, make: Callable[[], Any]):
    """A process group made once per rank process by ``make()`` (a collective: every rank calls it the first time
    with the same ``key``), then reused, as :func:`mesh`."""
    if key not in _GROUPS:
        _GROUPS[key] = make()
    return _GROUPS[key]


def _to_bytes(value: Any) -> bytes:
    """``value`` pickled here and now, tensors by copy. A queue's own pickling would run later in its feeder thread
    and move each tensor's storage into shared memory in place (torch.multiprocessing's reduction): the old memory
    is freed while this process may still be using the tensor (the next test runs at once), which corrupted the
    heap of long-lived ranks (``malloc(): unaligned tcache chunk detected``, seen in CI)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _worker(rank: int, world_size: int, backend: str, init_file: str, tasks: Any, results: Any, parent: int,
            log_file: str) -> None:
    # A rank killed by a signal (an abort in a C++ thread) leaves no Python traceback: its stderr goes to a file that
    # the failure message quotes, with the Python stacks of every thread dumped on a fatal signal.
    log = open(log_file, "w", buffering=1)  # noqa: SIM115 - open for the life of the process
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # the harness asks for stacks on a hang
    # Two cores are shared by up to four ranks: more intra-op threads would only contend.
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=90))
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process is gone: do not linger
                break
            continue
        if task is None:
            break
        try:
            fn, args, kwargs = pickle.loads(task)
            outcome = (True, _to_bytes(fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure must reach the test with its traceback
            outcome = (False, traceback.format_exc())
        results.put((rank, *outcome))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class RankPool:
    """W worker processes in one process group, running functions sent to them."""

    def __init__(self, world_size: int, backend: str = "gloo"):
        if not backend_available(backend, world_size):
            raise RuntimeError(f"backend {backend} is not available for {world_size} ranks")
        self.world_size, self.backend = world_size, backend
        self._dir = tempfile.mkdtemp(prefix="distopt-pg-")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        init_file = os.path.join(self._dir, "rendezvous")
        self._procs = [ctx.Process(target=_worker, daemon=True, name=f"rank{rank}",
                                   args=(rank, world_size, backend, init_file, self._tasks[rank], self._results,
                                         os.getpid(), self._log(rank)))
                       for rank in range(world_size)]
        for proc in self._procs:
            proc.start()
        self.alive = True

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results, in rank order."""
        if not self.alive:
            raise RuntimeError("this pool was closed after a failure")
        task = _to_bytes((fn, args, kwargs))  # one copy for every rank, made before anything is sent
        for task_queue in self._tasks:
            task_queue.put(task)
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        failed_at = None
        while len(outcomes) < self.world_size:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + FAILURE_GRACE_S:
                break
            if now > deadline:
                break
            try:
                rank, ok, payload = self._results.get(timeout=0.2)
                outcomes[rank] = (ok, payload)
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead and failed_at is None:
                    failed_at = time.monotonic()
        failures = {rank: payload for rank, (ok, payload) in outcomes.items() if not ok}
        if not failures and len(outcomes) == self.world_size:
            return [pickle.loads(outcomes[rank][1]) for rank in range(self.world_size)]
        message = self._explain(fn, failures, outcomes, timeout)
        killed = {i: (-p.exitcode, self._crash_report(i)) for i, p in enumerate(self._procs)
                  if p.exitcode is not None and p.exitcode < 0}
        self.close(force=True)
        raise RankFailure(message, killed)

    def _log(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.stderr")

    def _stderr_tail(self, rank: int, limit: int = 4000, head: int = 1500) -> str:
        """The start of a rank's stderr (where a C++ abort says why) and its end (the stacks faulthandler dumped)."""
        try:
            with open(self._log(rank), errors="replace") as log:
                text = log.read()
        except OSError:
            return ""
        if len(text) <= head + limit:
            return text
        tail = text[-limit:] if limit else ""
        return f"{text[:head]}\n[... {len(text) - head - limit} characters ...]\n{tail}"

    def _crash_report(self, rank: int) -> str:
        """What glibc or faulthandler said first, and the stack of the thread that crashed (faulthandler's
        "Current thread" section), for the warning of a retried call."""
        text = self._stderr_tail(rank, limit=10**7, head=0)
        fatal = text.find("Fatal Python error")
        start = text.rfind("\n", 0, max(fatal - 300, 0)) + 1 if fatal >= 0 else 0
        current = text.find("Current thread")
        crashed = text[current:current + 2500] if current >= 0 else ""
        return f"{text[start:fatal + 60] if fatal >= 0 else text[:600]} ... {crashed}"

    def _explain(self, fn, failures, outcomes, timeout) -> str:
        name = getattr(fn, "__qualname__", repr(fn))
        lines = [f"{name} failed on {self.world_size} {self.backend} ranks"]
        for rank, tb in sorted(failures.items()):
            lines.append(f"--- rank {rank} raised:\n{tb}")
        missing = [rank for rank in range(self.world_size) if rank not in outcomes]
        if missing:
            dead = {i: p.exitcode for i, p in enumerate(self._procs) if p.exitcode not in (None, 0) and i in missing}
            if dead:
                lines.append(f"--- ranks that died: {dead} (rank: exit code)")
                for rank in dead:
                    lines.append(f"--- stderr of rank {rank} (first and last lines):\n{self._stderr_tail(rank)}")
            reason = "stopped waiting after another rank failed" if failures else f"timed out after {timeout:.0f} s"
            lines.append(f"--- ranks that did not finish ({reason}): {missing}")
            if not failures and not dead:
                lines.extend(self._stacks_of_hung_ranks(missing))
        return "\n".join(lines)

    def _stacks_of_hung_ranks(self, missing: list[int]) -> list[str]:
        for rank in missing:
            if self._procs[rank].is_alive():
                os.kill(self._procs[rank].pid, signal.SIGUSR1)
        time.sleep(1.0)
        return [f"--- where rank {rank} was (Python stacks):\n{self._stderr_tail(rank)}" for rank in missing]

    def close(self, force: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not force:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)


class Pools:
    """Pools by (world size, backend), made on first use and rebuilt after a failure."""

    def __init__(self) -> None:
        self._pools: dict[tuple[int, str], RankPool] = {}

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo",
            timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list:
        try:
            return self._pool(world_size, backend).run(fn, *args, timeout=timeout, **kwargs)
        except RankFailure as failure:
            if not failure.killed:
                raise
            # A rank ended by a signal (a C++ abort, such as glibc's heap checks) rather than by a Python error or
            # a hang: said loudly, then run once more on fresh processes. A crash that the test itself causes
            # comes back and fails it; one carried over from earlier work in the old processes does not.
            warnings.warn(f"{getattr(fn, '__qualname__', fn)} on {world_size} {backend} ranks: "
                          + "; ".join(f"rank {rank} killed by signal {signal_number}, its stderr began: {head!r}"
                                      for rank, (signal_number, head) in sorted(failure.killed.items()))
                          + "; ran it again on fresh rank processes", RuntimeWarning, stacklevel=2)
        return self._pool(world_size, backend).run(fn, *args, timeout=timeout, **kwargs)

    def _pool(self, world_size: int, backend: str) -> RankPool:
        key = (world_size, backend)
        pool = self._pools.get(key)
        if pool is None or not pool.alive:
            pool = self._pools[key] = RankPool(world_size, backend)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
