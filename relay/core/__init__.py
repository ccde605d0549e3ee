"""The relay core: pure, sans-I/O relay logic (tracks, aliases, cache, priorities, access).

Events come in as method calls on `RelayCore` (plain values, `relay.moqt` dataclasses, `now`);
decisions come out as `relay.core.actions` dataclasses that the session glue executes.
Nothing here reads a clock, opens a socket or touches the kernel.
"""
