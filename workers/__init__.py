"""orders: a Kafka order-processing worker pool that counts every order exactly once."""

__version__ = "0.1.0"
