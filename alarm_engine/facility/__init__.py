"""A facility's configuration as one declarative file: validate, diff, apply, export, import.

- `source`: YAML/JSON documents read with the line of every key (for FILE:LINE errors).
- `fileformat`: the file format, its defaults, and its validation against the topics' schemas.
- `pvname`: what EPICS accepts as a PV name.
- `diff`: the plan between the topics' current state and the file (pure).
- `state`, `apply`: reading the compacted topics and producing the plan (Kafka).
- `export`: the current state as a file (YAML, JSON, Phoebus XML).
- `phoebus`, `jaws`: importers, each with a report of what did not map.
"""
