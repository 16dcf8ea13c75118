"""Unit-test fixtures: a codec over an in-memory schema table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from alarm_engine.codec import Codec, load_schema  # noqa: E402
from alarm_engine.config import VALUE_SCHEMAS  # noqa: E402


class FakeRegistry:
    """Stands in for the registry's id table only; the registry itself is
    exercised by the integration tests."""

    def __init__(self):
        self.by_id: dict[int, dict] = {}

    def register(self, subject, schema):
        for sid, s in self.by_id.items():
            if s == schema:
                return sid
        sid = len(self.by_id) + 1
        self.by_id[sid] = schema
        return sid

    def fetch(self, sid):
        return self.by_id.get(sid)


@pytest.fixture(scope="module")
def reg():
    return FakeRegistry()


@pytest.fixture(scope="module")
def codec(reg):
    schemas = {t: load_schema(n) for t, n in VALUE_SCHEMAS.items()}
    return Codec(schemas, reg.fetch, reg.register)
