"""How a failed topic creation is read: wait for Kafka, or stop with a configuration error."""
from confluent_kafka import KafkaError

from workers.errors import ServiceUnavailable, TopicConfigError
from workers.topics import create_error


def test_a_broker_that_is_starting_is_waited_for():
    """A KRaft broker just (re)started is fenced until it registers: the create is tried again."""
    fenced = KafkaError(KafkaError.INVALID_REPLICATION_FACTOR,
                        "Unable to replicate the partition 1 time(s): All brokers are currently fenced.")
    assert isinstance(create_error("orders", fenced), ServiceUnavailable)
    for code in (KafkaError._TRANSPORT, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_CONTROLLER):
        assert isinstance(create_error("orders", KafkaError(code, "x")), ServiceUnavailable)


def test_a_replication_factor_the_cluster_cannot_give_is_a_config_error():
    too_many = KafkaError(KafkaError.INVALID_REPLICATION_FACTOR,
                          "Unable to replicate the partition 3 time(s): The target replication factor of 3 cannot "
                          "be reached because only 1 broker(s) are registered.")
    error = create_error("orders", too_many)
    assert isinstance(error, TopicConfigError) and "only 1 broker(s)" in str(error)
    assert isinstance(create_error("orders", KafkaError(KafkaError.POLICY_VIOLATION, "no")), TopicConfigError)
