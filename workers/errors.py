"""The project's exceptions.

``OrderError`` is what can go wrong with one message: ``PermanentError`` sends it
straight to the dead letter queue, ``TransientError`` to the retry topic.
``ServiceUnavailable`` is an outage of a server (Kafka, registry, Redis): the
worker waits and tries the same batch again; no message is blamed for it.
``OrdersError`` subclasses that are not about one message end the process with
a one-line reason (the CLI turns them into exit code 1).
"""
from __future__ import annotations


class OrdersError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(OrdersError):
    """A setting is missing or invalid."""


class TopicConfigError(OrdersError):
    """A topic exists with a layout that the configuration contradicts."""


class ServiceUnavailable(OrdersError):
    """A server (Kafka, schema registry, Redis) cannot be reached right now."""


class PortUnavailable(OrdersError):
    """A server of ours (the metrics endpoint) cannot listen on its address."""


class StopRequested(OrdersError):
    """A signal asked the process to stop while it was waiting for a server."""


class FatalWorkerError(OrdersError):
    """The worker cannot go on (fenced, fatal Kafka error); supervisor restarts it."""


class OrderError(OrdersError):
    """Processing one message failed; carries where the message came from."""

    def __init__(self, message: str, *, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset

    @property
    def error_type(self) -> str:
        return type(self).__name__


class PermanentError(OrderError):
    """Retrying cannot help: the message goes straight to the DLQ."""


class UndecodableMessage(PermanentError):
    """The bytes are not an Order in the Confluent Avro wire format."""


class UnknownSchema(UndecodableMessage):
    """The message names a schema id the registry does not have."""


class SchemaMismatch(UndecodableMessage):
    """The writer's schema cannot be read as the Order schema."""


class InvalidOrder(PermanentError):
    """The order decoded but breaks a business rule."""


class TransientError(OrderError):
    """This attempt failed but a later one may succeed: goes to the retry topic."""


class DownstreamUnavailable(TransientError):
    """The downstream step refused the order this time."""


class RecordedError(OrderError):
    """A failure decided earlier, published again from its record (error type kept as decided)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self._error_type = error_type

    @property
    def error_type(self) -> str:
        return self._error_type
