"""Pure helpers of the fast-path runtime (the runtime itself runs in the lab tests)."""

from relay.fastpath.runtime import canonical_address, start_group


def test_canonical_address_one_spelling_per_address() -> None:
    # a dual-stack socket reports IPv4 peers IPv4-mapped: --userspace-peer 10.0.0.2 must match
    assert canonical_address("::ffff:10.0.0.2") == "10.0.0.2"
    assert canonical_address("10.0.0.2") == "10.0.0.2"
    assert canonical_address("fd00:0:0:0::2") == "fd00::2"
    assert canonical_address("fe80::1%veth0") == "fe80::1"
    assert canonical_address("not-an-address") == "not-an-address"


def test_start_group_is_the_first_whole_group() -> None:
    assert start_group(5, 0) == 5
    assert start_group(5, 3) == 6
