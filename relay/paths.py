"""Where the non-Python parts of fastrelay live, for source trees and installs alike."""

import importlib.util
from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent


def _data_dir(name: str) -> Path:
    # A source tree or editable install has the folder beside relay/; a wheel installs it
    # as a (namespace) package next to relay in site-packages.
    beside = _SOURCE_TREE / name
    if beside.is_dir():
        return beside
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"fastrelay is installed without its '{name}' directory")
    return Path(next(iter(spec.submodule_search_locations)))


#: C sources of every eBPF program and their shared headers.
BPF_DIR = _data_dir("bpf")
#: The lab: topology files, namespace realisation, host set-up.
HW_DIR = _data_dir("hw")
TOPOLOGY_DIR = HW_DIR / "topologies"
