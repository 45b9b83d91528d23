"""The data dictionary: what every entity, source, feature view, feature and feature service of
a repo means, read from the registry ``feast apply`` wrote (not from ``features.py``), with
the contracts of ``contracts.yaml``.

Per feature: its type, its description (derived from the aggregation when the definitions
give none, and marked so), what it means at request time (a windowed aggregate covers
``[floor(t, hop) - W, t)``; a plain view gives its latest row as of ``t`` within the TTL),
the checks on its column; per view: TTL, owner, tags, freshness SLA, checks, inputs and the
feature services that use it. :func:`build_catalog` makes one document of a few block kinds;
:func:`to_markdown` and :func:`to_html` (one self-contained page) render the same blocks.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import featurepipe
from featurepipe.core.windows import hop_for
from featurepipe.definitions import (
    KIND,
    TAG_INPUT,
    TAG_KIND,
    AggregateSpec,
    AggregateView,
    aggregate_views,
)
from featurepipe.quality.contracts import ColumnContract, Contracts, TableContract

if TYPE_CHECKING:
    from feast import FeatureStore

DERIVED = "*(derived from the aggregation)*"


# -- the document ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Para | Table | Bullets | Code


@dataclass(frozen=True)
class Catalog:
    """The data dictionary of one project: its title, the blocks, and what it counts."""

    title: str
    blocks: tuple[Block, ...]
    counts: dict[str, int] = field(default_factory=dict)


# -- wording --------------------------------------------------------------------------------------
def span(delta: timedelta, days_from: timedelta = timedelta(days=7)) -> str:
    """``5m``, ``1h 5m``, ``48h``, ``7d 1h``: hours under ``days_from``, as the demo's names
    and contracts write them (``txn_count_24h``, ``max_age: 48h``), days from there on."""
    rest = int(delta.total_seconds())
    parts = []
    units = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)) if delta >= days_from else \
        (("h", 3_600), ("m", 60), ("s", 1))
    for unit, size in units:
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return " ".join(parts) or "0s"


def plural(n: int, noun: str) -> str:
    """``1 entity``, ``2 entities``, ``9 data sources``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


_WORDS = {"count": "count", "sum": "sum", "mean": "mean", "min": "minimum", "max": "maximum"}


def derived_description(agg: AggregateSpec, timestamp_field: str) -> str:
    """A readable description of a windowed aggregate, e.g. ``count of amount over the 1h
    before the request``."""
    if agg.function == "last":
        if agg.column == timestamp_field:
            return "time of the latest event before the request (epoch seconds)"
        return f"latest {agg.column} before the request"
    over = f"the {span(agg.window)} before the request" if agg.window else "all events before the request"
    return f"{_WORDS.get(agg.function, agg.function)} of {agg.column} over {over}"


def window_semantics(agg: AggregateSpec) -> str:
    """What a windowed aggregate covers when asked at ``t``."""
    if agg.window is None:
        what = "the latest event" if agg.function == "last" else "every event"
        return f"{agg.function}({agg.column}): {what} before t (no window; rows older than the TTL are not served)"
    hop = timedelta(microseconds=hop_for(agg.window))
    w, h = span(agg.window), span(hop, days_from=timedelta(days=1))
    return (f"{agg.function}({agg.column}), window {w}, hop {h}: the window before the request time: "
            f"[floor(t, {h}) - {w}, t), {w} to {span(agg.window + hop)} of events")


def column_checks(column: ColumnContract | None) -> str:
    """``DOUBLE, not null, >= 0 (warn)`` for a column's contract; ``-`` without one."""
    if column is None:
        return "-"
    parts = [column.type] if column.type else []
    if not column.nullable:
        parts.append("not null")
    if column.min is not None:
        parts.append(f">= {column.min:g}")
    if column.max is not None:
        parts.append(f"<= {column.max:g}")
    if column.allowed is not None:
        parts.append("one of " + ", ".join(str(v) for v in column.allowed))
    return f"{', '.join(parts) or 'declared'} ({column.severity})"


