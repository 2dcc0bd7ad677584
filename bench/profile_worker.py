"""Profile one worker of the supervised pool while it drains a backlog.

    .venv/bin/pip install py-spy        # not a project dependency
    .venv/bin/python bench/profile_worker.py --orders 500000 --seconds 4 [--failure-rate 0.1] [--worker retry]

Starts the pool (the real supervisor.conf) on an empty topic, waits until the
consumer group has given each partition worker its partition, feeds the backlog
pre-encoded (as the bench's drains do: a pool started on a full topic spends its
first seconds rebalancing, and a profile of them shows start-up, not the steady
state), attaches ``py-spy record --idle`` to the chosen worker (consumer 0 by
default) and prints where its wall time goes: per function, inclusive (the
function and what it calls) and self. ``--idle`` keeps samples of a thread that
waits (in ``consume``, a Redis reply, a Kafka commit), so the shares add up to
wall time; ``--cpu-only`` drops them, leaving where the CPU goes. The raw py-spy output is kept in bench/results/.
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import collections  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.common import Resources, bench_env, kill_leftovers, process_times  # noqa: E402
from bench.pipeline import wait_spread  # noqa: E402
from bench.producer import encoded_orders, send_all  # noqa: E402
from tests.pool import SupervisedPool  # noqa: E402
from workers.clients import make_admin, make_redis  # noqa: E402
from workers.settings import Settings  # noqa: E402
from workers.store import AggregateStore, Source  # noqa: E402
from workers.topics import ensure_topics  # noqa: E402

log = logging.getLogger("bench.profile")
RESULTS = Path(__file__).resolve().parent / "results"


def worker_pid(store: AggregateStore, name: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = store.snapshot(0, workers=[name])["workers"][name]
        if beat:
            return beat["pid"]
        time.sleep(0.02)
    raise TimeoutError(f"no heartbeat from {name}")


def record(pid: int, seconds: float, out: Path, idle: bool) -> None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    subprocess.run([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                    *(["--idle"] if idle else []), "--nonblocking", "--format", "raw", "--output", str(out)],
                   check=True, capture_output=True, timeout=seconds + 60)


def summarise(raw: Path, top: int) -> str:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'run (workers/engine.py:210)' -> 'run (workers/engine.py)': lines split one function apart."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def main() -> None:
    p = argparse.ArgumentParser(description="py-spy profile of one pool worker draining a backlog")
    p.add_argument("--orders", type=int, default=500_000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--failure-rate", default="0")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--cpu-only", action="store_true", help="drop samples of a waiting thread (no --idle)")
    p.add_argument("--worker", choices=("consumer", "retry"), default="consumer",
                   help="slot 0 of this role (default: consumer)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    res = Resources()
    env = bench_env("profile", ORDERS_FAILURE_RATE=args.failure_rate)
    settings: Settings = res.track(env)
    RESULTS.mkdir(exist_ok=True)
    kind = "cpu" if args.cpu_only else "wall"
    out = RESULTS / f"profile-{args.worker}-0-failure-{args.failure_rate}-{kind}.txt"
    processes: dict[int, float] = {}
    try:
        values = encoded_orders(res.track(bench_env("profile-feed")), args.orders)
        ensure_topics(make_admin(settings), settings)
        store = AggregateStore(make_redis(settings), settings.redis_prefix)
        with tempfile.TemporaryDirectory(prefix=f"bench-pool-{settings.redis_prefix}-") as folder:
            pool = SupervisedPool(env, Path(folder))
            try:
                pool.start()
                wait_spread(store, [Source(settings.orders_topic, p) for p in range(settings.partitions)], hosts=1)
                pid = worker_pid(store, settings.member(args.worker, 0))
                processes = process_times([pid])
                feeder = threading.Thread(target=send_all, args=(settings, values), daemon=True)
                feeder.start()
                log.info("recording %s-0 pid=%d for %.0f s", args.worker, pid, args.seconds)
                record(pid, args.seconds, out, idle=not args.cpu_only)
                feeder.join(timeout=120)
            finally:
                pool.stop()
                kill_leftovers(processes)
    finally:
        res.cleanup()
    print(f"{args.worker}-0, {kind} time:")
    print(summarise(out, args.top))
    log.info("raw py-spy output: %s", out)

if __name__ == "__main__":
    main()
