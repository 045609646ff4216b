"""Algorithms as pure maths on tensors, and the registry that maps their names to them."""

from __future__ import annotations

from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .adamuon import AdaMuon
from .adan import Adan
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .base import ELEMENTWISE, MATRIX, Algorithm, MatrixAlgorithm
from .hyperball import HyperBallAdamW
from .laprop import LaProp
from .lion import Lion
from .msam import MSAMLaProp
from .muon import Muon
from .nadam import NAdam
from .normuon import NorMuon
from .psgd import PSGDKron
from .radam import RAdam
from .ranger import Ranger
from .rmsprop import RMSprop
from .schedule_free import SFAdamW
from .scion import Scion
from .sgd import SGD
from .simplified_ademamix import Simplified_AdEMAMix
from .sign_sgd import SignSGD
from .sink_sgd import SinkSGD
from .shampoo import Shampoo
from .soap import SOAP
from .psgd_family import FAMILY as PSGD_FAMILY
from .psgd_lra import PSGDLRA
from .soap_family import FAMILY as SOAP_FAMILY
from .suds import SUDSAdamW

#: Built-in algorithms by name; a name is the lowercase class name.
REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (AdamW, Adam, SGD, NAdam, RMSprop, RAdam, Adamax, Adagrad, Adadelta, Adafactor, Lion, LaProp, ADOPT,
                              AdEMAMix, Adan, Ranger, SignSGD, SinkSGD, Simplified_AdEMAMix,
                              SFAdamW, HyperBallAdamW, SUDSAdamW, Scion, MSAMLaProp,
                              Muon, NorMuon, AdaMuon, SOAP, PSGDKron, *SOAP_FAMILY, *PSGD_FAMILY, PSGDLRA, Shampoo)
}

#: Names of the algorithms that update local shards without communicating.
ELEMENTWISE_NAMES = tuple(name for name, cls in REGISTRY.items() if cls.kind == ELEMENTWISE and not cls.reduces)


from ..transforms.custom import (laprop_ortho, muon_adamw, muon_laprop, ortho_laprop, sign_laprop,  # noqa: E402
                                 unscaled_adamw)
from ..transforms.catalogue import adamc, prodigy, stable_adamw  # noqa: E402

#: Built-in chains (HeavyBall's names, lowercase): each name builds a fresh :class:`~distopt.transforms.Chain`.
CHAINS = {"muonlaprop": muon_laprop, "muonadamw": muon_adamw, "ortholaprop": ortho_laprop, "laproportho": laprop_ortho,
          "signlaprop": sign_laprop, "unscaledadamw": unscaled_adamw,
          "stableadamw": stable_adamw, "prodigy": prodigy, "adamc": adamc}


def resolve(algorithm: str | Algorithm) -> Algorithm:
    """Turn a name or an algorithm object into an algorithm object; unknown names list the known ones."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, type) and issubclass(algorithm, Algorithm):
        return algorithm()
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a name or an Algorithm object, got {algorithm!r}")
    cls = REGISTRY.get(algorithm.lower()) or CHAINS.get(algorithm.lower())
    if cls is None:
        raise ValueError(f"unknown algorithm {algorithm!r}; known algorithms: "
                         f"{', '.join(sorted({*REGISTRY, *CHAINS}))}")
    return cls()


__all__ = ["ELEMENTWISE_NAMES", "Algorithm", "MatrixAlgorithm", "ELEMENTWISE", "MATRIX", "Muon", "SOAP", "PSGDKron", "REGISTRY", "resolve", "Adam", "AdamW", "SGD", "NAdam", "RMSprop", "Lion",
           "RAdam", "Adamax", "Adagrad", "Adadelta", "Adafactor", "Adan", "Ranger",
           "LaProp", "ADOPT", "AdEMAMix"]
