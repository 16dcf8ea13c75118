"""Quiet logs while Kafka is away: one WARNING when the outage starts, a reminder at
most every REMIND_S seconds, one INFO when it ends.

During a 30 s broker outage aiokafka and Faust log thousands of lines ("Unable
connect to node", "Unable to update metadata", "Failed fetch messages", "Timer
commit is overlapping", seeks refused while the flow is stopped): what an operator
must act on drowns in them. A logging filter on the root handlers lets the first of
these through, rewritten as the outage's WARNING, counts and drops the others, and
lets one through as a reminder every REMIND_S. The outage ends when a send is
acknowledged again (the worker's heartbeat calls `kafka_ok()`): one INFO line with
its length and how many lines were held back. The engine's own messages are never
filtered.

`OutageGate` is the pure part (time passed in); `QuietFilter` is the logging shell.
"""

from __future__ import annotations

import logging
import time

REMIND_S = 30.0
# After the end of an outage, a broker that has just come back still refuses a few
# requests (its group coordinator loads): such lines within SETTLE_S are the outage's tail.
SETTLE_S = 15.0

# Substrings of the lines Kafka clients repeat while the broker is unreachable: the
# connection errors start an outage; the others are its side effects, held back only
# while an outage is in progress (a commit overlapping under load is not an outage).
CONNECTION = (
    "Unable connect to node", "Unable to connect to node", "Unable to update metadata",
    "Unable to request metadata", "Connect attempt to", "KafkaConnectionError", "NodeNotReadyError",
    "Connection refused",
)
SIDE_EFFECTS = (
    "Coordinator dead", "Marking the coordinator dead", "coordinator (node",
    "Failed fetch messages", "Timer commit is overlapping", "when flow not active", "Heartbeat failed",
    "Heartbeat session expired", "Got error produce response", "Error sending", "RequestTimedOutError",
    "Failed to commit", "OffsetCommit failed", "Group Coordinator Request failed", "Unable to send",
    "Error in sender", "Error fetching", "Failed to fetch", "Unable to find",
)
NOISY_LOGGERS = ("aiokafka", "faust", "mode")


def noise_kind(logger_name: str, message: str) -> str | None:
    """'connection', 'side effect', or None (not Kafka client noise)."""
    if not logger_name.startswith(NOISY_LOGGERS):
        return None
    if any(n in message for n in CONNECTION):
        return "connection"
    if any(n in message for n in SIDE_EFFECTS):
        return "side effect"
    return None


class OutageGate:
    """Decides what becomes of each noise line and of each sign of Kafka being back."""

    def __init__(self, remind_s: float = REMIND_S, settle_s: float = SETTLE_S):
        self.remind_s = remind_s
        self.settle_s = settle_s
        self.ended_at: float | None = None
        self.since: float | None = None  # start of the outage in progress
        self.last_shown = 0.0
        self.held = 0  # lines dropped since the last one shown
        self.held_total = 0
        self.last_outage_s: float | None = None  # length of the last outage that ended

    @property
    def in_outage(self) -> bool:
        return self.since is not None

    def quiet(self, now: float) -> bool:
        """In an outage or its tail: the side effects are held back too."""
        return self.since is not None or (self.ended_at is not None and now - self.ended_at < self.settle_s)

    def on_noise(self, now: float) -> str:
        """'start' (show as the outage's warning), 'remind' (show as a reminder) or 'drop'."""
        if self.since is None and self.ended_at is not None and now - self.ended_at < self.settle_s:
            self.held_total += 1
            return "drop"
        if self.since is None:
            self.since = self.last_shown = now
            self.held = self.held_total = 0
            return "start"
        if now - self.last_shown >= self.remind_s:
            self.last_shown = now
            return "remind"
        self.held += 1
        self.held_total += 1
        return "drop"

    def on_ok(self, now: float) -> tuple[float, int] | None:
        """Kafka answered: (outage length, lines held back) if an outage just ended."""
        if self.since is None:
            return None
        length, held = now - self.since, self.held_total
        self.since, self.ended_at = None, now
        self.last_outage_s = round(length, 1)
        return length, held


gate = OutageGate()
log = logging.getLogger("alarm_engine")


class QuietFilter(logging.Filter):
    def __init__(self, gate: OutageGate, clock=time.monotonic):
        super().__init__()
        self.gate = gate
        self.clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        # One decision per record, whichever handlers it passes through.
        decided = getattr(record, "_quiet", None)
        if decided is not None:
            return decided
        try:
            message = record.getMessage()
        except Exception:
            return True
        kind = None if record.levelno >= logging.CRITICAL else noise_kind(record.name, message)
        if kind is None or (kind == "side effect" and not self.gate.quiet(self.clock())):
            record._quiet = True
            return True
        action = self.gate.on_noise(self.clock())
        if action == "drop":
            record._quiet = False
            return False
        if action == "start":
            text = (f"Kafka unreachable: {message} (further connection errors are held back; "
                    f"a reminder every {self.gate.remind_s:.0f} s)")
        else:
            text = (f"Kafka still unreachable after {self.clock() - self.gate.since:.0f} s "
                    f"({self.gate.held} line(s) held back since the last one): {message}")
            self.gate.held = 0
        # args (), not None: mode's formatter makes None into (None,)
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record._quiet = True
        return True


_installed: QuietFilter | None = None


def install(clock=time.monotonic) -> QuietFilter:
    """Put the filter on every handler of the root logger (Faust's worker has set them up)."""
    global _installed
    if _installed is None:
        _installed = QuietFilter(gate, clock)
    for handler in logging.getLogger().handlers:
        if _installed not in handler.filters:
            handler.addFilter(_installed)
    return _installed


def kafka_ok(now: float | None = None) -> None:
    ended = gate.on_ok(time.monotonic() if now is None else now)
    if ended is not None:
        length, held = ended
        log.info("Kafka reachable again after %.0f s (%d log line(s) about it held back)", length, held)
