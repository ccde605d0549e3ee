"""fastrelay: a Media-over-QUIC relay whose data plane runs in eBPF on TC."""

from importlib import metadata

try:
    __version__ = metadata.version("fastrelay")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
