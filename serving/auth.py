"""Bearer-token authentication with per-token allowed feature services.

The tokens file (YAML or JSON) maps each token to the feature services it may read, or
``"*"`` for all of them and for lists of feature references::

    tokens:
      s3cr3t-fraud-model: [fraud_detection_v1]
      s3cr3t-ops: "*"

Callers send ``authorization: Bearer <token>`` metadata. Tokens are kept as SHA-256
digests and compared by digest, so the file's contents are not held in memory. Any known
token may ask for the server's info (:meth:`TokenPolicy.authenticate`); reading features
also needs the token to cover them (:meth:`TokenPolicy.check`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from featurepipe.errors import FeaturepipeError, InvalidInput

ALL = "*"


class Unauthenticated(FeaturepipeError):
    """No token, or a token the server does not know: the caller must authenticate."""


class PermissionDenied(FeaturepipeError):
    """A known token that may not read what it asked for."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf8")).digest()


@dataclass(frozen=True)
class TokenPolicy:
    """Which feature services each token may read."""

    allowed: dict[bytes, frozenset[str]]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenPolicy:
        """Read a tokens file (see the module doc); raises InvalidInput when malformed."""
        import yaml  # JSON is YAML too

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"cannot read tokens file {path}: {exc}") from exc
        tokens = raw.get("tokens", raw) if isinstance(raw, dict) else None
        if not isinstance(tokens, dict) or not tokens:
            raise InvalidInput(
                f"tokens file {path} must map tokens to feature services, e.g. "
                "'tokens: {my-token: [fraud_detection_v1], ops-token: \"*\"}'"
            )
        allowed: dict[bytes, frozenset[str]] = {}
        for token, services in tokens.items():
            if isinstance(services, str):
                services = [services]
            if not isinstance(token, str) or not token or not isinstance(services, list) \
                    or not all(isinstance(s, str) for s in services):
                raise InvalidInput(
                    f"tokens file {path}: entry {token!r} must be a non-empty token mapped to "
                    "a list of feature service names or \"*\""
                )
            allowed[_digest(token)] = frozenset(services)
        return cls(allowed)

    def authenticate(self, authorization: str | None) -> frozenset[str]:
        """The feature services the ``authorization`` header's token may read; raises
        Unauthenticated when there is no token or an unknown one."""
        if not authorization:
            raise Unauthenticated(
                "this feature server requires a token: send metadata "
                "'authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.partition(" ")
        services = self.allowed.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if services is None:
            raise Unauthenticated("the bearer token is not valid for this feature server")
        return services

    def check(self, authorization: str | None, feature_service: str | None) -> None:
        """Raise unless the ``authorization`` header may read ``feature_service``
        (None: a list of feature references, which needs ``"*"``)."""
        services = self.authenticate(authorization)
        if ALL in services:
            return
        if feature_service is None:
            raise PermissionDenied(
                "this token may read feature services "
                f"{sorted(services)} only, not lists of feature references"
            )
        if feature_service not in services:
            raise PermissionDenied(
                f"this token may not read feature service {feature_service!r}; it may read "
                f"{sorted(services)}"
            )
