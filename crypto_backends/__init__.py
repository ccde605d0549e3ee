"""Crypto backends: `none`, `soft` and `nic`, selected by `--crypto`."""

from __future__ import annotations

from crypto_backends.base import (
    ConnectionPath,
    CryptoBackend,
    Direction,
    KeyMaterial,
    KeyTrigger,
    OffloadRefused,
    PhaseKeys,
)
from crypto_backends.nic import NicBackend
from crypto_backends.none import NoneBackend
from crypto_backends.soft import SoftBackend
from offload.probe import BACKENDS, check_backend_name

_CLASSES: dict[str, type[CryptoBackend]] = {b.name: b for b in (NoneBackend, SoftBackend, NicBackend)}
assert tuple(_CLASSES) == BACKENDS, "the probe and the backends must name the same backends"


def get_backend(name: str) -> CryptoBackend:
    """The backend called `name`; ConfigError naming the valid ones for anything else."""
    check_backend_name(name)
    return _CLASSES[name]()


def usable_backend(name: str) -> CryptoBackend:
    """The backend called `name`, after the probe confirmed it can run here (else one-line error)."""
    backend = get_backend(name)
    backend.check()
    return backend


__all__ = ["ConnectionPath", "CryptoBackend", "Direction", "OffloadRefused", "KeyMaterial",
           "KeyTrigger", "PhaseKeys", "get_backend", "usable_backend", "NoneBackend",
           "SoftBackend", "NicBackend"]
