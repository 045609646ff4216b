"""Peers' own code, loaded from a source tree given by path (never committed here): the independent references that
a loop written from our own reading of a paper cannot replace.

``DISTOPT_SOAP_PATH``: a checkout of https://github.com/nikhilvyas/SOAP (the folder holding ``soap.py``). Tests that
need it skip, saying so, where it is not given.
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
