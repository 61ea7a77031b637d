"""Python hooks a test plan names (``tests.integration.plan_hooks:mask_email``)."""

from __future__ import annotations

import hashlib

#: Not a function: a plan naming it is refused.
NOT_CALLABLE = "mask"


def mask_email(value: str | None) -> str | None:
    """An e-mail with its local part replaced by a stable digest; NULL stays NULL."""
    if value is None:
        return None
    local, at, domain = value.partition("@")
    digest = hashlib.sha256(local.encode()).hexdigest()[:10]
    return f"{digest}{at}{domain.lower()}"
