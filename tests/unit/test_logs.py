"""Hostile text (terminal escapes, fake log lines) is shown escaped, on one line."""
import logging

import pytest

from workers import logs
from workers.settings import Settings

HOSTILE = "\x1b[31mFAKE\nERROR x=1\r\x07"


@pytest.mark.parametrize("text,shown", [
    ("plain order-1 desk", "plain order-1 desk"),
    (HOSTILE, "\\x1b[31mFAKE\\nERROR x=1\\r\\x07"),
    ("tab\there\x00\x7f", "tab\\there\\x00\\x7f"),
    ("c1 \x9b31m csi", "c1 \\x9b31m csi"),  # an 8-bit CSI: some terminals obey it
    ("bidi \u202e reversed \u2028 line", "bidi \\u202e reversed \\u2028 line"),
    ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),  # printable non-ASCII stays readable
])
def test_printable_escapes_control_characters(text, shown):
    assert logs.printable(text) == shown
    assert logs.printable(shown) == shown  # escaping twice changes nothing


def test_a_log_line_with_hostile_text_stays_one_line(capsys):
    logs.configure("INFO")
    try:
        logging.getLogger("workers.test").info("dead letter key=%s", HOSTILE)
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            logging.getLogger("workers.test").exception("failed key=%s", HOSTILE)
    finally:
        logging.getLogger().handlers[:] = []
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err
    lines = err.splitlines()
    assert lines[0].endswith(" INFO workers.test dead letter key=\\x1b[31mFAKE\\nERROR x=1\\r\\x07")
    assert lines[1].endswith(" ERROR workers.test failed key=\\x1b[31mFAKE\\nERROR x=1\\r\\x07")
    assert lines[2] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert lines[-1] == "ValueError: \\x1b[31mFAKE\\nERROR x=1\\r\\x07"
    assert not any(line.startswith("ERROR x=1") for line in lines)


def test_secret_values_are_masked_in_any_log_line(capsys):
    settings = Settings.from_env({"REDIS_URL": "redis://h:1/0?password=pw%2Fredis-1",
                                  "KAFKA_SASL_PASSWORD": "kafka-pw-2", "KAFKA_CLIENT_ID": "c",
                                  "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "reg:registry-pw-3"})
    assert {"pw%2Fredis-1", "pw/redis-1", "kafka-pw-2", "registry-pw-3"} <= set(settings.secrets())
    assert "c" not in settings.secrets()
    logs.configure("INFO", secrets=settings.secrets())
    try:
        # e.g. a library's error quoting what it was given
        logging.getLogger("workers.test").warning("auth failed password=pw/redis-1 sasl=kafka-pw-2 reg=registry-pw-3")
    finally:
        logging.getLogger().handlers[:] = []
    err = capsys.readouterr().err
    assert err.rstrip().endswith("auth failed password=*** sasl=*** reg=***"), err
