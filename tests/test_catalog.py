"""``featurepipe catalog``: the data dictionary of the deployed demo repo, read from its registry.

Oracles: the registry itself (every view's features and types, every service's projections,
the windowed views' declarations in their tags) and ``contracts.yaml`` as the gate reads it;
the Markdown and the HTML page must say the same.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from featurepipe.definitions import TAG_AGGREGATIONS
from featurepipe.quality.contracts import load_contracts
from tests.conftest import Pipeline

# the demo's windows as its feature names write them; the hop each has (docs/windows.md)
WINDOWS = {3600: ("1h", "5m"), 86400: ("24h", "1h"), 7 * 86400: ("7d", "1h"), 30 * 86400: ("30d", "1d")}
WORDS = {"count": "count", "sum": "sum", "mean": "mean", "min": "minimum", "max": "maximum"}


def md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text``: rows of cells (the header row first, the rule left out)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if set("".join(cells)) != {"-"}:
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def md_sections(text: str) -> dict[str, str]:
    """The text under each ``### name`` heading, by name."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            name = line[4:].strip() if line.startswith("### ") else None
            if name:
                out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


class _Page(HTMLParser):
    """The tables of an HTML page (cell text), its element ids, its links and any external asset."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag in ("script", "link", "img", "iframe") or any(
                k in ("src", "href") and v and not v.startswith("#") for k, v in attrs):
            self.external.append(f"<{tag} {attrs}>")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def expected_features(pipeline: Pipeline) -> dict[str, dict[str, tuple[str, str | None]]]:
    """Per view (feature views and on-demand ones), per feature: its type and, for a windowed
    aggregate without a declared description, the description derived from its declaration."""
    store = pipeline.store
    out: dict[str, dict[str, tuple[str, str | None]]] = {}
    for view in [*store.list_feature_views(), *store.list_on_demand_feature_views()]:
        specs = {s["name"]: s for s in json.loads(view.tags.get(TAG_AGGREGATIONS, "[]"))}
        features = {}
        for f in view.features:
            spec = specs.get(f.name)
            description = f.description or None
            if description is None and spec and spec["function"] != "last":
                window = WINDOWS[int(spec["window_seconds"])][0]
                description = f"{WORDS[spec['function']]} of {spec['column']} over the {window} before the request"
            features[f.name] = (str(f.dtype), description)
        out[view.name] = features
    return out


@pytest.fixture(scope="module")
def catalog_files(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The catalog the CLI writes: both formats to the default folder (<data>/catalog), and
    the HTML alone to --out."""
    out = tmp_path_factory.mktemp("catalog-out")
    default, html_only = pipeline.run_many(("catalog",), ("catalog", "--out", str(out), "--format", "html"))
    assert default.returncode == 0, default.stderr[-3000:]
    assert html_only.returncode == 0, html_only.stderr[-3000:]
    folder = pipeline.data / "catalog"
    assert f"wrote {folder / 'catalog.md'}, {folder / 'catalog.html'}: 2 entities" in default.stdout
    assert "4 feature views with 20 features, 1 feature service" in default.stdout
    assert sorted(p.name for p in out.iterdir()) == ["catalog.html"]
    return (folder / "catalog.md").read_text(), (out / "catalog.html").read_text()


def test_every_feature_of_every_view_has_its_type_and_description(
        pipeline: Pipeline, catalog_files: tuple[str, str]) -> None:
    md, _ = catalog_files
    sections = md_sections(md)
    expected = expected_features(pipeline)
    assert expected.keys() == {"user_transaction_stats", "merchant_activity", "merchant_fraud", "transaction_context"}
    for view, features in expected.items():
        rows = {r[0]: r for t in md_tables(sections[view]) if t[0][:2] == ["feature", "type"] for r in t[1:]}
        assert rows.keys() == features.keys(), view
        for name, (dtype, description) in features.items():
            row = rows[name]
            assert row[1] == dtype, (view, name, row)
            assert row[2] not in ("", "-"), (view, name, row)
            if description is not None:
                assert row[2].startswith(description), (view, name, row[2], description)
                assert row[2].endswith("*(derived from the aggregation)*"), row[2]
    # the windows' meaning, with the hop of each
    user = {r[0]: r for t in md_tables(sections["user_transaction_stats"]) for r in t}
    assert "[floor(t, 5m) - 1h, t)" in user["amount_sum_1h"][3], user["amount_sum_1h"]
    assert "[floor(t, 1h) - 7d, t)" in user["txn_count_7d"][3]
    assert user["last_txn_epoch"][2].startswith("time of the latest event before the request")
    fraud = {r[0]: r for t in md_tables(sections["merchant_fraud"]) for r in t}
    assert "[floor(t, 1d) - 30d, t)" in fraud["merchant_fraud_rate_30d"][3]
    assert "mean(is_fraud), window 30d, hop 1d" in fraud["merchant_fraud_rate_30d"][3]
    context = {r[0]: r for t in md_tables(sections["transaction_context"]) for r in t}
    assert "computed at request time by transaction_context" in context["amount_to_mean_7d"][2]
    assert "def transaction_context" in sections["transaction_context"]  # the transformation's code


