"""The ``orders`` command: one click group for every role and for operators."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import click

from . import logs
from .clients import describe_servers, make_admin, make_consumer, make_producer, make_redis, make_registry, wait_for
from .dlq import Filters, ReplayFailed, parse_since, read_dead_letters, replay, summarize
from .engine import StopFlag, now_ms
from .errors import ConfigError, OrdersError, ServiceUnavailable, StopRequested
from .events import listen
from .metrics import serve as serve_metrics
from .partition_worker import PartitionWorker
from .producer import (
    DeliveryFailed,
    DeliveryTally,
    IdempotentSender,
    Sender,
    StuckProducerGuard,
    TransactionalSender,
    produce_orders,
)
from .retry_worker import RetryWorker
from .serde import OrderSerde, load_schema
from .settings import Settings
from .status import StatusReader, render
from .store import AggregateStore, Source
from .topics import ensure_topics, partition_counts

log = logging.getLogger("workers")


class OrdersGroup(click.Group):
    """Turns our own errors into a one-line message and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StopRequested as exc:
            log.info("%s", exc)  # asked to stop: a clean exit, not a failure
        except OrdersError as exc:
            log.error("%s: %s", type(exc).__name__, exc)
            click.echo(logs.printable(f"error: {exc}"), err=True)
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
    logs.configure(ctx.obj.log_level, secrets=ctx.obj.secrets())


def _store(settings: Settings) -> AggregateStore:
    # Connected on first use: a Redis Cluster client connects when it is made, and a
    # worker started before Redis, or `orders dlq` while Redis is down, must not fail for that.
    return AggregateStore(lambda: make_redis(settings), settings.redis_prefix)


def _serde(settings: Settings, copies: AggregateStore | None = None) -> OrderSerde:
    return OrderSerde(make_registry(settings), load_schema(settings.schema_path), copies=copies)


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
    click.echo(f"topics ready: {settings.orders_topic}, {', '.join(settings.retry_topics)}, {settings.dlq_topic}; "
               f"schema id {schema_id}")


@cli.command()
@click.option("--count", "-n", default=0, show_default=True, type=click.IntRange(min=0),
              help="Orders to produce; 0 runs until stopped.")
@click.option("--rate", type=click.FloatRange(min=0), default=None,
              help="Orders per second; 0 is unlimited. [default: PRODUCE_RATE, or unlimited with --count]")
