"""maskedBy chains: a cycle of masks would make its alarms mask each other in turn, so the
places that write definitions (the CLI, `apply`) refuse one before it is written. Pure."""

from __future__ import annotations

from typing import Mapping


def mask_cycle(parents: Mapping[str, str | None], alarm: str, parent: str | None) -> list[str] | None:
    """The cycle that defining `alarm` masked by `parent` would close, as the chain of names
    from `alarm` back to it (["A", "B", "A"]), or None. `parents`: every other alarm's maskedBy."""
    if parent is None:
        return None
    chain, seen, current = [alarm], {alarm}, parent
    while current is not None:
        chain.append(current)
        if current in seen:
            return chain if current == alarm else None  # a cycle elsewhere is not this alarm's
        seen.add(current)
        current = parents.get(current)
    return None


def cycles(parents: Mapping[str, str | None]) -> list[list[str]]:
    """Every cycle in a whole set of definitions (alarm -> maskedBy), each once, from its
    smallest name: for checking a facility file as a whole."""
    found, done = [], set()
    for start in sorted(parents):
        chain, index, current = [], {}, start
        while current is not None and current not in done and current not in index:
            index[current] = len(chain)
            chain.append(current)
            current = parents.get(current)
        if current is not None and current in index:
            loop = chain[index[current]:]
            first = loop.index(min(loop))
            loop = loop[first:] + loop[:first]
            found.append(loop + [loop[0]])
        done.update(chain)
    return found