def test_every_feature_service_lists_its_features(pipeline: Pipeline, catalog_files: tuple[str, str]) -> None:
    md, _ = catalog_files
    sections = md_sections(md)
    expected = expected_features(pipeline)
    services = pipeline.store.list_feature_services()
    assert services
    for service in services:
        tables = md_tables(sections[service.name])
        rows = {r[0]: r for t in tables if t[0][0] == "feature" for r in t[1:]}
        wanted = {f"{p.name_to_use()}:{f.name}": (p.name, f) for p in service.feature_view_projections
                  for f in p.features}
        assert rows.keys() == wanted.keys()
        for key, (view, feature) in wanted.items():
            assert rows[key][2] == str(feature.dtype)
            assert rows[key][1].startswith(f"[{view}]")
            if expected[view][feature.name][1]:
                assert rows[key][3].startswith(expected[view][feature.name][1])
        # and each view names the services that use it
        for view in {p.name for p in service.feature_view_projections}:
            info = {r[0]: r[1] for r in md_tables(sections[view])[0]}
            assert service.name in info["feature services"]


def test_slas_and_contract_checks_appear(pipeline: Pipeline, catalog_files: tuple[str, str]) -> None:
    md, _ = catalog_files
    sections = md_sections(md)
    contracts = load_contracts(pipeline.repo)
    assert contracts.feature_views
    for view, contract in contracts.feature_views.items():
        info = {r[0]: r[1] for r in md_tables(sections[view])[0]}
        assert contract.freshness is not None
        hours = contract.freshness.max_age.total_seconds() / 3600
        assert info["freshness SLA"] == f"{hours:.0f}h ({contract.freshness.severity})", info
        if contract.unique:
            assert f"unique: no two rows share ({', '.join(contract.unique)}) ({contract.unique_severity})" \
                in sections[view]
        features = {r[0]: r for t in md_tables(sections[view]) if t[0][0] == "feature" for r in t[1:]}
        for column in contract.columns:
            where = features[column.name][4] if column.name in features else sections[view]
            assert column.type is not None and column.type in where, (view, column.name)
            if column.min is not None:
                assert f">= {column.min:g}" in where
    source = {r[0]: r[1] for r in md_tables(sections["transactions"])[0]}
    assert source["freshness SLA"] == "48h (warn)"
    assert source["timestamp field"] == "`event_timestamp`"
    assert "one of pos, online, contactless, atm" in sections["transactions"]
    assert source["read by"] == "merchant_activity, user_transaction_stats"
    # the labels read the same files: the gate checks them with the transactions' contract
    assert "contracts.yaml `sources.transactions`, whose files these are" in sections["transaction_labels"]
    entities = next(t for t in md_tables(md) if t[0][0] == "entity")
    assert ["user", "user_id", "INT64", "A card holder", "-", "-"] in entities


def test_html_is_one_page_with_the_same_features(pipeline: Pipeline, catalog_files: tuple[str, str]) -> None:
    md, page_text = catalog_files
    page = _Page()
    page.feed(page_text)
    page.close()
    assert page.external == []
    assert page.links and all(link[1:] in page.ids for link in page.links)  # the contents resolve
    assert {"views-user-transaction-stats", "services-fraud-detection-v1", "sources-transactions"} <= page.ids

    def features(tables: list[list[list[str]]]) -> list[tuple[str, ...]]:
        return sorted(tuple(r[:3]) for t in tables if t and t[0][:2] == ["feature", "type"] for r in t[1:])

    ours = features(page.tables)
    theirs = [(n, t, d.replace("*(", "(").replace(")*", ")")) for n, t, d in features(md_tables(md))]
    assert ours == sorted(theirs)
    assert len(ours) == sum(len(f) for f in expected_features(pipeline).values())
    assert page_text.count("<em>(derived from the aggregation)</em>") >= 18