@click.option("--seed", type=int, default=None, help="Seed for products and prices (ids stay unique).")
@click.option("--record", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Append each delivered order as a JSON line to this file (flushed per line; "
                   "with --transactional, once its transaction committed).")
@click.option("--schema", "schema_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Write with this Avro schema (a compatible evolution of the Order schema).")
@click.option("--transactional/--idempotent", default=None,
              help="Write in Kafka transactions: no order twice, even through leader changes; "
                   "each commit adds a marker per partition. [default: PRODUCE_TRANSACTIONAL, else idempotent]")
@click.pass_obj
def produce(settings: Settings, count: int, rate: float | None, seed: int | None, record,
            schema_path: str | None, transactional: bool | None) -> None:
    """Produce random orders to the orders topic."""
    stop = StopFlag().install()
    if rate is None:
        rate = 0.0 if count else settings.produce_rate
    if transactional is None:
        transactional = settings.produce_transactional
    _bootstrap(settings, stop)
    serde = _serde(settings)
    writer_schema = load_schema(Path(schema_path)) if schema_path else None
    schema_id = wait_for(lambda: serde.register(settings.orders_topic, writer_schema), "schema registry",
                         should_stop=stop)
    log.info("writing with schema id=%d subject=%s-value", schema_id, settings.orders_topic)
    # Line-buffered: what the file says was delivered survives a crash of this process.
    record_file = open(record, "a", buffering=1) if record else None
    tally = DeliveryTally(record=record_file)
    sender = _order_sender(settings, tally, transactional, stop)
    log.info("producing count=%s rate=%s topic=%s mode=%s %s", count or "unbounded", rate or "unlimited",
             settings.orders_topic, "transactional" if transactional else "idempotent", describe_servers(settings))
    if count and sys.stderr.isatty():
        with click.progressbar(length=count, label="producing", file=sys.stderr) as bar:
            sent = produce_orders(sender, serde, count=count, rate=rate, seed=seed, stop=stop,
                                  on_progress=bar.update)
    else:
        sent = produce_orders(sender, serde, count=count, rate=rate, seed=seed, stop=stop)
    if record_file:
        record_file.close()
    log.info("produce done sent=%d delivered=%d failed=%d", sent, tally.delivered, tally.failed)
    if tally.failed or tally.delivered != sent:
        raise DeliveryFailed(f"{sent - tally.delivered} of {sent} orders were not delivered: {tally.errors}")


def _order_sender(settings: Settings, tally: DeliveryTally, transactional: bool, stop: StopFlag) -> Sender:
    if not transactional:
        guard = StuckProducerGuard(lambda: make_producer(settings), settings.orders_topic, tally)
        return IdempotentSender(make_producer(settings), settings.orders_topic, tally, guard)
    # One id per process, kept by its replacement producers (which fence their predecessor).
    # Never shared: two producers with one id would fence each other. A crashed producer's
    # open transaction holds read_committed readers for up to TRANSACTION_TIMEOUT_MS.
    transactional_id = settings.transactional_id(f"{settings.host_name}-producer-{uuid.uuid4().hex[:12]}")
    log.info("transactional id=%s", transactional_id)
    return TransactionalSender(lambda: make_producer(settings, transactional_id=transactional_id),
                               settings.orders_topic, tally, stop=stop)


def _slot_from_env() -> int:
    # honcho names processes consumer.1, consumer.2, ...; supervisor passes --slot.
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    _, _, number = name.rpartition(".")
    return int(number) if number.isdigit() else 0


def _process_manager() -> str:
    """Who runs this process: supervisor and honcho both say so in the environment."""
    if os.environ.get("SUPERVISOR_PROCESS_NAME"):
        return "supervisor"
    if os.environ.get("HONCHO_PROCESS_NAME"):
        return "honcho"
    return "none"


def _run_worker(settings: Settings, worker_cls, stop, **kwargs) -> None:
    log.info("settings %s", settings.describe())
    store = _store(settings)
    # A group member under KIP-848 (the broker assigns, cooperatively). Not a static
    # member: under KIP-848 a crashed static member's id stays taken until its session
    # expires, and its restart would be refused (UNRELEASED_INSTANCE_ID) until then.
    membership = {"group.protocol": "consumer"} if kwargs.pop("member", False) else {}
    worker = worker_cls(
        settings,
        consumer=make_consumer(settings, kwargs.pop("group_id"), **membership,
                               **worker_cls.consumer_overrides(settings)),
        producer=make_producer(settings, transactional_id=kwargs.pop("transactional_id")),
        admin=make_admin(settings),
        store=store,
        serde=_serde(settings, copies=store),  # workers keep a copy of each writer schema in Redis
        stop=stop,
        manager=_process_manager(),
        **kwargs,
    )
    worker.run()


_SLOT = click.option("--slot", type=click.IntRange(min=0), default=None,
                     help="This worker's number on its host; with ORDERS_HOST it names the worker's group "
                          "membership and transactional id. [default: from HONCHO_PROCESS_NAME, else 0]")


@cli.command()
@click.option("--partition", "-p", type=click.IntRange(min=0), default=None,
              help="Own this one partition by explicit assignment instead of joining the consumer group "
                   "(for debugging: never next to a group that consumes the same topic).")
@_SLOT
@click.pass_obj
def consume(settings: Settings, partition: int | None, slot: int | None) -> None:
    """Run a worker of the orders topic: the consumer group gives it its partitions."""
    stop = StopFlag().install()
    _bootstrap(settings, stop)
    if partition is None:
        member = settings.member("consumer", _slot_from_env() if slot is None else slot)
        _run_worker(settings, PartitionWorker, stop, name=member, member=member,
                    group_id=settings.group_id("workers"), transactional_id=settings.transactional_id(member))
        return
    counts = wait_for(lambda: partition_counts(make_admin(settings)), "kafka", should_stop=stop)
    available = counts.get(settings.orders_topic, 0)
    if partition >= available:
        raise click.BadParameter(f"topic {settings.orders_topic} has partitions 0..{available - 1}, not {partition}",
                                 param_hint="--partition")
    role = f"partition-{partition}"
    _run_worker(settings, PartitionWorker, stop, name=role, partition=partition,
                group_id=settings.group_id(role), transactional_id=settings.transactional_id(role))


@cli.command()
@_SLOT
@click.pass_obj
def retry(settings: Settings, slot: int | None) -> None:
    """Run a retry worker (re-attempts orders from the retry topic when due)."""
    stop = StopFlag().install()
    _bootstrap(settings, stop)
    member = settings.member("retry", _slot_from_env() if slot is None else slot)
    _run_worker(settings, RetryWorker, stop, name=member, member=member,
                group_id=settings.group_id("retry-workers"), transactional_id=settings.transactional_id(member))


def _filter_options(func):
    """--error-type, --order-id and --since, shared by the viewer and replay."""
    func = click.option("--since", default=None, metavar="WHEN",
                        help="Only dead letters from this time on: 30m, 2h, 1d or an ISO 8601 time.")(func)
    func = click.option("--order-id", "order_ids", multiple=True, help="Only this orderId (repeatable).")(func)
    func = click.option("--error-type", "error_types", multiple=True,
                        help="Only this error type, e.g. InvalidOrder (repeatable).")(func)
    return func


def _filters(error_types, order_ids, since) -> Filters:
    try:
        since_ms = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(f"{since!r}: use 30m, 2h, 1d or an ISO 8601 time", param_hint="--since") from exc
    return Filters(tuple(error_types), tuple(order_ids), since_ms)


def _selected(settings: Settings, filters: Filters, *, follow: bool, stop, group: str):
    """Yield the dead letters matching ``filters``; closes the consumer at the end."""
    if follow:
        _bootstrap(settings, stop)  # following a topic that is not there yet would end at once
    consumer = make_consumer(settings, settings.group_id(group))
    try:
        for letter in read_dead_letters(consumer, settings.dlq_topic, _serde(settings), follow=follow, stop=stop):
            if filters.match(letter):
                yield letter
    finally:
        consumer.close()


@cli.group(invoke_without_command=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new dead letters.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=None, help="Print at most N dead letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--summary", is_flag=True, help="Counts by error type instead of the letters.")
@_filter_options
@click.pass_context
def dlq(ctx: click.Context, follow: bool, limit: int | None, as_json: bool, summary: bool,
        error_types, order_ids, since) -> None:
    """Show the dead letters (from the start of the DLQ topic); `dlq replay` puts them back."""
    if ctx.invoked_subcommand is not None:
        return
    settings: Settings = ctx.obj
    stop = StopFlag().install()
    filters = _filters(error_types, order_ids, since)
    store = _store(settings)
    replays = _replays_or_empty(store)
    letters = _selected(settings, filters, follow=follow and not summary, stop=stop, group="dlq-viewer")
    if summary:
        data = summarize(letters, replays)
        if as_json:
            click.echo(json.dumps(data))
        else:
            click.echo(f"{data['total']} dead letter(s), {data['replayed']} replayed")
            for error_type, row in data["by_error_type"].items():
                click.echo(f"  {logs.printable(error_type):<24} {row['count']:>8}  replayed {row['replayed']}")
        return
    shown = 0
    for letter in letters:
        replay_record = replays.get(letter.id)
        click.echo(json.dumps(letter.as_json(replay_record)) if as_json else letter.as_line(replay_record))
        shown += 1
        if limit is not None and shown >= limit:
            break
    if not as_json and not follow:
        click.echo(f"{shown} dead letter(s)", err=True)


def _replays_or_empty(store: AggregateStore) -> dict[str, dict]:
    # The viewer must work while Redis is down: it just cannot mark replays then.
    try:
        return store.replays()
    except ServiceUnavailable as exc:
        log.warning("cannot read replay records reason=%s", exc)
        return {}


@dlq.command("replay")
@_filter_options
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option("--again", is_flag=True,
              help="Also replay dead letters replayed before (still counted at most once).")
@click.pass_obj
def dlq_replay(settings: Settings, error_types, order_ids, since, dry_run: bool, again: bool) -> None:
    """Re-publish the selected dead letters to the orders topic as fresh orders."""
    stop = StopFlag().install()
    filters = _filters(error_types, order_ids, since)
    store = _store(settings)
    replays = store.replays()
    selected, skipped, references = [], 0, 0
    for letter in _selected(settings, filters, follow=False, stop=stop, group="dlq-replay"):
        if letter.reference is not None:
            references += 1  # the value was too large to keep: there is nothing to put back
            continue
        if letter.id in replays and not again:
            skipped += 1
            continue
        selected.append(letter)
    for letter in selected:
        click.echo(("would replay " if dry_run else "replaying ") + letter.as_line())
    note = f" ({skipped} already replayed; --again to include them)" if skipped else ""
    if references:
        note += f" ({references} cannot be replayed: their values were too large to keep)"
    if dry_run:
        click.echo(f"dry run: {len(selected)} dead letter(s) would be replayed{note}")
        return
    delivered, errors = replay(selected, make_producer(settings), settings.orders_topic, now_ms=now_ms)
    store.record_replays(delivered)
    click.echo(f"replayed {len(delivered)} dead letter(s) to {settings.orders_topic}{note}")
    if errors:
        raise ReplayFailed(f"{len(errors)} replays were not delivered: {errors[:5]}")


def _orders_partitions(settings: Settings) -> int:
    """The orders topic's partitions as Kafka has them (more may have been added since
    ``orders init``); the setting when Kafka does not answer: the figures are in Redis."""
    try:
        return partition_counts(make_admin(settings)).get(settings.orders_topic) or settings.partitions
    except ServiceUnavailable:
        return settings.partitions


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def stats(settings: Settings, as_json: bool) -> None:
    """Show the global running average and each partition's count and sum."""
    store = _store(settings)
    # The configured sources too, should the registry of sources be missing (it is rebuilt by the workers).
    partitions = _orders_partitions(settings)
    sources = [Source(settings.orders_topic, p) for p in range(partitions)]
    sources += [Source(topic, p) for topic in settings.retry_topics for p in range(settings.retry_partitions)]
    snap = store.snapshot(partitions, sources)
    data = {**snap["total"].as_dict(),
            "partitions": [{"partition": p, **t.as_dict()} for p, t in enumerate(snap["partitions"])]}
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"global   count={data['count']} sum={data['sum']:.2f} average={_fmt(data['average'])}")
    for part in data["partitions"]:
        click.echo(f"p{part['partition']:<7} count={part['count']} sum={part['sum']:.2f} "
                   f"average={_fmt(part['average'])}")