def table_checks(contract: TableContract | None, where: str, listed: Iterable[str] = ()) -> list[str]:
    """One line per check of a contract (``where``: its place in contracts.yaml), but for the
    columns in ``listed`` (shown beside their features)."""
    if contract is None:
        return [f"no contract in contracts.yaml ({where}): no checks"]
    lines = [f"schema: the declared columns, with their types ({contract.schema_severity})"]
    if contract.unique:
        lines.append(f"unique: no two rows share ({', '.join(contract.unique)}) ({contract.unique_severity})")
    if contract.volume:
        v = contract.volume
        ratio = f", no complete day below {v.min_day_ratio:.0%} of the median day" if v.min_day_ratio else ""
        lines.append(f"volume: at least {plural(v.min_rows, 'row')}{ratio} ({v.severity})")
    if contract.freshness:
        lines.append(f"freshness: newest event at most {span(contract.freshness.max_age)} old "
                     f"({contract.freshness.severity})")
    if contract.anomalies:
        a = contract.anomalies
        columns = ", ".join(a.columns) if a.columns is not None else "every numeric column"
        lines.append(f"anomalies: per-day {', '.join(a.statistics)} of {columns} against the {a.history} days "
                     f"before ({a.severity})")
    lines += [f"column {c.name}: {column_checks(c)}" for c in contract.columns if c.name not in set(listed)]
    return lines


def sla(contract: TableContract | None) -> str:
    """A table's freshness SLA, ``48h (warn)``, or ``none``."""
    if contract is None or contract.freshness is None:
        return "none"
    return f"{span(contract.freshness.max_age)} ({contract.freshness.severity})"


def _tags(tags: dict[str, str]) -> str:
    """User tags (featurepipe's own declaration tags are shown as semantics instead)."""
    mine = {k: v for k, v in sorted(tags.items()) if not k.startswith("featurepipe.")}
    return ", ".join(f"{k}={v}" for k, v in mine.items()) or "-"


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _path(source: Any) -> str:
    return str(getattr(source, "path", "") or "")


# -- the registry, read into blocks ----------------------------------------------------------------
@dataclass(frozen=True)
class _Registry:
    """What the catalog reads from the registry, once."""

    entities: list[Any]
    sources: list[Any]
    views: dict[str, Any]  # feature views and stream feature views
    odfvs: dict[str, Any]
    services: list[Any]
    specs: dict[str, AggregateView]  # the windowed-aggregate views' declarations
    used_by: dict[str, list[str]]  # view -> feature services
    readers: dict[str, list[str]]  # data source -> views that read it
    tables: dict[str, str]  # featurepipe's own sources (offline table, push source) -> their view

    @property
    def feature_count(self) -> int:
        return sum(len(v.features) for v in [*self.views.values(), *self.odfvs.values()])


def _read(store: FeatureStore) -> _Registry:
    views = {v.name: v for v in [*store.list_feature_views(), *store.list_stream_feature_views()]}
    odfvs = {v.name: v for v in store.list_on_demand_feature_views()}
    services = sorted(store.list_feature_services(), key=lambda s: s.name)
    windowed = [n for n, v in views.items() if v.tags.get(TAG_KIND) == KIND]
    specs = {v.name: v for v in aggregate_views(store, windowed)} if windowed else {}
    used_by: dict[str, list[str]] = {}
    for service in services:
        for projection in service.feature_view_projections:
            used_by.setdefault(projection.name, []).append(service.name)
    readers: dict[str, list[str]] = {}
    tables: dict[str, str] = {}
    for name, view in views.items():
        own = [s.name for s in (view.batch_source, view.stream_source) if s is not None]
        if name in specs:
            tables.update(dict.fromkeys(own, name))
        for source in dict.fromkeys([*([view.tags[TAG_INPUT]] if name in specs else []), *own]):
            readers.setdefault(source, []).append(name)
    for name, odfv in odfvs.items():
        for source in odfv.source_request_sources:
            readers.setdefault(source, []).append(name)
    # the inputs first, then featurepipe's own tables and push sources
    sources = sorted(store.list_data_sources(), key=lambda s: (s.name in tables, s.name))
    return _Registry(sorted(store.list_entities(), key=lambda e: e.name), sources, views, odfvs, services, specs,
                     used_by, readers, tables)


