"""Logging set-up, done once in each process's main(); escaping of untrusted text.

Keys, product names and error messages come from whoever can write to the
orders topic. Printed raw, an escape sequence would drive the operator's terminal
and a newline would start a fake log line; so every log line, and every line of
dead letters that ``orders dlq`` prints, goes through ``printable``.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Sequence

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped as in a Python literal.

    Control characters (C0, DEL, C1), line and paragraph separators and format
    characters (bidi overrides) become ``\\n``, ``\\x1b``, ``\\u202e``...; printable
    text, also non-ASCII, stays as it is. Backslashes are left alone, so escaping
    twice changes nothing (the lossless form is ``orders dlq --json``).
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named:
        return named
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class EscapingFormatter(logging.Formatter):
    """Formats each record on one line; a traceback keeps its lines, each escaped.

    Any of ``secrets`` (values, longest first) is replaced by ``***`` wherever it
    appears, such as in a library's error message that quotes its configuration.
    """

    def __init__(self, *args, secrets: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._secrets = tuple(secrets)

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return printable(text)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._clean(super().formatMessage(record))

    def formatException(self, ei) -> str:
        lines = "".join(_traceback_lines(ei[1], set())).rstrip("\n")
        return "\n".join(self._clean(line) for line in lines.split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(self._clean(line) for line in stack_info.splitlines())


def _traceback_lines(exc, seen: set[int]) -> list[str]:
    """Python's traceback of ``exc`` and its chain, with each exception's message escaped.

    The frames are our own code; the messages may quote a message's content and
    must not break out of the traceback's lines.
    """
    seen.add(id(exc))
    lines: list[str] = []
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        lines += _traceback_lines(cause, seen)
        lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        lines += _traceback_lines(context, seen)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    summary = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):\n")
        lines += summary.stack.format()
    lines += [printable(line.rstrip("\n")) + "\n" for line in summary.format_exception_only()]
    return lines


def configure(level: str = "INFO", secrets: Sequence[str] = ()) -> None:
    """Log key=value lines to stderr, UTC timestamps, line-buffered for supervisor; ``secrets`` masked."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = EscapingFormatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S", secrets=secrets)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The registry client logs every HTTP request at INFO.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
