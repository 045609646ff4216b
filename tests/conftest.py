import os
import sys

import pytest
import torch

# The suite runs eagerly (a first compile costs 10 to 20 s here); tests/test_compiled.py compiles on purpose.
os.environ.setdefault("DISTOPT_COMPILE", "0")

# Tests import the package from this checkout, never from an install elsewhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
