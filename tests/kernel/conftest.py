"""Fixtures shared by the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def shim() -> Iterator[Any]:
    """The soft crypto shim (bpf/crypto_shim.c) loaded once per test module, never attached;
    each module's own fixture clears the entries and counters its tests use."""
    from crypto_backends.soft_shim import SoftShim

    loaded = SoftShim()
    yield loaded
    loaded.close()
