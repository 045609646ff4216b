"""Independent references: torch.optim configurations, and loops written straight from each paper.

The loops below share no code with distopt. They are written in the papers' notation, out of place, and are
meant to be run in float64 so that they serve as the ground truth for the maths.
"""

from __future__ import annotations

import math

import torch

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                    "nadam": torch.optim.NAdam, "rmsprop": torch.optim.RMSprop, "radam": torch.optim.RAdam,
                    "adamax": torch.optim.Adamax, "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta,
                    "adafactor": torch.optim.Adafactor}

# Configurations beyond torch's own (common_optimizers) that exercise every hyperparameter at least once.
_EXTRA = {
    "adam": [{"betas": (0.8, 0.95), "eps": 1e-6}, {"amsgrad": True}, {"weight_decay": 0.1,
             "decoupled_weight_decay": True}, {"lr": torch.tensor(0.01)}],
    "adamw": [{"betas": (0.5, 0.9), "weight_decay": 0.0}, {"amsgrad": True, "maximize": True, "eps": 1e-3}],
    "sgd": [{"momentum": 0.5, "nesterov": True}, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01,
            "maximize": True}],
    "nadam": [{"betas": (0.8, 0.95), "eps": 1e-4}, {"weight_decay": 0.1, "decoupled_weight_decay": True,
              "maximize": True}],
    "rmsprop": [{"alpha": 0.9, "eps": 1e-4}, {"momentum": 0.9}, {"centered": True, "alpha": 0.5}],
    "radam": [{"betas": (0.5, 0.9)}, {"betas": (0.9, 0.99), "weight_decay": 0.1, "decoupled_weight_decay": True,
               "maximize": True}],
    "adamax": [{"betas": (0.5, 0.9), "eps": 1e-3}],
    "adagrad": [{"eps": 1e-3, "initial_accumulator_value": 0.5, "lr_decay": 0.1, "maximize": True}],
    "adadelta": [{"rho": 0.5, "eps": 1e-3, "lr": 0.5}],
    "adafactor": [{"eps": (1e-6, 1e-2), "d": 2.0, "beta2_decay": -0.5, "maximize": True},
                  {"lr": 0.5, "weight_decay": 0.1}],
}


def torch_configs(name: str) -> list[tuple[str, dict]]:
    """torch's own configurations of an optimizer (from common_optimizers), plus ours; implementation switches
    (foreach, fused, capturable, differentiable) are dropped because they select kernels, not maths."""
    from torch.testing._internal.common_optimizers import optim_db

    info = next(i for i in optim_db if i.optim_cls is TORCH_OPTIMIZERS[name])
    configs = []
    for entry in info.optim_inputs_func(device="cpu", dtype=torch.float32):
        kwargs = {k: v for k, v in entry.kwargs.items()
                  if k not in ("foreach", "fused", "capturable", "differentiable")}
        configs.append((f"torch:{entry.desc}", kwargs))
    configs += [(f"extra:{i}", kwargs) for i, kwargs in enumerate(_EXTRA[name])]
    return configs


# ---------------------------------------------------------------------------------------------------------------
# Reference loops from the papers. Each takes the initial parameter and a list of gradients (maximize: ascent)
# and returns the parameter after every step.

