import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import functools

import pytest


@pytest.fixture(scope="session")
def kustomized():
    """`kubectl kustomize DIR`, parsed, once per directory."""
    from support import kustomize

    return functools.lru_cache(maxsize=None)(kustomize)
