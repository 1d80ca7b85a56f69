"""The one exception type shared by both request-target implementations.

Kept in its own tiny module so that ``gateway._target_py`` and the native
``gateway._target_c`` raise the very same class, whichever one is selected.
"""

from __future__ import annotations

__all__ = ["BadTarget"]


class BadTarget(ValueError):
    """The raw request target is malformed or ambiguous; the gateway answers 400.

    ``detail`` is a short human-readable reason such as ``"encoded slash in path"``.
    """

    detail: str

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