def lion(p, grads, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """Chen et al. 2023, Algorithm 2."""
    b1, b2 = betas
    m = torch.zeros_like(p)
    out = []
    for g in grads:
        g = -g if maximize else g
        c = b1 * m + (1 - b1) * g
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = b2 * m + (1 - b2) * g
        out.append(p)
    return out


def laprop(p, grads, lr=4e-4, betas=(0.8, 0.99), eps=1e-15, weight_decay=0.0, maximize=False):
    """Ziyin et al. 2020, Algorithm 1 with bias correction; weight decay decoupled."""
    mu, nu = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = -g if maximize else g
        v = nu * v + (1 - nu) * g * g
        m = mu * m + (1 - mu) * g / (torch.sqrt(v / (1 - nu**t)) + eps)
        p = p - lr * weight_decay * p - lr * m / (1 - mu**t)
        out.append(p)
    return out


def adopt(p, grads, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False, clip=True,
          maximize=False):
    """Taniguchi et al. 2024, Algorithm 2 (clipped; clip=False gives Algorithm 1)."""
    b1, b2 = betas
    m = torch.zeros_like(p)
    v = None
    out = []
    for t, g in enumerate(grads):
        g = -g if maximize else g
        if t == 0:
            v = g * g
            out.append(p)
            continue
        if weight_decay:
            if decouple:
                p = p - lr * weight_decay * p
            else:
                g = g + weight_decay * p
        normed = g / torch.maximum(torch.sqrt(v), torch.full_like(v, eps))
        if clip:
            normed = normed.clamp(-t**0.25, t**0.25)
        m = b1 * m + (1 - b1) * normed
        p = p - lr * m
        v = b2 * v + (1 - b2) * g * g
        out.append(p)
    return out


def adamw_grams(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Grams, Cao et al. 2024 (arXiv 2412.17107), Algorithm 1 on AdamW: the Adam step's magnitude with the current
    gradient's sign, ``u = sign(g) |m̂ / (sqrt(v̂) + eps)|``, decoupled decay ``p (1 - lr wd)``."""
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        p = p * (1 - lr * weight_decay) - lr * torch.sign(g) * step.abs()
        out.append(p)
    return out


def laprop_atan2(p, grads, lr=4e-4, betas=(0.8, 0.99), weight_decay=0.0):
    """LaProp (Ziyin et al. 2020, Algorithm 1) with Adam-atan2's division (Everett et al. 2024, arXiv 2407.05872)
    in adv_optm's constants: the normalised gradient ``(4/π) atan2(g, sqrt(v̂))``, no eps."""
    b1, b2 = betas
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        v = b2 * v + (1 - b2) * g * g
        m = b1 * m + (1 - b1) * (4 / math.pi) * torch.atan2(g, (v / (1 - b2**t)).sqrt())
        p = p * (1 - lr * weight_decay) - lr * m / (1 - b1**t)
        out.append(p)
    return out


def ademamix(p, grads, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
             eps=1e-8, weight_decay=0.0, maximize=False):
    """Pagliardini et al. 2024, Algorithm 1 with the schedulers of Section 3."""
    b1, b2, b3_final = betas
    m1, m2, v = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = -g if maximize else g
        a = alpha if alpha_warmup is None else min(t * alpha / alpha_warmup, alpha)
        if beta3_warmup is None:
            b3 = b3_final
        else:
            x = t / beta3_warmup
            b3 = min(math.exp(math.log(b1) * math.log(b3_final)
                              / ((1 - x) * math.log(b3_final) + x * math.log(b1))), b3_final)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        v = b2 * v + (1 - b2) * g * g
        m1_hat, v_hat = m1 / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * ((m1_hat + a * m2) / (torch.sqrt(v_hat) + eps) + weight_decay * p)
        out.append(p)
    return out


PAPER_LOOPS = {"lion": lion, "laprop": laprop, "adopt": adopt, "ademamix": ademamix}

PAPER_CONFIGS = {
    "lion": [{}, {"lr": 1e-2, "betas": (0.95, 0.98), "weight_decay": 0.1}, {"maximize": True, "lr": 1e-3}],
    "laprop": [{}, {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}, {"maximize": True}],
    "adopt": [{}, {"lr": 1e-2, "weight_decay": 0.1}, {"weight_decay": 0.1, "decouple": True, "betas": (0.5, 0.99)},
              {"clip": False, "eps": 1e-3, "maximize": True}],
    "ademamix": [{}, {"alpha": 5.0, "beta3_warmup": 6, "alpha_warmup": 4, "weight_decay": 0.1},
                 {"betas": (0.8, 0.99, 0.999), "eps": 1e-6, "maximize": True}],
}

#: float64 implementation vs float64 reference loop: the two differ only in operation order (in-place lerp and
#: addcmul versus the papers' out-of-place form), i.e. a few ulps per step, far below this bound.
PAPER_TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


def soap(p, grads, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1.0, eps=1e-8, weight_decay=0.01,
         precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
         normalize_grads=False, correct_bias=True):
    """SOAP on one tensor of any shape, rewritten in meaning (not copied) from the authors' ``soap.py``
    (nikhilvyas/SOAP, HEAD a1e5535), whose structure it keeps and distopt's it does not:

    * the statistics ``GG`` start at zero and every step, the first included, is ``GG <- lerp(GG, outer, 1 - sb)``;
    * the first call only feeds the statistics and takes the first bases from ``eigh``; nothing else moves;
    * ``exp_avg`` lives in the rotated basis (the authors' current code; distopt keeps it in the original basis):
      it is rotated back and forth around every statistics update, so a new basis carries it over;
    * which dimensions get a factor is decided from the parameter's own number of dimensions: a vector only with
      ``precondition_1d``; otherwise every (merged) dimension up to ``max_precond_dim``.
    """
    b1, b2 = betas
    sb = shampoo_beta if shampoo_beta >= 0 else b2
    shape = p.shape

    def work_shape():
        if len(shape) < 2 or not merge_dims:
            return tuple(shape)
        out, run = [], 1
        for size in shape:
            if run * size > max_precond_dim:
                out.append(run if run > 1 else size)
                run = size if run > 1 else 1
            else:
                run *= size
        if run > 1 or not out:
            out.append(run)
        return tuple(out)

    dims = work_shape()
    if len(shape) == 1:
        has_factor = [precondition_1d and shape[0] <= max_precond_dim]
    else:
        has_factor = [d <= max_precond_dim for d in dims]
    GG = [torch.zeros(d, d, dtype=p.dtype) if f else None for d, f in zip(dims, has_factor)]
    Q = None

    def rotate(x, back=False):
        x = x.reshape(dims)
        for q in Q:
            if q is None:  # no factor: move the dimension to the back unchanged
                x = x.permute(*range(1, x.dim()), 0)
            else:  # contract the leading dimension with Q (Q^T x) or with Q^T (Q x)
                x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
        return x.reshape(shape)

    def feed(g):
        g = g.reshape(dims)
        for i, f in enumerate(has_factor):
            if f:
                rest = [d for d in range(len(dims)) if d != i]
                GG[i] = GG[i] + (1 - sb) * (torch.tensordot(g, g, dims=(rest, rest)) - GG[i])

    m = torch.zeros_like(p)  # in the rotated basis
    v = torch.zeros_like(p)  # in the rotated basis
    t = 0
    out = []
    for call, g in enumerate(grads):
        if call == 0:
            feed(g)
            Q = [torch.linalg.eigh(s + 1e-30 * torch.eye(len(s), dtype=s.dtype))[1].flip(1) if s is not None
                 else None for s in GG]
            out.append(p)
            continue
        t += 1
        g_rot = rotate(g)
        m = b1 * m + (1 - b1) * g_rot
        v = b2 * v + (1 - b2) * g_rot**2
        d = rotate(m / (v.sqrt() + eps), back=True)
        if normalize_grads:
            d = d / (1e-30 + d.pow(2).mean().sqrt())
        size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
        p = p - size * d
        p = p - lr * weight_decay * p
        m = rotate(m, back=True)  # to the original basis while the statistics change
        feed(g)
        if t % precondition_frequency == 0:  # one power iteration and QR, eigenvalue order kept
            v = v.reshape(dims)
            for i, s in enumerate(GG):
                if s is None:
                    continue
                order = torch.argsort(torch.diag(Q[i].T @ s @ Q[i]), descending=True)
                v = v.index_select(i, order)
                Q[i] = torch.linalg.qr(s @ Q[i][:, order])[0]
            v = v.reshape(shape)
        m = rotate(m)
        out.append(p)
    return out


def psgd_kron(p, grads, draws, lr=3e-4, b1=0.9, weight_decay=0.0, precond_lr=0.1, probability=1.0,
              momentum_into_precond_update=True, max_size_triangular=8192, min_ndim_triangular=2,
              memory_save_mode=None, merge_dims=True, precond_init_scale=1.0):
    """PSGD-Kron on one tensor of any shape (Li 2015; kron-torch 0.3.3's arithmetic), with every factor held as an
    explicit matrix (a diagonal factor as a dense diagonal matrix) and every mode product written as a matrix
    product of the unfolded tensor. ``draws(step)`` returns (balance draw, probe) for that step, so the loop sees
    the same random numbers as the optimizer. With ``probability`` below 1 the factors update when kron-torch's
    counter reaches ``1 / probability``."""
    shape = tuple(p.shape)
    dims = shape
    if merge_dims and len(shape) > 2:
        rows_last = (math.prod(shape[:-1]), shape[-1])
        rows_first = (shape[0], math.prod(shape[1:]))
        dims = rows_last if rows_last[1] - rows_last[0] <= rows_first[1] - rows_first[0] else rows_first
    order = len(dims)
    largest = max(range(order), key=lambda i: (dims[i], i))
    second = sorted(dims)[-2] if order > 1 else None
    diagonal = []
    for i, size in enumerate(dims):
        chosen = (memory_save_mode == "all_diag" or (memory_save_mode == "one_diag" and i == largest)
                  or (memory_save_mode == "smart_one_diag" and i == largest and order > 1 and size > second))
        diagonal.append(chosen or size == 1 or size > max_size_triangular or order < min_ndim_triangular)
    scale = precond_init_scale ** (1 / order)
    Q = [scale * torch.eye(n, dtype=p.dtype) for n in dims]
    mom = torch.zeros(dims, dtype=p.dtype)
    eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=p.dtype).sqrt()

    def unfold(x, i):  # dimension i first, the rest flattened: an (n_i, numel / n_i) matrix
        return torch.movedim(x, i, 0).reshape(x.shape[i], -1)

    def fold(m, i, like):
        rest = [like.shape[j] for j in range(like.dim()) if j != i]
        return torch.movedim(m.reshape(like.shape[i], *rest), 0, i)

    def mode(x, matrix, i):
        return fold(matrix @ unfold(x, i), i, x)

    def lower_bound(s):
        norm = s.abs().max()
        s = s / norm
        x = s[:, torch.argmax((s * s).sum(0))] @ s
        return (s @ (x / x.norm())).norm() * norm

    counter = 0
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.reshape(dims)
        prob = probability(t - 1) if callable(probability) else probability
        counter += 1
        update = counter >= 1 / prob
        if update:
            counter = 0
        mom = b1 * mom + (1 - b1) * g
        d = mom / (1 - b1**t)
        balance, v = draws(t)
        if update:
            if order > 1 and balance < 0.01:
                norms = torch.stack([q.abs().max() for q in Q])
                Q = [q * s for q, s in zip(Q, norms.log().mean().exp() / norms)]
            fit = d if momentum_into_precond_update else g
            fit = fit + eps * fit.abs().mean() * v
            if momentum_into_precond_update:
                d = fit
            a, b = fit, v
            for i, q in enumerate(Q):
                a = mode(a, q, i)
                b = mode(b, torch.linalg.inv(q).T, i)
            new = []
            for i, q in enumerate(Q):
                aa, bb = unfold(a, i) @ unfold(a, i).T, unfold(b, i) @ unfold(b, i).T
                if diagonal[i]:
                    aa, bb = torch.diag(torch.diag(aa)), torch.diag(torch.diag(bb))
                    new.append(q - precond_lr * (aa - bb) @ q / (aa + bb).abs().max())
                else:
                    new.append(q - torch.triu((aa - bb) * precond_lr) / lower_bound(aa + bb) @ q)
            Q = new
        u = d
        for i, q in enumerate(Q):
            u = mode(u, q.T @ q, i)
        u = u * torch.clamp(1.1 / (u.pow(2).mean().sqrt() + 1e-12), max=1.0)
        u = u.reshape(shape)
        if weight_decay and len(shape) >= 2:
            u = u + weight_decay * p
        p = p - lr * u
        out.append(p)
    return out
