"""Shared fixtures. Integration tests expect the stack that `make test` starts
(ports from BOOTSTRAP_SERVERS / SCHEMA_REGISTRY); each test gets topics of its
own through a unique topic prefix, so tests never see each other's records."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from alarm_engine.config import Settings


@pytest.fixture
def settings() -> Settings:
    """Settings with a fresh topic prefix; topics created and compacting fast."""
    from alarm_engine.stack import FAST_COMPACTION
    from alarm_engine.topics import ensure_topics

    s = Settings.from_env(topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=3)
    asyncio.run(ensure_topics(s, extra_config=FAST_COMPACTION))
    from alarm_engine.history import ensure_topic as ensure_history  # append-only, its own policy

    asyncio.run(ensure_history(s))
    return s
