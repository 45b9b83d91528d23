"""A small Feast repo for offline-store tests, and a brute-force point-in-time reference.

The reference is written from Feast's documented semantics, one entity row at a time:
for each feature view, among the rows with the same join keys and event time at or before
the row's as-of time (and, with a TTL, not older than ``as_of - ttl``), take the one with
the greatest event time, then the greatest created time. No match: nulls. Entity rows keep
their order, columns and duplicates.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DEFINITIONS = '''
from datetime import timedelta
from pathlib import Path

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64

# absolute paths: Feast's own duckdb store (the second opinion) reads relative ones from the cwd
DATA = Path(__file__).resolve().parent / "data"
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(seconds=10),
    schema=[Field(name="user_id", dtype=Int64), Field(name="amount", dtype=Float64), Field(name="cnt", dtype=Int64)],
    source=FileSource(name="user_src", path=str(DATA / "user_stats.parquet"), timestamp_field="event_ts",
                      created_timestamp_column="created_ts", field_mapping={"amt": "amount"}),
)
pair_stats = FeatureView(
    name="pair_stats",
    entities=[user, merchant],
    ttl=timedelta(0),
    schema=[Field(name="user_id", dtype=Int64), Field(name="merchant_id", dtype=Int64), Field(name="score", dtype=Float64)],
    source=FileSource(name="pair_src", path=str(DATA / "pair" / "**" / "*.parquet"), timestamp_field="ts"),
)
merchant_stats = FeatureView(
    name="merchant_stats",
    entities=[merchant],
    ttl=timedelta(seconds=30),
    schema=[Field(name="merchant_id", dtype=Int64), Field(name="rating", dtype=Float64)],
    source=FileSource(name="merchant_src", path=str(DATA / "merchant_stats.parquet"), timestamp_field="event_ts",
                      created_timestamp_column="created_ts"),
)


@on_demand_feature_view(sources=[user_stats], schema=[Field(name="amount_x2", dtype=Float64)], mode="pandas")
def doubled(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"amount_x2": df["amount"] * 2})


# (both projections aliased: Feast 0.67 cannot sort an aliased and an unaliased projection of one view)
# the same user view seen for the counterparty of a transfer: join key user_id -> dest_user_id
transfer = FeatureService(
    name="transfer",
    features=[user_stats.with_name("src")[["amount"]], user_stats.with_name("dest").with_join_key_map({"user_id": "dest_user_id"})[["amount"]]],
)
'''

YAML = """
project: oracle
provider: local
registry: data/registry.db
online_store:
  type: sqlite
  path: data/online.db
offline_store:
  type: {offline}
