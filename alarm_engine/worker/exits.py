"""How long the worker waits for Kafka and the registry, and how it gives up.

A worker that cannot do its job exits (non-zero) rather than run half-working: its
supervisor (`alarm-engine worker`, or any process manager) restarts it, and it
replays its input from its committed positions.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("alarm_engine")

# A send that Kafka does not acknowledge is retried with exponential backoff for this
# long, then the worker exits. Never dead-lettered: an unreachable broker is not a bad record.
SEND_RETRY_S = float(os.environ.get("ALARM_ENGINE_SEND_RETRY_S", "300"))
# A record whose writer schema cannot be fetched (registry down) is not a bad record:
# its partition waits and retries with backoff for this long, and only then is the
# record dead-lettered (with that reason) so that the partition moves on.
REGISTRY_RETRY_S = float(os.environ.get("ALARM_ENGINE_REGISTRY_RETRY_S", "300"))
EXIT_SEND_FAILED = 75  # EX_TEMPFAIL
EXIT_CRASHED = 70  # EX_SOFTWARE: a part of the worker failed (watchdog.py)
EXIT_FAILED = 1


def fatal(message: str, *args, code: int = EXIT_FAILED, exc_info: bool = False) -> None:
    """Log `message` as CRITICAL and exit the process at once with `code`."""
    log.critical(message, *args, exc_info=exc_info)
    logging.shutdown()
    os._exit(code)
