"""API keys and per-key rate limits.

Inference keys (FLOCK_API_KEYS) may call generation and routing; admin keys (FLOCK_ADMIN_KEYS) may also change
the expert pool. Keys come from the environment or from a file (FLOCK_API_KEYS_FILE, FLOCK_ADMIN_KEYS_FILE;
one key per line), are compared in constant time and never logged. With no key configured the gateway is
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


def _load_keys(inline: list[str], file: Path | None) -> list[bytes]:
    keys = list(inline)
    if file is not None:
        keys += [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [k.encode() for k in keys if k]


@dataclass
class Principal:
    key_id: str  # a short hash of the key: what logs and rate limits name, never the key itself
    admin: bool


class Authenticator:
    def __init__(self, api_keys: list[str], admin_keys: list[str], api_keys_file: Path | None = None,
                 admin_keys_file: Path | None = None):
        self.admin = _load_keys(admin_keys, admin_keys_file)
        self.inference = _load_keys(api_keys, api_keys_file)
        self.open = not self.admin and not self.inference

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
        if not is_admin and not self._match(presented, self.inference):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if admin and not is_admin:
            raise APIError(403, "this endpoint needs an admin key", code="insufficient_permissions")
        return Principal(key_id=hashlib.sha256(presented).hexdigest()[:12], admin=is_admin)


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