def build_catalog(store: FeatureStore, contracts: Contracts, now: datetime | None = None) -> Catalog:
    """The data dictionary of ``store``'s registry, with ``contracts``."""
    import feast

    now = now or datetime.now(timezone.utc)
    reg = _read(store)
    view_names = sorted([*reg.views, *reg.odfvs])
    counts = {"entities": len(reg.entities), "data_sources": len(reg.sources), "feature_views": len(view_names),
              "features": reg.feature_count, "feature_services": len(reg.services)}
    blocks: list[Block] = [Heading(1, f"Data dictionary: {store.project}", "top"), Para(
        f"Generated {now:%Y-%m-%d %H:%M} UTC by featurepipe {featurepipe.__version__} (Feast {feast.__version__}) "
        f"from the registry of `{store.repo_path}` (`{store.config.registry.path}`) and its `contracts.yaml`: "
        f"{plural(counts['entities'], 'entity')}, {plural(counts['data_sources'], 'data source')}, "
        f"{plural(counts['feature_views'], 'feature view')} with {plural(counts['features'], 'feature')}, "
        f"{plural(counts['feature_services'], 'feature service')}."), Para(
        f"Descriptions marked {DERIVED} are not declared in the definitions: featurepipe wrote them from the "
        "view's aggregation. A windowed aggregate asked at time t covers the entity's events in "
        "[floor(t, hop) - W, t): events at t itself are out, and the hop (5m under 12h, 1h under 12d, 1d beyond) "
        "makes it a sawtooth covering W to W + hop. t is the request's time online and the entity row's time "
        "offline (docs/windows.md).")]
    toc = [("entities", "Entities", []), ("sources", "Data sources", [s.name for s in reg.sources]),
           ("views", "Feature views", view_names), ("services", "Feature services", [s.name for s in reg.services])]
    blocks += [Heading(2, "Contents", "contents"), Bullets(tuple(
        f"[{title}](#{key})" + "".join(f"\n[{n}](#{_anchor(key, n)})" for n in names) for key, title, names in toc))]
    blocks += [Heading(2, "Entities", "entities"), Table(
        ("entity", "join key", "type", "description", "owner", "tags"),
        tuple((e.name, e.join_key, e.value_type.name, e.description or "-", e.owner or "-", _tags(e.tags))
              for e in reg.entities))]
    blocks.append(Heading(2, "Data sources", "sources"))
    for source in reg.sources:
        blocks += _source_blocks(source, reg, contracts)
    blocks.append(Heading(2, "Feature views", "views"))
    for name in view_names:
        blocks += _view_blocks(reg.views[name], reg, contracts) if name in reg.views else _odfv_blocks(reg.odfvs[name], reg)
    blocks.append(Heading(2, "Feature services", "services"))
    for service in reg.services:
        blocks += _service_blocks(service, reg)
    return Catalog(f"Data dictionary: {store.project}", tuple(blocks), counts)


def _source_contract(source: Any, reg: _Registry, contracts: Contracts) -> tuple[TableContract | None, str]:
    """The contract that checks a source's rows, and where it is: the quality gate checks files
    by path, so a source over the same files as a contracted one (the demo's
    ``transaction_labels``) is checked by that contract."""
    if source.name in contracts.sources:
        return contracts.sources[source.name], f"`sources.{source.name}`"
    for other in reg.sources:
        if other.name in contracts.sources and _path(other) and _path(other) == _path(source):
            return contracts.sources[other.name], f"`sources.{other.name}`, whose files these are"
    return None, f"`sources.{source.name}`"


def _source_blocks(source: Any, reg: _Registry, contracts: Contracts) -> list[Block]:
    kind = type(source).__name__
    contract, where = _source_contract(source, reg, contracts)
    rows = [("kind", kind), ("description", source.description or "-")]
    if _path(source):
        rows.append(("path", f"`{_path(source)}`"))
    if getattr(source, "timestamp_field", ""):
        rows.append(("timestamp field", f"`{source.timestamp_field}`"))
    if kind == "PushSource" and source.batch_source is not None:
        rows.append(("batch source", f"{source.batch_source.name} (`{_path(source.batch_source)}`)"))
    if kind == "RequestSource":
        rows.append(("request fields", ", ".join(f"{f.name} ({f.dtype})" for f in source.schema)))
    rows += [("owner", source.owner or "-"), ("tags", _tags(source.tags)),
             ("read by", ", ".join(reg.readers.get(source.name, [])) or "-")]
    blocks: list[Block] = [Heading(3, source.name, _anchor("sources", source.name))]
    if source.name in reg.tables:
        view = reg.tables[source.name]
        rows.append(("written by", f"featurepipe, for feature view [{view}](#{_anchor('views', view)}) (its "
                                   "checks are the view's)"))
        return [*blocks, Table(("", ""), tuple(rows))]
    if kind != "FileSource":
        return [*blocks, Table(("", ""), tuple(rows))]
    rows.append(("freshness SLA", sla(contract)))
    return [*blocks, Table(("", ""), tuple(rows)), Para(f"Contract checks (contracts.yaml {where}):"),
            Bullets(tuple(table_checks(contract, f"sources.{source.name}")))]


