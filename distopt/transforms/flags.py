"""The seeds' feature flags: their names, defaults and checks, and which algorithms can take them.

Names and meanings follow HeavyBall 3.2.1 where HeavyBall has the flag (a HeavyBall user's keywords carry over),
adv_optm 2.5.16 for ``orthograd``, ``atan2`` and Kourkoutas-β, torch-optimi for ``decouple_lr``. The formulas, as
each library implements them, are in ``docs/design/flags-reference.md``.

A param group holds a flag only when it was given (to the group, or to the optimizer as a default); an absent flag
is off. An algorithm states which flags its maths cannot take, with the reason (:meth:`Algorithm.refused_flags`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Every flag and flag setting with its default (off).
FLAGS: dict[str, Any] = {
    "caution": False,
    "cautious_weight_decay": False,
    "mars": False,
    "mars_gamma": 0.0025,
    "palm": False,
    "beta2_scale": 0.8,
    "warmup_steps": 0,
    "gradient_clipping": None,
    "gradient_clip_at": 1.0,
    "update_clipping": None,
    "update_clip_at": 1.0,
    "promote": False,
    "grams": False,
    "orthograd": False,
    "atan2": False,
    "kourkoutas_beta": False,
    "beta2_min": 0.9,
    "ema_alpha": 0.95,
    "tiny_spike": 1e-9,
    "k_warmup_steps": 0,
    "decouple_lr": False,
    "max_lr": None,
}

#: Settings that only mean something with their switch on: they are accepted wherever the switch is.
SETTING_OF = {"mars_gamma": "mars", "beta2_scale": "palm", "gradient_clip_at": "gradient_clipping",
              "update_clip_at": "update_clipping", "beta2_min": "kourkoutas_beta", "ema_alpha": "kourkoutas_beta",
              "tiny_spike": "kourkoutas_beta", "k_warmup_steps": "kourkoutas_beta", "max_lr": "decouple_lr"}

#: The switches, in the order a chain applies them.
SWITCHES = tuple(name for name in FLAGS if name not in SETTING_OF)

#: Clip names (HeavyBall's, with or without its trailing underscore) and whether each needs a reduction.
CLIPS = {"l2_clip": "norm", "rmsnorm_clip": "norm", "global_l2norm_clip": "global", "global_rmsnorm_clip": "global",
         "trust_region_clip": "elementwise"}


def value(hp: Mapping[str, Any], name: str) -> Any:
    return hp.get(name, FLAGS[name])


def clip_name(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.removesuffix("_") if isinstance(raw, str) else raw


def active(hp: Mapping[str, Any]) -> tuple[str, ...]:
    """The switches that are on in ``hp``, in chain order."""
    return tuple(name for name in SWITCHES if name in hp and hp[name] not in (False, None, 0))


def check(algo: str, hp: Mapping[str, Any], refused: Mapping[str, str]) -> None:
    """Raise ``ValueError`` for an invalid flag value, or a flag that ``algo`` cannot take (with the reason)."""
    for name in FLAGS:
        if name in hp:
            _check_value(algo, name, hp[name])
    for name in active(hp):
        if name in refused:
            raise ValueError(f"{algo}: flag {name}={hp[name]!r} cannot apply: {refused[name]}")
    if value(hp, "kourkoutas_beta") and value(hp, "palm"):
        raise ValueError(f"{algo}: kourkoutas_beta and palm both set the second moment's decay; choose one")
    if value(hp, "kourkoutas_beta"):
        betas = hp.get("betas")
        if betas is not None and not float(betas[1]) > float(value(hp, "beta2_min")):
            raise ValueError(f"{algo}: kourkoutas_beta needs betas[1] > beta2_min, got betas[1]={betas[1]!r}, "
                             f"beta2_min={value(hp, 'beta2_min')!r}")


def reads_step(hp: Mapping[str, Any]) -> bool:
    """Whether a flag's schedule depends on the step count (so that the count must be saved)."""
    return bool(value(hp, "warmup_steps") or value(hp, "palm") or value(hp, "kourkoutas_beta"))


def fill(hp: dict[str, Any]) -> None:
    """Settings a switch derives from the group: optimi's ``max_lr`` defaults to the group's ``lr`` (optimi takes
    the constructor's, which gives a group with its own ``lr`` another decay than it asked for)."""
    if value(hp, "decouple_lr") and hp.get("max_lr") is None:
        hp["max_lr"] = float(hp["lr"])


def _check_value(algo: str, name: str, raw: Any) -> None:
    default = FLAGS[name]
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ValueError(f"{algo}: flag {name} must be a bool, got {raw!r}")
        return
    if name in ("gradient_clipping", "update_clipping"):
        if raw is not None and clip_name(raw) not in CLIPS:
            raise ValueError(f"{algo}: invalid {name}={raw!r} (must be None or one of "
                             f"{', '.join(sorted(CLIPS))}; thresholds are {name.split('_')[0]}_clip_at)")
        return
    if name in ("warmup_steps", "k_warmup_steps"):
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ValueError(f"{algo}: invalid {name}={raw!r} (must be an int >= 0)")
        return
    if name == "max_lr" and raw is None:
        return
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or math.isnan(raw):
        raise ValueError(f"{algo}: flag setting {name} must be a number, got {raw!r}")
    if name in ("mars_gamma", "ema_alpha") and not 0.0 <= raw < 1.0:
        raise ValueError(f"{algo}: invalid {name}={raw!r} (must be in [0, 1))")
    if name == "beta2_min" and not 0.0 <= raw < 1.0:
        raise ValueError(f"{algo}: invalid {name}={raw!r} (must be in [0, 1))")
    if name in ("beta2_scale", "gradient_clip_at", "update_clip_at", "max_lr") and not raw > 0:
        raise ValueError(f"{algo}: invalid {name}={raw!r} (must be > 0)")
    if name == "tiny_spike" and not raw > 0:
        raise ValueError(f"{algo}: invalid {name}={raw!r} (must be > 0: it keeps the first ratio finite)")


# Reasons shared by several algorithms' refusals.
NO_SECOND_MOMENT = "it has no bias-corrected second moment with betas[1] whose decay the flag would schedule"
NO_EPS_DIVISION = "it has no division by an eps-regularized second moment for atan2 to replace"
L2_DECAY = ("its weight decay is L2 (added to the gradient), and the flag acts on decoupled weight decay; use "
            "decoupled weight decay")


def l2_refusals(decoupled: bool) -> dict[str, str]:
    """The flags that act on decoupled weight decay, refused where the decay is L2."""
    return {} if decoupled else {"cautious_weight_decay": L2_DECAY, "decouple_lr": L2_DECAY}


SIGN_UPDATE = "its update is already a sign, which grams' sign(g)·|u| would turn into signSGD"
