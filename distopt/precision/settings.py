"""The precision settings of a param group: how parameters are written and how optimizer states are stored.

Names and meanings follow the library each comes from, so that a user's keywords carry over:

* ``kahan_sum`` (optimi): a compensation buffer ``kahan_comp`` in the parameter's dtype carries the rounding error
  of each bfloat16/float16 parameter write. ``None`` (default) means on for bfloat16 and float16 parameters, as in
  optimi, unless another parameter write is chosen; ``False`` gives torch.optim's arithmetic in the parameter's dtype.
* ``stochastic_rounding`` (adv_optm): the bfloat16/float16 parameter write rounds stochastically (random bits from
  ``precision_seed``, the parameter's name, its step and the element's position in the whole tensor).
* ``param_ecc`` (HeavyBall): the parameter keeps an error-correction tensor beside its low-precision value.
* ``storage_dtype`` (HeavyBall): states stored in ``"bfloat16"`` (or ``"float16"``), computed in float32.
* ``ecc`` (HeavyBall): states stored as a low-precision value plus an error-correction tensor.
* ``state_precision`` (adv_optm's modes ``"fp32"``, ``"bf16_sr"``, ``"fp16"``, ``"int8_sr"``, ``"factored"``;
  torchao's block-wise ``"int8"`` and ``"int4"``), with ``state_block_size``.
* ``factored_2nd`` (adv_optm): only the second moments (the non-negative states) factored, the others stored as
  the rest of the settings say.

A group holds a setting only where it was given. Every setting is checked at construction against every parameter
of its group: a setting that cannot apply (Kahan summation on a float32 parameter, a quantized state for a complex
one) is refused, naming the parameter and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

#: Every precision setting with its default.
PRECISION: dict[str, Any] = {
    "kahan_sum": None,
    "stochastic_rounding": False,
    "param_ecc": None,
    "storage_dtype": None,
    "ecc": None,
    "state_precision": None,
    "state_block_size": None,
    "factored_2nd": False,
    "precision_seed": 0,
}

LOW_PRECISION = (torch.bfloat16, torch.float16)
ECC_MODES = ("bf16+8", "bf16+16", "fp16+8", "fp16+16")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_PRECISIONS = ("auto", "fp32", "bf16_sr", "fp16", "int8_sr", "int8", "int4", "factored")
#: Default block sizes: adv_optm's int8_sr (2048 elements), torchao's AdamW8bit (256) and AdamW4bit (128).
DEFAULT_BLOCK = {"int8_sr": 2048, "int8": 256, "int4": 128}


def value(hp: Mapping[str, Any], name: str) -> Any:
    return hp.get(name, PRECISION[name])


def given(hp: Mapping[str, Any]) -> bool:
    """Whether any setting is given (a group without any runs the algorithm's own arithmetic, unless its
    parameters are bfloat16/float16, where Kahan summation is on by default)."""
    return any(key in hp and hp[key] != PRECISION[key] for key in PRECISION)


def check(algo: str, hp: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the setting and its value if it is malformed or conflicts with another."""
    for key in ("stochastic_rounding", "factored_2nd"):
        if not isinstance(value(hp, key), bool):
            raise ValueError(f"{algo}: invalid {key}={value(hp, key)!r} (must be True or False)")
    kahan = value(hp, "kahan_sum")
    if kahan is not None and not isinstance(kahan, bool):
        raise ValueError(f"{algo}: invalid kahan_sum={kahan!r} (must be None, True or False)")
    seed = value(hp, "precision_seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{algo}: invalid precision_seed={seed!r} (must be an int)")
    for key in ("param_ecc", "ecc"):
        if value(hp, key) is not None and value(hp, key) not in ECC_MODES:
            raise ValueError(f"{algo}: invalid {key}={value(hp, key)!r} (must be None or one of {ECC_MODES})")
    storage = value(hp, "storage_dtype")
    if storage is not None and storage not in STORAGE_DTYPES:
        raise ValueError(f"{algo}: invalid storage_dtype={storage!r} (must be None or one of "
                         f"{tuple(STORAGE_DTYPES)})")
    mode = value(hp, "state_precision")
    if mode is not None and mode not in STATE_PRECISIONS:
        raise ValueError(f"{algo}: invalid state_precision={mode!r} (must be None or one of {STATE_PRECISIONS})")
    block = value(hp, "state_block_size")
    if block is not None:
        if mode not in DEFAULT_BLOCK:
            raise ValueError(f"{algo}: state_block_size={block!r} needs state_precision 'int8_sr', 'int8' or "
                             f"'int4', not {mode!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2:
            raise ValueError(f"{algo}: invalid state_block_size={block!r} (must be an even int >= 2)")
    chosen = [f"{key}={value(hp, key)!r}" for key in ("storage_dtype", "ecc", "state_precision")
              if value(hp, key) is not None]
    if len(chosen) > 1:
        raise ValueError(f"{algo}: {' and '.join(chosen)} both choose how states are stored; give one")
    writes = [f"{key}={value(hp, key)!r}" for key in ("stochastic_rounding", "param_ecc")
              if value(hp, key) not in (None, False)]
    if kahan:
        writes.append("kahan_sum=True")
    if len(writes) > 1:
        raise ValueError(f"{algo}: {' and '.join(writes)} both choose how parameters are written; give one")


def param_write(hp: Mapping[str, Any], dtype: torch.dtype) -> str | None:
    """How a parameter of ``dtype`` is written: ``"kahan"``, ``"stochastic"``, ``"ecc"`` or None (as the
    algorithm writes it). Kahan summation is the default for bfloat16/float16 parameters."""
    if value(hp, "param_ecc") is not None:
        return "ecc"
    if value(hp, "stochastic_rounding"):
        return "stochastic"
    kahan = value(hp, "kahan_sum")
    if kahan or (kahan is None and dtype in LOW_PRECISION):
        return "kahan"
    return None


def check_param(hp: Mapping[str, Any], param: torch.Tensor) -> None:
    """Raise ``ValueError`` (the caller names the parameter) if a setting cannot apply to this parameter."""
    dtype = param.dtype
    low = dtype in LOW_PRECISION
    if value(hp, "kahan_sum") is True and not low:
        raise ValueError(f"kahan_sum=True cannot apply to a {dtype} parameter: Kahan summation compensates the "
                         "rounding of bfloat16/float16 writes; leave kahan_sum at None (on only where it applies)")
    if value(hp, "stochastic_rounding") and not low:
        raise ValueError(f"stochastic_rounding=True cannot apply to a {dtype} parameter: it rounds bfloat16/float16 "
                         "writes; use it on groups of bfloat16 or float16 parameters")
    ecc = value(hp, "param_ecc")
    if ecc is not None and dtype != _ecc_value_dtype(ecc):
        raise ValueError(f"param_ecc={ecc!r} needs {_ecc_value_dtype(ecc)} parameters (the corrected value is the "
                         f"parameter itself), not {dtype}")
    compact = (any(value(hp, key) is not None for key in ("storage_dtype", "ecc", "state_precision"))
               or value(hp, "factored_2nd"))
    if torch.is_complex(param) and (compact or param_write(hp, dtype)):
        raise ValueError("compact states and low-precision writes are defined for real tensors; this parameter is "
                         "complex (use torch.view_as_real)")


def _ecc_value_dtype(mode: str) -> torch.dtype:
    return torch.bfloat16 if mode.startswith("bf16") else torch.float16
