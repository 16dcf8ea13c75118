"""alarm_engine: an EPICS alarm engine with Kafka as the source of truth.

`faust -A alarm_engine worker` looks up the attribute `app` on this package.
It is resolved lazily so that the CLI, the codecs and the pure core import
without pulling in Faust and its event loop machinery.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "app":
        from alarm_engine.worker import app

        return app
    raise AttributeError(f"module 'alarm_engine' has no attribute {name!r}")
