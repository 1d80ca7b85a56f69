"""The demo signing key and token minting for ``fairgate demo`` and
``fairgate token``.

The key is generated on first use and kept in a local state directory
(``$FAIRGATE_HOME``, else ``$XDG_STATE_HOME/fairgate``, else
``~/.local/state/fairgate``). ``fairgate run`` never reads it: production
keys come from the policy's ``secret_env`` or ``key_file``.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from pathlib import Path

import jwt

DEMO_ISSUER = "https://id.fairgate.example"
DEMO_AUDIENCE = "crm-voip-api"
SECRET_ENV = "FAIRGATE_JWT_SECRET"
AUDIT_KEY_ENV = "FAIRGATE_AUDIT_KEY"


def state_dir() -> Path:
    if home := os.environ.get("FAIRGATE_HOME"):
        return Path(home)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fairgate"


def demo_secret() -> str:
    return _state_secret("demo-signing-key")


def demo_audit_key() -> str:
    """The demo's key for audit pseudonyms, stable across demo restarts."""
    return _state_secret("demo-audit-key")


def _state_secret(name: str) -> str:
    path = state_dir() / name
    try:
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # Written with owner-only permissions: anyone who reads it can mint tokens.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def mint_token(
    *,
    sub: str,
    tenant: str,
    roles: list[str],
    plan: str | None = None,
    ttl: float = 3600.0,
    secret: str | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": DEMO_ISSUER,
        "aud": DEMO_AUDIENCE,
        "sub": sub,
        "tenant": tenant,
        "roles": roles,
        "iat": now,
        "exp": now + int(ttl),
        "jti": uuid.uuid4().hex,
        "sid": uuid.uuid4().hex[:16],
    }
    if plan:
        claims["plan"] = plan
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret or demo_secret(), algorithm="HS256")
