"""Optional bearer-token check on every RPC: tokens from an environment variable or a mounted secret file."""
from __future__ import annotations

import hmac
import os
from pathlib import Path


class Unauthenticated(Exception):
    """The call carried no valid `authorization: Bearer <token>` metadata."""


class TokenCheck:
    """Accepts a call when no tokens are configured, or when its bearer token is one of them.
    Tokens are read once at replica start; they never appear in logs or error messages."""

    def __init__(self, env_var: str | None = None, token_file: str | None = None):
        tokens: list[str] = []
        if env_var and os.environ.get(env_var):
            tokens += os.environ[env_var].split(",")
        if token_file:
            tokens += Path(token_file).read_text().split()
        self._tokens = [t.strip().encode() for t in tokens if t.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, metadata) -> None:
        """metadata: (key, value) pairs of the call. Raises Unauthenticated."""
        if not self._tokens:
            return
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("missing authorization metadata (expected 'Bearer <token>')")
        scheme, _, token = str(values[0]).partition(" ")
        given = token.strip().encode()
        # Compare against every token in constant time: timing reveals nothing about which one is near.
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, t) for t in self._tokens):
            raise Unauthenticated("invalid bearer token")
