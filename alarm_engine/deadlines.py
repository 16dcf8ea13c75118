"""When the timer of a per-PV alarm may fire: only once the PV's inputs from before it are applied.

A deadline (an on-delay or off-delay ending, a shelving or a disable ending) is a
wall-clock time, and its tick travels on alarm-deps, not on pv-state. Fired while
an earlier pv-state record of the partition is still unread (a backlog) or not
yet sent by the CA bridge, the tick would be applied first: an on-delay that a
clear had cancelled in time would be shown for a moment, a false alarm.

So a partition's due deadlines fire when one of these holds:
- its stream time (the latest pv-state record time applied) has reached the
  deadline: every record from before the deadline is applied, records of one
  partition being applied in their order;
- it is settled: nothing of it is waiting to be read or sent, so the clock is
  the only news (an idle PV);
- the deadline is `force_ms` past: a stuck input must not hold an alarm back
  forever; it then fires on what is known.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

#: Past a deadline by this much, it fires whatever its partition's inputs are doing.
FORCE_MS = 10_000


def fireable(deadlines: Mapping[str, tuple[int, str, int]], now_ms: int, stream_ms: Mapping[int, int],
             settled: Container[int], force_ms: int = FORCE_MS) -> list[str]:
    """The alarms whose deadline (alarm -> (partition, pv, when)) may fire at `now_ms`."""
    return [name for name, (p, _pv, when) in deadlines.items()
            if when <= now_ms and (stream_ms.get(p, -1) >= when or p in settled or now_ms - when >= force_ms)]