def feature_description(view: Any, name: str, declared: str, spec: AggregateView | None) -> str:
    """A feature's description: the declared one, else one derived from its aggregation (or,
    on an on-demand view, from the view), marked as derived."""
    if declared:
        return declared
    agg = next((a for a in spec.aggregations if a.name == name), None) if spec is not None else None
    if agg is not None and spec is not None:
        return f"{derived_description(agg, spec.timestamp_field)} {DERIVED}"
    if type(view).__name__ == "OnDemandFeatureView":
        inputs = ", ".join([*view.source_feature_view_projections, *view.source_request_sources])
        return f"computed at request time by {view.name} from {inputs} *(derived from the view)*"
    return "not described in the definitions"


def _view_blocks(view: Any, reg: _Registry, contracts: Contracts) -> list[Block]:
    spec = reg.specs.get(view.name)
    contract = contracts.feature_views.get(view.name)
    ttl = span(view.ttl) if view.ttl else "none"
    if spec is not None:
        kind = "windowed aggregates (featurepipe: `featurepipe backfill` offline, `featurepipe stream run` online)"
        source = view.tags[TAG_INPUT]
        inputs = (f"[{source}](#{_anchor('sources', source)}) (event time `{spec.timestamp_field}`) -> {view.name} "
                  f"-> offline table `{_path(view.batch_source)}`; online updates through push source "
                  f"{view.stream_source.name if view.stream_source else '-'}")
        meaning = f"the window before the request time (per feature below); rows older than the TTL ({ttl}) are not served"
    else:
        kind = type(view).__name__
        inputs = f"{view.batch_source.name} (`{_path(view.batch_source)}`) -> {view.name}" + (
            f"; stream source {view.stream_source.name}" if view.stream_source else "")
        meaning = (f"the latest row as of t within the TTL: the newest row with event time <= t and > t - {ttl}"
                   if view.ttl else "the latest row as of t (no TTL)")
    rows = (("kind", kind), ("description", view.description or "-"),
            ("join keys", ", ".join(c.name for c in view.entity_columns) or "-"), ("TTL", ttl), ("value at t", meaning),
            ("owner", view.owner or "-"), ("tags", _tags(view.tags)), ("freshness SLA", sla(contract)),
            ("inputs", inputs), ("feature services", ", ".join(reg.used_by.get(view.name, [])) or "-"))
    aggs = {a.name: a for a in spec.aggregations} if spec is not None else {}
    features = tuple(
        (f.name, str(f.dtype), feature_description(view, f.name, f.description, spec),
         window_semantics(aggs[f.name]) if f.name in aggs else f"latest value as of t within the TTL ({ttl})",
         column_checks(contract.column(f.name) if contract else None))
        for f in view.features)
    listed = [f.name for f in view.features]
    return [Heading(3, view.name, _anchor("views", view.name)), Table(("", ""), rows),
            Table(("feature", "type", "description", "value at request time t", "checks"), features),
            Para(f"Contract checks (contracts.yaml `feature_views.{view.name}`; per column: beside each feature):"),
            Bullets(tuple(table_checks(contract, f"feature_views.{view.name}", listed)))]


def _odfv_blocks(odfv: Any, reg: _Registry) -> list[Block]:
    views = [f"[{p.name}](#{_anchor('views', p.name)}) ({', '.join(f.name for f in p.features)})"
             for p in odfv.source_feature_view_projections.values()]
    requests = [f"request source [{name}](#{_anchor('sources', name)}) ({', '.join(f.name for f in s.schema)})"
                for name, s in odfv.source_request_sources.items()]
    rows = (("kind", f"on-demand feature view ({odfv.mode} mode): computed at request time"),
            ("description", odfv.description or "-"), ("owner", odfv.owner or "-"), ("tags", _tags(odfv.tags)),
            ("inputs", f"{'; '.join([*views, *requests])} -> {odfv.name}"),
            ("feature services", ", ".join(reg.used_by.get(odfv.name, [])) or "-"))
    features = tuple((f.name, str(f.dtype), feature_description(odfv, f.name, f.description, None),
                      "computed from the inputs' values at t", "-") for f in odfv.features)
    blocks: list[Block] = [Heading(3, odfv.name, _anchor("views", odfv.name)), Table(("", ""), rows),
                           Table(("feature", "type", "description", "value at request time t", "checks"), features)]
    code = (getattr(odfv.feature_transformation, "udf_string", "") or "").strip()
    return [*blocks, Para("Transformation:"), Code(code)] if code else blocks


