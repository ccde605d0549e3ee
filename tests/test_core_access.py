"""relay.core.access: token parsing, token aliases, allow-lists, config parsing."""

from __future__ import annotations

import pytest

from relay.core.access import (
    ANONYMOUS,
    AccessConfig,
    AccessControl,
    AuthToken,
    SessionAuth,
    TokenAliasType,
    TokenError,
    has_prefix,
    parse_prefix,
    parse_token,
)
from relay.moqt.constants import SessionErrorCode

CONFIG = """
[access]
anonymous_publish = []
anonymous_subscribe = ["public"]
max_auth_token_cache_size = 16

[[access.principal]]
name = "alice"
token = "alice-secret"
publish = ["live/alice"]
subscribe = ["*"]

[[access.principal]]
name = "bob"
token_hex = "b0b0"
publish = ["live/bob"]
subscribe = ["live"]
"""


def use_value(value: bytes, token_type: int = 0) -> bytes:
    return bytes([TokenAliasType.USE_VALUE, token_type]) + value


def register(alias: int, value: bytes) -> bytes:
    return bytes([TokenAliasType.REGISTER, alias, 0]) + value


@pytest.fixture
def ac() -> AccessControl:
    return AccessControl(AccessConfig.from_toml(CONFIG))


TOKEN_CASES = [
    ("use value", use_value(b"abc"), AuthToken(TokenAliasType.USE_VALUE, None, 0, b"abc")),
    ("use value empty", use_value(b""), AuthToken(TokenAliasType.USE_VALUE, None, 0, b"")),
    ("register", register(5, b"xy"), AuthToken(TokenAliasType.REGISTER, 5, 0, b"xy")),
    ("use alias", bytes([2, 5]), AuthToken(TokenAliasType.USE_ALIAS, 5)),
    ("delete", bytes([0, 0x40, 0x40]), AuthToken(TokenAliasType.DELETE, 64)),
]


