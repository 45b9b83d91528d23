"""featurepipe's offline store against a brute-force reference, with Feast's duckdb store as a second opinion.

Everything goes through Feast's public API (``FeatureStore.get_historical_features`` and
friends) on a repo deployed with the real ``feast apply``: plain feature views (Feast's
as-of semantics, TTL included), then windowed-aggregate views backfilled by featurepipe
(request-time values at any instant, against a brute force over the raw events).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepipe.batch.backfill import BackfillResult
from featurepipe.batch.backfill import backfill as batch_backfill
from featurepipe.core.windows import KERNEL_VERSION
from featurepipe.offline import index, pit
from featurepipe.offline.entity import read_entity_frame
from featurepipe.offline.infra import connect
from featurepipe.offline.store import FeaturepipeOfflineStore
from featurepipe.offline.view import ViewRequest
from tests.offline_oracle import (
    EVENT_COLUMNS,
    WINDOW_VIEWS,
    feast_duckdb_store,
    make_repo,
    normalise,
    reference,
    window_reference,
    write_events,
    write_tables,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)
US = timedelta(microseconds=1)
ALL = ["user_stats:amount", "user_stats:cnt", "pair_stats:score", "merchant_stats:rating"]
ALL_REQUESTS = [("user_stats", "", {}), ("pair_stats", "", {}), ("merchant_stats", "", {})]
FEATURE_COLUMNS = ["amount", "cnt", "score", "rating"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("offline"))


@pytest.fixture(scope="module")
def stores(repo: Path) -> Iterator[tuple[Any, Any]]:
    from feast import FeatureStore

    yield FeatureStore(repo_path=str(repo)), feast_duckdb_store(repo)


def _frame(rows: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns) if rows else frame.astype(columns)


def tables_from(user: list[dict], pair: list[dict], merchant: list[dict]) -> dict[str, pd.DataFrame]:
    ts = "datetime64[us, UTC]"
    return {
        "user_stats": _frame(user, {"user_id": "int64", "event_ts": ts, "created_ts": ts, "amt": "float64", "cnt": "int64"}),
        "pair_stats": _frame(pair, {"user_id": "int64", "merchant_id": "int64", "ts": ts, "score": "float64"}),
        "merchant_stats": _frame(merchant, {"merchant_id": "int64", "event_ts": ts, "created_ts": ts, "rating": "float64"}),
    }


def retrieve(
    store: Any, entity_df: pd.DataFrame | str, features: Any, full: bool = False, created_cutoff: bool = False
) -> pd.DataFrame:
    return store.get_historical_features(
        entity_df=entity_df, features=features, full_feature_names=full, filter_by_created_timestamp=created_cutoff
    ).to_df()


def assert_same(ours: pd.DataFrame, expected: pd.DataFrame, columns: list[str]) -> None:
    pd.testing.assert_frame_equal(normalise(ours, columns), normalise(expected, columns), check_dtype=False)


# --- hand-made edge cases --------------------------------------------------------------------

EDGE_USER = [
    # user 1: a tie on event time, broken by created time (the later-created row wins)
    {"user_id": 1, "event_ts": T0, "created_ts": T0 + S, "amt": 10.0, "cnt": 1},
    {"user_id": 1, "event_ts": T0, "created_ts": T0 + 2 * S, "amt": 11.0, "cnt": 2},
    {"user_id": 1, "event_ts": T0 + 5 * S, "created_ts": T0 + 5 * S, "amt": 12.0, "cnt": 3},
    # user 2: one row, to probe the TTL (10 s) boundary to the microsecond
    {"user_id": 2, "event_ts": T0, "created_ts": T0, "amt": 20.0, "cnt": 1},
    # user 3: only a row in the future of every entity row
    {"user_id": 3, "event_ts": T0 + 3600 * S, "created_ts": T0, "amt": 30.0, "cnt": 1},
]
EDGE_PAIR = [  # compound key (user, merchant); days 1 and 3 only (day 2's partition is missing)
    {"user_id": 1, "merchant_id": 7, "ts": T0 - timedelta(days=2), "score": 0.1},
    {"user_id": 1, "merchant_id": 7, "ts": T0, "score": 0.2},
    {"user_id": 1, "merchant_id": 8, "ts": T0 - timedelta(days=2), "score": 0.3},
    {"user_id": 2, "merchant_id": 7, "ts": T0 + 4 * S, "score": 0.4},
]
EDGE_ENTITIES = [
    # (row_id, user, merchant, as-of)
    (0, 1, 7, T0 - US),  # before user 1's first row: no user features; pair from day 1
    (1, 1, 7, T0),  # exactly at the tie: the later-created row
    (2, 1, 7, T0 + 5 * S),  # exact equality with a feature row
    (3, 2, 7, T0 + 10 * S),  # TTL boundary: as_of - ttl == event time -> still matches
    (4, 2, 7, T0 + 10 * S + US),  # one microsecond past the TTL -> null
    (5, 3, 8, T0 + 60 * S),  # user 3's only row is in the future; pair (3, 8) unknown
    (6, 9, 9, T0 + 60 * S),  # unknown everywhere
    (1, 1, 7, T0),  # a duplicate of row 1 (same keys, same time) stays a duplicate
    (7, 1, 8, T0 + 86400 * S),  # pair (1, 8): newest row is two days old, pair view has no TTL
]


def edge_entity_df() -> pd.DataFrame:
    frame = pd.DataFrame(EDGE_ENTITIES, columns=["row_id", "user_id", "merchant_id", "event_timestamp"])
    frame["note"] = [f"row {r}" for r in frame["row_id"]]  # an extra column, carried through
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True)  # order is the caller's


def use_engine(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """``index``: match through the sorted index; ``scan``/``scan-no-semi-join``: ASOF over the files."""
    if engine.startswith("scan"):
        monkeypatch.setattr(pit, "INDEX_MAX_ENTITY_ROWS", -1)
    monkeypatch.setattr(pit, "SEMI_JOIN_MAX_ENTITY_ROWS", 0 if engine == "scan-no-semi-join" else 10**9)


def index_folders(repo: Path) -> list[str]:
    root = repo / ".featurepipe" / "offline-index"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


ENGINES = ["index", "scan", "scan-no-semi-join"]


@pytest.mark.parametrize("engine", ENGINES)
def test_edge_cases_match_the_reference(
    repo: Path, stores: tuple[Any, Any], engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_engine(monkeypatch, engine)
    ours_store, _ = stores
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])  # the merchant view is empty
    write_tables(repo, tables)
    entity_df = edge_entity_df()
    ours = retrieve(ours_store, entity_df, ALL)
    expected = reference(entity_df, tables, ALL_REQUESTS)
    assert list(ours.columns) == [*entity_df.columns, *FEATURE_COLUMNS]
    assert_same(ours, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", "note", *FEATURE_COLUMNS])
    # and the cases say what they claim
    by_row = ours.set_index("row_id")
    assert pd.isna(by_row.loc[0, "amount"]) and by_row.loc[0, "score"] == 0.1
    assert (by_row.loc[1, "amount"] == 11.0).all() and len(by_row.loc[1]) == 2
    assert by_row.loc[2, "amount"] == 12.0
    assert by_row.loc[3, "amount"] == 20.0 and pd.isna(by_row.loc[4, "amount"])
    assert by_row.loc[5, ["amount", "score"]].isna().all()
    assert by_row.loc[7, "score"] == 0.3
    assert ours["rating"].isna().all()
    if engine == "index":  # one index per view, the empty one included
        assert len(index_folders(repo)) == 3


def test_naive_and_aware_timestamps_agree(repo: Path, stores: tuple[Any, Any]) -> None:
    ours_store, _ = stores
    write_tables(repo, tables_from(EDGE_USER, EDGE_PAIR, []))
    aware = edge_entity_df()
    naive = aware.assign(event_timestamp=aware["event_timestamp"].dt.tz_convert(None))
    as_text = aware.assign(event_timestamp=aware["event_timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00"))
    expected = retrieve(ours_store, aware, ALL)
    for variant in (naive, as_text):
        assert_same(retrieve(ours_store, variant, ALL), expected, FEATURE_COLUMNS)


def test_feast_duckdb_store_agrees_on_the_edge_cases(repo: Path, stores: tuple[Any, Any]) -> None:
    """Second opinion: Feast's own duckdb store gives the same rows (it may reorder them)."""
    _, feast_store = stores
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    entity_df = edge_entity_df()
    theirs = retrieve(feast_store, entity_df, ALL)
    expected = reference(entity_df, tables, ALL_REQUESTS)
    cols = ["row_id", "user_id", "merchant_id", *FEATURE_COLUMNS]
    key = ["row_id", "user_id", "merchant_id"]
    assert_same(theirs.sort_values(key, kind="stable"), expected.sort_values(key, kind="stable"), cols)


