"""The worker: the Faust app and what runs in it. `faust -A alarm_engine worker`.

Data flow (each arrow a topic; tables in brackets; the module that does it):

  monitored-pvs --> monitored_agent [monitored] --CA--> pv-state             bridge.py
  pv-state, alarm-deps --> hot path [pv-home] --> active-alarms (per-PV alarms)
                                              --> alarm-inputs (rule alarms)  hotpath.py
  alarms, shelved-alarms, alarm-activations, alarm-acks, disabled-alarms, alarm-inputs
      --> alarm_agent [alarm-state] --> active-alarms (rule, external alarms)
                                    --> alarm-deps (to the PVs' homes)        alarms.py
  active-alarms, operator topics --> history writer --> alarm-history         history_writer.py
  alarms, active-alarms, locations --> summary writer --> alarm-summaries   summary_writer.py

Every topic has the same partition count so that Faust assigns the same partition
numbers of the PV-keyed topics (and of the alarm-keyed topics) to the same worker.
The control topics are read by Faust agents (batches.py: per batch one
acknowledgement wait, then table writes, then input fences); the hot path reads
pv-state and alarm-deps in raw batches of thousands with its own consumer, on the
partitions Faust assigned. The logic lives in engine.py, pv_home.py and core/; this
package moves bytes. app.py: the app, topics and tables; faust_internals.py: all that
leans on Faust's private parts; exits.py: how the worker gives up. docs/design.md
has the picture and the correctness argument.
"""

import os
import socket

from alarm_engine.worker import alarms, bridge, history_writer, hotpath, service, summary_writer  # noqa: F401
from alarm_engine.worker.app import APP_ID, LOGICAL, OUT, app, settings

history_writer.install(app, settings)  # alarm-history, with its own clients
summary_writer.install(app, settings)  # alarm-summaries, one writer per fleet
# The worker as a service: heartbeat, /healthz and /metrics, crash watch, quiet logs.
heartbeat = service.install(
    app, settings, LOGICAL, {settings.topic(t): t for t in OUT}, bridge.bridge,
    app.conf.consumer_group_instance_id or f"{APP_ID}-{socket.gethostname()}-{os.getpid()}", hotpath.hot)

__all__ = ["app"]
