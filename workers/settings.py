"""Settings: one frozen object built from the environment in one place.

Every role receives a ``Settings`` explicitly; no other module reads ``os.environ``
(except the CLI, which passes it here).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCHEMA_PATH = REPO_ROOT / "schemas" / "order.avsc"

# Environment variables with a KAFKA_ prefix become librdkafka settings
# (KAFKA_SECURITY_PROTOCOL -> security.protocol), except our own and those that
# configure a Kafka *server* (scripts/stack's ports, Kafka's own *_OPTS).
_KAFKA_OWN_VARS = {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "KAFKA_VERSION",
                   "KAFKA_JAVA", "KAFKA_HOME", "KAFKA_CLUSTER_ID"}
# librdkafka's sensitive properties: those flagged _RK_SENSITIVE in
# confluentinc/librdkafka src/rdkafka_conf.c (v2.15.0; the same in CONFIGURATION.md),
# which librdkafka itself redacts in its config dumps, plus the alias
# sasl.oauthbearer.client.credentials.client.secret of one of them.
LIBRDKAFKA_SENSITIVE = frozenset({
    "ssl.key.location", "ssl.key.password", "ssl.key.pem", "ssl_key", "ssl.ca.pem",
    "ssl.keystore.password",
    "sasl.username", "sasl.password", "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.file", "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
})
# Names that look secret, for properties a newer librdkafka may add.
_SECRET_WORDS = ("password", "secret", "key", "token", "user.info", "jaas", "credential")
# Shorter values are not masked everywhere in the logs: "***" for every "ab" would help no one.
_MIN_SECRET_CHARS = 4
# Query parameters of a URL that carry a secret (redis-py reads ?password=...).
_SECRET_QUERY = re.compile(r"([?&;][^=&;#]*(?:pass|pwd|secret|token|key|auth|credential)[^=&;#]*=)[^&;#]*",
                           re.IGNORECASE)


def is_sensitive(name: str) -> bool:
    """Whether a librdkafka property holds a secret (its value is never shown)."""
    lowered = name.lower()
    return lowered in LIBRDKAFKA_SENSITIVE or any(word in lowered for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """Return ``url`` with every password in it replaced by ``***`` (for logs).

    Covers ``user:password@``, ``:password@`` and secret query parameters
    (``?password=``). The user info is taken to end at the *last* ``@``, so a
    password with an unescaped ``@`` or ``/`` is hidden whole too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{hostpart}" if colon else f"{userinfo}@{hostpart}"
    rest = _SECRET_QUERY.sub(r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def backoff_ms(retry_number: int, base_ms: int, multiplier: float) -> int:
    """Delay before retry ``retry_number`` (1-based): base * multiplier**(n-1)."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    return int(base_ms * multiplier ** (retry_number - 1))


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    schema_registry_url: str = "http://127.0.0.1:8081/apis/ccompat/v7"
    schema_registry_user_info: str = field(default="", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_prefix: str = "orders"
    # REDIS_URL names one seed node of a Redis Cluster (redis-py's RedisCluster finds the rest).
    redis_cluster: bool = False

    orders_topic: str = "orders"
    retry_topic: str = "orders-retry"
    dlq_topic: str = "orders-dlq"
    partitions: int = 3
    retry_partitions: int = 3
    replication_factor: int = -1  # -1: the broker's default.replication.factor
    # The aggregate is derived from the orders and retry logs; a rebuild after
    # losing Redis needs them whole, so topics we create keep data forever.
    retention_ms: int = -1

    group_prefix: str = "orders"
    transactional_id_prefix: str = "orders"
    # This host's name among the pool's hosts (default: the machine's host name). With
    # a worker's slot it names the worker's static group membership and transactional
    # id, so two hosts must never share it: their workers would fence each other.
    host: str = ""
    batch_size: int = 2000
    poll_timeout_s: float = 0.5

    failure_rate: float = 0.0
    max_retries: int = 3
    retry_backoff_ms: int = 1000
    retry_backoff_multiplier: float = 2.0
    # Bytes of retry messages not yet due that a retry worker keeps in memory; at the
    # bound it pauses its partitions. librdkafka's prefetch for it gets as much again.
    retry_buffer_bytes: int = 1024 * 1024
    max_price: float = 1_000_000.0

    # How often an idle worker commits its unchanged offsets again, so that Kafka
    # never expires them (offsets.retention.minutes, 7 days by default).
    offsets_refresh_s: float = 3600.0
    # How long the broker lets a transaction stay open. A host that dies with a
    # transaction open (offsets included) holds its partitions' committed offsets
    # "unstable" this long: the new owner cannot read K before it (KIP-447), so it
    # bounds a takeover. Kafka Streams uses 10 s under exactly-once for the same reason.
    transaction_timeout_ms: int = 10000

    produce_rate: float = 20.0
    # `orders produce` in Kafka transactions (--transactional) unless told otherwise.
    produce_transactional: bool = False
    # `orders metrics`: the Prometheus endpoint of this host's pool. Loopback by default:
    # a Prometheus on another machine needs METRICS_BIND (or a local agent) to reach it.
    metrics_port: int = 9464
    metrics_bind: str = "127.0.0.1"
    schema_path: Path = DEFAULT_SCHEMA_PATH
    log_level: str = "INFO"
    kafka_extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raises ConfigError."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, (var, convert) in _ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = convert(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r} is not valid: {exc}") from exc
        if "failure_rate" not in values and env.get("ORDERS_FAILURE_RATE_DEFAULT"):
            # supervisor.conf's demo rate: an explicit ORDERS_FAILURE_RATE wins.
            values["failure_rate"] = float(env["ORDERS_FAILURE_RATE_DEFAULT"])
        values["kafka_extra"] = _kafka_extra(env)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Reject values no run could succeed with; raises ConfigError naming the variable."""
        checks = [
            (self.partitions >= 1, "ORDERS_PARTITIONS must be >= 1"),
            (self.retry_partitions >= 1, "RETRY_PARTITIONS must be >= 1"),
            (0.0 <= self.failure_rate <= 1.0, "ORDERS_FAILURE_RATE must be between 0 and 1"),
            (self.max_retries >= 0, "RETRY_MAX must be >= 0"),
            (self.retry_backoff_ms >= 0, "RETRY_BACKOFF_MS must be >= 0"),
            (self.retry_backoff_multiplier >= 1.0, "RETRY_BACKOFF_MULTIPLIER must be >= 1"),
            (self.batch_size >= 1, "BATCH_SIZE must be >= 1"),
            (self.retry_buffer_bytes >= 1024 * 1024, "RETRY_BUFFER_BYTES must be >= 1048576 (1 MiB)"),
            (self.offsets_refresh_s > 0, "OFFSETS_REFRESH_S must be > 0"),
            (self.transaction_timeout_ms >= 1000, "TRANSACTION_TIMEOUT_MS must be >= 1000"),
            (0 < self.poll_timeout_s <= 1.0, "POLL_TIMEOUT_S must be in (0, 1]"),
            (self.produce_rate >= 0, "PRODUCE_RATE must be >= 0"),
            (self.max_price > 0, "ORDERS_MAX_PRICE must be > 0"),
            (0 < self.metrics_port < 65536, "METRICS_PORT must be a TCP port (1-65535)"),
            # Braces would end the keys' hash tags early (workers/store.py).
            (bool(self.redis_prefix) and not {"{", "}"} & set(self.redis_prefix),
             "REDIS_PREFIX must be non-empty, without { or }"),
            (len({self.orders_topic, self.retry_topic, self.dlq_topic}) == 3,
             "ORDERS_TOPIC, RETRY_TOPIC and DLQ_TOPIC must differ"),
            # The retry worker drains every topic of RETRY_TOPIC's family (workers/topics.py).
            (not self.is_retry_topic(self.orders_topic) and not self.is_retry_topic(self.dlq_topic),
             "ORDERS_TOPIC and DLQ_TOPIC must not be named like a retry topic (RETRY_TOPIC-<n>ms)"),
            (self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
             "LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def retry_delay_ms(self, retry_number: int) -> int:
        """The backoff before retry ``retry_number`` (1-based)."""
        return backoff_ms(retry_number, self.retry_backoff_ms, self.retry_backoff_multiplier)

    def retry_topic_for(self, retry_number: int) -> str:
        """The topic of retry ``retry_number``: one topic per delay, so each is in due-time order."""
        return f"{self.retry_topic}-{self.retry_delay_ms(retry_number)}ms"

    @property
    def retry_topics(self) -> list[str]:
        """The delay levels' topics these settings retry through, shortest delay first."""
        return list(dict.fromkeys(self.retry_topic_for(n) for n in range(1, self.max_retries + 1)))

    def is_pool_topic(self, name: str) -> bool:
        """Whether ``name`` is one of the pool's topics: orders, any retry topic, the DLQ."""
        return name in (self.orders_topic, self.dlq_topic) or self.is_retry_topic(name)

    def is_retry_topic(self, name: str) -> bool:
        """Whether ``name`` is of RETRY_TOPIC's family: a delay level's topic under any backoff
        settings, or RETRY_TOPIC itself (the single retry topic of earlier versions)."""
        return name == self.retry_topic or re.fullmatch(re.escape(self.retry_topic) + r"-[0-9]+ms", name) is not None

    def group_id(self, role: str) -> str:
        return f"{self.group_prefix}-{role}"

    def transactional_id(self, role: str) -> str:
        return f"{self.transactional_id_prefix}-{role}"

    @property
    def host_name(self) -> str:
        """This host's name among the pool's hosts: ORDERS_HOST, else the machine's."""
        return self.host or socket.gethostname()

    def member(self, role: str, slot: int) -> str:
        """A worker's stable name: host, role and slot (its number on the host)."""
        return f"{self.host_name}-{role}-{slot}"

    def describe(self) -> str:
        """One log line of the effective settings, with secrets hidden."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url":
                value = redact_url(value)
            elif f.name == "schema_registry_url":
                value = redact_url(value)
            elif f.name == "schema_registry_user_info":
                value = "***" if value else ""
            elif f.name == "kafka_extra":
                value = {k: ("***" if is_sensitive(k) else v) for k, v in value.items()}
            shown.append(f"{f.name}={value}")
        return " ".join(shown)

    def secrets(self) -> list[str]:
        """Every secret value these settings hold, longest first: logs mask them wherever they appear."""
        values = [v for k, v in self.kafka_extra.items() if is_sensitive(k)]
        values += [self.schema_registry_user_info, self.schema_registry_user_info.partition(":")[2]]
        for url in (self.redis_url, self.schema_registry_url):
            values += _url_secrets(url)
        return sorted({v for v in values if len(v) >= _MIN_SECRET_CHARS}, key=len, reverse=True)


def _url_secrets(url: str) -> list[str]:
    """The password(s) in a URL, as written and URL-decoded (clients use the decoded form)."""
    rest = url.partition("://")[2] or url
    userinfo, at, _ = rest.rpartition("@")
    found = [userinfo.partition(":")[2]] if at else []
    found += [m.group(0).partition("=")[2] for m in _SECRET_QUERY.finditer(rest)]
    return found + [unquote(v) for v in found]


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")


def _kafka_extra(env: Mapping[str, str]) -> dict[str, str]:
    extra = {}
    for var, value in env.items():
        if var.startswith("KAFKA_") and var not in _KAFKA_OWN_VARS and not var.endswith("_OPTS"):
            key = var[len("KAFKA_"):].lower().replace("_", ".")
            if not re.fullmatch(r"[a-z0-9.]+", key):
                raise ConfigError(f"{var} does not name a librdkafka setting")
            extra[key] = value
    return extra


_ENV_VARS: dict[str, tuple[str, Callable[[str], object]]] = {
    "bootstrap_servers": ("KAFKA_BOOTSTRAP_SERVERS", str),
    "schema_registry_url": ("SCHEMA_REGISTRY_URL", str),
    "schema_registry_user_info": ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", str),
    "redis_url": ("REDIS_URL", str),
    "redis_prefix": ("REDIS_PREFIX", str),
    "redis_cluster": ("REDIS_CLUSTER", _boolean),
    "orders_topic": ("ORDERS_TOPIC", str),
    "retry_topic": ("RETRY_TOPIC", str),
    "dlq_topic": ("DLQ_TOPIC", str),
    "partitions": ("ORDERS_PARTITIONS", int),
    "retry_partitions": ("RETRY_PARTITIONS", int),
    "offsets_refresh_s": ("OFFSETS_REFRESH_S", float),
    "transaction_timeout_ms": ("TRANSACTION_TIMEOUT_MS", int),
    "replication_factor": ("TOPIC_REPLICATION_FACTOR", int),
    "retention_ms": ("TOPIC_RETENTION_MS", int),
    "group_prefix": ("CONSUMER_GROUP_PREFIX", str),
    "transactional_id_prefix": ("TRANSACTIONAL_ID_PREFIX", str),
    "host": ("ORDERS_HOST", str),
    "batch_size": ("BATCH_SIZE", int),
    "poll_timeout_s": ("POLL_TIMEOUT_S", float),
    "failure_rate": ("ORDERS_FAILURE_RATE", float),
    "max_retries": ("RETRY_MAX", int),
    "retry_backoff_ms": ("RETRY_BACKOFF_MS", int),
    "retry_backoff_multiplier": ("RETRY_BACKOFF_MULTIPLIER", float),
    "retry_buffer_bytes": ("RETRY_BUFFER_BYTES", int),
    "max_price": ("ORDERS_MAX_PRICE", float),
    "produce_rate": ("PRODUCE_RATE", float),
    "produce_transactional": ("PRODUCE_TRANSACTIONAL", _boolean),
    "metrics_port": ("METRICS_PORT", int),
    "metrics_bind": ("METRICS_BIND", str),
    "schema_path": ("ORDER_SCHEMA_PATH", Path),
    "log_level": ("LOG_LEVEL", str),
}
