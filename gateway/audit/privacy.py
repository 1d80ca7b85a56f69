"""Pseudonymous client addresses for audit records.

A keyed HMAC, so the pseudonym is stable for one key (the same client can be
followed through the trail) but cannot be reversed by hashing all 2^32 IPv4
addresses without the key.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonymize(ip: str, key: bytes) -> str:
    return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:32]
