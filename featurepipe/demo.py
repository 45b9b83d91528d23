"""``featurepipe demo``: the whole mission, end to end, on generated data.

generate -> feast apply -> backfill -> materialize -> train -> serve (gRPC) -> score a
sample of transactions through the server (p50/p99) -> stream live events through the
stream job (`featurepipe stream`) and show their features change online -> summary table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from featurepipe.cli.options import EVENTS_SOURCE, FEATURE_SERVICE
from featurepipe.config import source_path
from featurepipe.errors import FeaturepipeError

if TYPE_CHECKING:
    from feast import FeatureStore


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def random_events(store: FeatureStore, count: int, seed: int | None = None) -> pa.Table:
    """``count`` new transactions happening now, for users and merchants already in the data."""
    from featurepipe.core.db import connect

    raw = source_path(store, EVENTS_SOURCE)
    con = connect()
    ids = con.execute(
        f"SELECT user_id, merchant_id, max(transaction_id) OVER () AS top FROM read_parquet('{raw}') "
        f"USING SAMPLE {max(count, 1)} ROWS (reservoir, {seed if seed is not None else 42})"
    ).fetchall()
    rng = np.random.default_rng(seed)
    now = datetime.now(timezone.utc)
    top = int(ids[0][2])
    return pa.table({
        "transaction_id": pa.array(np.arange(top + 1, top + 1 + len(ids)) + int(now.timestamp()) * 1000, pa.int64()),
        "user_id": pa.array([r[0] for r in ids], pa.int64()),
        "merchant_id": pa.array([r[1] for r in ids], pa.int64()),
        "amount": pa.array(np.round(rng.lognormal(5.0, 0.5, len(ids)), 2)),
        "category": pa.array(["electronics"] * len(ids)),
        "country": pa.array(["NL"] * len(ids)),
        "channel": pa.array(["online"] * len(ids)),
        "event_timestamp": pa.array([now - timedelta(milliseconds=10 * i) for i in range(len(ids))],
                                    pa.timestamp("us", tz="UTC")),
    })


def _stream_live(store: FeatureStore, data: Path, events: pa.Table) -> Any:
    """Publish ``events`` to a Redis stream and run the stream job over them (bootstrapped
    from the Parquet history, so windows include the past)."""
    import shutil

    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.runner import event_payloads, redis_client
    from featurepipe.stream.source import RedisStreamSource, publish_redis

    stream = "transactions-live"
    shutil.rmtree(data / "stream" / "demo", ignore_errors=True)  # a new job each demo run
    client = redis_client(store=store)
    client.delete(stream)
    publish_redis(client, stream, event_payloads(events))
    # the demo's live events are all published up front: at the stop the input is complete, so the
    # job finalises them into the offline tables too (`featurepipe skew` then agrees after the demo)
    options = StreamOptions(source=EVENTS_SOURCE, job="demo", bootstrap=True, max_events=events.num_rows, idle_seconds=5.0,
                            progress=False, latency_samples=events.num_rows, final=True)
    job = StreamJob(store, RedisStreamSource(redis_client(store=store), stream, "featurepipe-demo-w0"),
                    redis_client(store=store, socket_timeout=60), options)
    try:
        return job.run()
    finally:
        job.close()
        client.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def run_demo(repo: Path | None, rows: int, score: int, keep_running: bool) -> dict[str, Any]:
    """Run the demo; return the summary figures."""
    from featurepipe.config import data_dir, find_repo, load_store, online_target
    from featurepipe.generate import generate_transactions
    from featurepipe.jobs.backfill import backfill
    from featurepipe.jobs.materialize import materialize
    from featurepipe.online.read import online_features
    from featurepipe.report import table
    from serving.client import FeatureClient
    from serving.server import FeatureServer
    from training.dataset import build_training_set, labelled_transactions
    from training.inference import FraudScorer
    from training.leakage import compare as compare_leakage
    from training.model import FraudModel
    from training.skew import check_skew, sample_entities
    from training.train import train_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    repo_path = find_repo(repo)
    data = data_dir(repo_path)

    _step(f"1/10 generate {rows:,} transactions")
    t = time.perf_counter()
    gen = generate_transactions(rows, data / "raw" / EVENTS_SOURCE)
    timings["generate"] = time.perf_counter() - t
    print(f"{gen.rows:,} transactions, {gen.fraud_rows:,} fraud, {gen.users:,} users, "
          f"{gen.merchants:,} merchants, {gen.start:%Y-%m-%d} .. {gen.end:%Y-%m-%d}")

    _step("2/10 feast apply")
    t = time.perf_counter()
    feast_bin = Path(sys.executable).parent / "feast"
    rc = subprocess.call([str(feast_bin), "--chdir", str(repo_path), "apply"], env=os.environ.copy())
    if rc != 0:
        raise FeaturepipeError(f"feast apply failed with exit code {rc}")
    timings["apply"] = time.perf_counter() - t
    store = load_store(repo_path)

    _step("3/10 backfill offline feature tables (DuckDB)")
    t = time.perf_counter()
    results = backfill(store)
    timings["backfill"] = time.perf_counter() - t
    print(table(["view", "rows", "entities", "seconds"],
                [[r.view, f"{r.rows:,}", f"{r.entities:,}", f"{r.seconds:.1f}"] for r in results]))

    _step(f"4/10 materialize into Redis ({online_target(store.config).describe()})")
    t = time.perf_counter()
    # the data was generated anew: the keys of an earlier run would win where their newest
    # event is later than this run's, so they go first (Feast's own deletion of a project's keys)
    views = [v for v in store.list_feature_views() if v.online]
    store._get_provider().online_store.teardown(store.config, views, [])
    materialize(store)
    timings["materialize"] = time.perf_counter() - t

    _step("5/10 train on a point-in-time training set (report: ROC, PR, calibration, importance)")
    t = time.perf_counter()
    entity_df, cutoff = labelled_transactions(source_path(store, EVENTS_SOURCE))
    ts = build_training_set(store, entity_df, FEATURE_SERVICE, cutoff)
    trained = train_model(ts, data / "models" / FEATURE_SERVICE)
    timings["train"] = time.perf_counter() - t
    m = trained.metadata
    print(f"{len(ts.frame):,} rows, {len(ts.feature_columns)} features; holdout {m.holdout_rows:,} rows: "
          f"ROC AUC {m.roc_auc:.3f}, PR AUC {m.pr_auc:.3f}")
    print(f"evaluation report: {trained.path / 'report' / 'report.md'}")

    _step("6/10 leakage: the same model on a naive latest-value join")
    t = time.perf_counter()
    leak = compare_leakage(store, entity_df, ts, data / "reports")
    timings["leakage"] = time.perf_counter() - t
    print(table(["training features", "PR AUC", "ROC AUC"], leak.table()))
    print(f"plot: {leak.plot}")

    _step("7/10 serve gRPC feast.serving.ServingService")
    server = FeatureServer(repo_path, host="127.0.0.1", port=0).start()
    print(f"listening on {server.address}")
    model = FraudModel.load(data / "models" / FEATURE_SERVICE)
    summary: dict[str, Any] = {}
    try:
        with FeatureClient(server.address, timeout=2.0) as client:
            _step(f"8/10 score {score} transactions over gRPC")
            scorer = FraudScorer(client, model)
            sample = entity_df.sample(n=min(score, len(entity_df)), random_state=1)
            latencies, scores = [], []
            for user_id, merchant_id, amount in zip(sample["user_id"], sample["merchant_id"], sample["amount"]):
                txn = {"user_id": int(user_id), "merchant_id": int(merchant_id), "amount": float(amount)}
                t = time.perf_counter()
                feats = scorer.features([txn])
                latencies.append((time.perf_counter() - t) * 1000)
                scores.append(float(model.score(feats)[0]))
            p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
            print(f"gRPC GetOnlineFeatures, 1 entity, {len(latencies)} calls: p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
                  f"mean fraud score {np.mean(scores):.4f}")

            _step("9/10 online/offline skew check (gRPC vs point-in-time offline, same instant)")
            skew = check_skew(store, client, sample_entities(source_path(store, EVENTS_SOURCE), 300), FEATURE_SERVICE)
            inconsistent = [f.feature for f in skew.features if f.mismatches or f.missing_online or f.extra_online]
            print(f"{skew.rows} entity pairs, {len(skew.features)} features: "
                  + ("online and offline agree" if skew.clean else f"inconsistent: {inconsistent}"))

            _step("10/10 stream live events (Redis stream -> featurepipe stream -> Redis), features change online")
            events = random_events(store, 2000)
            keys = {"user_id": events.column("user_id").to_pylist()[:3],
                    "merchant_id": events.column("merchant_id").to_pylist()[:3]}
            ctx = {"amount": events.column("amount").to_pylist()[:3], "txn_epoch": [time.time()] * 3}
            before = client.get_features(keys, feature_service=FEATURE_SERVICE, request_context=ctx).values
            streamed = _stream_live(store, data, events)
            after = client.get_features(keys, feature_service=FEATURE_SERVICE, request_context=ctx).values
            shown = ["last_txn_epoch", "txn_count_1h", "amount_sum_1h", "merchant_txn_count_24h"]
            print(table(
                ["user_id", *(f"{c} before->after" for c in shown)],
                [[u, *(f"{before[c][i]} -> {after[c][i]}" for c in shown)]
                 for i, u in enumerate(keys["user_id"])],
            ))
            changed = sum(before["last_txn_epoch"][i] != after["last_txn_epoch"][i] for i in range(3))
            # Windows slide with the clock: the same users asked an hour and five minutes from
            # now (in-process, the server's own reader) have no purchase in their last hour.
            later = datetime.now(timezone.utc) + timedelta(minutes=65)
            windows = ["user_transaction_stats:txn_count_1h", "user_transaction_stats:txn_count_24h"]
            ahead = online_features(store, [{"user_id": u} for u in keys["user_id"]], windows, at=later)
            print(f"the same users at {later:%H:%M} UTC (request-time windows: the 1h window has slid past "
                  "their purchases, the 24h one has not):")
            print(table(["user_id", "txn_count_1h now -> +65 min", "txn_count_24h now -> +65 min"],
                        [[u, f"{after['txn_count_1h'][i]} -> {ahead['txn_count_1h'][i]}",
                          f"{after['txn_count_24h'][i]} -> {ahead['txn_count_24h'][i]}"]
                         for i, u in enumerate(keys["user_id"])]))
            lat = streamed.latencies * 1000
            c = streamed.counters
            print(f"streamed {c.messages:,} events ({c.accepted:,} accepted, {c.dead:,} dead letters) in "
                  f"{streamed.loop_seconds:.2f} s; event-to-online p50 {_percentile(list(lat), 50):.0f} ms, "
                  f"p99 {_percentile(list(lat), 99):.0f} ms (all published up front, so this includes the queue)")
        summary = {
            "transactions": gen.rows,
            "feature rows": sum(r.rows for r in results),
            "training rows": len(ts.frame),
            "ROC AUC": round(m.roc_auc, 3),
            "PR AUC": round(m.pr_auc, 3),
            "gRPC p50 ms": round(p50, 2),
            "gRPC p99 ms": round(p99, 2),
            "leakage: naive PR AUC believed": round(leak.naive_believed_pr_auc, 3),
            "leakage: naive PR AUC real": round(leak.naive_test_pr_auc, 3),
            "skew: inconsistent features": len(inconsistent),
            "entities updated by stream": changed,
            **{f"{k} s": round(v, 1) for k, v in timings.items()},
            "total s": round(time.perf_counter() - t_start, 1),
        }
        _step("summary")
        print(table(["measure", "value"], [[k, v] for k, v in summary.items()]))
        if keep_running:
            print(f"\ngRPC server still running on {server.address}; Ctrl-C stops it")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
    finally:
        server.stop(grace=1.0)
    return summary
