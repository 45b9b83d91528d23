"""The data-quality commands: status (freshness, runs, checks), lineage and report."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click

from featurepipe.cli.options import REPO_OPTION
from featurepipe.report import table


@click.command()
@click.option("--runs", "last", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many recent runs to list.")
@click.option("--prometheus", is_flag=True,
              help="Print the pipeline metrics in the Prometheus text format instead (the content of "
                   "<data>/metrics/featurepipe.prom, recomputed now).")
@REPO_OPTION
def status(last: int, prometheus: bool, repo: Path | None) -> None:
    """Freshness per feature view (offline: newest event time vs its SLA; online: newest
    value materialised), the last runs and the check results of the latest backfill and of
    each view's latest materialisation."""
    from featurepipe.config import data_dir, find_repo, load_store
    from featurepipe.definitions import aggregate_views
    from featurepipe.quality.contracts import load_contracts
    from featurepipe.quality.runlog import read_runs
    from featurepipe.quality.status import (
        format_age,
        freshness,
        latest_runs,
        online_freshness,
        run_summary,
    )

    root = find_repo(repo)
    data = data_dir(root)
    contracts = load_contracts(root)
    if prometheus:
        from featurepipe.quality.metrics import exposition

        sla = {n: c.freshness.max_age.total_seconds() for n, c in contracts.feature_views.items() if c.freshness}
        click.echo(exposition(data, sla=sla), nl=False)
        return
    views = aggregate_views(load_store(root))
    runs = read_runs(data)
    online = online_freshness(runs)
    click.echo("freshness")
    click.echo(table(["view", "newest event (UTC)", "age", "SLA", "state", "online newest (UTC)", "online age"], [
        [f.view, f"{f.newest:%Y-%m-%d %H:%M:%S}" if f.newest else "-", format_age(f.age), format_age(f.sla), f.state,
         f"{online[f.view].newest:%Y-%m-%d %H:%M:%S}" if f.view in online else "-",
         format_age(online[f.view].age) if f.view in online else "-"]
        for f in freshness(views, contracts)
    ]))
    if not runs:
        click.echo("\nno runs recorded yet (run `featurepipe backfill`)")
        return
    click.echo(f"\nlast runs ({data / 'runs' / 'runs.jsonl'})")
    rows = []
    for run in runs[-last:][::-1]:
        s = run_summary(run)
        rows.append([run.run_id, run.kind, run.status, run.finished[:19].replace("T", " "),
                     f"{run.seconds:.1f}", f"{s.rows_in:,}", f"{s.quarantined:,}",
                     f"{s.checks - s.failed}/{s.checks}", ", ".join(s.views) or "-"])
    click.echo(table(["run", "kind", "status", "finished (UTC)", "seconds", "rows in", "quarantined",
                      "checks passed", "views written"], rows))
    for run in latest_runs(runs):
        failed = [c for c in run.checks if not c.passed]
        what = run.kind + (f" {run.outputs[0].view}" if run.kind == "materialize" and run.outputs else "")
        click.echo(f"\nchecks of run {run.run_id} ({what}, {run.status}): {len(run.checks) - len(failed)} passed, "
                   f"{len(failed)} failed")
        if failed:
            click.echo(table(["stage", "table", "check", "column", "severity", "failed rows", "detail"], [
                [c.stage, c.table, c.check, c.column or "-", c.severity, f"{c.failed_rows:,}", c.detail]
                for c in failed
            ]))
        if run.error:
            click.echo(f"error: {run.error}")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the lineage as JSON.")
