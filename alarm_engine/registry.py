"""The schema registry (Confluent REST API) behind the codec."""

from __future__ import annotations

import json

import httpx
from schema_registry.client import SchemaRegistryClient, schema as sr_schema

from alarm_engine.codec import Codec, load_schema
from alarm_engine.config import VALUE_SCHEMAS, Settings


class RegistryError(RuntimeError):
    pass


def client(settings: Settings) -> SchemaRegistryClient:
    # Credentials may be given in the URL (https://user:pass@host/...).
    url = httpx.URL(settings.registry_url)
    auth = None
    if url.username:
        auth = httpx.BasicAuth(url.username, url.password)
        url = url.copy_with(username=None, password=None)
    return SchemaRegistryClient(
        str(url),
        ca_location=settings.extra.get("registry_ca"),
        auth=auth,
        timeout=httpx.Timeout(5.0),
    )


def make_codec(settings: Settings) -> Codec:
    sr = client(settings)

    def fetch(schema_id: int):
        found = sr.get_by_id(schema_id)
        return None if found is None else found.raw_schema

    def register(subject: str, schema: dict) -> int:
        try:
            return sr.register(subject, sr_schema.AvroSchema(schema))
        except Exception as e:
            raise RegistryError(f"schema registry at {settings.registry_url}: cannot register {subject}: {e}") from e

    schemas = {topic: load_schema(name) for topic, name in VALUE_SCHEMAS.items()}
    # Subjects follow the physical topic names (TopicNameStrategy).
    return Codec(schemas, fetch, register, subject=lambda topic: f"{settings.topic(topic)}-value")


def register_all(settings: Settings, codec: Codec | None = None) -> dict[str, int]:
    codec = codec or make_codec(settings)
    return {t: codec.schema_id(t) for t in VALUE_SCHEMAS}
