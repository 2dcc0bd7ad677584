from dataclasses import FrozenInstanceError

import pytest

from workers.errors import ConfigError
from workers.retry_worker import longest_delay_ms
from workers.settings import Settings, redact_url
from workers.topics import retry_delay_of, retry_family


def test_defaults_point_at_localhost():
    s = Settings.from_env({})
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.orders_topic, s.retry_topic, s.dlq_topic) == ("orders", "orders-retry", "orders-dlq")
    assert s.partitions == 3
    assert s.max_attempts == 4


def test_one_retry_topic_per_delay_level():
    s = Settings.from_env({"RETRY_BACKOFF_MS": "200"})
    assert s.retry_topics == ["orders-retry-200ms", "orders-retry-400ms", "orders-retry-800ms"]
    assert [s.retry_topic_for(n) for n in (1, 2, 3)] == s.retry_topics
    # Equal delays share a level; no retries, no retry topic.
    assert Settings.from_env({"RETRY_BACKOFF_MULTIPLIER": "1"}).retry_topics == ["orders-retry-1000ms"]
    assert Settings.from_env({"RETRY_MAX": "0"}).retry_topics == []
    # The family: any backoff's levels and the single retry topic of earlier versions, nothing else.
    for name in ("orders-retry", "orders-retry-5ms", "orders-retry-1000ms"):
        assert s.is_retry_topic(name) and s.is_pool_topic(name)
    for name in ("orders", "orders-dlq", "orders-retry-ms", "orders-retry-1000", "orders-retry-1000ms-x",
                 "orders-retry-x-1000ms", "xorders-retry-1000ms"):
        assert not s.is_retry_topic(name), name
    assert s.is_pool_topic("orders") and s.is_pool_topic("orders-dlq") and not s.is_pool_topic("other")


def test_retry_family_is_in_delay_order():
    s = Settings.from_env({"RETRY_BACKOFF_MS": "200"})
    existing = ["orders", "orders-retry-5000ms", "orders-retry", "orders-retry-400ms", "orders-dlq", "other-10ms"]
    assert retry_family(s, existing) == ["orders-retry", "orders-retry-200ms", "orders-retry-400ms",
                                         "orders-retry-800ms", "orders-retry-5000ms"]
    assert retry_delay_of("orders-retry-5000ms") == 5000 and retry_delay_of("orders-retry") == -1


def test_environment_overrides_and_types():
    s = Settings.from_env({"ORDERS_PARTITIONS": "6", "ORDERS_FAILURE_RATE": "0.25", "RETRY_BACKOFF_MS": "50",
                           "ORDERS_TOPIC": "o2"})
    assert (s.partitions, s.failure_rate, s.retry_backoff_ms, s.orders_topic) == (6, 0.25, 50, "o2")


def test_bad_number_names_the_variable():
    with pytest.raises(ConfigError, match="ORDERS_PARTITIONS"):
        Settings.from_env({"ORDERS_PARTITIONS": "three"})


@pytest.mark.parametrize("env,word", [
    ({"ORDERS_FAILURE_RATE": "1.5"}, "ORDERS_FAILURE_RATE"),
    ({"ORDERS_PARTITIONS": "0"}, "ORDERS_PARTITIONS"),
    ({"RETRY_TOPIC": "orders"}, "differ"),
    ({"RETRY_TOPIC": "o", "ORDERS_TOPIC": "o-100ms"}, "named like a retry topic"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER"),
    ({"REDIS_PREFIX": "a{b}"}, "REDIS_PREFIX"),
    ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
    ({"METRICS_PORT": "http"}, "METRICS_PORT"),
])
def test_invalid_values_are_rejected(env, word):
    with pytest.raises(ConfigError, match=word):
        Settings.from_env(env)


@pytest.mark.parametrize("raw,expected", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                          ("false", False), ("0", False), ("no", False)])
def test_redis_cluster_is_a_boolean(raw, expected):
    assert Settings.from_env({"REDIS_CLUSTER": raw}).redis_cluster is expected
    assert Settings.from_env({}).redis_cluster is False


def test_kafka_extras_become_librdkafka_keys():
    s = Settings.from_env({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
                           "KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_BOOTSTRAP_SERVERS": "b:9092"})
    assert s.kafka_extra == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.password": "hunter2"}
    assert s.bootstrap_servers == "b:9092"


def test_server_side_kafka_variables_are_not_client_settings():
    s = Settings.from_env({"KAFKA_PORT": "19092", "KAFKA_CONTROLLER_PORT": "19093", "KAFKA_HEAP_OPTS": "-Xmx1g",
                           "KAFKA_OPTS": "-Dx=1", "KAFKA_CLIENT_ID": "orders-1"})
    assert s.kafka_extra == {"client.id": "orders-1"}


def test_secrets_never_appear_in_describe_or_repr():
    s = Settings.from_env({"KAFKA_SASL_PASSWORD": "hunter2", "REDIS_URL": "redis://:s3cret@h:6379/0",
                           "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "u:pw-xyz"})
    for text in (s.describe(), repr(s)):
        assert "hunter2" not in text and "s3cret" not in text and "pw-xyz" not in text
    assert "sasl.password" in s.describe()


def test_redact_url():
    assert redact_url("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"
    assert redact_url("redis://host:1/0") == "redis://host:1/0"


def test_demo_failure_rate_is_a_default_only():
    assert Settings.from_env({"ORDERS_FAILURE_RATE_DEFAULT": "0.05"}).failure_rate == 0.05
    assert Settings.from_env({"ORDERS_FAILURE_RATE_DEFAULT": "0.05", "ORDERS_FAILURE_RATE": "0"}).failure_rate == 0.0


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(FrozenInstanceError):
        s.partitions = 5  # type: ignore[misc]


@pytest.mark.parametrize("url,secret", [
    ("redis://user:pw-1a@host:6379/0", "pw-1a"),
    ("redis://:pw-2b@host:6379/0", "pw-2b"),
    ("rediss://:pw-3c@host:6380/0", "pw-3c"),
    ("rediss://default:pw-4d@host:6380/0", "pw-4d"),
    ("redis://host:6379/0?password=pw-5e", "pw-5e"),
    ("rediss://host:6380/0?ssl_cert_reqs=none&password=pw-6f&db=1", "pw-6f"),
    ("redis://host/0?Password=pw-7g", "pw-7g"),
    ("redis://host/0?ssl_password=pw-8h", "pw-8h"),
    ("redis://user@host/0?username=u&password=pw%209i", "pw%209i"),
    ("https://registry-user:pw-10j@registry.example:8081/apis", "pw-10j"),
    ("redis://:p@ss/w0rd-11k@host:6379/0", "w0rd-11k"),
])
def test_redact_url_hides_the_password_in_every_form(url, secret):
    shown = redact_url(url)
    assert secret not in shown and "***" in shown
    assert "host" in shown or "registry.example" in shown


def test_redact_url_keeps_what_is_not_secret():
    assert redact_url("rediss://user:pw@host:6380/1?ssl_cert_reqs=none") == \
        "rediss://user:***@host:6380/1?ssl_cert_reqs=none"
    assert redact_url("redis://host:6379/0?password=pw&db=2") == "redis://host:6379/0?password=***&db=2"
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"


# librdkafka's sensitive properties (_RK_SENSITIVE in src/rdkafka_conf.c), and an alias of one.
LIBRDKAFKA_SENSITIVE = [
    "ssl.key.location", "ssl.key.password", "ssl.key.pem", "ssl_key", "ssl.ca.pem", "ssl.keystore.password",
    "sasl.username", "sasl.password", "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file", "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem", "sasl.oauthbearer.client.credentials.client.secret",
]


@pytest.mark.parametrize("name", [n for n in LIBRDKAFKA_SENSITIVE if n != "ssl_key"])
def test_every_librdkafka_secret_is_masked(name):
    # ssl_key is internal (a pointer set through the C API): no environment variable names it.
    var = "KAFKA_" + name.upper().replace(".", "_")
    s = Settings.from_env({var: f"value-of-{name}-xyz", "KAFKA_CLIENT_ID": "orders-a"})
    assert s.kafka_extra == {name: f"value-of-{name}-xyz", "client.id": "orders-a"}
    for text in (s.describe(), repr(s)):
        assert "-xyz" not in text, text
    assert f"'{name}': '***'" in s.describe()
    assert "orders-a" in s.describe()


def test_the_sensitive_list_is_librdkafkas():
    from workers.settings import LIBRDKAFKA_SENSITIVE as listed
    assert set(listed) == set(LIBRDKAFKA_SENSITIVE)


def test_a_retry_may_be_due_as_far_ahead_as_its_own_level_says():
    """A level of earlier, longer backoff settings is waited for as made, not dead-lettered as
    'due too far ahead' under today's shorter ones."""
    s = Settings.from_env({"RETRY_BACKOFF_MS": "200"})
    assert longest_delay_ms(s, "orders-retry-600000ms") == 600_000
    assert longest_delay_ms(s, "orders-retry-200ms") == 200
    assert longest_delay_ms(s, "orders-retry") == 800  # the single topic of earlier versions: today's longest
