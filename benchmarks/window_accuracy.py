"""How true are the served window values? Measured on a repo's raw transactions (the demo's).

For a sample of scored transactions (each scored at its own time ``t``, before it is
ingested), four values of every user window feature (count and sum over 1h / 24h / 7d):

* **exact**: the user's transactions in ``[t - W, t)``, brute force over the raw events;
* **documented**: the documented window ``[floor(t, hop) - W, t)`` (featurepipe's sawtooth);
* **served now**: what featurepipe returns at ``t``: the training set's point-in-time join
  (``build_training_set``, featurepipe's offline store), which the tests hold equal to the
  gRPC server and the stream at the same instant, value for value;
* **served before** (kernel 1, windows as of each event): the window ending at the user's
  previous transaction, ``[t_prev - W, t_prev]``, which is what the online store served
  before request-time windows.

Prints, per feature, the share of transactions where "served now" differs from the
documented window (must be 0), where the documented window differs from the exact one
(the sawtooth's cost), and where "served before" differs from the exact value (the old
error), plus how often the old value claimed activity in a window that had none.

    .venv/bin/python benchmarks/window_accuracy.py --repo feature_repo --sample 20000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import pandas as pd

from featurepipe.config import load_store, source_path
from featurepipe.core.sql import literal
from featurepipe.core.windows import US, hop_for, micros
from training.dataset import build_training_set, labelled_transactions

WINDOWS = {"1h": pd.Timedelta(hours=1), "24h": pd.Timedelta(days=1), "7d": pd.Timedelta(days=7)}


def truth(raw: str, sample: pd.DataFrame) -> pd.DataFrame:
    """Exact, documented and kernel-1 values of each window, by brute force in DuckDB."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("s", sample[["transaction_id", "user_id", "t_us"]])
    con.execute(f"""CREATE TABLE e AS SELECT user_id, epoch_us(event_timestamp) AS x,
                    CAST(amount AS DECIMAL(38, 9)) AS a
                    FROM read_parquet({literal(raw)}, hive_partitioning = true)""")
    longest = max(micros(w.to_pytimedelta()) + hop_for(w.to_pytimedelta()) for w in WINDOWS.values())
    cols = []
    for name, w in WINDOWS.items():
        wu, h = micros(w.to_pytimedelta()), hop_for(w.to_pytimedelta())
        doc = f"e.x >= s.t_us - ((s.t_us % {h}) + {h}) % {h} - {wu}"
        exact = f"e.x >= s.t_us - {wu}"
        old = f"e.x <= p.prev AND e.x >= p.prev - {wu}"
        for kind, cond in (("exact", exact), ("doc", doc), ("old", old)):
            cols.append(f"count(*) FILTER (WHERE {cond}) AS {kind}_count_{name}")
            cols.append(f"CAST(COALESCE(sum(e.a) FILTER (WHERE {cond}), 0) AS DOUBLE) AS {kind}_sum_{name}")
    return con.execute(f"""
        WITH p AS (SELECT s.transaction_id, max(e.x) AS prev FROM s JOIN e ON e.user_id = s.user_id
                   AND e.x < s.t_us GROUP BY s.transaction_id)
        SELECT s.transaction_id, any_value(p.prev) AS prev, {", ".join(cols)}
        FROM s LEFT JOIN p USING (transaction_id)
        LEFT JOIN e ON e.user_id = s.user_id AND e.x < s.t_us AND e.x >= s.t_us - {longest + 7 * 24 * 3600 * US}
        GROUP BY s.transaction_id""").df()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("feature_repo"))
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--feature-service", default="fraud_detection_v1")
    parser.add_argument("--source", default="transactions")
    args = parser.parse_args(argv)

    store = load_store(args.repo)
    raw = source_path(store, args.source)
    entity_df, cutoff = labelled_transactions(raw)
    sample = entity_df.sample(n=min(args.sample, len(entity_df)), random_state=7).reset_index(drop=True)
    sample["t_us"] = (pd.to_datetime(sample["event_timestamp"], utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
        microseconds=1)
    served = build_training_set(store, sample, args.feature_service, cutoff).frame
    ref = truth(raw, sample)
    both = served.merge(ref, on="transaction_id", how="inner")
    if len(both) != len(sample):
        print(f"joined {len(both)} of {len(sample)} transactions", file=sys.stderr)
        return 1
    rows = []
    for name in WINDOWS:
        for fn, feature in (("count", f"txn_count_{name}"), ("sum", f"amount_sum_{name}")):
            # null: the user had no event before t (unknown to the store then), where the windows are empty
            now = both[feature].fillna(0)
            doc, exact, old = both[f"doc_{fn}_{name}"], both[f"exact_{fn}_{name}"], both[f"old_{fn}_{name}"]
            row = {
                "feature": feature,
                "served now != documented": f"{(now != doc).mean():.2%}",
                "documented != exact": f"{(doc != exact).mean():.2%}",
                "served before != exact": f"{(old != exact).mean():.2%}",
            }
            row["served null, events before t"] = f"{(both[feature].isna() & both['prev'].notna()).mean():.2%}"
            if fn == "count":
                row["before: activity claimed, none true"] = f"{((old > 0) & (exact == 0)).mean():.2%}"
            rows.append(row)
    print(f"{len(both):,} scored transactions (sample of {len(entity_df):,}), each at its own time; "
          f"{both['prev'].isna().mean():.2%} are their user's first (served null: no event before t)")
    print(pd.DataFrame(rows).fillna("").to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
