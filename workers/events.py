"""Supervisor's event listener: every unexpected exit and every FATAL, counted in Redis and logged.

Supervisor restarts a crashed worker within seconds, so a crash loop shows
nowhere else: ``supervisorctl status`` says RUNNING between crashes. This
listener (``[eventlistener:events]`` in supervisor.conf, subscribed to
PROCESS_STATE) counts, per host and process, in ``{P}:counters:<host>``:

* ``restarts``: the process exited unexpectedly, while running (EXITED with
  expected=0) or before it counted as started (BACKOFF); supervisor starts it again;
* ``fatal``: supervisor gave up starting it (FATAL): it stays down.

``orders metrics`` exports them as ``orders_worker_restarts_total`` and
``orders_worker_fatal_total``. A process that starts gets both counters at 0,
so that its first crash is an increase Prometheus can see.

The protocol (supervisor's docs, "Event Listeners"): stdout belongs to it
(READY, then RESULT 2\\nOK per event), so logs go to stderr. An event is
acknowledged even when Redis is down (it is logged, not counted): a listener
that does not answer would make supervisor queue, then drop, events.
"""
from __future__ import annotations

import logging
from typing import TextIO

from supervisor import childutils

from .errors import ServiceUnavailable
from .metrics import FATAL, RESTARTS
from .settings import Settings
from .store import AggregateStore

log = logging.getLogger(__name__)

COUNTED = {
    "PROCESS_STATE_EXITED": RESTARTS,   # only with expected:0
    "PROCESS_STATE_BACKOFF": RESTARTS,  # exited before startsecs
    "PROCESS_STATE_FATAL": FATAL,
}


def worker_name(host: str, process: str) -> str:
    """The name a process has in the metrics: a worker's own name (``host-consumer-0``), likewise for the others."""
    return f"{host}-{process}"


def handle(store: AggregateStore, host: str, event: str, payload: dict[str, str]) -> None:
    """Count and log one PROCESS_STATE event."""
    process = payload.get("processname", "?")
    who = worker_name(host, process)
    if event == "PROCESS_STATE_STARTING":
        _add(store, host, who, {RESTARTS: 0, FATAL: 0})
        return
    counter = COUNTED.get(event)
    if counter is None or (event == "PROCESS_STATE_EXITED" and payload.get("expected") != "0"):
        return
    total = _add(store, host, who, {counter: 1})
    state = event.removeprefix("PROCESS_STATE_")
    if counter == FATAL:
        log.error("process FATAL host=%s program=%s group=%s from_state=%s fatal_total=%s action=none "
                  "(supervisor gave up; supervisorctl start it after fixing the cause)",
                  host, process, payload.get("groupname"), payload.get("from_state"), total)
    else:
        log.warning("process exited unexpectedly host=%s program=%s group=%s state=%s from_state=%s pid=%s "
                    "restarts_total=%s action=supervisor_restarts_it", host, process, payload.get("groupname"),
                    state, payload.get("from_state"), payload.get("pid", "-"), total)


def _add(store: AggregateStore, host: str, who: str, counts: dict[str, int]) -> int | str:
    """Add to the counters; the last one's new value, or '?' when Redis is down."""
    try:
        return store.add_counts(host, who, counts)
    except ServiceUnavailable as exc:
        log.warning("event not counted host=%s worker=%s reason=%s", host, who, exc)
        return "?"


def listen(settings: Settings, store: AggregateStore, stdin: TextIO, stdout: TextIO) -> None:
    """Answer supervisor's events until it closes our stdin."""
    host = settings.host_name
    log.info("listening for supervisor events host=%s", host)
    while True:
        childutils.listener.ready(stdout)
        line = stdin.readline()
        if not line:
            log.info("supervisor closed the event stream")
            return
        headers = childutils.get_headers(line)
        body = stdin.read(int(headers["len"]))
        payload_line = body.split("\n", 1)[0]
        handle(store, host, headers.get("eventname", ""), childutils.get_headers(payload_line))
        childutils.listener.ok(stdout)
