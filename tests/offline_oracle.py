"""Small Feast repos for offline-store tests, and brute-force point-in-time references.

Plain feature views (:data:`DEFINITIONS`, :func:`reference`): the reference is written from
Feast's documented semantics, one entity row at a time: for each feature view, among the
rows with the same join keys and event time at or before the row's as-of time (and, with a
TTL, not older than ``as_of - ttl``), take the one with the greatest event time, then the
greatest created time. No match: nulls. Entity rows keep their order, columns and duplicates.

Windowed-aggregate views (:data:`WINDOW_DEFINITIONS`, :func:`window_reference`): the
reference computes each value from the raw events, one entity row at a time, from the
documented semantics alone (it shares no code with the kernel): a windowed aggregate with
window ``W`` asked at ``t`` covers the key's events with event time in
``[floor(t, hop) - W, t)``, hop 5 min under 12 h, 1 h under 12 days, 1 day beyond; ``last``
is the latest event before ``t`` (epoch seconds); an empty window gives count and sum 0,
mean, min and max null; a key with no event before ``t`` gets nulls everywhere; the view's
TTL plays no part. Feast's own stores cannot compute these values (they join stored rows
as of an event time), which is why the oracle is this brute force. (It groups events by key
for speed; :mod:`tests.window_oracle`, the kernel's own reference, is one event list per
query; both cast a double to ``DECIMAL(38, 9)`` with ``as_decimal``.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.window_oracle import as_decimal

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


def make_repo(folder: Path, windows: bool = False) -> Path:
    """A Feast repo using featurepipe's offline store, deployed with the real ``feast apply``:
    the plain views of :data:`DEFINITIONS`, or with ``windows`` the windowed-aggregate views
    of :data:`WINDOW_DEFINITIONS` (their tables are written by ``featurepipe backfill``)."""
    repo = folder / "repo"
    (repo / "data" / "pair").mkdir(parents=True)
    (repo / "features.py").write_text(WINDOW_DEFINITIONS if windows else DEFINITIONS)
    (repo / "feature_store.yaml").write_text(
        textwrap.dedent(YAML.format(offline="featurepipe.offline.store.FeaturepipeOfflineStore"))
    )
    if windows:
        write_events(repo, pd.DataFrame({c: pd.Series([], dtype=t) for c, t in EVENT_COLUMNS.items()}))
    else:
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


# --- windowed-aggregate views ------------------------------------------------------------------

WINDOW_DEFINITIONS = '''
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.aggregation import Aggregation
from feast.types import Float64, Int64

from featurepipe.definitions import WindowedFeatures

DATA = Path(__file__).resolve().parent / "data"
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)
events = FileSource(name="events", path=str(DATA / "events" / "**" / "*.parquet"), timestamp_field="ts")
H, D = timedelta(hours=1), timedelta(days=1)


def agg(function, window, name, column="amount"):
    return Aggregation(column=column, function=function, time_window=window, name=name)


# a TTL much shorter than the windows: a known user is still known after it (count 0, not null)
user_windows = WindowedFeatures(
    name="user_windows", entity=user, source=events, ttl=timedelta(minutes=10), offline_root=DATA / "tables",
    aggregations=[agg("count", H, "n_1h"), agg("sum", H, "sum_1h"), agg("mean", H, "mean_1h"),
                  agg("min", H, "min_1h"), agg("max", H, "max_1h"), agg("count", D, "n_24h"),
                  agg("sum", D, "sum_24h"), agg("last", None, "last_ts", column="ts")],
).feature_view()
# an aggregate without a window (the whole history) and a 30 min one
merchant_windows = WindowedFeatures(
    name="merchant_windows", entity=merchant, source=events, ttl=timedelta(minutes=1), offline_root=DATA / "tables",
    aggregations=[agg("count", None, "n_all"), agg("max", timedelta(minutes=30), "max_30m"),
                  agg("mean", 2 * H, "mean_2h")],
).feature_view()
# a compound key: WindowedFeatures declares one entity, so the view is assembled from its parts
def _pair_windows():
    one_key = WindowedFeatures(
        name="pair_windows", entity=user, source=events, ttl=timedelta(0), offline_root=DATA / "tables",
        aggregations=[agg("count", H, "pair_n_1h"), agg("sum", 3 * H, "pair_sum_3h")],
    )
    return FeatureView(
        name="pair_windows", entities=[user, merchant], ttl=timedelta(0), online=True,
        tags=one_key.feature_view().tags, source=one_key.push_source(),
        schema=[Field(name="user_id", dtype=Int64), Field(name="merchant_id", dtype=Int64),
                Field(name="pair_n_1h", dtype=Int64), Field(name="pair_sum_3h", dtype=Float64)],
    )


pair_windows = _pair_windows()
'''

EVENT_COLUMNS = {"user_id": "Int64", "merchant_id": "Int64", "ts": "datetime64[us, UTC]", "amount": "float64"}


@dataclass(frozen=True)
class WindowAgg:
    """One aggregate of a windowed test view."""

    name: str
    function: str
    column: str
    window: timedelta | None


@dataclass(frozen=True)
class WindowView:
    """What the window reference needs to know of a windowed test view."""

    name: str
    keys: list[str]
    aggregations: list[WindowAgg]


def _w(function: str, window: timedelta | None, name: str, column: str = "amount") -> WindowAgg:
    return WindowAgg(name, function, column, window)


_H, _D = timedelta(hours=1), timedelta(days=1)
WINDOW_VIEWS = {
    "user_windows": WindowView("user_windows", ["user_id"], [
        _w("count", _H, "n_1h"), _w("sum", _H, "sum_1h"), _w("mean", _H, "mean_1h"), _w("min", _H, "min_1h"),
        _w("max", _H, "max_1h"), _w("count", _D, "n_24h"), _w("sum", _D, "sum_24h"), _w("last", None, "last_ts", "ts"),
    ]),
    "merchant_windows": WindowView("merchant_windows", ["merchant_id"], [
        _w("count", None, "n_all"), _w("max", timedelta(minutes=30), "max_30m"), _w("mean", 2 * _H, "mean_2h"),
    ]),
    "pair_windows": WindowView("pair_windows", ["user_id", "merchant_id"], [
        _w("count", _H, "pair_n_1h"), _w("sum", 3 * _H, "pair_sum_3h"),
    ]),
}

_MINUTE_US, _HOUR_US, _DAY_US = 60_000_000, 3_600_000_000, 86_400_000_000


def hop_us(window: timedelta) -> int:
    """The hop of a window in microseconds: 5 min under 12 h, 1 h under 12 days, 1 day beyond."""
    if window < timedelta(hours=12):
        return 5 * _MINUTE_US
    if window < timedelta(days=12):
        return _HOUR_US
    return _DAY_US


def window_start_us(t_us: int, window: timedelta) -> int:
    """``floor(t, hop) - W``: the first instant a window asked at ``t`` covers."""
    hop = hop_us(window)
    return (t_us // hop) * hop - window // timedelta(microseconds=1)


def write_events(repo: Path, events: pd.DataFrame) -> None:
    """Replace the raw events (one folder per day of ``ts``; rows with a null ``ts`` go to the first)."""
    root = repo / "data" / "events"
    for old in root.glob("**/*.parquet"):
        old.unlink()
    frame = events.astype(EVENT_COLUMNS)
    days = frame["ts"].dt.strftime("%Y-%m-%d").fillna("1970-01-01")
    for day, part in list(frame.groupby(days)) if len(frame) else [("1970-01-01", frame)]:
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / "part-0.parquet")


def _exact(value: Any) -> Decimal:
    """A number as the exact sums of the semantics hold it (``DECIMAL(38, 9)`` for a float,
    cast as DuckDB casts it: :func:`tests.window_oracle.as_decimal`)."""
    if isinstance(value, (int, np.integer)):
        return Decimal(int(value))
    return as_decimal(float(value))


def window_reference(entity_df: pd.DataFrame, events: pd.DataFrame, view: str | WindowView,
                     key_map: dict[str, str] | None = None, timestamp: str = "ts") -> pd.DataFrame:
    """Brute force: ``view``'s values (a name in :data:`WINDOW_VIEWS`, or a spec) at each entity
    row's ``event_timestamp``, from ``events`` (their event time in column ``timestamp``; a
    ``last`` aggregate is of that column).

    Returns one column per aggregate, in entity row order (counts Int64, the rest float64).
    """
    spec = WINDOW_VIEWS[view] if isinstance(view, str) else view
    key_map = key_map or {}
    valid = events.dropna(subset=[*spec.keys, timestamp])
    groups: dict[tuple[Any, ...], pd.DataFrame] = {
        (k if isinstance(k, tuple) else (k,)): g.sort_values(timestamp, kind="stable")
        for k, g in valid.groupby(spec.keys)
    } if len(valid) else {}
    as_of = pd.to_datetime(entity_df["event_timestamp"], utc=True).dt.floor("us")
    values: dict[str, list[Any]] = {a.name: [] for a in spec.aggregations}
    for i in range(len(entity_df)):
        t = int(as_of.iloc[i].value // 1000)
        key = tuple(entity_df[key_map.get(k, k)].iloc[i] for k in spec.keys)
        group = groups.get(key)
        x = (pd.to_datetime(group[timestamp], utc=True).dt.tz_convert(None).to_numpy(dtype="datetime64[us]").astype(np.int64)
             if group is not None else np.zeros(0, np.int64))
        before = x < t
        if not before.any():  # no event before t: an unknown key, nulls everywhere
            for a in spec.aggregations:
                values[a.name].append(None)
            continue
        assert group is not None
        for a in spec.aggregations:
            if a.function == "last":
                values[a.name].append(int(x[before].max()) / 1e6)
                continue
            inside = before & (x >= window_start_us(t, a.window)) if a.window is not None else before
            column = group[a.column].to_numpy()[inside]
            column = column[~pd.isna(column)]
            if a.function == "count":
                values[a.name].append(len(column))
            elif a.function == "sum":
                values[a.name].append(float(sum((_exact(v) for v in column), Decimal(0))))
            elif a.function == "mean":
                total = sum((_exact(v) for v in column), Decimal(0))
                values[a.name].append(float(total) / float(len(column)) if len(column) else None)
            elif a.function == "min":
                values[a.name].append(float(column.min()) if len(column) else None)
            elif a.function == "max":
                values[a.name].append(float(column.max()) if len(column) else None)
            else:
                raise AssertionError(f"no reference for {a.function}")
    return pd.DataFrame({
        a.name: pd.Series(values[a.name], index=entity_df.index, dtype="Int64" if a.function == "count" else "float64")
        for a in spec.aggregations
    })
