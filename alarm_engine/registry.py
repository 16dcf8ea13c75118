"""The schema registry (Confluent REST API) behind the codec."""

from __future__ import annotations

import json
import ssl

import httpx
from schema_registry.client import SchemaRegistryClient, schema as sr_schema

from alarm_engine.codec import Codec, load_schema
from alarm_engine.config import VALUE_SCHEMAS, Settings


class RegistryError(RuntimeError):
    pass


class _Client(SchemaRegistryClient):
    """python-schema-registry-client (2.6) reads `ca_location` only together with a client
    certificate; without one, httpx would verify the server against certifi's CAs alone
    and a private CA could not be used. This hands httpx the context to verify with."""

    def __init__(self, *args, verify: ssl.SSLContext | None = None, **kwargs):
        self._verify = verify  # read by _get_client_kwargs, called from __init__
        super().__init__(*args, **kwargs)

    def _get_client_kwargs(self) -> dict:
        kw = super()._get_client_kwargs()
        if self._verify is not None and "verify" not in kw:
            kw["verify"] = self._verify
        return kw


def client(settings: Settings) -> SchemaRegistryClient:
    # Credentials: SCHEMA_REGISTRY_USERNAME/PASSWORD, or in the URL (https://user:pass@host/...).
    url = httpx.URL(settings.registry_url)
    user, password = settings.registry_username, settings.registry_password
    if url.username or url.password:
        user = user if user is not None else url.username
        password = password if password is not None else url.password
        url = url.copy_with(username=None, password=None)
    auth = httpx.BasicAuth(user, password or "") if user else None
    cafile = settings.registry_cafile or settings.extra.get("registry_ca")
    verify = ssl.create_default_context(cafile=cafile) if cafile and url.scheme == "https" else None
    return _Client(
        str(url),
        ca_location=cafile,
        auth=auth,
        timeout=httpx.Timeout(5.0),
        verify=verify,
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
            code = getattr(e, "http_code", None)
            why = {401: "authentication refused (HTTP 401): check SCHEMA_REGISTRY_USERNAME/PASSWORD",
                   403: "not authorized (HTTP 403)"}.get(code, f"{e}" + (f" (HTTP {code})" if code else ""))
            raise RegistryError(f"schema registry at {settings.registry_url_redacted()}: "
                                f"cannot register {subject}: {why}") from e

    schemas = {topic: load_schema(name) for topic, name in VALUE_SCHEMAS.items()}
    # Subjects follow the physical topic names (TopicNameStrategy).
    return Codec(schemas, fetch, register, subject=lambda topic: f"{settings.topic(topic)}-value")


def register_all(settings: Settings, codec: Codec | None = None) -> dict[str, int]:
    codec = codec or make_codec(settings)
    return {t: codec.schema_id(t) for t in VALUE_SCHEMAS}
