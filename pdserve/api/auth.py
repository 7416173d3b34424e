"""Who may call what: API keys for /v1/*, admin keys for /admin/*, either for /metrics when `metrics_auth`.
Keys come from the config and from key files re-read when they change (a rotated Kubernetes Secret); a
token is compared with every key, by SHA-256 digest, in constant time."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request

from pdserve.api.errors import APIError
from pdserve.config import FrontendConfig, parse_key_entry

logger = logging.getLogger("pdserve.api")

_SALT_DOMAIN = b"pdserve cache salt\0"  # a key's derived salt is no digest that is compared with tokens


@dataclass(frozen=True)
class Key:
    digest: bytes  # sha256 of the key: all comparisons are 32 bytes, so timing tells nothing of lengths
    salt: str | None  # the default cache salt of the requests made with this key


def make_key(entry: str, tenant_salts: bool) -> Key:
    """A key from its entry: its tenant's salt, else (with `tenant_salts`) one derived from the key."""
    key, tenant = parse_key_entry(entry)
    if tenant is not None:
        salt = f"tenant:{tenant}"
    elif tenant_salts:
        salt = "key:" + hashlib.sha256(_SALT_DOMAIN + key.encode()).hexdigest()[:32]
    else:
        salt = None
    return Key(hashlib.sha256(key.encode()).digest(), salt)


class KeyFile:
    """The keys in a file: one entry a line, blank lines and '#' lines skipped. Re-read when its stat
    changes. A file that cannot be read or parsed is an error at start; later the last good keys stay
    (Kubernetes swaps a Secret's files atomically, so such a failure is a moment's) and it is logged once."""

    def __init__(self, path: str, field: str, tenant_salts: bool) -> None:
        self.path, self.field, self.tenant_salts = path, field, tenant_salts
        self._stamp: tuple[int, int, int] | None = None
        self._keys: tuple[Key, ...] = ()
        self._failure: str | None = None
        self._load(strict=True)

    def keys(self) -> tuple[Key, ...]:
        self._load(strict=False)
        return self._keys

    def _load(self, strict: bool) -> None:
        stamp = None
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                keys = tuple(self._parse(f.read()))
        except (OSError, ValueError) as e:
            failure = f"frontend.{self.field}: {e}"
            if strict:
                raise ValueError(failure) from None
            self._stamp = stamp  # a bad file is read again only once it changes
            if failure != self._failure:
                logger.error("%s; keeping the %d keys read before", failure, len(self._keys))
            self._failure = failure
            return
        self._stamp, self._keys, self._failure = stamp, keys, None

    def _parse(self, text: str) -> Iterable[Key]:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                yield make_key(line, self.tenant_salts)
            except ValueError:  # not echoed: the line may hold keys
                raise ValueError(f"{self.path} line {number} is not 'KEY' or 'KEY tenant=NAME'") from None


class KeySet:
    """One class of keys (API or admin): entries fixed at start (config key `field`) plus an optional key
    file (`field`_file)."""

    def __init__(self, entries: Iterable[str], file: str | None, field: str, tenant_salts: bool) -> None:
        try:
            self.fixed = tuple(make_key(entry, tenant_salts) for entry in entries)
        except ValueError as e:
            raise ValueError(f"frontend.{field}: {e}") from None
        self.file = KeyFile(file, f"{field}_file", tenant_salts) if file else None

    @property
    def configured(self) -> bool:
        """Keys are required: true even while the key file is empty (then nothing is let in)."""
        return bool(self.fixed) or self.file is not None

    def keys(self) -> tuple[Key, ...]:
        return self.fixed + (self.file.keys() if self.file else ())

    def match(self, digest: bytes) -> Key | None:
        """The key whose digest is `digest`; every key is compared, none skipped after a match."""
        found = None
        for key in self.keys():
            if secrets.compare_digest(key.digest, digest) and found is None:
                found = key
        return found


class Auth:
    """The key policy and its FastAPI dependencies. No keys at all: everything is open (a dev server).
    API keys: /v1/* needs one. Admin keys: /admin/* needs one, an API key gets 403 there; with API keys
    but no admin keys /admin/* is disabled (403). /health and /ready never need a key."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        api_keys_file: str | None = None,
        admin_keys: Iterable[str] = (),
        admin_keys_file: str | None = None,
        metrics_auth: bool = False,
        tenant_salts: bool = True,
    ) -> None:
        self.api = KeySet(api_keys, api_keys_file, "api_keys", tenant_salts)
        self.admin = KeySet(admin_keys, admin_keys_file, "admin_keys", tenant_salts=False)
        self.metrics_auth = metrics_auth
        if metrics_auth and self.open:
            raise ValueError("frontend.metrics_auth: set API or admin keys first (an open server has no keys)")
        if {k.digest for k in self.api.keys()} & {k.digest for k in self.admin.keys()}:
            raise ValueError("frontend.admin_keys: a key is also an API key; admin keys must differ")

    @classmethod
    def from_config(cls, fe: FrontendConfig) -> Auth:
        return cls(
            api_keys=[*([fe.api_key] if fe.api_key else []), *fe.api_keys], api_keys_file=fe.api_keys_file,
            admin_keys=fe.admin_keys, admin_keys_file=fe.admin_keys_file, metrics_auth=fe.metrics_auth,
            tenant_salts=fe.tenant_salts,
        )  # fmt: skip

    @property
    def open(self) -> bool:
        return not (self.api.configured or self.admin.configured)

    def _match(self, request: Request) -> tuple[Key | None, Key | None]:
        """(API key, admin key) the request's bearer token is; both sets are always compared."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, None
        digest = hashlib.sha256(token.encode()).digest()
        return self.api.match(digest), self.admin.match(digest)

    async def api_route(self, request: Request) -> None:
        """/v1/*: sets `request.state.cache_salt_default`, the salt of the key used (None without one)."""
        request.state.cache_salt_default = None
        if not self.api.configured:
            return
        api, admin = self._match(request)
        if api is not None:
            request.state.cache_salt_default = api.salt
        elif admin is not None:
            raise APIError(403, "an admin key is for /admin/* only: use an API key", code="api_key_required")
        else:
            raise _unauthorized("API key")

    async def admin_route(self, request: Request) -> None:
        if self.open:
            return
        if not self.admin.configured:
            raise APIError(403, "admin disabled: set frontend.admin_keys", code="admin_disabled")
        api, admin = self._match(request)
        if admin is None and api is not None:
            raise APIError(403, "an API key cannot call /admin/*: use an admin key", code="admin_key_required")
        if admin is None:
            raise _unauthorized("admin key")

    async def metrics_route(self, request: Request) -> None:
        if self.metrics_auth and self._match(request) == (None, None):
            raise _unauthorized("API or admin key")


def _unauthorized(what: str) -> APIError:
    return APIError(
        401, f"Incorrect or missing {what}: send it as 'Authorization: Bearer <key>'", code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip
