import pytest

from workers.errors import ConfigError
from workers.settings import Settings, redact_url


def test_defaults_point_at_localhost():
    s = Settings.from_env({})
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.orders_topic, s.retry_topic, s.dlq_topic) == ("orders", "orders-retry", "orders-dlq")
    assert s.partitions == 3
    assert s.max_attempts == 4


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
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_invalid_values_are_rejected(env, word):
    with pytest.raises(ConfigError, match=word):
        Settings.from_env(env)


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
    with pytest.raises(Exception):
        s.partitions = 5
