"""The Spark offline store against the brute-force references and the DuckDB store.

Spark costs seconds per job, so the cases are batched: the hand-made edge cases and every
hypothesis case go into one set of tables, each case's keys shifted by ``OFFSET * case`` so
that no case sees another's rows, and one ``get_historical_features`` answers them all. The
hypothesis examples are drawn first (no Spark), then checked together; a failure names the
case. Every retrieval is compared with the brute force (:mod:`tests.offline_oracle`) and, as
Arrow tables (values and types), with featurepipe's DuckDB store on the same input.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyspark  # noqa: F401  (before the draws: importing it changes the examples hypothesis draws)
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from featurepipe.errors import InvalidInput
from featurepipe.offline.spark_store import SparkOfflineStore
from featurepipe.offline.store import FeaturepipeOfflineStore
from tests.offline_oracle import (
    DEFINITIONS,
    EVENT_COLUMNS,
    WINDOW_DEFINITIONS,
    YAML,
    empty_tables,
    normalise,
    reference,
    write_events,
    write_tables,
)
from tests.test_offline import (
    ALL,
    ALL_REQUESTS,
    EDGE_PAIR,
    EDGE_USER,
    FEATURE_COLUMNS,
    MIN,
    T0,
    US,
    W0,
    WINDOW_COLUMNS,
    WINDOW_FEATURES,
    S,
    edge_entity_df,
    publish_events,
    random_case,
    tables_from,
    window_case,
    window_expected,
)

SPARK_STORE = "featurepipe.offline.spark_store.SparkOfflineStore"
OFFSET = 100  # keys of case i are shifted by OFFSET * i (the cases' own keys stay below it)
PLAIN_CASES = 80
WINDOW_CASES = 25


def draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy`` (deterministic), drawn without running Spark."""
    drawn: list[Any] = []

    @seed(20261207)  # the same examples every run
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Any) -> None:
        drawn.append(case)

    collect()
    return drawn


