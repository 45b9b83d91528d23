"""CLI commands for data quality: status (freshness, runs, checks) and lineage."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click

from featurepipe.report import table

REPO_OPTION = click.option(
    "--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Feature repo folder (default: ./feature_repo, or $FEATUREPIPE_REPO).",
)


@click.command()
@click.option("--runs", "last", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many recent runs to list.")
@REPO_OPTION
def status(last: int, repo: Path | None) -> None:
    """Freshness per feature view (newest event time vs its SLA), the last runs and the
    check results of the latest run."""
    from featurepipe.config import data_dir, find_repo, load_store
    from featurepipe.definitions import aggregate_views
    from featurepipe.quality.contracts import load_contracts
    from featurepipe.quality.runlog import read_runs
    from featurepipe.quality.status import format_age, freshness

    root = find_repo(repo)
    data = data_dir(root)
    contracts = load_contracts(root)
    views = aggregate_views(load_store(root))
    click.echo("freshness")
    click.echo(table(["view", "newest event (UTC)", "age", "SLA", "state"], [
        [f.view, f"{f.newest:%Y-%m-%d %H:%M:%S}" if f.newest else "-", format_age(f.age),
         format_age(f.sla), f.state] for f in freshness(views, contracts)
    ]))
    runs = read_runs(data)
    if not runs:
        click.echo("\nno runs recorded yet (run `featurepipe backfill`)")
        return
    click.echo(f"\nlast runs ({data / 'runs' / 'runs.jsonl'})")
    rows = []
    for run in runs[-last:][::-1]:
        failed = [c for c in run.get("checks", []) if not c["passed"]]
        rows.append([
            run["run_id"], run["kind"], run["status"], run["finished"][:19].replace("T", " "),
            f"{run['seconds']:.1f}", f"{sum(i.get('rows', 0) for i in run.get('inputs', [])):,}",
            f"{sum(i.get('quarantined', 0) for i in run.get('inputs', [])) + sum(o.get('quarantined', 0) for o in run.get('outputs', [])):,}",
            f"{len(run.get('checks', [])) - len(failed)}/{len(run.get('checks', []))}",
            ", ".join(o["view"] for o in run.get("outputs", []) if "rows" in o) or "-",
        ])
    click.echo(table(["run", "kind", "status", "finished (UTC)", "seconds", "rows in", "quarantined",
                      "checks passed", "views written"], rows))
    latest = runs[-1]
    failed = [c for c in latest.get("checks", []) if not c["passed"]]
    click.echo(f"\nchecks of run {latest['run_id']}: {len(latest.get('checks', [])) - len(failed)} passed, "
               f"{len(failed)} failed")
    if failed:
        click.echo(table(["stage", "table", "check", "column", "severity", "failed rows", "detail"], [
            [c["stage"], c["table"], c["check"], c["column"] or "-", c["severity"],
             f"{c['failed_rows']:,}", c["detail"]] for c in failed
        ]))
    if latest.get("error"):
        click.echo(f"error: {latest['error']}")


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
            click.echo(f"  input {inp['source']}: {len(files)} files, {inp['rows']:,} rows, "
                       f"{inp['passed']:,} passed, {inp['quarantined']:,} quarantined"
                       + (f" ({inp['quarantine_file']})" if inp.get("quarantine_file") else ""))
            for f in files[:3]:
                click.echo(f"    {f}")
            if len(files) > 3:
                click.echo(f"    ... {len(files) - 3} more")
    if info["partitions_without_run"]:
        click.echo(f"\n{len(info['partitions_without_run'])} partitions written by no recorded run "
                   "(backfilled without the quality gates, or before run logging)")
