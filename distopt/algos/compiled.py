"""One compiled pass over a param group's local tensors for each elementwise algorithm (the default step when
compilation is on; ``compile=False`` or ``DISTOPT_COMPILE=0`` keeps the eager, torch-bitwise arithmetic).

Each kernel is the algorithm's arithmetic written over lists of tensors, with every number that changes between
steps (lr, bias corrections, schedules) in one float64 tensor, so that a scheduler or the step count never causes a
recompilation: ``torch.compile`` sees one static graph per group and fuses each tensor's update into one loop over
memory (as torch's fused kernels and HeavyBall's compiled steps do). The graph is specialized on the list's length,
shapes and dtypes, which do not change between steps of a group.

The compiled arithmetic rounds differently from the eager one (bias corrections folded into scalars, products in
another order): a few float32 units per step, measured in ``tests/test_compiled.py``. Steps that the kernels do not
cover (ADOPT's and SGD's first, complex tensors, a group spread over devices or dtypes, ``fused=True``) run eagerly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .ademamix import alpha_at, beta3_at

_COMPILED: dict[str, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    name = fn.__name__
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[name]


# ----------------------------------------------------------------------------------------------------------------
# Kernels: lists of local tensors, ``s`` the float64 scalars, ``flags`` a tuple of Python bools (static).

def _decayed(p, g, lr, weight_decay, decoupled, decays):
    """Weight decay as torch.optim applies it: decoupled on the parameter, or L2 on the gradient (returned)."""
    if decays and decoupled:
        p.mul_(1 - lr * weight_decay)
    elif decays:
        g = g + weight_decay * p
    return g


def adam_kernel(ps, gs, ms, vs, maxs, s, flags):
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt = s.unbind(0)
    maximize, decoupled, amsgrad, decays = flags
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        g = -g if maximize else g
        g = _decayed(p, g, lr, weight_decay, decoupled, decays)
        m.lerp_(g, 1 - beta1)
        v.copy_(v * beta2 + (1 - beta2) * g * g)
        second = v
        if amsgrad:
            maxs[i].copy_(torch.maximum(maxs[i], v))
            second = maxs[i]
        p.sub_(lr / bias_correction1 * m / (second.sqrt() / bias_correction2_sqrt + eps))


def nadam_kernel(ps, gs, ms, vs, mu_products, s, flags):
    lr, beta1, beta2, eps, weight_decay, bias_correction2, mu, mu_next = s.unbind(0)
    maximize, decoupled, decays = flags
    for p, g, m, v, mu_product in zip(ps, gs, ms, vs, mu_products):
        g = -g if maximize else g
        g = _decayed(p, g, lr, weight_decay, decoupled, decays)
        mu_product.copy_(mu_product * mu)
        m.lerp_(g, 1 - beta1)
        v.copy_(v * beta2 + (1 - beta2) * g * g)
        denom = (v / bias_correction2).sqrt() + eps
        product = mu_product.to(s.dtype)
        p.sub_(lr * (1 - mu) / (1 - product) * g / denom + lr * mu_next / (1 - product * mu_next) * m / denom)


def rmsprop_kernel(ps, gs, squares, averages, buffers, s, flags):
    lr, alpha, eps, weight_decay, momentum = s.unbind(0)
    maximize, centered, with_momentum, decays = flags
    for i, (p, g, square) in enumerate(zip(ps, gs, squares)):
        g = -g if maximize else g
        if decays:
            g = g + weight_decay * p
        square.copy_(square * alpha + (1 - alpha) * g * g)
        if centered:
            averages[i].lerp_(g, 1 - alpha)
            avg = (square - averages[i] * averages[i]).sqrt() + eps
        else:
            avg = square.sqrt() + eps
        if with_momentum:
            buffers[i].copy_(buffers[i] * momentum + g / avg)
            p.sub_(lr * buffers[i])
        else:
            p.sub_(lr * g / avg)


def lion_kernel(ps, gs, ms, s, flags):
    lr, beta1, beta2, weight_decay = s.unbind(0)
    (maximize,) = flags
    for p, g, m in zip(ps, gs, ms):
        g = -g if maximize else g
        direction = torch.lerp(m, g, 1 - beta1).sign()
        p.copy_(p * (1 - lr * weight_decay) - lr * direction)
        m.lerp_(g, 1 - beta2)


def laprop_kernel(ps, gs, ms, vs, s, flags):
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2 = s.unbind(0)
    (maximize,) = flags
    for p, g, m, v in zip(ps, gs, ms, vs):
        g = -g if maximize else g
        v.copy_(v * beta2 + (1 - beta2) * g * g)
        m.lerp_(g / ((v / bias_correction2).sqrt() + eps), 1 - beta1)
        p.copy_(p * (1 - lr * weight_decay) - lr / bias_correction1 * m)


def adopt_kernel(ps, gs, ms, vs, s, flags):
    lr, beta1, beta2, eps, weight_decay, bound = s.unbind(0)
    maximize, decoupled, clip, decays = flags
    for p, g, m, v in zip(ps, gs, ms, vs):
        g = -g if maximize else g
        g = _decayed(p, g, lr, weight_decay, decoupled, decays)
        normed = g / v.sqrt().clamp(min=eps)
        if clip:
            normed = normed.clamp(-bound, bound)
        m.lerp_(normed, 1 - beta1)
        p.sub_(lr * m)
        v.copy_(v * beta2 + (1 - beta2) * g * g)


def ademamix_kernel(ps, gs, ms, slows, vs, s, flags):
    lr, beta1, beta2, beta3, alpha, eps, weight_decay, bias_correction1, bias_correction2_sqrt = s.unbind(0)
    maximize, decays = flags
    for p, g, m, slow, v in zip(ps, gs, ms, slows, vs):
        g = -g if maximize else g
        m.lerp_(g, 1 - beta1)
        slow.lerp_(g, 1 - beta3)
        v.copy_(v * beta2 + (1 - beta2) * g * g)
        direction = (m / bias_correction1 + alpha * slow) / (v.sqrt() / bias_correction2_sqrt + eps)
        p.sub_(lr * (direction + weight_decay * p) if decays else lr * direction)


def sgd_kernel(ps, gs, buffers, s, flags):
    lr, momentum, dampening, weight_decay = s.unbind(0)
    maximize, with_momentum, nesterov, decays = flags
    for i, (p, g) in enumerate(zip(ps, gs)):
        g = -g if maximize else g
        if decays:
            g = g + weight_decay * p
        if with_momentum:
            buffers[i].copy_(buffers[i] * momentum + (1 - dampening) * g)
            g = g + momentum * buffers[i] if nesterov else buffers[i]
        p.sub_(lr * g)


def radam_kernel(ps, gs, ms, vs, s, flags):
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, rect = s.unbind(0)
    maximize, decoupled, decays, rectified = flags
    for p, g, m, v in zip(ps, gs, ms, vs):
        g = -g if maximize else g
        g = _decayed(p, g, lr, weight_decay, decoupled, decays)
        m.lerp_(g, 1 - beta1)
        v.copy_(v * beta2 + (1 - beta2) * g * g)
        corrected = m / bias_correction1
        if rectified:
            p.sub_(corrected * lr * (bias_correction2_sqrt / (v.sqrt() + eps)) * rect)
        else:
            p.sub_(corrected * lr)


def adamax_kernel(ps, gs, ms, infs, s, flags):
    lr, beta1, beta2, eps, weight_decay, bias_correction = s.unbind(0)
    maximize, decays = flags
    for p, g, m, inf in zip(ps, gs, ms, infs):
        g = -g if maximize else g
        if decays:
            g = g + weight_decay * p
        m.lerp_(g, 1 - beta1)
        inf.copy_(torch.maximum(inf * beta2, g.abs() + eps))
        p.sub_(lr / bias_correction * m / inf)


def adagrad_kernel(ps, gs, sums, s, flags):
    clr, weight_decay, eps = s.unbind(0)
    maximize, decays = flags
    for p, g, total in zip(ps, gs, sums):
        g = -g if maximize else g
        if decays:
            g = g + weight_decay * p
        total.add_(g * g)
        p.sub_(clr * g / (total.sqrt() + eps))


def adadelta_kernel(ps, gs, squares, deltas, s, flags):
    lr, rho, eps, weight_decay = s.unbind(0)
    maximize, decays = flags
    for p, g, square, acc in zip(ps, gs, squares, deltas):
        g = -g if maximize else g
        if decays:
            g = g + weight_decay * p
        square.copy_(square * rho + (1 - rho) * g * g)
        delta = (acc + eps).sqrt() / (square + eps).sqrt() * g
        acc.copy_(acc * rho + (1 - rho) * delta * delta)
        p.sub_(lr * delta)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def _scalars(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=like.device)


def _lists(states: list[dict[str, Tensor]], *keys: str) -> list[list[Tensor]]:
    return [[state[key] for state in states] if key else [] for key in keys]


def run(algorithm: Any, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
        hp: Mapping[str, Any], call: Callable[[Callable], Callable] | None = None) -> list[int]:
    """Run the compiled pass of ``algorithm`` over the tensors it covers; return the indices left to the eager
    step (all of them if this algorithm or group has no compiled pass). ``call(kernel)`` gives the function that
    runs a kernel (a fused step over stored forms: :mod:`distopt.precision.fused`)."""
    name = algorithm.name
    call = call or _compiled
    # Exactly the built-in classes: a subclass may override the maths that the kernel would replace.
    if PLANS.get(name, (None,))[0] is not type(algorithm) or hp.get("fused"):
        return list(range(len(params)))
    first = params[0]
    if any(p.device != first.device or p.dtype != first.dtype or torch.is_complex(p) or g.dtype != p.dtype
           for p, g in zip(params, grads)) or not first.is_floating_point():
        return list(range(len(params)))
    steps = [int(state["step"]) + 1 for state in states]
    # 0-d tensors step eagerly: inductor drops the in-place update of a 0-d float64 input (measured: such a
    # parameter never moved), and they are too small for a compiled pass to matter.
    eager = [i for i, step in enumerate(steps) if (step == 1 and name in FIRST_STEP_EAGER) or params[i].dim() == 0]
    by_step: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        if i not in eager:
            by_step.setdefault(step, []).append(i)
    for step, indices in by_step.items():
        ps, gs, ss = [params[i] for i in indices], [grads[i] for i in indices], [states[i] for i in indices]
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                PLANS[name][1](algorithm, ps, gs, ss, hp, step, call)
        except KeyError:
            # State without a key the kernel needs (momentum switched on after the first step): the eager step
            # raises the error that explains it.
            eager += indices
            continue
        except Exception as error:
            if not _is_compiler_error(error):
                raise
            # The graph failed to compile, so none of it ran: the eager step does these tensors.
            _warn_once(name, error)
            eager += indices
            continue
        for state in ss:
            state["step"] += 1
    return eager


#: Graphs one kernel may compile in a process (one per group composition, and per set of tensors stepped together);
#: torch's default of 8 is shared by every optimizer of the process. Past it, the eager step runs, with a warning.
RECOMPILE_LIMIT = 64
_WARNED: set[str] = set()


def _is_compiler_error(error: BaseException) -> bool:
    return (isinstance(error, torch._dynamo.exc.TorchDynamoException)
            or type(error).__module__.startswith(("torch._dynamo", "torch._inductor")))


def _warn_once(name: str, error: BaseException) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"distopt: the compiled pass of {name} could not compile ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); these steps run eagerly", stacklevel=3)


FIRST_STEP_EAGER = {"adopt", "sgd"}  # ADOPT's first step only fills v; SGD's seeds the buffer with the gradient


def _adam(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    decoupled = algorithm.decoupled_decay(hp)
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], 1 - beta1**step,
                  math.sqrt(1 - beta2**step)], ps[0])
    ms, vs, maxs = _lists(ss, "exp_avg", "exp_avg_sq", "max_exp_avg_sq" if hp["amsgrad"] else "")
    call(adam_kernel)(ps, gs, ms, vs, maxs, s, (hp["maximize"], decoupled, hp["amsgrad"],
                                                                 hp["weight_decay"] != 0))


def _nadam(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    decay = hp["momentum_decay"]
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], 1 - beta2**step, mu, mu_next],
                 ps[0])
    ms, vs, products = _lists(ss, "exp_avg", "exp_avg_sq", "mu_product")
    call(nadam_kernel)(ps, gs, ms, vs, products, s, (hp["maximize"], hp["decoupled_weight_decay"],
                                                                   hp["weight_decay"] != 0))


def _rmsprop(algorithm, ps, gs, ss, hp, step, call):
    s = _scalars([float(hp["lr"]), hp["alpha"], hp["eps"], hp["weight_decay"], hp["momentum"]], ps[0])
    squares, averages, buffers = _lists(ss, "square_avg", "grad_avg" if hp["centered"] else "",
                                        "momentum_buffer" if hp["momentum"] > 0 else "")
    call(rmsprop_kernel)(ps, gs, squares, averages, buffers, s,
                              (hp["maximize"], hp["centered"], hp["momentum"] > 0, hp["weight_decay"] != 0))


def _lion(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["weight_decay"]], ps[0])
    call(lion_kernel)(ps, gs, _lists(ss, "exp_avg")[0], s, (hp["maximize"],))


def _laprop(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], 1 - beta1**step, 1 - beta2**step],
                 ps[0])
    ms, vs = _lists(ss, "exp_avg", "exp_avg_sq")
    call(laprop_kernel)(ps, gs, ms, vs, s, (hp["maximize"],))


def _adopt(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], (step - 1) ** 0.25], ps[0])
    ms, vs = _lists(ss, "exp_avg", "exp_avg_sq")
    call(adopt_kernel)(ps, gs, ms, vs, s, (hp["maximize"], hp["decouple"], hp["clip"],
                                                       hp["weight_decay"] != 0))


def _ademamix(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2, beta3 = hp["betas"]
    s = _scalars([float(hp["lr"]), beta1, beta2, beta3_at(step, beta1, beta3, hp["beta3_warmup"]),
                  alpha_at(step, hp["alpha"], hp["alpha_warmup"]), hp["eps"], hp["weight_decay"], 1 - beta1**step,
                  math.sqrt(1 - beta2**step)], ps[0])
    ms, slows, vs = _lists(ss, "exp_avg", "exp_avg_slow", "exp_avg_sq")
    call(ademamix_kernel)(ps, gs, ms, slows, vs, s, (hp["maximize"], hp["weight_decay"] != 0))


def _sgd(algorithm, ps, gs, ss, hp, step, call):
    momentum = hp["momentum"]
    s = _scalars([float(hp["lr"]), momentum, hp["dampening"], hp["weight_decay"]], ps[0])
    buffers = _lists(ss, "momentum_buffer" if momentum != 0 else "")[0]
    call(sgd_kernel)(ps, gs, buffers, s, (hp["maximize"], momentum != 0, hp["nesterov"],
                                                        hp["weight_decay"] != 0))


def _radam(algorithm, ps, gs, ss, hp, step, call):
    from .radam import _rectification
    beta1, beta2 = hp["betas"]
    rho_t, rect = _rectification(beta2, step)
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], 1 - beta1**step,
                  (1 - beta2**step) ** 0.5, rect], ps[0])
    ms, vs = _lists(ss, "exp_avg", "exp_avg_sq")
    call(radam_kernel)(ps, gs, ms, vs, s, (hp["maximize"], hp["decoupled_weight_decay"], hp["weight_decay"] != 0,
                                                 rho_t > 5.0))


def _adamax(algorithm, ps, gs, ss, hp, step, call):
    beta1, beta2 = hp["betas"]
    s = _scalars([float(hp["lr"]), beta1, beta2, hp["eps"], hp["weight_decay"], 1 - beta1**step], ps[0])
    ms, infs = _lists(ss, "exp_avg", "exp_inf")
    call(adamax_kernel)(ps, gs, ms, infs, s, (hp["maximize"], hp["weight_decay"] != 0))


def _adagrad(algorithm, ps, gs, ss, hp, step, call):
    s = _scalars([float(hp["lr"]) / (1 + (step - 1) * hp["lr_decay"]), hp["weight_decay"], hp["eps"]], ps[0])
    call(adagrad_kernel)(ps, gs, _lists(ss, "sum")[0], s, (hp["maximize"], hp["weight_decay"] != 0))


def _adadelta(algorithm, ps, gs, ss, hp, step, call):
    s = _scalars([float(hp["lr"]), hp["rho"], hp["eps"], hp["weight_decay"]], ps[0])
    squares, deltas = _lists(ss, "square_avg", "acc_delta")
    call(adadelta_kernel)(ps, gs, squares, deltas, s, (hp["maximize"], hp["weight_decay"] != 0))


def _plans() -> dict[str, tuple[type, Callable]]:
    from .adadelta import Adadelta
    from .adagrad import Adagrad
    from .adam import Adam, AdamW
    from .adamax import Adamax
    from .ademamix import AdEMAMix
    from .adopt import ADOPT
    from .laprop import LaProp
    from .lion import Lion
    from .nadam import NAdam
    from .radam import RAdam
    from .rmsprop import RMSprop
    from .sgd import SGD
    return {"adam": (Adam, _adam), "adamw": (AdamW, _adam), "nadam": (NAdam, _nadam), "rmsprop": (RMSprop, _rmsprop),
            "lion": (Lion, _lion), "laprop": (LaProp, _laprop), "adopt": (ADOPT, _adopt),
            "ademamix": (AdEMAMix, _ademamix), "sgd": (SGD, _sgd), "radam": (RAdam, _radam),
            "adamax": (Adamax, _adamax), "adagrad": (Adagrad, _adagrad), "adadelta": (Adadelta, _adadelta)}


PLANS = _plans()
