# Image for the engine worker, the CLI and the demo IOC (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs (keeps .venv, .stack etc. out of the image even
# without a .dockerignore). Dependencies first, so code edits reuse that layer.
COPY pyproject.toml README.md ./
COPY alarm_engine/__init__.py alarm_engine/__init__.py
COPY alarm_engine/core/__init__.py alarm_engine/core/__init__.py
COPY alarm_engine/facility/__init__.py alarm_engine/facility/__init__.py
RUN pip install ".[ioc]" && pip uninstall -y alarm-engine

COPY alarm_engine ./alarm_engine
COPY schemas ./schemas
# Editable: the codec reads the Avro schemas from <source>/schemas, which a
# plain `pip install .` does not copy into site-packages.
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 engine \
    && mkdir -p /data && chown engine /data

USER engine
# Faust's RocksDB tables. docker-compose.yml keeps no volumes (the registry is in-memory);
# mount one here for a long-lived deployment.
ENV ALARM_ENGINE_DATA_DIR=/data

CMD ["alarm-engine", "worker"]