entity_key_serialization_version: 3
"""


@dataclass(frozen=True)
class ViewSpec:
    """What the reference needs to know of a test view."""

    name: str
    keys: list[str]
    ts: str
    created: str | None
    features: dict[str, str]  # source column -> feature name
    ttl: timedelta | None


VIEWS = {
    "user_stats": ViewSpec("user_stats", ["user_id"], "event_ts", "created_ts", {"amt": "amount", "cnt": "cnt"}, timedelta(seconds=10)),
    "pair_stats": ViewSpec("pair_stats", ["user_id", "merchant_id"], "ts", None, {"score": "score"}, None),
    "merchant_stats": ViewSpec("merchant_stats", ["merchant_id"], "event_ts", "created_ts", {"rating": "rating"}, timedelta(seconds=30)),
}


def make_repo(folder: Path) -> Path:
    """A Feast repo using featurepipe's offline store, deployed with the real ``feast apply``."""
    repo = folder / "repo"
    (repo / "data" / "pair").mkdir(parents=True)
    (repo / "features.py").write_text(DEFINITIONS)
    (repo / "feature_store.yaml").write_text(
        textwrap.dedent(YAML.format(offline="featurepipe.offline.store.FeaturepipeOfflineStore"))
    )
    write_tables(repo, empty_tables())
    feast = str(Path(sys.executable).parent / "feast")
    done = subprocess.run([feast, "--chdir", str(repo), "apply"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return repo


def feast_duckdb_store(repo: Path) -> Any:
    """The same registry and files read through Feast's own ``duckdb`` offline store."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    config = RepoConfig(
        project="oracle",
        provider="local",
        registry=str(repo / "data" / "registry.db"),
        online_store={"type": "sqlite", "path": str(repo / "data" / "online.db")},
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=repo,
    )
    return FeatureStore(config=config)


def empty_tables() -> dict[str, pd.DataFrame]:
    ts = pd.Series([], dtype="datetime64[us, UTC]")
    return {
        "user_stats": pd.DataFrame({"user_id": pd.Series([], dtype="int64"), "event_ts": ts, "created_ts": ts,
                                    "amt": pd.Series([], dtype="float64"), "cnt": pd.Series([], dtype="int64")}),
        "pair_stats": pd.DataFrame({"user_id": pd.Series([], dtype="int64"), "merchant_id": pd.Series([], dtype="int64"),
                                    "ts": ts, "score": pd.Series([], dtype="float64")}),
        "merchant_stats": pd.DataFrame({"merchant_id": pd.Series([], dtype="int64"), "event_ts": ts, "created_ts": ts,
                                        "rating": pd.Series([], dtype="float64")}),
    }


def write_tables(repo: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Replace the three views' source files (the pair view: one folder per day, days may be missing)."""
    data = repo / "data"
    for name in ("user_stats", "merchant_stats"):
        pq.write_table(pa.Table.from_pandas(tables[name], preserve_index=False), data / f"{name}.parquet")
    pair_root = data / "pair"
    for old in pair_root.glob("**/*.parquet"):
        old.unlink()
    pair = tables["pair_stats"]
    if pair.empty:
        folder = pair_root / "date=1970-01-01"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(pair, preserve_index=False), folder / "part-0.parquet")
        return
    for day, part in pair.groupby(pair["ts"].dt.strftime("%Y-%m-%d")):
        folder = pair_root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / "part-0.parquet")


def reference(
    entity_df: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    requests: list[tuple[str, str, dict[str, str]]],
    created_cutoff: bool = False,
) -> pd.DataFrame:
    """Brute force: ``requests`` is ``(view, output prefix or '', join-key map)`` per view.

    ``created_cutoff``: Feast's ``filter_by_created_timestamp`` (rows created after the
    as-of time do not count either).

    Returns entity_df with one column per requested feature, in entity row order.
    """
    out = entity_df.copy()
    as_of = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    for view_name, prefix, key_map in requests:
        spec = VIEWS[view_name]
        table = tables[view_name]
        values: dict[str, list[Any]] = {f: [] for f in spec.features.values()}
        for i in range(len(entity_df)):
            t = as_of.iloc[i]
            match = table
            for key in spec.keys:
                match = match[match[key] == entity_df[key_map.get(key, key)].iloc[i]]
            stamps = pd.to_datetime(match[spec.ts], utc=True)
            ok = stamps <= t
            if spec.ttl is not None:
                ok &= stamps >= t - spec.ttl
            if created_cutoff and spec.created:
                ok &= pd.to_datetime(match[spec.created], utc=True) <= t
            match = match[ok.to_numpy()]
            if match.empty:
                for f in values:
                    values[f].append(None)
                continue
            order = [spec.ts, *([spec.created] if spec.created else [])]
            best = match.sort_values(order, ascending=False, kind="stable").iloc[0]
            for src, feature in spec.features.items():
                values[feature].append(best[src])
        for feature, column in values.items():
            out[prefix + feature] = pd.Series(column, index=out.index, dtype="float64" if feature != "cnt" else "Int64")
    return out


def normalise(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Comparable form: the given columns, UTC timestamps, floats for numbers, None for missing."""
    result = frame[columns].copy()
    for c in columns:
        if pd.api.types.is_datetime64_any_dtype(result[c]):
            result[c] = pd.to_datetime(result[c], utc=True)
        elif pd.api.types.is_numeric_dtype(result[c]) and not pd.api.types.is_bool_dtype(result[c]):
            result[c] = result[c].astype("float64")
    return result.reset_index(drop=True)
