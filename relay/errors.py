"""The one exception hierarchy users see: each message says what failed and what to do."""


class FastrelayError(Exception):
    """An error the CLI reports as one line (`error: <message>`) and exit status 1."""


class MissingCapabilityError(FastrelayError):
    """The machine lacks something fastrelay needs: root, the BPF syscall, bcc, headers, hardware."""


class ConfigError(FastrelayError):
    """A user-supplied file or option is wrong: unknown field, clash, bad value."""


class NotFoundError(FastrelayError):
    """A named thing (interface, lab, host) does not exist."""