@cli.command()
@click.option("--watch", "-w", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes (and the window for orders/s).")
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON (one object per refresh).")
@click.pass_obj
def status(settings: Settings, watch: bool, interval: float, as_json: bool) -> None:
    """Is the pool healthy? Workers, counts, lag, rates, retries, DLQ, average."""
    reader = StatusReader(settings, _store(settings), make_admin(settings))
    color = sys.stdout.isatty() and not as_json
    style = click.style if color else (lambda text, **kw: text)
    # Ctrl-C sets a flag that the loop checks: a KeyboardInterrupt raised inside a
    # Kafka client's callback could be lost there, and --watch went on for ever.
    stop = StopFlag().install()
    reader.snapshot()
    _sleep_unless(stop, min(interval, 1.0))  # a first window, so rates are known
    while not stop():
        data = reader.snapshot()
        if as_json:
            click.echo(json.dumps(data))
        else:
            if watch and color:
                click.clear()
            click.echo("\n".join(render(data, style)))
            if watch:
                click.echo(style(f"\nrefreshing every {interval:g}s, Ctrl-C to quit", dim=True))
        if not watch:
            break
        _sleep_unless(stop, interval)


@cli.command()
@click.pass_obj
def metrics(settings: Settings) -> None:
    """Serve the pool's figures for Prometheus on METRICS_BIND:METRICS_PORT, path /metrics."""
    stop = StopFlag().install()
    serve_metrics(settings, store=_store(settings), admin=make_admin(settings),
                  consumer=make_consumer(settings, settings.group_id("metrics")), stop=stop)


@cli.command("supervisor-events")
@click.pass_obj
def supervisor_events(settings: Settings) -> None:
    """Supervisor's event listener (supervisor.conf): counts and logs unexpected exits and FATAL states."""
    # No StopFlag: the listener waits on stdin and keeps nothing to finish; TERM ends it.
    listen(settings, _store(settings), sys.stdin, sys.stdout)


def _sleep_unless(stop: StopFlag, seconds: float) -> None:
    """Sleep ``seconds``, or less once ``stop`` is set."""
    deadline = time.monotonic() + seconds
    while not stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    cli(prog_name="orders")
