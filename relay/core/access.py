"""Access control: AUTHORIZATION TOKEN parsing and per-role namespace allow-lists.

Token structure, draft-14 section 9.2.2 (setup parameter 0x03 and message parameter 0x03):

    Token { Alias Type (i), [Token Alias (i),] [Token Type (i),] [Token Value (..)] }

    DELETE 0x0: alias        REGISTER 0x1: alias, type, value
    USE_ALIAS 0x2: alias     USE_VALUE 0x3: type, value      (value runs to the end)

Token type 0 = negotiated out of band; the relay compares token values byte for byte with the
configured ones (any token type). A token that does not parse is MALFORMED_AUTH_TOKEN.
DELETE / USE_ALIAS in CLIENT_SETUP is a PROTOCOL_VIOLATION. Registering aliases beyond the
relay's MAX_AUTH_TOKEN_CACHE_SIZE (default 0: no aliases) is AUTH_TOKEN_CACHE_OVERFLOW.

Policy: a session's principal comes from its CLIENT_SETUP token (or is anonymous); a token in a
request overrides it for that request. PUBLISH_NAMESPACE needs a `publish` prefix of the
namespace, SUBSCRIBE / FETCH a `subscribe` prefix. An active namespace cannot be taken over by
a different principal (UNAUTHORIZED); `AccessControl` answers, `RelayCore` keeps the owners.

Config (TOML, `[access]` table):

    anonymous_publish = []            # prefixes "a/b" (fields split on "/"), "*" = everything
    anonymous_subscribe = ["*"]
    max_auth_token_cache_size = 0
    [[access.principal]]
    name = "alice"
    token = "secret"                  # or token_hex = "00ff.."
    publish = ["live/alice"]
    subscribe = ["*"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from aioquic.buffer import Buffer, BufferReadError

from relay.moqt.constants import SessionErrorCode
from relay.moqt.messages import TrackNamespace

ANONYMOUS = ""


# https://www.ietf.org/archive/id/draft-ietf-moq-transport-14.html#section-9.2.2
class TokenAliasType(IntEnum):
    DELETE = 0x0
    REGISTER = 0x1
    USE_ALIAS = 0x2
    USE_VALUE = 0x3


@dataclass(frozen=True)
class AuthToken:
    alias_type: TokenAliasType
    alias: int | None = None
    token_type: int | None = None
    value: bytes | None = None


class TokenError(Exception):
    """A token problem; `session_code` closes the session, `request_code` refuses a request."""

    def __init__(self, message: str, session_code: int, request_code: int | None) -> None:
        super().__init__(message)
        self.session_code = session_code
        self.request_code = request_code


# Request error codes shared by SUBSCRIBE / FETCH / PUBLISH_NAMESPACE / SUBSCRIBE_NAMESPACE.
REQUEST_UNAUTHORIZED = 0x1
REQUEST_MALFORMED_AUTH_TOKEN = 0x10


def _malformed(message: str) -> TokenError:
    return TokenError(message, SessionErrorCode.MALFORMED_AUTH_TOKEN,
                      REQUEST_MALFORMED_AUTH_TOKEN)


def parse_token(data: bytes) -> AuthToken:
    buf = Buffer(data=data)
    try:
        kind = buf.pull_uint_var()
        if kind not in iter(TokenAliasType):
            raise _malformed(f"Unknown token alias type {kind:#x}")
        alias_type = TokenAliasType(kind)
        alias = token_type = value = None
        if alias_type in (TokenAliasType.DELETE, TokenAliasType.REGISTER,
                          TokenAliasType.USE_ALIAS):
            alias = buf.pull_uint_var()
        if alias_type in (TokenAliasType.REGISTER, TokenAliasType.USE_VALUE):
            token_type = buf.pull_uint_var()
            value = data[buf.tell():]
        elif not buf.eof():
            raise _malformed(f"Token with alias type {alias_type.name} has trailing bytes")
    except BufferReadError:
        raise _malformed("Token is truncated") from None
    return AuthToken(alias_type, alias, token_type, value)


def parse_prefix(text: str) -> TrackNamespace:
    """"a/b" -> (b"a", b"b"); "*" or "" -> () (matches every namespace)."""
    if text in ("*", ""):
        return ()
    return tuple(part.encode() for part in text.split("/"))


def has_prefix(namespace: TrackNamespace, prefixes: tuple[TrackNamespace, ...]) -> bool:
    return any(namespace[:len(p)] == p for p in prefixes)


@dataclass(frozen=True)
class Principal:
    name: str
    token: bytes
    publish: tuple[TrackNamespace, ...] = ()
    subscribe: tuple[TrackNamespace, ...] = ()


@dataclass(frozen=True)
class AccessConfig:
    principals: tuple[Principal, ...] = ()
    anonymous_publish: tuple[TrackNamespace, ...] = ((),)
    anonymous_subscribe: tuple[TrackNamespace, ...] = ((),)
    max_auth_token_cache_size: int = 0

    @classmethod
    def open(cls) -> AccessConfig:
        """Everyone may publish and subscribe everywhere (no config given)."""
        return cls()

    @classmethod
    def from_toml(cls, text: str) -> AccessConfig:
        return cls.from_dict(tomllib.loads(text).get("access", {}))

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> AccessConfig:
        known = {"principal", "anonymous_publish", "anonymous_subscribe",
                 "max_auth_token_cache_size"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"Unknown access setting(s): {', '.join(sorted(unknown))}")
        principals = []
        seen_tokens: set[bytes] = set()
        for entry in table.get("principal", []):
            name = entry.get("name")
            if not name:
                raise ValueError("Every [[access.principal]] needs a name")
            if "token_hex" in entry:
                token = bytes.fromhex(entry["token_hex"])
            elif "token" in entry:
                token = str(entry["token"]).encode()
            else:
                raise ValueError(f"Principal {name!r} needs token or token_hex")
            if token in seen_tokens:
                raise ValueError(f"Principal {name!r} reuses another principal's token")
            seen_tokens.add(token)
            principals.append(Principal(
                name, token,
                tuple(parse_prefix(p) for p in entry.get("publish", [])),
                tuple(parse_prefix(p) for p in entry.get("subscribe", []))))
        return cls(
            tuple(principals),
            tuple(parse_prefix(p) for p in table.get("anonymous_publish", [])),
            tuple(parse_prefix(p) for p in table.get("anonymous_subscribe", [])),
            int(table.get("max_auth_token_cache_size", 0)))


@dataclass
class SessionAuth:
    """Per-session token state: the principal and registered token aliases."""

    principal: str = ANONYMOUS
    aliases: dict[int, bytes] = field(default_factory=dict)

    @property
    def cache_used(self) -> int:
        return sum(len(v) for v in self.aliases.values())


class AccessControl:
    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self._by_token = {p.token: p for p in config.principals}
        self._by_name = {p.name: p for p in config.principals}

    def _resolve(self, auth: SessionAuth, token: AuthToken) -> bytes | None:
        """The token value a token stands for (after alias bookkeeping), or None for DELETE."""
        if token.alias_type is TokenAliasType.USE_VALUE:
            return token.value
        assert token.alias is not None
        if token.alias_type is TokenAliasType.REGISTER:
            assert token.value is not None
            if token.alias in auth.aliases:
                raise TokenError(f"Token alias {token.alias} is already registered",
                                 SessionErrorCode.DUPLICATE_AUTH_TOKEN_ALIAS, None)
            if auth.cache_used + len(token.value) > self.config.max_auth_token_cache_size:
                raise TokenError("Token alias cache is full",
                                 SessionErrorCode.AUTH_TOKEN_CACHE_OVERFLOW, None)
            auth.aliases[token.alias] = token.value
            return token.value
        if token.alias not in auth.aliases:
            raise TokenError(f"Unknown token alias {token.alias}",
                             SessionErrorCode.UNKNOWN_AUTH_TOKEN_ALIAS, None)
        if token.alias_type is TokenAliasType.DELETE:
            del auth.aliases[token.alias]
            return None
        return auth.aliases[token.alias]

    def _principal_for(self, value: bytes) -> str:
        principal = self._by_token.get(value)
        if principal is None:
            raise TokenError("Unknown authorization token", SessionErrorCode.UNAUTHORIZED,
                             REQUEST_UNAUTHORIZED)
        return principal.name

    def setup(self, tokens: list[bytes]) -> SessionAuth:
        """A new session from its CLIENT_SETUP AUTHORIZATION TOKEN parameters (raises TokenError)."""
        auth = SessionAuth()
        for raw in tokens:
            token = parse_token(raw)
            if token.alias_type in (TokenAliasType.DELETE, TokenAliasType.USE_ALIAS):
                raise TokenError(f"{token.alias_type.name} token in CLIENT_SETUP",
                                 SessionErrorCode.PROTOCOL_VIOLATION, None)
            value = self._resolve(auth, token)
            assert value is not None
            auth.principal = self._principal_for(value)
        return auth

    def request_principal(self, auth: SessionAuth, tokens: list[bytes]) -> str:
        """The principal a request acts as: its own token(s) if any, else the session's."""
        principal = auth.principal
        for raw in tokens:
            value = self._resolve(auth, parse_token(raw))
            if value is not None:
                principal = self._principal_for(value)
        return principal

    def may_publish(self, principal: str, namespace: TrackNamespace) -> bool:
        p = self._by_name.get(principal)
        prefixes = p.publish if p is not None else self.config.anonymous_publish
        return has_prefix(namespace, prefixes)

    def may_subscribe(self, principal: str, namespace: TrackNamespace) -> bool:
        p = self._by_name.get(principal)
        prefixes = p.subscribe if p is not None else self.config.anonymous_subscribe
        return has_prefix(namespace, prefixes)
