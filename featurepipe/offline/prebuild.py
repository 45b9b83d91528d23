"""Build every feature view's offline index ahead of retrievals (``featurepipe index``).

The first retrieval after a view's files change builds its index anyway (see
:mod:`featurepipe.offline.index`); building it right after a backfill moves that cost out
of the data scientist's way. This is a whole run over a ``feast.FeatureStore``, so it sits
above the index itself, which knows nothing of Feast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from featurepipe.errors import InvalidInput
from featurepipe.offline.index import locate, open_or_build
from featurepipe.offline.infra import connect, index_directory, source_path
from featurepipe.offline.store import FeaturepipeOfflineStoreConfig
from featurepipe.offline.versions import require_current_kernel
from featurepipe.offline.view import ViewRequest, source_types

if TYPE_CHECKING:
    from feast import FeatureStore


@dataclass(frozen=True)
class IndexSummary:
    """What :func:`build_indexes` did for one feature view."""

    view: str
    status: str  # "built", "up to date", "scan (<reason>)"
    rows: int
    keys: int
    key_kind: str  # "packed", "hashed" or ""
    megabytes: float
    seconds: float


def build_indexes(store: FeatureStore, views: list[str] | None = None, progress: bool = True) -> list[IndexSummary]:
    """Build (or check) the offline index of every feature view of ``store`` (or the named ones).

    ``store`` is a ``feast.FeatureStore`` whose offline store is featurepipe's with the
    index on.
    """
    config = store.config
    if not isinstance(config.offline_store, FeaturepipeOfflineStoreConfig):
        raise InvalidInput(
            "the offline index belongs to featurepipe's offline store; set offline_store: type: "
            "featurepipe.offline.store.FeaturepipeOfflineStore in feature_store.yaml"
        )
    directory = index_directory(config)
    if directory is None:
        raise InvalidInput("the offline index is switched off (offline_store: index: false in feature_store.yaml)")
    feature_views = store.list_feature_views()
    if views:
        unknown = sorted(set(views) - {fv.name for fv in feature_views})
        if unknown:
            raise InvalidInput(f"no feature view(s) {unknown}; known: {sorted(fv.name for fv in feature_views)}")
        feature_views = [fv for fv in feature_views if fv.name in views]
    summaries = []
    con = connect(config)
    try:
        for fv in tqdm(feature_views, desc="offline index", unit="view", disable=not progress):
            started = time.perf_counter()
            try:
                path = source_path(config, fv.batch_source, fv.name)
                view = ViewRequest.from_feature_view(fv, [f.name for f in fv.features], path, False).pinned(con)
            except InvalidInput as exc:
                summaries.append(IndexSummary(fv.name, f"scan ({exc})", 0, 0, "", 0.0, 0.0))
                continue
            require_current_kernel(view, con)  # an old windowed table: rebuild it, do not index it
            where = locate(view, directory)
            types = where.meta["types"] if where.meta else source_types(con, view)
            index = open_or_build(con, view, types, where)
            seconds = time.perf_counter() - started
            if index is None:
                summaries.append(IndexSummary(view.name, "scan (no usable index: see the log)", 0, 0, "", 0.0, seconds))
                continue
            size = sum(f.stat().st_size for f in index.folder.iterdir()) / 1e6
            summaries.append(IndexSummary(
                view.name, "built" if where.meta is None else "up to date", index.num_rows, len(index.keys),
                "packed" if index.packing is not None else "hashed", size, seconds,
            ))
    finally:
        con.close()
    return summaries