@pytest.fixture(scope="module")
def spark_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Feast repo with the plain and the windowed views of the oracle, applied in this
    process (``FeatureStore.apply`` of the definitions' objects: no second Python starting)."""
    from feast import Entity, FeatureService, FeatureStore
    from feast.base_feature_view import BaseFeatureView
    from feast.data_source import DataSource

    repo = tmp_path_factory.mktemp("spark_offline") / "repo"
    (repo / "data" / "pair").mkdir(parents=True)
    source = DEFINITIONS + WINDOW_DEFINITIONS
    (repo / "features.py").write_text(source)
    (repo / "feature_store.yaml").write_text(
        textwrap.dedent(YAML.format(offline="featurepipe.offline.store.FeaturepipeOfflineStore"))
    )
    write_tables(repo, empty_tables())
    write_events(repo, pd.DataFrame({c: pd.Series([], dtype=t) for c, t in EVENT_COLUMNS.items()}))
    spec = importlib.util.spec_from_file_location("fp_spark_offline_features", repo / "features.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the on-demand view's function is pickled by reference to it
    spec.loader.exec_module(module)
    kinds = (Entity, BaseFeatureView, FeatureService, DataSource)
    FeatureStore(repo_path=str(repo)).apply([o for o in vars(module).values() if isinstance(o, kinds)])
    return repo


@pytest.fixture(scope="module")
def stores(spark_repo: Path, spark: Any) -> Iterator[tuple[Any, Any]]:
    """(the Spark store, the DuckDB store) over the same registry and files."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    config = RepoConfig(
        project="oracle", provider="local", registry=str(spark_repo / "data" / "registry.db"),
        online_store={"type": "sqlite", "path": str(spark_repo / "data" / "online.db")},
        offline_store={"type": SPARK_STORE}, entity_key_serialization_version=3, repo_path=spark_repo,
    )
    yield FeatureStore(config=config), FeatureStore(repo_path=str(spark_repo))


def shifted(frame: pd.DataFrame, case: int) -> pd.DataFrame:
    out = frame.copy()
    for key in ("user_id", "merchant_id"):
        if key in out:
            out[key] = out[key] + OFFSET * case
    return out



@dataclass(frozen=True)
class Batch:
    """Many cases in one set of tables and one entity frame (column ``case``, rows shuffled)."""

    tables: dict[str, pd.DataFrame]
    entity_df: pd.DataFrame
    case_tables: list[dict[str, pd.DataFrame]]  # each case's own rows (keys shifted)


def batch(cases: list[tuple[dict[str, pd.DataFrame], pd.DataFrame]]) -> Batch:
    case_tables = [{name: shifted(t, i) for name, t in tables.items()} for i, (tables, _) in enumerate(cases)]
    entities = [shifted(e, i).assign(case=i) for i, (_, e) in enumerate(cases)]
    tables = {name: pd.concat([t[name] for t in case_tables], ignore_index=True) for name in case_tables[0]}
    entity_df = pd.concat(entities, ignore_index=True).sample(frac=1.0, random_state=7).reset_index(drop=True)
    return Batch(tables, entity_df, case_tables)


@pytest.fixture(scope="module")
def plain(spark_repo: Path) -> Batch:
    """The hand-made edge cases (case 0) and the hypothesis cases of tests/test_offline.py, written."""
    edge = (tables_from(EDGE_USER, EDGE_PAIR, []), edge_entity_df())
    drawn = draw(random_case, PLAIN_CASES)
    assert len(drawn) == PLAIN_CASES
    cases = batch([edge, *drawn])
    write_tables(spark_repo, cases.tables)
    return cases


def assert_cases_match(ours: pd.DataFrame, expected: pd.DataFrame, columns: list[str], data: Batch | None) -> None:
    """Row for row; a failure names the failing case and shows its input."""
    got, want = normalise(ours, [*columns, "case"]), normalise(expected, [*columns, "case"])
    assert len(got) == len(want)
    for case in sorted(set(want["case"])):
        rows = (want["case"] == case).to_numpy()
        shown = "" if data is None else "\n".join(f"{n}:\n{t}" for n, t in data.case_tables[int(case)].items())
        pd.testing.assert_frame_equal(got[rows].reset_index(drop=True), want[rows].reset_index(drop=True),
                                      check_dtype=False, obj=f"case {int(case)}\n{shown}\n")


def same_arrow(ours: pa.Table, theirs: pa.Table) -> None:
    assert ours.schema == theirs.schema
    for name in theirs.column_names:
        assert ours.column(name).equals(theirs.column(name)), name


@pytest.mark.parametrize("created_cutoff", [False, True], ids=["asof", "filter_by_created_timestamp"])
def test_cases_match_the_reference_and_the_duckdb_store(
    stores: tuple[Any, Any], plain: Batch, created_cutoff: bool
) -> None:
    spark_store, duckdb_store = stores
    ours = spark_store.get_historical_features(
        entity_df=plain.entity_df, features=ALL, filter_by_created_timestamp=created_cutoff
    ).to_arrow()
    parts = [reference(plain.entity_df[plain.entity_df["case"] == i], tables, ALL_REQUESTS, created_cutoff)
             for i, tables in enumerate(plain.case_tables)]
    expected = pd.concat(parts).sort_index()
    frame = ours.to_pandas()
    assert list(frame.columns) == [*plain.entity_df.columns, *FEATURE_COLUMNS]
    assert_cases_match(frame, expected, ["row_id", "user_id", "merchant_id", "event_timestamp", *FEATURE_COLUMNS], plain)
    same_arrow(ours, duckdb_store.get_historical_features(
        entity_df=plain.entity_df, features=ALL, filter_by_created_timestamp=created_cutoff).to_arrow())
    # the batch holds what the cases claim: matches in every view, misses, and the edge cases
    assert frame[FEATURE_COLUMNS].notna().sum().min() > 20 and frame[FEATURE_COLUMNS].isna().sum().min() > 20
    if not created_cutoff:
        by_row = frame[frame["case"] == 0].set_index("row_id")
        assert pd.isna(by_row.loc[0, "amount"]) and by_row.loc[0, "score"] == 0.1
        assert (by_row.loc[1, "amount"] == 11.0).all() and len(by_row.loc[1]) == 2
        assert by_row.loc[2, "amount"] == 12.0
        assert by_row.loc[3, "amount"] == 20.0 and pd.isna(by_row.loc[4, "amount"])
        assert by_row.loc[5, ["amount", "score"]].isna().all()
        assert by_row.loc[7, "score"] == 0.3


def by_hand_window_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    """tests/test_offline.py's windows by hand: ties, exclusion at t, hop and window drops."""
    t = pd.Timestamp(W0)
    events = pd.DataFrame({"user_id": [1, 1, 1, 1], "merchant_id": [1, 1, 1, 1],
                           "ts": [t, t, t + 7 * MIN, t + 7 * MIN + US], "amount": [1.0, 2.0, 4.0, 8.0]})
    instants = [t, t + US, t + 7 * MIN, t + 7 * MIN + US, t + 7 * MIN + 2 * US, t + 65 * MIN - US, t + 65 * MIN,
                t + 70 * MIN, t + 85 * MIN, t + timedelta(hours=20)]
    entity_df = pd.DataFrame({"row_id": range(len(instants)), "user_id": 1, "merchant_id": 1,
                              "event_timestamp": pd.to_datetime(instants, utc=True)})
    return events, entity_df


def test_windowed_cases_match_the_brute_force_and_the_duckdb_store(
    stores: tuple[Any, Any], spark_repo: Path
) -> None:
    """Request-time windows: change-point rows joined at each entity row's instant, no TTL."""
    spark_store, duckdb_store = stores
    cases = [by_hand_window_case(), *draw(window_case(), WINDOW_CASES)]
    events = pd.concat([shifted(e, i).astype(EVENT_COLUMNS) for i, (e, _) in enumerate(cases)], ignore_index=True)
    entity_df = pd.concat([shifted(e, i).assign(case=i) for i, (_, e) in enumerate(cases)], ignore_index=True)
    results = publish_events(spark_repo, duckdb_store, events)
    end = pd.Timestamp(min(r.end for r in results))
    entity_df = entity_df[entity_df["event_timestamp"] < end].sample(frac=1.0, random_state=3).reset_index(drop=True)
    ours = spark_store.get_historical_features(entity_df=entity_df, features=WINDOW_FEATURES).to_arrow()
    frame = ours.to_pandas()
    assert_cases_match(frame, window_expected(entity_df, events),
                       ["row_id", "user_id", "merchant_id", "event_timestamp", *WINDOW_COLUMNS], None)
    same_arrow(ours, duckdb_store.get_historical_features(entity_df=entity_df, features=WINDOW_FEATURES).to_arrow())
    # known keys long after their last event: counts 0, not missing (no TTL on windowed views)
    assert ((frame["n_1h"] == 0) & frame["last_ts"].notna()).sum() > 10 and frame["n_1h"].isna().sum() > 10
    hand = frame[frame["case"] == 0].sort_values("row_id")
    assert pd.isna(hand["n_1h"].iloc[0]) and hand["n_1h"].iloc[1] == 2  # events at t itself are not before t

    # a table written by another kernel version is refused, with the command that rebuilds it
    files = sorted((spark_repo / "data" / "tables" / "user_windows").glob("date=*/*.parquet"))
    table = pq.read_table(files[0])
    pq.write_table(table.replace_schema_metadata({}), files[0])
    try:
        with pytest.raises(InvalidInput, match="kernel version 1 .*featurepipe backfill --view user_windows"):
            spark_store.get_historical_features(entity_df=entity_df, features=WINDOW_FEATURES).to_arrow()
    finally:
        pq.write_table(table, files[0])


def test_sql_and_spark_entity_inputs_and_persist(
    stores: tuple[Any, Any], plain: Batch, spark: Any, tmp_path: Path
) -> None:
    """A Spark SQL string and a Spark DataFrame as entity input; a saved dataset written by
    Spark from ``to_spark_df`` (one Parquet file, rows in entity order)."""
    from feast.infra.offline_stores.file_source import SavedDatasetFileStorage

    spark_store, duckdb_store = stores
    entity_df = edge_entity_df()
    entity_df["dest_user_id"] = entity_df["user_id"].map({1: 2, 2: 1, 3: 3, 9: 1})
    spark.createDataFrame(entity_df).createOrReplaceTempView("fp_edge_entities")
    refs = [*ALL, "doubled:amount_x2"]  # an on-demand view runs on the result
    expected = duckdb_store.get_historical_features(entity_df=entity_df, features=refs).to_arrow()
    job = spark_store.get_historical_features(entity_df="SELECT * FROM fp_edge_entities", features=refs)
    same_arrow(job.to_arrow(), expected)
    assert job.metadata.min_event_timestamp == entity_df["event_timestamp"].min()

    service = duckdb_store.get_feature_service("transfer")  # join-key map, full names
    got = spark_store.get_historical_features(entity_df=spark.table("fp_edge_entities"), features=service,
                                              full_feature_names=True).to_arrow()
    same_arrow(got, duckdb_store.get_historical_features(entity_df=entity_df, features=service,
                                                         full_feature_names=True).to_arrow())
    assert got.column("src__amount").null_count < got.num_rows
    assert not got.column("src__amount").equals(got.column("dest__amount"))

    target = tmp_path / "saved.parquet"
    job = spark_store.get_historical_features(entity_df=entity_df, features=ALL)
    spark_store.create_saved_dataset(from_=job, name="edge", storage=SavedDatasetFileStorage(path=str(target)))
    same_arrow(pq.read_table(target), expected.drop_columns(["amount_x2"]))

    base = entity_df[["user_id", "merchant_id", "event_timestamp"]]
    for bad, message in [
        (base.drop(columns=["event_timestamp"]), "no column 'event_timestamp'"),
        (base.assign(user_id=base["user_id"].astype(str)), "entity_df column 'user_id' is string"),
        (spark.table("fp_edge_entities").drop("merchant_id"), "no column 'merchant_id', a join key"),
        ("SELECT * FROM no_such_table", "the entity_df SQL query failed in Spark"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            spark_store.get_historical_features(entity_df=bad, features=ALL).to_arrow()


def test_pulls_match_the_duckdb_store(stores: tuple[Any, Any], plain: Batch) -> None:
    spark_store, duckdb_store = stores
    source = duckdb_store.get_feature_view("user_stats").batch_source
    start, end = pd.Timestamp(T0 - S).to_pydatetime(), pd.Timestamp(T0 + 20 * S).to_pydatetime()
    args = dict(data_source=source, join_key_columns=["user_id"], feature_name_columns=["amt", "cnt"],
                timestamp_field="event_ts", created_timestamp_column="created_ts", start_date=start, end_date=end)
    order = [("user_id", "ascending"), ("event_ts", "ascending"), ("created_ts", "ascending")]
    for pull in ("pull_latest_from_table_or_query", "pull_all_from_table_or_query"):
        ours = getattr(SparkOfflineStore, pull)(config=spark_store.config, **args).to_arrow().sort_by(order)
        theirs = getattr(FeaturepipeOfflineStore, pull)(config=duckdb_store.config, **args).to_arrow().sort_by(order)
        assert ours.num_rows > 20
        same_arrow(ours, theirs)
