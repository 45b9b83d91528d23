"""Redis memory of request-time windows: per entity and view, with the window schedule and without.

After ``make demo`` (or any materialisation), reads every key of the repo's online store and
measures with Redis' own ``MEMORY USAGE`` (``SAMPLES 0``: every field counted):

* per view, each entity's hash as it would be holding **only that view's fields**, with its
  window schedule (``_fp_sched:<view>``: what featurepipe stores now) and without it (Feast's
  own fields alone: what Feast's layout costs, and what featurepipe stored before request-time
  windows); p50 / p99 / max per entity, and the schedule field's own size;
* in total, every key as stored against the same keys without any schedule field.

Each variant is the key's own ``DUMP`` restored to a scratch key (``__fp_memory_probe``, the
encoding Redis keeps for it) with the other fields deleted, measured, then dropped, so the
figures come from the server's allocator, not from a formula. Nothing else is changed.

    .venv/bin/python benchmarks/online_memory.py --repo feature_repo
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = b"__fp_memory_probe"


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "feature_repo", help="the feature repo (after make demo)")
    parser.add_argument("--batch", type=int, default=500, help="keys measured per pipelined round trip")
    args = parser.parse_args()

    import redis

    from featurepipe.config import load_store, online_connection_string, redis_connection_kwargs
    from featurepipe.online.layout import feature_field, timestamp_field
    from featurepipe.online.schedule import schedule_field

    store = load_store(args.repo)
    own = {fv.name: {timestamp_field(fv.name), schedule_field(fv.name),
                     *(feature_field(fv.name, f.name) for f in fv.features)} for fv in store.list_feature_views()}
    client = redis.Redis(**redis_connection_kwargs(online_connection_string(store.config)))
    keys = [k for k in client.scan_iter(count=5000, _type="hash") if k != PROBE]  # entity hashes only
    if not keys:
        raise SystemExit(f"the online store of {args.repo} is empty: run `make demo` (or featurepipe materialize) first")
    with_sched: dict[str, list[int]] = defaultdict(list)
    without: dict[str, list[int]] = defaultdict(list)
    field_bytes: dict[str, list[int]] = defaultdict(list)
    total_now = total_feast = 0
    for i in range(0, len(keys), args.batch):
        chunk = keys[i:i + args.batch]
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.hkeys(k)
            pipe.memory_usage(k, samples=0)
            pipe.dump(k)
        replies = pipe.execute()
        for j in range(len(chunk)):
            fields, used, dumped = replies[3 * j], replies[3 * j + 1], replies[3 * j + 2]
            total_now += int(used)
            schedules = [f for f in fields if f.startswith(b"_fp_sched:")]
            total_feast += _probe(client, dumped, schedules)
            views = {f[len(b"_ts:"):].decode() for f in fields if f.startswith(b"_ts:")}
            for view in views:
                sched = b"_fp_sched:" + view.encode()
                if sched not in fields:
                    continue
                others = [f for f in fields if f not in own.get(view, ())]
                with_sched[view].append(_probe(client, dumped, others))
                without[view].append(_probe(client, dumped, [*others, sched]))
                field_bytes[view].append(int(client.hstrlen(chunk[j], sched)))
    client.delete(PROBE)
    print(f"{len(keys):,} keys in the online store of {args.repo}")
    print("| view | entities | MEMORY USAGE per entity with schedule: p50 / p99 / max | Feast's fields alone: "
          "p50 / p99 / max | schedule field bytes: p50 / p99 / max |")
    print("| --- | --- | --- | --- | --- |")
    for view in sorted(with_sched):
        w, f, b = with_sched[view], without[view], field_bytes[view]
        print(f"| {view} | {len(w):,} | {statistics.median(w):,.0f} / {percentile(w, 0.99):,} / {max(w):,} B | "
              f"{statistics.median(f):,.0f} / {percentile(f, 0.99):,} / {max(f):,} B | "
              f"{statistics.median(b):,.0f} / {percentile(b, 0.99):,} / {max(b):,} |")
    print(f"total over all keys: {total_now / 1e6:,.1f} MB as stored, {total_feast / 1e6:,.1f} MB without the "
          f"schedule fields ({total_now / max(total_feast, 1):.2f}x)")


def _probe(client: object, dumped: bytes, drop: list[bytes]) -> int:
    """MEMORY USAGE of a stored hash (its ``DUMP``) without the fields ``drop``: restored to
    the scratch key (as featurepipe writes new keys: the same encoding) then those fields
    deleted."""
    import redis

    assert isinstance(client, redis.Redis)
    pipe = client.pipeline(transaction=True)
    pipe.restore(PROBE, 0, dumped, replace=True)
    if drop:
        pipe.hdel(PROBE, *drop)
    pipe.memory_usage(PROBE, samples=0)
    return int(pipe.execute()[-1] or 0)


if __name__ == "__main__":
    main()