# --- randomised: hypothesis ------------------------------------------------------------------

def _tables_and_entities(draw: Any) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Small random tables on a coarse time grid, so ties, TTL edges and equalities are common."""
    def stamp(seconds: int, micros: int) -> datetime:
        return T0 + seconds * S + micros * US

    seconds = st.integers(0, 40)
    micros = st.sampled_from([0, 0, 0, 1, 999_999])
    user = draw(st.lists(st.fixed_dictionaries({
        "user_id": st.integers(1, 3), "event_ts": st.builds(stamp, seconds, micros),
        "created_ts": st.builds(stamp, st.integers(0, 3), st.just(0)),
        "amt": st.floats(-1e6, 1e6, allow_nan=False), "cnt": st.integers(-5, 5),
    }), max_size=25))
    pair = draw(st.lists(st.fixed_dictionaries({
        "user_id": st.integers(1, 3), "merchant_id": st.integers(1, 2),
        "ts": st.builds(lambda s, d: stamp(s, 0) + timedelta(days=d), seconds, st.integers(-2, 0)),
        "score": st.floats(0, 1, allow_nan=False),
    }), max_size=15))
    merchant = draw(st.lists(st.fixed_dictionaries({
        "merchant_id": st.integers(1, 2), "event_ts": st.builds(stamp, seconds, micros),
        "created_ts": st.builds(stamp, st.integers(0, 3), st.just(0)),
        "rating": st.floats(0, 5, allow_nan=False),
    }), max_size=10))
    tables = tables_from(user, pair, merchant)
    # exact ties on (keys, event time, created time) have no defined winner in Feast: keep one
    tables["user_stats"] = tables["user_stats"].drop_duplicates(["user_id", "event_ts", "created_ts"])
    tables["merchant_stats"] = tables["merchant_stats"].drop_duplicates(["merchant_id", "event_ts", "created_ts"])
    tables["pair_stats"] = tables["pair_stats"].drop_duplicates(["user_id", "merchant_id", "ts"])
    rows = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), seconds, micros), min_size=1, max_size=20))
    entity_df = pd.DataFrame(
        [(i, u, m, stamp(s, us)) for i, (u, m, s, us) in enumerate(rows)],
        columns=["row_id", "user_id", "merchant_id", "event_timestamp"],
    )
    return tables, entity_df


random_case = st.composite(lambda draw: _tables_and_entities(draw))()
RANDOM_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True)


@pytest.mark.parametrize("engine", ["index", "scan"])
@pytest.mark.parametrize("created_cutoff", [False, True], ids=["asof", "filter_by_created_timestamp"])
@settings(max_examples=40, **RANDOM_SETTINGS)
@given(case=random_case)
def test_random_cases_match_the_reference(
    repo: Path, stores: tuple[Any, Any], created_cutoff: bool, engine: str, case: Any
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:  # hypothesis runs many examples per test call
        use_engine(monkeypatch, engine)
        _check_random_case(repo, stores, created_cutoff, case)


def _check_random_case(repo: Path, stores: tuple[Any, Any], created_cutoff: bool, case: Any) -> None:
    ours_store, _ = stores
    tables, entity_df = case
    write_tables(repo, tables)
    ours = retrieve(ours_store, entity_df, ALL, created_cutoff=created_cutoff)
    expected = reference(entity_df, tables, ALL_REQUESTS, created_cutoff=created_cutoff)
    assert_same(ours, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", *FEATURE_COLUMNS])


@settings(max_examples=15, **RANDOM_SETTINGS)
@given(case=random_case)
def test_feast_duckdb_store_agrees_on_random_cases(repo: Path, stores: tuple[Any, Any], case: Any) -> None:
    _, feast_store = stores
    tables, entity_df = case
    write_tables(repo, tables)
    theirs = retrieve(feast_store, entity_df, ALL).sort_values("row_id", kind="stable")
    expected = reference(entity_df, tables, ALL_REQUESTS)
    assert_same(theirs, expected, ["row_id", *FEATURE_COLUMNS])


# --- the rest of Feast's API -----------------------------------------------------------------

def test_join_key_map_full_names_and_feature_services(repo: Path, stores: tuple[Any, Any]) -> None:
    ours_store, _ = stores
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    entity_df = edge_entity_df()
    entity_df["dest_user_id"] = entity_df["user_id"].map({1: 2, 2: 1, 3: 3, 9: 1})
    service = ours_store.get_feature_service("transfer")
    ours = retrieve(ours_store, entity_df, service, full=True)
    assert [c for c in ours.columns if "__" in c] == ["src__amount", "dest__amount"]
    expected = reference(entity_df, tables, [("user_stats", "src__", {}), ("user_stats", "dest__", {"user_id": "dest_user_id"})])
    assert_same(ours, expected, ["row_id", "src__amount", "dest__amount"])
    assert not ours["dest__amount"].equals(ours["src__amount"])


def test_on_demand_views_apply_to_the_result(repo: Path, stores: tuple[Any, Any]) -> None:
    ours_store, _ = stores
    write_tables(repo, tables_from(EDGE_USER, EDGE_PAIR, []))
    ours = retrieve(ours_store, edge_entity_df(), ["user_stats:amount", "doubled:amount_x2"])
    np.testing.assert_array_equal(ours["amount_x2"].to_numpy(), ours["amount"].to_numpy() * 2)


def test_sql_entity_input_and_persist(repo: Path, stores: tuple[Any, Any], tmp_path: Path) -> None:
    from feast.infra.offline_stores.file_source import SavedDatasetFileStorage

    ours_store, _ = stores
    write_tables(repo, tables_from(EDGE_USER, EDGE_PAIR, []))
    entity_df = edge_entity_df()
    entity_df.to_parquet(tmp_path / "entities.parquet")
    query = f"SELECT * FROM read_parquet('{tmp_path / 'entities.parquet'}')"
    from_sql = retrieve(ours_store, query, ALL)
    assert_same(from_sql, retrieve(ours_store, entity_df, ALL), ["row_id", *FEATURE_COLUMNS])
    job = ours_store.get_historical_features(entity_df=entity_df, features=ALL)
    target = tmp_path / "saved.parquet"
    ours_store.create_saved_dataset(from_=job, name="edge_cases", storage=SavedDatasetFileStorage(path=str(target)))
    assert_same(pd.read_parquet(target), job.to_df(), ["row_id", *FEATURE_COLUMNS])


def test_materialize_uses_pull_latest(repo: Path, stores: tuple[Any, Any]) -> None:
    """Feast's materialisation reads through pull_latest_from_table_or_query: the online values are the latest rows."""
    ours_store, _ = stores
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    ours_store.materialize(T0 - timedelta(days=5), T0 + timedelta(days=1), feature_views=["pair_stats"])
    online = ours_store.get_online_features(
        features=["pair_stats:score"], entity_rows=[{"user_id": 1, "merchant_id": 7}, {"user_id": 1, "merchant_id": 8}]
    ).to_dict()
    assert online["score"] == [0.2, 0.3]


