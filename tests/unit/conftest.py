"""Unit tests see no CDCSYNC_* variable from the developer's shell.

Hypothesis runs without per-example deadlines: on a shared two-core machine a slow
example says nothing about correctness, and a deadline there only makes runs flaky.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("cdcsync", deadline=None)
settings.load_profile("cdcsync")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CDCSYNC_"):
            monkeypatch.delenv(name)
