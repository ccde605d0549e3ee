"""`fastrelay demo`: the main job shown in the README (placeholder)."""


def demo() -> None:
    """Bring a lab up, probe, send traffic publisher -> relay -> subscribers, print the result."""
