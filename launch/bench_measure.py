"""What the step benchmark measures besides time: collectives and the bytes they send, memory, the machine.

:class:`CollectiveCounter` is a dispatch mode that sees every collective any optimizer issues during a step, whether
it calls ``torch.distributed`` directly (``c10d`` ops) or through DTensor redistributions and functional collectives
(``_c10d_functional`` ops), so it counts distopt and the peers alike. It slows every op down, so it runs on an extra
step that is not timed.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

#: How a collective's input bytes become the bytes one rank sends to the others, under the bandwidth-optimal
#: algorithm of each kind (ring all-reduce/all-gather/reduce-scatter, direct all-to-all, pipelined broadcast).
_SENT_FRACTION: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_gather": lambda w: w - 1,
    "reduce_scatter": lambda w: (w - 1) / w,
    "one_to_all": lambda w: (w - 1) / w,
    "send": lambda w: 1.0,
    "none": lambda w: 0.0,
}

#: op name (``namespace::name``) -> (kind, the argument holding what this rank sends).
_COLLECTIVES: dict[str, tuple[str, str | None]] = {
    "c10d::allreduce_": ("all_reduce", "tensors"),
    "c10d::allreduce_coalesced_": ("all_reduce", "tensors"),
    "_c10d_functional::all_reduce": ("all_reduce", "input"),
    "_c10d_functional::all_reduce_": ("all_reduce", "input"),
    "_c10d_functional::all_reduce_coalesced": ("all_reduce", "inputs"),
    "_c10d_functional::all_reduce_coalesced_": ("all_reduce", "inputs"),
    "c10d::allgather_": ("all_gather", "input_tensors"),
    "c10d::allgather_coalesced_": ("all_gather", "input_list"),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", "inputs"),
    "c10d::_allgather_base_": ("all_gather", "input_tensor"),
    "_c10d_functional::all_gather_into_tensor": ("all_gather", "input"),
    "_c10d_functional::all_gather_into_tensor_out": ("all_gather", "input"),
    "_c10d_functional::all_gather_into_tensor_coalesced": ("all_gather", "inputs"),
    "c10d::reduce_scatter_": ("reduce_scatter", "input_tensors"),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs"),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", "input_tensor"),
    "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", "input"),
    "_c10d_functional::reduce_scatter_tensor_out": ("reduce_scatter", "input"),
    "_c10d_functional::reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs"),
    "c10d::alltoall_": ("all_to_all", "input_tensors"),
    "c10d::alltoall_base_": ("all_to_all", "input"),
    "_c10d_functional::all_to_all_single": ("all_to_all", "input"),
    "c10d::broadcast_": ("one_to_all", "tensors"),
    "_c10d_functional::broadcast": ("one_to_all", "input"),
    "_c10d_functional::broadcast_": ("one_to_all", "input"),
    "c10d::reduce_": ("one_to_all", "tensors"),
    "c10d::gather_": ("one_to_all", "input_tensors"),
    "c10d::scatter_": ("one_to_all", "input_tensors"),
    "c10d::send": ("send", "tensors"),
    "_c10d_functional::isend": ("send", "tensor"),
    "c10d::recv_": ("none", None),
    "c10d::recv_any_source_": ("none", None),
    "_c10d_functional::irecv": ("none", None),
    "c10d::barrier": ("none", None),
    "c10d::monitored_barrier_": ("none", None),
}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _all_to_all_sent(inputs, splits, world: int, rank: int) -> float:
    """Bytes an all-to-all sends to other ranks: its input less the part it keeps for itself."""
    if isinstance(inputs, (list, tuple)):  # one tensor per destination rank
        return _nbytes(inputs) - _nbytes(inputs[rank])
    total = _nbytes(inputs)
    if not splits or inputs.dim() == 0 or inputs.shape[0] == 0:
        return total * (world - 1) / world
    return total - total * int(splits[rank]) / inputs.shape[0]


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives issued inside the ``with`` block and the bytes this rank sends in them.

    DTensor ops are passed on to DTensor (``NotImplemented``) so that the collectives of their redistributions
    reach this mode too. The world size and rank are those of the default group, which all candidates use.
    """

    def __init__(self):
        super().__init__()
        self.calls, self.sent_bytes = 0, 0.0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        entry = _COLLECTIVES.get(func._schema.name)
        if entry is not None:
            self._count(func, entry, args, kwargs)
        return func(*args, **kwargs)

    def _count(self, func, entry, args, kwargs) -> None:
        kind, input_name = entry
        self.calls += 1
        if input_name is None or self.world == 1:
            return
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
        if kind == "all_to_all":
            self.sent_bytes += _all_to_all_sent(bound[input_name], bound.get("input_split_sizes"), self.world,
                                                self.rank)
        else:
            self.sent_bytes += _nbytes(bound[input_name]) * _SENT_FRACTION[kind](self.world)


def step_peak_bytes(step: Callable[[], object]) -> int | None:
    """Allocator high-water mark of one call of ``step`` above the memory in use when it starts, in bytes.

    On CPU there is no allocator peak counter, so this replays the allocation events the profiler records with
    ``profile_memory=True``. None where those events cannot be read (they come from a profiler internal).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def state_bytes(opt) -> int:
    """Bytes of optimizer state held on this rank (local shards of DTensors, whole owner-held tensors)."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            local = value.to_local() if isinstance(value, DTensor) else value
            if type(local) is not torch.Tensor and hasattr(local, "__tensor_flatten__"):
                # A tensor subclass (torchao's quantized states): what it holds, not what it appears to be.
                names, _ = local.__tensor_flatten__()
                return sum(walk(getattr(local, name)) for name in names)
            return local.numel() * local.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0
    return sum(walk(state) for state in opt.state.values())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_ms(dtype: torch.dtype, size: int = 512, repeats: int = 5) -> float:
    """Mean time of a ``size`` x ``size`` matmul in ``dtype`` after one warm-up, in ms."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats * 1e3


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "matmul_512_ms": {"float32": matmul_ms(torch.float32), "bfloat16": matmul_ms(torch.bfloat16)}}


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    ms = info["matmul_512_ms"]
    line = (f"{info['cpu']}, {info['cores']} cores, CPU capability {info['cpu_capability']}, torch {info['torch']}; "
            f"512x512 matmul: float32 {ms['float32']:.2f} ms, bfloat16 {ms['bfloat16']:.2f} ms; "
            f"load average {info['load_average_1min']:.2f} at start")
    if info["load_average_1min"] > 0.5 * (info["cores"] or 1):
        # Other work takes cores: a rank's multithreaded ops then wait for descheduled threads, W=1 most of all.
        line += " (busy machine: figures are noisy, multithreaded ranks suffer most; --threads 1 limits that)"
    return line