def test_pull_all_and_latest_match_pandas(repo: Path) -> None:
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    source = store.get_feature_view("user_stats").batch_source
    args = dict(config=store.config, data_source=source, join_key_columns=["user_id"], feature_name_columns=["amt", "cnt"],
                timestamp_field="event_ts", created_timestamp_column="created_ts")
    lo, hi = T0 - S, T0 + 5 * S
    every = FeaturepipeOfflineStore.pull_all_from_table_or_query(**args, start_date=lo, end_date=hi).to_df()
    table = tables["user_stats"]
    inside = table[(table["event_ts"] >= lo) & (table["event_ts"] <= hi)]
    assert sorted(every["amt"]) == sorted(inside["amt"])
    latest = FeaturepipeOfflineStore.pull_latest_from_table_or_query(**args, start_date=lo, end_date=hi).to_df()
    assert dict(zip(latest["user_id"], latest["amt"])) == {1: 12.0, 2: 20.0}


def test_offline_write_batch_appends_rows(repo: Path, stores: tuple[Any, Any]) -> None:
    ours_store, _ = stores
    write_tables(repo, tables_from(EDGE_USER, EDGE_PAIR, []))
    new = pd.DataFrame({"user_id": [5], "merchant_id": [5], "ts": [T0 + timedelta(days=3)], "score": [0.9]})
    ours_store.write_to_offline_store("pair_stats", new)
    entity = pd.DataFrame({"user_id": [5], "merchant_id": [5], "event_timestamp": [T0 + timedelta(days=4)]})
    assert retrieve(ours_store, entity, ["pair_stats:score"])["score"].tolist() == [0.9]
    with pytest.raises(ValueError, match="extra"):  # Feast checks first; ours would too
        ours_store.write_to_offline_store("pair_stats", new.assign(extra=1))


# --- bad input fails fast, naming what is wrong ---------------------------------------------

