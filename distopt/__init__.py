"""distopt: a distributed-first optimizer layer for PyTorch (FSDP2, DTensor, DCP)."""

from .algos import REGISTRY as ALGORITHMS
from .algos import Algorithm
from .constructors import (ADOPT, MSAMLaProp, SGD, AdamC, HyperBallAdamW, Scion, SUDSAdamW, Adadelta, Adafactor, Adagrad, AdamW, Adam, Adamax, AdEMAMix, LaProp, LaPropOrtho, Lion,
                           Muon, MuonAdamW, MuonLaProp, NAdam, OrthoLaProp, PSGDKron, RAdam, RMSprop, Shampoo, SignLaProp, SOAP,
                           UnscaledAdamW)
from .catalogue import AdaMuon, Adan, NorMuon, Prodigy, Ranger, SFAdamW, SignSGD, Simplified_AdEMAMix, SinkSGD, StableAdamW
from .optimizer import DistributedOptimizer
from .qk_clip import QKClip
from .sam import SAMWrapper
from .saved_state import StateDictMismatch
from .heavyball_constructors import CONSTRUCTORS as _HEAVYBALL_FAMILIES
from .transforms.custom import Chain

__version__ = "0.1.0"

__all__ = ["DistributedOptimizer", "Algorithm", "ALGORITHMS", "AdamW", "Adam", "SGD", "NAdam", "RMSprop", "Lion",
           "LaProp", "ADOPT", "AdEMAMix", "Muon", "SOAP", "PSGDKron", "StateDictMismatch", "Chain", "MuonLaProp",
           "OrthoLaProp", "LaPropOrtho", "RAdam", "Adamax", "Adagrad", "Adadelta", "Adafactor", "SignLaProp", "UnscaledAdamW",
           "Adan", "Ranger", "StableAdamW", "Prodigy", "SignSGD", "SinkSGD",
           "Simplified_AdEMAMix", "SFAdamW", "AdamC", "HyperBallAdamW",
           "SUDSAdamW", "Scion", "NorMuon", "MuonAdamW", "AdaMuon", "QKClip", "SAMWrapper", "MSAMLaProp", "Shampoo", *_HEAVYBALL_FAMILIES]
globals().update(_HEAVYBALL_FAMILIES)
