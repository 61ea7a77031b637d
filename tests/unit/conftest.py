"""Unit tests see no CDCSYNC_* variable from the developer's shell."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CDCSYNC_"):
            monkeypatch.delenv(name)
