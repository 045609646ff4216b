"""Peers' own code, loaded from a source tree given by path (never committed here): the independent references that
a loop written from our own reading of a paper cannot replace.

``DISTOPT_SOAP_PATH``: a checkout of https://github.com/nikhilvyas/SOAP (the folder holding ``soap.py``).
``DISTOPT_DION_PATH``: a checkout of https://github.com/microsoft/dion (the folder holding the ``dion`` package; the
bench takes the same, as ``--dion-path``).
``DISTOPT_ADV_OPTM_223_PATH``: the unpacked wheel of adv-optm 2.2.3 (the folder holding its ``adv_optm`` package;
``pip download --no-deps adv-optm==2.2.3`` and unzip it), the last release with Simplified AdEMAMix; it loads as
``adv_optm_223``, beside the installed 2.5.16.
``DISTOPT_SHAMPOO_PATH``: a checkout of https://github.com/facebookresearch/optimizers (the folder holding the
``distributed_shampoo`` package). Tests that need one skip, saying so, where it is not given.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SOAP_ENV = "DISTOPT_SOAP_PATH"


def soap_path() -> Path | None:
    value = os.environ.get(SOAP_ENV)
    return Path(value) / "soap.py" if value else None


def load_soap():
    """The authors' ``soap`` module, or a pytest skip that says how to provide it."""
    path = soap_path()
    if path is None:
        pytest.skip(f"the authors' SOAP is not given: set {SOAP_ENV} to a checkout of nikhilvyas/SOAP")
    if not path.is_file():
        pytest.fail(f"{SOAP_ENV}={os.environ[SOAP_ENV]!r} holds no soap.py")
    if "authors_soap" not in sys.modules:
        spec = importlib.util.spec_from_file_location("authors_soap", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["authors_soap"] = module
    return sys.modules["authors_soap"]


ADV_OPTM_223_ENV = "DISTOPT_ADV_OPTM_223_PATH"


def load_adv_optm_223():
    """adv_optm 2.2.3's package, loaded under the name ``adv_optm_223``, or a pytest skip that says how."""
    value = os.environ.get(ADV_OPTM_223_ENV)
    if not value:
        pytest.skip(f"adv_optm 2.2.3 is not given: set {ADV_OPTM_223_ENV} to its unpacked wheel")
    if "adv_optm_223" in sys.modules:
        return sys.modules["adv_optm_223"]
    package = Path(value) / "adv_optm"
    spec = importlib.util.spec_from_file_location("adv_optm_223", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or not (package / "__init__.py").is_file():
        raise FileNotFoundError(f"{ADV_OPTM_223_ENV}={value!r} holds no adv_optm/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["adv_optm_223"] = module
    spec.loader.exec_module(module)
    return module


DION_ENV = "DISTOPT_DION_PATH"


def _checkout_package(env: str, package: str, what: str):
    """``package`` from the checkout that ``env`` names (put on ``sys.path``), or a pytest skip that says how."""
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"{what} is not given: set {env} to a checkout of it")
    if not (Path(value) / package / "__init__.py").is_file():
        raise FileNotFoundError(f"{env}={value!r} holds no {package}/__init__.py")
    if value not in sys.path:
        sys.path.insert(0, value)
    return importlib.import_module(package)


def load_dion_module(name: str):
    """``dion.<name>`` from the checkout given by ``DISTOPT_DION_PATH``, or a pytest skip that says how."""
    _checkout_package(DION_ENV, "dion", "microsoft/dion")
    return importlib.import_module(f"dion.{name}")


SHAMPOO_ENV = "DISTOPT_SHAMPOO_PATH"


def load_distributed_shampoo():
    """facebookresearch/optimizers' ``distributed_shampoo`` from ``DISTOPT_SHAMPOO_PATH``, or a pytest skip that says
    how."""
    return _checkout_package(SHAMPOO_ENV, "distributed_shampoo", "Distributed Shampoo (facebookresearch/optimizers)")