@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns=["event_timestamp"]), "event_timestamp"),
        (lambda df: df.drop(columns=["merchant_id"]), "merchant_id"),
        (lambda df: df.assign(user_id=df["user_id"].astype(str)), "user_id"),
        (lambda df: df.assign(event_timestamp="yesterday-ish"), "event_timestamp"),
    ],
    ids=["no-timestamp", "no-join-key", "string-key", "bad-timestamp"],
)
def test_bad_entity_frames_name_the_column(stores: tuple[Any, Any], change: Any, message: str) -> None:
    ours_store, _ = stores
    entity_df = change(edge_entity_df()[["user_id", "merchant_id", "event_timestamp"]])
    with pytest.raises(Exception, match=message) as info:
        retrieve(ours_store, entity_df, ALL)
    assert "Traceback" not in str(info.value)


def test_unknown_feature_is_named(stores: tuple[Any, Any]) -> None:
    ours_store, _ = stores
    with pytest.raises(Exception, match="no_such_feature"):
        retrieve(ours_store, edge_entity_df(), ["user_stats:no_such_feature"])


# --- the sorted index: its other code paths, staleness, fallbacks -----------------------------

def _medium_case(seed: int) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """A few thousand feature rows, many per key, ties on event time broken by created time."""
    rng = np.random.default_rng(seed)

    def stamps(n: int) -> pd.Series:
        # whole seconds (ties) plus the odd microsecond (TTL edges)
        micros = rng.integers(0, 200, n) * 1_000_000 + rng.choice([0, 0, 0, 1, 999_999], n)
        return pd.Series(pd.Timestamp(T0) + pd.to_timedelta(micros, unit="us"))

    user = pd.DataFrame({"user_id": rng.integers(1, 40, 3000), "event_ts": stamps(3000),
                         "created_ts": pd.Timestamp(T0) + pd.to_timedelta(rng.integers(0, 4, 3000), unit="s"),
                         "amt": rng.normal(size=3000), "cnt": rng.integers(-5, 5, 3000)})
    pair = pd.DataFrame({"user_id": rng.integers(1, 40, 2000), "merchant_id": rng.integers(1, 6, 2000),
                         "ts": stamps(2000) - pd.to_timedelta(rng.integers(0, 3, 2000), unit="D"), "score": rng.random(2000)})
    merchant = pd.DataFrame({"merchant_id": rng.integers(1, 6, 500), "event_ts": stamps(500),
                             "created_ts": pd.Timestamp(T0) + pd.to_timedelta(rng.integers(0, 4, 500), unit="s"),
                             "rating": rng.random(500) * 5})
    tables = tables_from(user.to_dict("records"), pair.to_dict("records"), merchant.to_dict("records"))
    tables["user_stats"] = tables["user_stats"].drop_duplicates(["user_id", "event_ts", "created_ts"])
    tables["merchant_stats"] = tables["merchant_stats"].drop_duplicates(["merchant_id", "event_ts", "created_ts"])
    tables["pair_stats"] = tables["pair_stats"].drop_duplicates(["user_id", "merchant_id", "ts"])
    n = 400
    entity_df = pd.DataFrame({"row_id": np.arange(n), "user_id": rng.integers(0, 42, n),
                              "merchant_id": rng.integers(0, 7, n), "event_timestamp": stamps(n)})
    return tables, entity_df


def _spread_keys(tables: dict[str, pd.DataFrame], entity_df: pd.DataFrame) -> None:
    """Ids spread over most of int64: a single key packs into 63 bits, the pair needs a hash."""
    def user(v: pd.Series) -> pd.Series:
        return v * 2**57 - 2**62

    def merchant(v: pd.Series) -> pd.Series:
        return v * 2**59 - 2**61

    for frame in [*tables.values(), entity_df]:
        if "user_id" in frame:
            frame["user_id"] = user(frame["user_id"])
        if "merchant_id" in frame:
            frame["merchant_id"] = merchant(frame["merchant_id"])


