"""API keys and per-key rate limits.

Inference keys (FLOCK_API_KEYS) may call generation and routing over the shared experts; tenant keys
(FLOCK_TENANT_KEYS, `TENANT:KEY`) also see their tenant's private experts and may register and remove them;
admin keys (FLOCK_ADMIN_KEYS) see every expert and may change any (adapters/tenants.py). Keys come from the
environment or from a file (FLOCK_API_KEYS_FILE, FLOCK_ADMIN_KEYS_FILE, FLOCK_TENANT_KEYS_FILE; one key or
`TENANT:KEY` per line), are compared in constant time and never logged. With no key configured the gateway is
open and says so at start-up. Rate limits are token buckets kept in Redis, so every gateway replica shares
them; without Redis a local bucket is used.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from redis.exceptions import RedisError

from adapters.tenants import EVERYTHING, Scope, check_tenant_name
from service.errors import APIError

log = logging.getLogger(__name__)

# KEYS[1] = bucket; ARGV = rate per second, burst, now (s). Returns 0 when allowed, else seconds to wait.
_TOKEN_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


def _lines(inline: list[str], file: Path | None) -> list[str]:
    lines = list(inline)
    if file is not None:
        lines += [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [line for line in lines if line]


def _load_keys(inline: list[str], file: Path | None) -> list[bytes]:
    return [k.encode() for k in _lines(inline, file)]


def parse_tenant_keys(inline: list[str], file: Path | None = None) -> list[tuple[str, bytes]]:
    """`TENANT:KEY` entries as (tenant, key); a malformed entry stops the start-up with a message that names
    its position (never the key)."""
    keys = []
    for i, entry in enumerate(_lines(inline, file), 1):
        tenant, sep, key = entry.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"tenant key #{i} is not of the form TENANT:KEY")
        try:
            keys.append((check_tenant_name(tenant.strip()), key.strip().encode()))
        except ValueError as exc:
            raise ValueError(f"tenant key #{i}: {exc}") from None
    return keys


def key_id(key: bytes) -> str:
    """A short hash of a key: what logs, audit lines and rate limits name, never the key itself."""
    return hashlib.sha256(key).hexdigest()[:12]


@dataclass
class Principal:
    key_id: str  # a short hash of the key: what logs and rate limits name, never the key itself
    admin: bool
    tenant: str | None = None  # a tenant key's tenant; None: an admin key or a key of no tenant

    @property
    def scope(self) -> Scope:
        """The experts this caller may see (adapters/tenants.py)."""
        return EVERYTHING if self.admin else Scope(tenant=self.tenant)


class Authenticator:
    def __init__(self, api_keys: list[str], admin_keys: list[str], api_keys_file: Path | None = None,
                 admin_keys_file: Path | None = None, tenant_keys: list[str] | None = None,
                 tenant_keys_file: Path | None = None):
        self.admin = _load_keys(admin_keys, admin_keys_file)
        self.inference = _load_keys(api_keys, api_keys_file)
        self.tenants = parse_tenant_keys(tenant_keys or [], tenant_keys_file)
        owners: dict[bytes, str] = {}
        for tenant, key in self.tenants:
            if owners.setdefault(key, tenant) != tenant:
                raise ValueError(f"a key is given to two tenants ({owners[key]!r} and {tenant!r})")
        if set(owners) & (set(self.admin) | set(self.inference)):
            raise ValueError("a tenant key is also an admin or inference key: give each key one role")
        self.open = not self.admin and not self.inference and not self.tenants

    @staticmethod
    def _match(presented: bytes, keys: list[bytes]) -> bool:
        found = False
        for key in keys:  # no early exit: the time taken does not depend on which key matched
            found |= hmac.compare_digest(presented, key)
        return found

    def authenticate(self, request: Request, *, admin: bool) -> Principal:
        if self.open:
            return Principal(key_id="anonymous", admin=True)
        header = request.headers.get("authorization", "")
        presented = header[7:].strip().encode() if header.lower().startswith("bearer ") else b""
        if not presented:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        is_admin = self._match(presented, self.admin)
        tenant = self._tenant(presented)
        if not is_admin and tenant is None and not self._match(presented, self.inference):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if admin and not is_admin:
            raise APIError(403, "this endpoint needs an admin key", code="insufficient_permissions")
        return Principal(key_id=key_id(presented), admin=is_admin, tenant=tenant)

    def _tenant(self, presented: bytes) -> str | None:
        """The tenant whose key this is (None: none), every key compared (no early exit)."""
        found = None
        for tenant, key in self.tenants:
            if hmac.compare_digest(presented, key):
                found = tenant
        return found


class RateLimiter:
    """Token bucket per key: `rate` requests per second on average, bursts up to `burst`."""

    def __init__(self, redis_client, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._redis = redis_client
        self._script = redis_client.register_script(_TOKEN_BUCKET) if redis_client is not None else None
        self._local: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def check(self, key_id: str) -> None:
        if not self.enabled:
            return
        now = time.time()
        wait = None
        if self._script is not None:
            try:
                wait = float(await self._script(keys=[f"flock:ratelimit:{key_id}"], args=[self.rate, self.burst, now]))
            except (RedisError, OSError):
                wait = None  # Redis down: fall back to this replica's own bucket
        if wait is None:
            tokens, at = self._local.get(key_id, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._local[key_id] = (tokens - 1 if tokens >= 1 else tokens, now)
        if wait > 0:
            raise APIError(429, f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
