import pytest
from confluent_kafka import KafkaError

from workers.transaction import Action, Watchdog, classify


def error(fatal: bool = False, retriable: bool = False, abort: bool = False) -> KafkaError:
    return KafkaError(KafkaError._TIMED_OUT, "test", fatal=fatal, retriable=retriable, txn_requires_abort=abort)


@pytest.mark.parametrize("err, action", [
    (error(retriable=True), Action.RETRY),
    (error(abort=True), Action.ABORT),
    (error(fatal=True), Action.FATAL),
    (error(), Action.FATAL),                                   # no flag at all: fatal
    (error(fatal=True, retriable=True), Action.FATAL),         # fatal wins
    (error(abort=True, retriable=True), Action.ABORT),         # abort before retry
])
def test_classify_follows_librdkafka_flags_in_order(err, action):
    assert classify(err) is action


def test_watchdog_sections_nest_and_the_earliest_deadline_holds():
    dog = Watchdog()
    with dog.armed("outer", 100):
        outer = dog._deadline
        with dog.armed("inner, later", 200):
            assert dog._deadline == outer  # an inner section cannot extend the outer one
        with dog.armed("inner, sooner", 10):
            assert dog._deadline is not None and outer is not None and dog._deadline < outer
        assert dog._deadline == outer
    assert dog._deadline is None
