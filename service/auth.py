"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.

With no keys configured every request passes (development); `service.settings` refuses that
in production unless FLOWIE_ALLOW_UNAUTHENTICATED says a gateway authenticates instead.
Keys are never logged: the digests compared here are the only form they take after start-up.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from service.problems import Unauthorized


def _digest(key: str) -> bytes:
    # Equal-length digests: compare_digest's time then reveals nothing about key lengths.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyAuth:
    """FastAPI dependency: raise Unauthorized (401) unless the request carries a configured key."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str | None) -> bool:
        if not self._digests:
            return True
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    async def __call__(self, request: Request) -> None:
        if not self._digests:
            return
        presented = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if presented is None and authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = credentials.strip()
        if presented is None:
            raise Unauthorized("this service needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
        if not self.check(presented):
            raise Unauthorized("the API key is not valid")
