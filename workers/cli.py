"""The ``orders`` command: one click group for every role and for operators."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from . import logs
from .clients import (describe_servers, make_admin, make_consumer, make_producer, make_redis, make_registry,
                      wait_for)
from .dlq import read_dead_letters
from .engine import StopFlag
from .errors import ConfigError, OrdersError
from .partition_worker import PartitionWorker
from .producer import DeliveryTally, produce_orders
from .retry_worker import RetryWorker
from .serde import OrderSerde, load_schema
from .settings import Settings
from .store import AggregateStore
from .topics import ensure_topics, partition_counts

log = logging.getLogger("workers")


class OrdersGroup(click.Group):
    """Turns our own errors into a one-line message and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OrdersError as exc:
            log.error("%s: %s", type(exc).__name__, exc)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=OrdersGroup)
@click.version_option(package_name="orders")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Kafka order-processing worker pool: every order counted once or dead-lettered once."""
    try:
        ctx.obj = Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    logs.configure(ctx.obj.log_level)


def _serde(settings: Settings) -> OrderSerde:
    return OrderSerde(make_registry(settings), load_schema(settings.schema_path))


def _bootstrap(settings: Settings, stop) -> None:
    admin = make_admin(settings)
    wait_for(lambda: ensure_topics(admin, settings), "kafka (topic bootstrap)", should_stop=stop)


@cli.command()
@click.pass_obj
def init(settings: Settings) -> None:
    """Create the topics if missing and register the Order schema."""
    stop = StopFlag().install()
    _bootstrap(settings, stop)
    schema_id = wait_for(lambda: _serde(settings).register(settings.orders_topic), "schema registry", should_stop=stop)
    click.echo(f"topics ready: {settings.orders_topic}, {settings.retry_topic}, {settings.dlq_topic}; "
               f"schema id {schema_id}")


@cli.command()
@click.option("--count", "-n", default=0, show_default=True, type=click.IntRange(min=0),
              help="Orders to produce; 0 runs until stopped.")
@click.option("--rate", type=click.FloatRange(min=0), default=None,
              help="Orders per second; 0 is unlimited. [default: PRODUCE_RATE, or unlimited with --count]")
@click.option("--seed", type=int, default=None, help="Seed for products and prices (ids stay unique).")
@click.option("--record", type=click.File("w"), default=None,
              help="Write each delivered order as a JSON line to this file.")
@click.option("--schema", "schema_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Write with this Avro schema (a compatible evolution of the Order schema).")
@click.pass_obj
def produce(settings: Settings, count: int, rate: float | None, seed: int | None, record,
            schema_path: str | None) -> None:
    """Produce random orders to the orders topic."""
    stop = StopFlag().install()
    if rate is None:
        rate = 0.0 if count else settings.produce_rate
    _bootstrap(settings, stop)
    serde = _serde(settings)
    writer_schema = load_schema(schema_path) if schema_path else None
    schema_id = wait_for(lambda: serde.register(settings.orders_topic, writer_schema), "schema registry",
                         should_stop=stop)
    log.info("writing with schema id=%d subject=%s-value", schema_id, settings.orders_topic)
    producer = make_producer(settings)
    tally = DeliveryTally(record=record)
    log.info("producing count=%s rate=%s topic=%s %s", count or "unbounded", rate or "unlimited",
             settings.orders_topic, describe_servers(settings))
    if count and sys.stderr.isatty():
        with click.progressbar(length=count, label="producing", file=sys.stderr) as bar:
            sent = produce_orders(producer, serde, settings.orders_topic, count=count, rate=rate, seed=seed,
                                  stop=stop, tally=tally, on_progress=bar.update)
    else:
        sent = produce_orders(producer, serde, settings.orders_topic, count=count, rate=rate, seed=seed,
                              stop=stop, tally=tally)
    log.info("produce done sent=%d delivered=%d failed=%d", sent, tally.delivered, tally.failed)
    if tally.failed or tally.delivered != sent:
        raise DeliveryFailed(f"{sent - tally.delivered} of {sent} orders were not delivered: {tally.errors}")


class DeliveryFailed(OrdersError):
    """Some produced orders were not acknowledged by Kafka."""


def _partition_from_env() -> int | None:
    # honcho names processes consumer.1, consumer.2, ...; partitions start at 0.
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    _, _, number = name.rpartition(".")
    return int(number) - 1 if number.isdigit() else None


def _run_worker(settings: Settings, worker_cls, stop, **kwargs) -> None:
    log.info("settings %s", settings.describe())
    worker = worker_cls(
        settings,
        consumer=make_consumer(settings, kwargs.pop("group_id")),
        producer=make_producer(settings, transactional_id=kwargs.pop("transactional_id")),
        store=AggregateStore(make_redis(settings), settings.redis_prefix),
        serde=_serde(settings),
        stop=stop,
        **kwargs,
    )
    worker.run()


@cli.command()
@click.option("--partition", "-p", type=click.IntRange(min=0), default=None,
              help="Partition of the orders topic to own. [default: from HONCHO_PROCESS_NAME]")
@click.pass_obj
def consume(settings: Settings, partition: int | None) -> None:
    """Run the worker that owns one partition of the orders topic."""
    if partition is None:
        partition = _partition_from_env()
        if partition is None:
            raise click.UsageError("--partition is required (or run under honcho as consumer.N)")
    stop = StopFlag().install()
    _bootstrap(settings, stop)
    counts = wait_for(lambda: partition_counts(make_admin(settings)), "kafka", should_stop=stop)
    available = counts.get(settings.orders_topic, 0)
    if partition >= available:
        raise click.BadParameter(f"topic {settings.orders_topic} has partitions 0..{available - 1}, not {partition}",
                                 param_hint="--partition")
    role = f"partition-{partition}"
    _run_worker(settings, PartitionWorker, stop, partition=partition,
                group_id=settings.group_id(role), transactional_id=settings.transactional_id(role))


@cli.command()
@click.pass_obj
def retry(settings: Settings) -> None:
    """Run the retry worker (re-attempts orders from the retry topic when due)."""
    stop = StopFlag().install()
    _bootstrap(settings, stop)
    _run_worker(settings, RetryWorker, stop, group_id=settings.group_id("retry"),
                transactional_id=settings.transactional_id("retry"))


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new dead letters.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=None, help="Print at most N dead letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def dlq(settings: Settings, follow: bool, limit: int | None, as_json: bool) -> None:
    """Show the dead letters (from the start of the DLQ topic)."""
    stop = StopFlag().install()
    if follow:
        _bootstrap(settings, stop)  # following a topic that is not there yet would end at once
    consumer = make_consumer(settings, settings.group_id("dlq-viewer"))
    shown = 0
    try:
        for letter in read_dead_letters(consumer, settings.dlq_topic, _serde(settings), follow=follow, stop=stop):
            click.echo(json.dumps(letter.as_json()) if as_json else letter.as_line())
            shown += 1
            if limit is not None and shown >= limit:
                break
    finally:
        consumer.close()
    if not as_json and not follow:
        click.echo(f"{shown} dead letter(s)", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def stats(settings: Settings, as_json: bool) -> None:
    """Show the global running average and each partition's count and sum."""
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    snap = store.snapshot(settings.partitions)
    data = {**snap["total"].as_dict(),
            "partitions": [{"partition": p, **t.as_dict()} for p, t in enumerate(snap["partitions"])]}
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"global   count={data['count']} sum={data['sum']:.2f} average={_fmt(data['average'])}")
    for part in data["partitions"]:
        click.echo(f"p{part['partition']:<7} count={part['count']} sum={part['sum']:.2f} average={_fmt(part['average'])}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    cli(prog_name="orders")