def _service_blocks(service: Any, reg: _Registry) -> list[Block]:
    rows = []
    for projection in service.feature_view_projections:
        view = reg.views.get(projection.name) or reg.odfvs.get(projection.name)
        declared = {f.name: f.description for f in view.features} if view is not None else {}
        for f in projection.features:
            rows.append((f"{projection.name_to_use()}:{f.name}", f"[{projection.name}](#{_anchor('views', projection.name)})",
                         str(f.dtype), feature_description(view, f.name, declared.get(f.name, ""),
                                                           reg.specs.get(projection.name))))
    head = (("description", service.description or "-"), ("owner", service.owner or "-"),
            ("tags", _tags(service.tags)), ("features", str(len(rows))))
    return [Heading(3, service.name, _anchor("services", service.name)), Table(("", ""), head),
            Table(("feature", "view", "type", "description"), tuple(rows))]


# -- rendering ------------------------------------------------------------------------------------
def to_markdown(catalog: Catalog) -> str:
    """The catalog as Markdown (GitHub's flavour: tables, explicit anchors)."""
    out: list[str] = []
    for block in catalog.blocks:
        if isinstance(block, Heading):
            out.append(f'<a id="{block.anchor}"></a>\n{"#" * block.level} {block.text}')
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join("- " + item.replace("\n", "\n  - ") for item in block.items))
        elif isinstance(block, Code):
            out.append(f"```python\n{block.text}\n```")
        else:
            lines = [_md_row(block.header), "| " + " | ".join("---" for _ in block.header) + " |"]
            out.append("\n".join(lines + [_md_row(r) for r in block.rows]))
    return "\n\n".join(out) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


_INLINE = re.compile(r"`([^`]+)`|\[([^\]]+)\]\(#([^)]+)\)|\*\(([^)]*)\)\*")


def _inline(text: str) -> str:
    """Markdown's inline code, in-page links and ``*(...)*`` notes as HTML; the rest escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f'<a href="#{html.escape(m.group(3))}">{html.escape(m.group(2))}</a>')
        else:
            out.append(f"<em>({html.escape(m.group(4))})</em>")
        pos = m.end()
    return "".join(out) + html.escape(text[pos:])


_STYLE = ("body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:80rem;padding:0 1rem;color:#222}"
          "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
          "vertical-align:top;text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2rem}"
          "pre{background:#f6f6f6;padding:.75rem;overflow:auto}h3{border-top:1px solid #ddd;padding-top:1rem}"
          "em{color:#666}")


def to_html(catalog: Catalog) -> str:
    """The catalog as one self-contained HTML page (styles inline, no external assets)."""
    parts: list[str] = []
    for block in catalog.blocks:
        if isinstance(block, Heading):
            parts.append(f'<h{block.level} id="{block.anchor}">{html.escape(block.text)}</h{block.level}>')
        elif isinstance(block, Para):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(_html_item(item) for item in block.items) + "</ul>")
        elif isinstance(block, Code):
            parts.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
        else:
            head = "".join(f"<th>{_inline(c)}</th>" for c in block.header) if any(block.header) else ""
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(catalog.title)}'
            f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _html_item(item: str) -> str:
    first, *nested = item.split("\n")
    sub = "<ul>" + "".join(f"<li>{_inline(n)}</li>" for n in nested) + "</ul>" if nested else ""
    return f"<li>{_inline(first)}{sub}</li>"


@dataclass(frozen=True)
class CatalogFiles:
    """What :func:`write_catalog` wrote."""

    paths: tuple[Path, ...]
    counts: dict[str, int]


def write_catalog(store: FeatureStore, contracts: Contracts, out: Path, formats: Iterable[str] = ("md", "html"),
                  now: datetime | None = None) -> CatalogFiles:
    """Write ``catalog.md`` and/or ``catalog.html`` into the folder ``out``."""
    catalog = build_catalog(store, contracts, now)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"catalog.{fmt}"
        text = to_markdown(catalog) if fmt == "md" else to_html(catalog)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return CatalogFiles(tuple(paths), catalog.counts)