@pytest.mark.parametrize("name,data,token", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_parse_token(name: str, data: bytes, token: AuthToken) -> None:
    assert parse_token(data) == token


MALFORMED = [
    ("empty", b"", "Token is truncated"),
    ("unknown alias type", bytes([4, 0]), "Unknown token alias type 0x4"),
    ("use value without type", bytes([3]), "Token is truncated"),
    ("register without alias", bytes([1]), "Token is truncated"),
    ("use alias trailing", bytes([2, 1, 9]), "Token with alias type USE_ALIAS has trailing bytes"),
]


@pytest.mark.parametrize("name,data,message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_parse_token_malformed(name: str, data: bytes, message: str) -> None:
    with pytest.raises(TokenError, match=message) as info:
        parse_token(data)
    assert info.value.session_code == SessionErrorCode.MALFORMED_AUTH_TOKEN
    assert info.value.request_code == 0x10


def test_parse_prefix_and_match() -> None:
    assert parse_prefix("*") == ()
    assert parse_prefix("live/alice") == (b"live", b"alice")
    assert has_prefix((b"live", b"alice", b"cam"), ((b"live", b"alice"),))
    assert not has_prefix((b"live", b"alicex"), ((b"live", b"alice"),))
    assert not has_prefix((b"live",), ((b"live", b"alice"),))
    assert has_prefix((b"x",), ((),))
    assert not has_prefix((b"x",), ())


def test_setup_token_selects_principal(ac: AccessControl) -> None:
    assert ac.setup([use_value(b"alice-secret")]).principal == "alice"
    assert ac.setup([use_value(bytes.fromhex("b0b0"), token_type=7)]).principal == "bob"
    assert ac.setup([]).principal == ANONYMOUS


def test_setup_unknown_token_is_unauthorized(ac: AccessControl) -> None:
    with pytest.raises(TokenError, match="Unknown authorization token") as info:
        ac.setup([use_value(b"nope")])
    assert info.value.session_code == SessionErrorCode.UNAUTHORIZED


@pytest.mark.parametrize("data", [bytes([0, 1]), bytes([2, 1])], ids=["delete", "use alias"])
def test_setup_rejects_alias_references(ac: AccessControl, data: bytes) -> None:
    with pytest.raises(TokenError, match="in CLIENT_SETUP") as info:
        ac.setup([data])
    assert info.value.session_code == SessionErrorCode.PROTOCOL_VIOLATION


def test_register_then_use_alias(ac: AccessControl) -> None:
    auth = ac.setup([register(1, b"b0b0"[:0] + bytes.fromhex("b0b0"))])
    assert auth.principal == "bob"
    assert ac.request_principal(auth, [bytes([2, 1])]) == "bob"
    assert ac.request_principal(auth, []) == "bob"
    assert ac.request_principal(auth, [use_value(b"alice-secret")]) == "alice"


def test_register_duplicate_alias(ac: AccessControl) -> None:
    auth = ac.setup([register(1, b"alice-secret")])
    with pytest.raises(TokenError, match="Token alias 1 is already registered") as info:
        ac.request_principal(auth, [register(1, b"alice-secret")])
    assert info.value.session_code == SessionErrorCode.DUPLICATE_AUTH_TOKEN_ALIAS


def test_register_overflows_cache(ac: AccessControl) -> None:
    auth = ac.setup([register(1, b"alice-secret")])  # 12 of 16 bytes
    with pytest.raises(TokenError, match="Token alias cache is full") as info:
        ac.request_principal(auth, [register(2, b"b0b0b0")])
    assert info.value.session_code == SessionErrorCode.AUTH_TOKEN_CACHE_OVERFLOW


def test_default_cache_size_forbids_aliases() -> None:
    with pytest.raises(TokenError, match="Token alias cache is full"):
        AccessControl(AccessConfig.open()).setup([register(1, b"x")])


def test_unknown_alias_and_delete(ac: AccessControl) -> None:
    auth = SessionAuth()
    with pytest.raises(TokenError, match="Unknown token alias 3") as info:
        ac.request_principal(auth, [bytes([2, 3])])
    assert info.value.session_code == SessionErrorCode.UNKNOWN_AUTH_TOKEN_ALIAS
    ac.request_principal(auth, [register(3, b"alice-secret")])
    assert ac.request_principal(auth, [bytes([0, 3])]) == ANONYMOUS
    assert auth.aliases == {}


def test_allow_lists(ac: AccessControl) -> None:
    assert ac.may_publish("alice", (b"live", b"alice"))
    assert ac.may_publish("alice", (b"live", b"alice", b"hd"))
    assert not ac.may_publish("alice", (b"live", b"bob"))
    assert not ac.may_publish(ANONYMOUS, (b"live", b"alice"))
    assert ac.may_subscribe("alice", (b"anything",))
    assert ac.may_subscribe("bob", (b"live", b"alice"))
    assert not ac.may_subscribe("bob", (b"private",))
    assert ac.may_subscribe(ANONYMOUS, (b"public", b"x"))
    assert not ac.may_subscribe(ANONYMOUS, (b"live", b"alice"))


def test_open_config_allows_everything() -> None:
    ac = AccessControl(AccessConfig.open())
    assert ac.may_publish(ANONYMOUS, (b"a",)) and ac.may_subscribe(ANONYMOUS, (b"a",))


@pytest.mark.parametrize("text,message", [
    ("[access]\nbogus = 1\n", "Unknown access setting\\(s\\): bogus"),
    ("[[access.principal]]\ntoken = 'x'\n", "Every \\[\\[access.principal\\]\\] needs a name"),
    ("[[access.principal]]\nname = 'a'\n", "Principal 'a' needs token or token_hex"),
    ("[[access.principal]]\nname = 'a'\ntoken = 'x'\n[[access.principal]]\nname = 'b'\n"
     "token = 'x'\n", "Principal 'b' reuses another principal's token"),
])
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccessConfig.from_toml(text)


def test_config_parsed() -> None:
    config = AccessConfig.from_toml(CONFIG)
    assert [p.name for p in config.principals] == ["alice", "bob"]
    assert config.principals[1].token == b"\xb0\xb0"
    assert config.anonymous_publish == ()
    assert config.anonymous_subscribe == ((b"public",),)
    assert config.max_auth_token_cache_size == 16