@pytest.mark.parametrize(
    "path", ["c-sorted-parallel-batched", "numpy-batched", "c-small", "hashed-keys", "spread-keys"]
)
def test_index_code_paths_match_the_reference(
    repo: Path, stores: tuple[Any, Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sorted-query search, parallel views, several record batches, the NumPy fallback,
    hashed keys, and integer keys packed over most of the int64 range."""
    import json

    use_engine(monkeypatch, "index")
    if path == "hashed-keys":  # as for string keys, or integers too far apart to pack
        monkeypatch.setattr(index, "_packing", lambda con, view, types: None)
    if path != "c-small":
        monkeypatch.setattr(index, "BATCH_ROWS", 97)  # several record batches per view
    if path.startswith("c-sorted"):
        monkeypatch.setattr(index, "SORT_QUERIES_ABOVE", 0)
        monkeypatch.setattr(pit, "PARALLEL_LOOKUPS_ABOVE", 0)
    if path.startswith("numpy"):
        monkeypatch.setattr(index, "compiled", None)
    else:
        assert index.compiled is not None, "the C part is not compiled: run `make install` with a C compiler"
    tables, entity_df = _medium_case(seed=len(path))
    if path == "spread-keys":
        _spread_keys(tables, entity_df)
    write_tables(repo, tables)
    ours = retrieve(stores[0], entity_df, ALL)
    expected = reference(entity_df, tables, ALL_REQUESTS)
    assert_same(ours, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", *FEATURE_COLUMNS])
    assert ours[FEATURE_COLUMNS].notna().sum().min() > 20  # the case has matches in every view
    root = repo / ".featurepipe" / "offline-index"
    packed = {m["view"]: m["packing"] is not None for m in (json.loads((root / f / "meta.json").read_text()) for f in index_folders(repo))}
    expected_packed = {"hashed-keys": {False}, "spread-keys": {True, False}}.get(path, {True})
    assert set(packed.values()) == expected_packed, packed
    if path != "c-small":
        opened = [index.SortedIndex.open(repo / ".featurepipe" / "offline-index" / f) for f in index_folders(repo)]
        assert max(len(o.batches) for o in opened) > 1


def test_index_is_rebuilt_when_the_files_change(repo: Path, stores: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    use_engine(monkeypatch, "index")
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    entity_df = edge_entity_df()
    retrieve(stores[0], entity_df, ALL)
    before = index_folders(repo)
    tables["user_stats"]["amt"] = tables["user_stats"]["amt"] + 100  # same size, new values
    write_tables(repo, tables)
    ours = retrieve(stores[0], entity_df, ALL)
    assert_same(ours, reference(entity_df, tables, ALL_REQUESTS), ["row_id", *FEATURE_COLUMNS])
    after = index_folders(repo)
    assert len(after) == 3 and after != before  # new versions; the old ones are gone
    # a build that died two hours ago left its temp folder: the next build removes it
    root = repo / ".featurepipe" / "offline-index"
    abandoned = root / ".tmp-abandoned"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    tables["user_stats"]["amt"] = tables["user_stats"]["amt"] + 1
    write_tables(repo, tables)
    retrieve(stores[0], entity_df, ALL)
    assert not abandoned.exists()


def test_hash_clash_falls_back_to_the_scan(repo: Path, stores: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two keys with one 64-bit hash cannot share an index: the view is scanned instead."""
    import json

    use_engine(monkeypatch, "index")
    monkeypatch.setattr(index, "_packing", lambda con, view, types: None)  # hash every key
    monkeypatch.setattr(index, "hash_clashes", lambda con, view: True)
    tables = tables_from(EDGE_USER, EDGE_PAIR, [])
    write_tables(repo, tables)
    entity_df = edge_entity_df()
    ours = retrieve(stores[0], entity_df, ALL)
    assert_same(ours, reference(entity_df, tables, ALL_REQUESTS), ["row_id", *FEATURE_COLUMNS])
    root = repo / ".featurepipe" / "offline-index"
    metas = [json.loads((root / f / "meta.json").read_text()) for f in index_folders(repo)]
    assert sorted(m["view"] for m in metas if m.get("usable") is False) == ["merchant_stats", "pair_stats", "user_stats"]


def test_hashed_keys_are_checked_on_every_match(repo: Path, stores: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A key absent from the view that shares a hash with a present one must not match it."""
    import json

    use_engine(monkeypatch, "index")
    monkeypatch.setattr(index, "_packing", lambda con, view, types: None)  # hash every key
    write_tables(repo, tables_from(EDGE_USER, EDGE_PAIR, []))
    retrieve(stores[0], edge_entity_df(), ALL)
    root = repo / ".featurepipe" / "offline-index"
    folder = next(root / f for f in index_folders(repo) if json.loads((root / f / "meta.json").read_text())["view"] == "pair_stats")
    opened = index.SortedIndex.open(folder)
    assert opened.packing is None
    stored = opened.take(np.array([0]), ["user_id", "merchant_id"]).to_pylist()[0]
    view = ViewRequest("pair_stats", "", {"user_id": "user_id", "merchant_id": "merchant_id"}, "ts", None, {"score": "score"}, None)
    con = connect()
    try:
        for keys, kept in [(stored, True), ({"user_id": 9, "merchant_id": 9}, False)]:
            frame = read_entity_frame(pd.DataFrame([{**keys, "event_timestamp": T0}]), con)
            assert index.verify_keys(opened, frame, view, np.array([0])).tolist() == ([0] if kept else [-1])
    finally:
        con.close()


def test_index_command_builds_then_checks(repo: Path) -> None:
    """`featurepipe index` (the real CLI) builds every view's index, then finds it up to date."""
    import subprocess
    import sys

    from tests.cli_batch import run_commands

    tables, _ = _medium_case(seed=11)
    write_tables(repo, tables)
    cli = str(Path(sys.executable).parent / "featurepipe")

    def shown(done: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
        assert done.returncode == 0, done.stderr[-2000:]
        lines = [line.split() for line in done.stdout.splitlines()]
        return {cells[0]: cells[1:] for cells in lines if cells and cells[0] in tables}

    first = shown(subprocess.run([cli, "index", "--repo", str(repo)], capture_output=True, text=True, timeout=300))
    assert {v: cells[0] for v, cells in first.items()} == dict.fromkeys(tables, "built")
    for name, table in tables.items():  # every row indexed (no null keys or times in this data)
        assert int(first[name][1].replace(",", "")) == len(table)
    # a later process finds them up to date (and a view it does not know is an error): two
    # read-only commands in one process (each featurepipe process pays Feast's import)
    again, bad = run_commands([("index", "--repo", str(repo)), ("index", "--repo", str(repo), "--view", "nope")])
    second = shown(again)
    assert all(cells[:2] == ["up", "to"] for cells in second.values())
    assert len(index_folders(repo)) == 3
    assert bad.returncode == 2 and "no feature view(s) ['nope']" in bad.stderr


# --- windowed-aggregate views: request-time values at any instant ------------------------------
#
# The backfill writes each view's change-point rows; the join at an entity row's time t must
# give the values over [floor(t, hop) - W, t) computed from the raw events (the brute force in
# tests/offline_oracle.py), whatever t is, through every engine and entity input.

W0 = datetime(2026, 3, 1, 22, 30, tzinfo=timezone.utc)  # the data crosses midnight: several partitions
MIN = timedelta(minutes=1)
WINDOW_FEATURES = [f"{v}:{a.name}" for v, spec in WINDOW_VIEWS.items() for a in spec.aggregations]
WINDOW_COLUMNS = [a.name for spec in WINDOW_VIEWS.values() for a in spec.aggregations]
DROPS = [timedelta(minutes=30), timedelta(hours=1), timedelta(hours=2), timedelta(hours=3), timedelta(days=1)]


@pytest.fixture(scope="module")
def window_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("windows"), windows=True)


@pytest.fixture(scope="module")
def window_store(window_repo: Path) -> Any:
    from feast import FeatureStore

    return FeatureStore(repo_path=str(window_repo))


def publish_events(repo: Path, store: Any, events: pd.DataFrame) -> list[BackfillResult]:
    """Write the raw events and backfill every windowed view (no quality gate), in place of
    the previous case's tables (a backfill replaces only the days it covers)."""
    import shutil

    shutil.rmtree(repo / "data" / "tables", ignore_errors=True)
    write_events(repo, events)
    return batch_backfill(store, progress=False)


def window_expected(entity_df: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    parts = [window_reference(entity_df, events, view) for view in WINDOW_VIEWS]
    return pd.concat([entity_df, *parts], axis=1)


def special_instants(events: pd.DataFrame, rng: np.random.Generator, n: int) -> list[pd.Timestamp]:
    """Instants where values change or nearly do: event times and 1 us either side, hop
    boundaries, the instants buckets leave each window, and 1 us either side of those."""
    stamps = events["ts"].dropna()
    picked = stamps.sample(min(n, len(stamps)), random_state=int(rng.integers(1 << 31))).tolist()
    out = []
    for x in picked:
        for d in (timedelta(0), US, -US):
            out.append(x + d)
        hop = timedelta(minutes=5) if rng.random() < 0.5 else timedelta(hours=1)
        boundary = pd.Timestamp(x).floor(hop) + hop
        window = DROPS[int(rng.integers(len(DROPS)))]
        drop_hop = timedelta(minutes=5) if window < timedelta(hours=12) else timedelta(hours=1)
        drop = pd.Timestamp(x).floor(drop_hop) + drop_hop + window
        out += [boundary, boundary - US, drop, drop - US, drop + US]
    return out


def _medium_events(seed: int) -> pd.DataFrame:
    """A few thousand events over three days: many per key, ties, whole cents, some null amounts."""
    rng = np.random.default_rng(seed)
    n = 3000
    micros = rng.integers(0, 3 * 86_400, n) * 1_000_000 + rng.choice([0, 0, 0, 1, 999_999], n)
    events = pd.DataFrame({
        "user_id": rng.integers(1, 25, n), "merchant_id": rng.integers(1, 5, n),
        "ts": pd.Timestamp(W0) + pd.to_timedelta(micros, unit="us"),
        "amount": rng.integers(-100_000, 100_000, n) / 100,
    })
    events.loc[rng.random(n) < 0.02, "amount"] = np.nan  # counted as events, not as values
    events = pd.concat([events, events.sample(40, random_state=seed)], ignore_index=True)  # exact ties
    return events


def _instants_frame(events: pd.DataFrame, seed: int, end: datetime) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lo = pd.Timestamp(W0) - timedelta(hours=1)
    span = int((pd.Timestamp(end) - lo) / US)
    random_times = (lo + pd.to_timedelta(rng.integers(0, span, 1200), unit="us")).tolist()
    times = [t for t in [*random_times, *special_instants(events, rng, 120)] if t < pd.Timestamp(end)]
    n = len(times)
    frame = pd.DataFrame({"row_id": np.arange(n), "user_id": rng.integers(0, 26, n),
                          "merchant_id": rng.integers(0, 6, n), "event_timestamp": pd.to_datetime(times, utc=True)})
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("entity_input", ["dataframe", "sql"])
@pytest.mark.parametrize("engine", ENGINES)
def test_windowed_views_at_random_instants_match_the_brute_force(
    window_repo: Path, window_store: Any, engine: str, entity_input: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """get_historical_features at random instants (and at event times, 1 us either side, hop
    boundaries, window drops) equals the brute force over the raw events, value for value,
    for a single key, a key with an unbounded aggregate and a compound key."""
    use_engine(monkeypatch, engine)
    events = _medium_events(seed=5)
    results = publish_events(window_repo, window_store, events)
    end = min(r.end for r in results)
    entity_df = _instants_frame(events, seed=6, end=end)
    given: pd.DataFrame | str = entity_df
    if entity_input == "sql":
        entity_df.to_parquet(tmp_path / "entities.parquet")
        given = f"SELECT * FROM read_parquet('{tmp_path / 'entities.parquet'}')"
    ours = retrieve(window_store, given, WINDOW_FEATURES)
    expected = window_expected(entity_df, events)
    assert_same(ours, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", *WINDOW_COLUMNS])
    # the case holds what it claims: empty windows of known keys past the TTL are 0, unknown keys null
    late = (ours["n_1h"] == 0) & ours["last_ts"].notna()
    ages = ours["event_timestamp"].map(lambda t: t.timestamp()) - ours["last_ts"]
    assert (late & (ages > 600)).sum() > 50  # user_windows' TTL is 10 minutes
    assert ours.loc[late, "mean_1h"].isna().all() and (ours.loc[late, "sum_1h"] == 0).all()
    assert ours["n_1h"].isna().sum() > 20 and ours["pair_n_1h"].notna().sum() > 200
    exact = ours["event_timestamp"].isin(set(events["ts"]))
    assert exact.sum() > 50


def test_windows_by_hand(window_repo: Path, window_store: Any) -> None:
    """The documented semantics, case by case, on one user (1h window: hop 5 min)."""
    t = pd.Timestamp(W0)  # 22:30, a multiple of the hop
    events = pd.DataFrame({"user_id": [1, 1, 1, 1], "merchant_id": [1, 1, 1, 1],
                           "ts": [t, t, t + 7 * MIN, t + 7 * MIN + US], "amount": [1.0, 2.0, 4.0, 8.0]})
    publish_events(window_repo, window_store, events)
    cases = {  # as-of time: (n_1h, sum_1h, max_1h, last_ts)
        t: (None, None, None, None),  # the first events are at t itself: not before t, an unknown user
        t + US: (2, 3.0, 2.0, t),  # both tied events count from 1 us later
        t + 7 * MIN: (2, 3.0, 2.0, t),  # the event at exactly t is excluded
        t + 7 * MIN + US: (3, 7.0, 4.0, t + 7 * MIN),
        t + 7 * MIN + 2 * US: (4, 15.0, 8.0, t + 7 * MIN + US),
        # the window asked at T covers [floor(T, 5 min) - 1 h, T): the 22:30 bucket stays until 23:35
        t + 65 * MIN - US: (4, 15.0, 8.0, t + 7 * MIN + US),
        t + 65 * MIN: (2, 12.0, 8.0, t + 7 * MIN + US),  # 1 h 5 min later: only 22:35's bucket is left
        t + 70 * MIN: (0, 0.0, None, t + 7 * MIN + US),  # empty: count and sum 0, max null, last kept
        t + 85 * MIN: (0, 0.0, None, t + 7 * MIN + US),  # 78 min after the last event, its TTL 10 min: still 0
        t + timedelta(days=3): (0, 0.0, None, t + 7 * MIN + US),  # after the input ends: its drops are written
    }
    entity_df = pd.DataFrame({"user_id": 1, "event_timestamp": list(cases)})
    ours = retrieve(window_store, entity_df, ["user_windows:n_1h", "user_windows:sum_1h", "user_windows:max_1h",
                                              "user_windows:last_ts", "user_windows:n_24h"])
    got = [tuple(None if pd.isna(v) else v for v in row)
           for row in ours[["n_1h", "sum_1h", "max_1h", "last_ts"]].itertuples(index=False)]
    want = [(n, s, m, None if last is None else last.timestamp()) for n, s, m, last in cases.values()]
    assert got == want
    assert ours["n_24h"].tolist()[-2:] == [4, 0]  # the day-long window (hop 1 h): all four at 23:55, none 3 days on
    unknown = retrieve(window_store, pd.DataFrame({"user_id": [2], "event_timestamp": [t + MIN]}), ["user_windows:n_1h"])
    assert unknown["n_1h"].isna().all()  # no event of user 2 ever: missing, not 0


def _window_events(draw: Any) -> pd.DataFrame:
    def stamp(minutes: int, micros: int) -> datetime:
        return W0 + minutes * MIN + micros * US

    rows = draw(st.lists(st.fixed_dictionaries({
        "user_id": st.integers(1, 3), "merchant_id": st.integers(1, 2),
        "ts": st.builds(stamp, st.integers(0, 400), st.sampled_from([0, 0, 0, 1, 999_999])),
        "amount": st.one_of(st.integers(-500, 500).map(lambda c: c / 4), st.none(),
                            st.floats(-1e7, 1e7, allow_nan=False, allow_infinity=False)),
    }), min_size=1, max_size=30))
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS))


@st.composite
def window_case(draw: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    events = _window_events(draw)
    stamps = [pd.Timestamp(x) for x in events["ts"]]
    near = st.builds(lambda i, d: stamps[i % len(stamps)] + d, st.integers(0, 100),
                     st.sampled_from([timedelta(0), US, -US, timedelta(minutes=65), timedelta(minutes=70),
                                      timedelta(minutes=65) - US, timedelta(hours=3, minutes=5), timedelta(hours=25)]))
    anywhere = st.builds(lambda m, us: pd.Timestamp(W0) + m * MIN + us * US, st.integers(-10, 600), st.sampled_from([0, 1, 999_999]))
    rows = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.one_of(near, anywhere)), min_size=1, max_size=25))
    entity_df = pd.DataFrame([(i, u, m, t) for i, (u, m, t) in enumerate(rows)],
                             columns=["row_id", "user_id", "merchant_id", "event_timestamp"])
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    return events, entity_df


@settings(max_examples=25, **RANDOM_SETTINGS)
@given(case=window_case())
def test_windowed_random_cases_match_the_brute_force(window_repo: Path, window_store: Any, case: Any) -> None:
    """Randomised: ties, events on hop boundaries, instants at events, 1 us either side and at
    window drops, null amounts, keys with no events; the index and the scan both."""
    events, entity_df = case
    results = publish_events(window_repo, window_store, events)
    end = pd.Timestamp(min(r.end for r in results))
    entity_df = entity_df[entity_df["event_timestamp"] < end].reset_index(drop=True)
    if entity_df.empty:
        return
    expected = window_expected(entity_df, events)
    for engine in ("index", "scan"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            use_engine(monkeypatch, engine)
            ours = retrieve(window_store, entity_df, WINDOW_FEATURES)
        assert_same(ours, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", *WINDOW_COLUMNS])


def _strip_kernel_version(path: Path, version: str | None) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"featurepipe.kernel"}
    if version is not None:
        metadata[b"featurepipe.kernel"] = version.encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_old_kernel_tables_are_refused_with_the_command_that_rebuilds_them(
    window_repo: Path, window_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from featurepipe.errors import InvalidInput
    from featurepipe.offline.prebuild import build_indexes

    events = _medium_events(seed=8)
    publish_events(window_repo, window_store, events)
    files = sorted((window_repo / "data" / "tables" / "user_windows").glob("date=*/*.parquet"))
    assert len(files) > 2
    assert {pq.read_metadata(f).metadata[b"featurepipe.kernel"] for f in files} == {str(KERNEL_VERSION).encode()}
    entity_df = pd.DataFrame({"user_id": [1], "merchant_id": [1], "event_timestamp": [W0 + timedelta(hours=5)]})
    retrieve(window_store, entity_df, ["user_windows:n_1h"])  # fine, and its index is built
    _strip_kernel_version(files[1], None)  # one day written by the old backfill: a mixed table
    message = ("feature table user_windows was computed with kernel version 1 (windows as of each event); "
               "rebuild it: featurepipe backfill --view user_windows")
    for engine in ("index", "scan"):
        with pytest.MonkeyPatch.context() as patch:
            use_engine(patch, engine)
            with pytest.raises(InvalidInput, match=re.escape(message)):
                retrieve(window_store, entity_df, ["user_windows:n_1h"])
            with pytest.raises(InvalidInput, match=re.escape(message)):  # a SQL entity input too
                retrieve(window_store, "SELECT 1::BIGINT AS user_id, now() AS event_timestamp", ["user_windows:n_1h"])
    with pytest.raises(InvalidInput, match=re.escape(message)):  # `featurepipe index` does not index it
        build_indexes(window_store, ["user_windows"], progress=False)
    retrieve(window_store, entity_df, ["merchant_windows:n_all"])  # the other views are untouched
    _strip_kernel_version(files[1], str(KERNEL_VERSION + 1))
    with pytest.raises(InvalidInput, match=f"kernel version {KERNEL_VERSION + 1}, newer than this featurepipe's"):
        retrieve(window_store, entity_df, ["user_windows:n_1h"])
    batch_backfill(window_store, ["user_windows"], progress=False)  # what the message says to do
    assert_same(retrieve(window_store, entity_df, ["user_windows:n_1h"]),
                pd.concat([entity_df, window_reference(entity_df, events, "user_windows")], axis=1), ["n_1h"])


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*.parquet"))}


def test_partial_rerun_gives_the_full_backfills_rows(window_repo: Path, window_store: Any) -> None:
    """A backfill of [start, end) reads events from start - horizon (all of them for an
    unbounded aggregate) and writes exactly the full backfill's rows in that range: as files
    (the same bytes) and as SQL over any range, day-aligned or not."""
    from featurepipe.batch.backfill import backfill_view, source_columns
    from featurepipe.batch.sql import aggregate_sql
    from featurepipe.core.db import connect as db_connect
    from featurepipe.definitions import aggregate_views

    events = _medium_events(seed=9)
    publish_events(window_repo, window_store, events)
    tables = window_repo / "data" / "tables"
    full = _digest(tables)
    assert len({name.split("/")[1] for name in full}) >= 4  # several day partitions per view
    views = aggregate_views(window_store)
    for view in views:
        result = backfill_view(view, W0.date() + timedelta(days=1), W0.date() + timedelta(days=2))
        assert result.published == (f"date={(W0 + timedelta(days=1)):%Y-%m-%d}",)
    assert _digest(tables) == full
    batch_backfill(window_store, progress=False)
    assert _digest(tables) == full  # a full rerun too
    con = db_connect("deterministic")
    try:
        for view in views:
            columns = source_columns(con, view.input_path)
            whole = con.sql(aggregate_sql(view, columns)).df()
            for start, end in [(W0 + timedelta(hours=7, minutes=3), W0 + timedelta(hours=30, seconds=1)),
                               (W0 + timedelta(days=2, hours=1), None)]:
                part = con.sql(aggregate_sql(view, columns, start, end)).df()
                inside = whole[(whole["event_timestamp"] >= start) & ((whole["event_timestamp"] < end) if end else True)]
                pd.testing.assert_frame_equal(part.reset_index(drop=True), inside.reset_index(drop=True))
                assert len(part) > 100
    finally:
        con.close()


def test_a_gate_rewrite_keeps_the_kernel_version(window_repo: Path, window_store: Any) -> None:
    """A quality gate that quarantines rows rewrites the staged files; the published ones
    still say which kernel computed them."""
    import pyarrow.parquet as pq

    from featurepipe.batch.backfill import backfill_view
    from featurepipe.core.sql import literal
    from featurepipe.definitions import aggregate_views

    class RewritingGate:
        def check_input(self, con: Any, view: Any) -> None:
            return None

        def check_output(self, con: Any, view: Any, staging: Path) -> Path:
            cleaned = staging.with_name(staging.name + "-checked")
            con.execute(f"COPY (SELECT * FROM read_parquet({literal(str(staging / '**' / '*.parquet'))}, "
                        f"hive_partitioning = true) WHERE n_1h <> 1) TO {literal(str(cleaned))} "
                        "(FORMAT parquet, PARTITION_BY (date))")
            return cleaned

        def view_done(self, result: Any) -> None:
            pass

    publish_events(window_repo, window_store, _medium_events(seed=10))
    view = next(v for v in aggregate_views(window_store) if v.name == "user_windows")
    backfill_view(view, gate=RewritingGate())
    files = sorted((window_repo / "data" / "tables" / "user_windows").glob("date=*/*.parquet"))
    assert files and all(pq.read_metadata(f).metadata[b"featurepipe.kernel"] == str(KERNEL_VERSION).encode() for f in files)
    retrieve(window_store, pd.DataFrame({"user_id": [1], "event_timestamp": [W0 + timedelta(hours=5)]}), ["user_windows:n_1h"])


def test_offline_writes_to_windowed_views_are_refused(window_repo: Path, window_store: Any) -> None:
    publish_events(window_repo, window_store, _medium_events(seed=11))
    row = pd.DataFrame({"user_id": [1], "merchant_id": [1], "event_timestamp": [W0], "pair_n_1h": [1], "pair_sum_3h": [1.0]})
    with pytest.raises(ValueError, match="featurepipe backfill --view pair_windows"):
        window_store.write_to_offline_store("pair_windows", row)


def test_feast_duckdb_store_reads_the_same_tables_but_applies_the_ttl(window_repo: Path, window_store: Any) -> None:
    """Second opinion on the tables: Feast's own duckdb store joins the same change-point rows
    to the same values where no TTL interferes (the compound-key view has none); on a view
    with a TTL it turns a known user's values into missing ones once the user's last change
    point is older than the TTL: empty windows (a count of 0 is not a missing count) and,
    with a TTL shorter than the window, counts that are not even 0. featurepipe does not."""
    events = _medium_events(seed=12)
    results = publish_events(window_repo, window_store, events)
    entity_df = _instants_frame(events, seed=13, end=min(r.end for r in results)).head(400)
    feast_store = feast_duckdb_store(window_repo)
    refs = ["pair_windows:pair_n_1h", "pair_windows:pair_sum_3h", "user_windows:n_1h"]
    theirs = retrieve(feast_store, entity_df, refs).sort_values("row_id", kind="stable")
    ours = retrieve(window_store, entity_df, refs).sort_values("row_id", kind="stable")
    assert_same(theirs, ours, ["row_id", "pair_n_1h", "pair_sum_3h"])
    expired = theirs["n_1h"].isna().to_numpy() & ours["n_1h"].notna().to_numpy()
    hidden = ours["n_1h"].to_numpy()[expired]
    assert (hidden == 0).sum() > 10 and (hidden > 0).sum() > 10
    known = ~theirs["n_1h"].isna().to_numpy()
    assert (theirs["n_1h"].to_numpy()[known] == ours["n_1h"].to_numpy()[known]).all()