@REPO_OPTION
def lineage(name: str, as_json: bool, repo: Path | None) -> None:
    """Where the values of a feature view or feature (NAME, or VIEW:FEATURE) came from:
    the runs that wrote its published day partitions, their source files, quarantined rows,
    definitions hash and code version."""
    from featurepipe.config import data_dir, find_repo, load_store
    from featurepipe.definitions import aggregate_views
    from featurepipe.quality.runlog import view_definition_hashes
    from featurepipe.quality.status import format_age, resolve
    from featurepipe.quality.status import lineage as trace

    root = find_repo(repo)
    store = load_store(root)
    view, feature = resolve(aggregate_views(store), name)
    current = view_definition_hashes(store, [view.name])[view.name]
    info = trace(data_dir(root), view, feature, current)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    what = f"feature {feature} of view {view.name}" if feature else f"feature view {view.name}"
    click.echo(what)
    if info["declaration"]:
        d = info["declaration"]
        window = f" over {format_age(timedelta(seconds=d['window_seconds']))}" if d["window_seconds"] else ""
        click.echo(f"  computed as {d['function']}({d['column']}){window}")
    click.echo(f"  from source files {info['input_path']}")
    click.echo(f"  published in {info['offline_path']} ({info['published_partitions']} day partitions)")
    click.echo(f"  current definition hash {current[:16]}")
    for run in info["runs"]:
        parts = run["partitions"]
        span = parts[0] if len(parts) == 1 else f"{parts[0]} .. {parts[-1]}"
        changed = "  (definitions changed since)" if run["definitions_changed_since"] else ""
        click.echo(f"\nrun {run['run_id']} ({run['kind']}, finished {run['finished'][:19]} UTC): "
                   f"{len(parts)} partitions {span}{changed}")
        click.echo(f"  definition hash {str(run['definition_hash'])[:16]}, code "
                   f"featurepipe {run['code_version'].get('featurepipe')} git {str(run['code_version'].get('git_sha'))[:12]}")
        click.echo(f"  rows written {run['rows_written']:,}, feature rows quarantined {run['rows_quarantined']:,}")
        for inp in run["inputs"]:
            files = inp.get("files", [])
            click.echo(f"  input {inp['name']}: {len(files)} files, {inp['rows']:,} rows, "
                       f"{inp['passed']:,} passed, {inp['quarantined']:,} quarantined"
                       + (f" ({inp['quarantine_file']})" if inp.get("quarantine_file") else ""))
            for f in files[:3]:
                click.echo(f"    {f}")
            if len(files) > 3:
                click.echo(f"    ... {len(files) - 3} more")
    if info["online"]:
        o = info["online"]
        changed = "  (definitions changed since)" if o["definitions_changed_since"] else ""
        click.echo(f"\nonline: materialised by run {o['run_id']} (finished {o['finished'][:19]} UTC) into "
                   f"{o['online_store']}: {o['written']:,} written, {o['not_newer']:,} already newer, "
                   f"{o['quarantined']:,} quarantined; newest value {str(o['newest_event'])[:19]}{changed}")
    else:
        click.echo("\nonline: no successful materialisation recorded (run `featurepipe materialize`)")
    if info["stream"]:
        st = info["stream"]
        click.echo(f"\nstream: last checkpoint {st['run_id']} of job {st['job']} (worker {st['worker']}, source "
                   f"{st['source']}, finished {st['finished'][:19]} UTC): {st['offline_rows']:,} offline rows, "
                   f"watermark {str(st['watermark'])[:19]}")
    if info["partitions_without_run"]:
        click.echo(f"\n{len(info['partitions_without_run'])} partitions written by no recorded run "
                   "(backfilled without the quality gates, or before run logging)")


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write (default: <data>/reports/quality.html).")
@click.option("--runs", "last", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many recent runs to list.")
@REPO_OPTION
def report(out: Path | None, last: int, repo: Path | None) -> None:
    """Write an HTML data-quality report: freshness, last runs, check results, quarantined
    rows, and per checked column its distribution and its drift over days and runs (plots
    embedded: one self-contained file)."""
    from featurepipe.config import data_dir, find_repo, load_store
    from featurepipe.definitions import aggregate_views
    from featurepipe.quality.contracts import load_contracts
    from featurepipe.quality.html_report import write_report

    root = find_repo(repo)
    data = data_dir(root)
    info = write_report(data, out or data / "reports" / "quality.html", aggregate_views(load_store(root)),
                        load_contracts(root), last)
    click.echo(f"wrote {info.path} ({info.runs} runs, {info.figures} figures)")


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write catalog.md / catalog.html into (default: <data>/catalog).")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "both"]), default="both", show_default=True,
              help="Markdown, one self-contained HTML page, or both.")
@REPO_OPTION
def catalog(out: Path | None, fmt: str, repo: Path | None) -> None:
    """Write the data dictionary, from the registry: every entity, data source, feature view,
    feature and feature service, with types, descriptions (derived from the aggregation where
    the definitions give none), window semantics, TTL, owner, tags, freshness SLA and checks
    from contracts.yaml, inputs, and the feature services that use each view."""
    from featurepipe.config import data_dir, find_repo, load_store
    from featurepipe.quality.catalog import plural, write_catalog
    from featurepipe.quality.contracts import load_contracts

    root = find_repo(repo)
    formats = ("md", "html") if fmt == "both" else (fmt,)
    files = write_catalog(load_store(root), load_contracts(root), out or data_dir(root) / "catalog", formats)
    c = files.counts
    click.echo(f"wrote {', '.join(str(p) for p in files.paths)}: {plural(c['entities'], 'entity')}, "
               f"{plural(c['data_sources'], 'data source')}, {plural(c['feature_views'], 'feature view')} with "
               f"{plural(c['features'], 'feature')}, {plural(c['feature_services'], 'feature service')}")
