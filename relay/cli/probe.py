"""`fastrelay probe`: the offload capability probe (placeholder, filled by the probe work)."""


def probe() -> None:
    """Report what this machine's kernel, bcc and NICs can offload, and a verdict per crypto backend."""
