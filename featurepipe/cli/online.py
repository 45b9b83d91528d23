"""``featurepipe online``: the online store as a whole, rebuilt from the offline store and verified."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from featurepipe.cli.options import REPO_OPTION, VIEWS_OPTION
from featurepipe.report import table

if TYPE_CHECKING:
    from featurepipe.jobs.online_ops import OnlineVerification

PROGRESS_OPTION = click.option("--progress/--no-progress", default=None,
                               help="Progress bar per view (default: on; off with --json).")


@click.group()
def online() -> None:
    """The online store as a whole: rebuild it from the offline store, verify it against it.

    \b
    When Redis lost its data (a new empty server, a cluster primary back without its data):
      featurepipe online rebuild   write what a full `featurepipe materialize` writes, then verify
      featurepipe online verify    compare Redis with what a materialisation writes now, byte for byte
    """


@online.command("rebuild")
@VIEWS_OPTION
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows encoded and sent together (default: the engine's, 5000).")
@PROGRESS_OPTION
@REPO_OPTION
def rebuild(views: tuple[str, ...], batch_rows: int | None, progress: bool | None, repo: Path | None) -> None:
    """Repopulate the online store (one Redis or a Redis Cluster) from the offline store,
    then verify it; exit status 1 when it still differs.

    Writes exactly what `featurepipe materialize` over the whole range writes, with the same
    engine: windowed views each entity's window schedule from the raw events, other views the
    latest row per entity. A store that still holds keys is fine: a value is never replaced by
    an older one (a newer one the stream job wrote stays), and keys the offline store has no
    entity for are left alone and reported by the verification as extra.
    """
    from featurepipe.config import load_store
    from featurepipe.jobs.online_ops import rebuild_online

    store = load_store(repo)
    result = rebuild_online(store, list(views) or None, batch_rows=batch_rows, progress=progress)
    if result.keys_before:
        click.echo(f"{result.target} held {result.keys_before:,} keys of project {store.project!r} before the "
                   "rebuild: kept where newer, rewritten with the same bytes otherwise")
    else:
        click.echo(f"{result.target} held no key of project {store.project!r}: rebuilding it whole")
    per_view = result.materialized.per_view
    if per_view:
        click.echo(table(
            ["view", "entities", "written", "not newer", "quarantined", "seconds", "rows/s"],
            [[r.view, f"{r.entities:,}", f"{r.written:,}", f"{r.skipped:,}", f"{r.quarantined:,}",
              f"{r.seconds:.2f}", f"{r.rows_per_second:,.0f}"] for r in per_view],
        ))
        for r in per_view:
            for path in r.quarantine_files:
                click.echo(f"quarantined rows of {r.view}: {path}")
    click.echo(f"rebuilt {', '.join(result.materialized.views)}: {result.entities:,} rows in "
               f"{result.materialized.seconds:.1f}s ({result.rows_per_second:,.0f} rows/s)")
    _echo(result.verification)
    sys.exit(0 if result.verification.ok else 1)


@online.command("verify")
@VIEWS_OPTION
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Compare N entities per view, chosen at random (default: every entity). Extra keys are "
                   "still looked for among all keys.")
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True,
              help="Examples listed per view and kind (missing, different, extra).")
@click.option("--seed", type=int, default=None, help="Random seed of --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@PROGRESS_OPTION
@REPO_OPTION
def verify(views: tuple[str, ...], sample: int | None, examples: int, seed: int | None, as_json: bool,
           progress: bool | None, repo: Path | None) -> None:
    """Compare the online store with the offline store's latest state; exit status 1 when
    they differ.

    For every entity (or --sample N) of each online view, the fields Redis holds (the event
    time _ts:<view>, every feature and a windowed view's schedule) are compared byte for byte
    with those a materialisation over the whole range writes now. Per view: entities missing
    online, different (and which fields), extra online (keys of the view for no entity of the
    offline store, found by a SCAN of every primary) and quarantined (rows a materialisation
    does not write: not compared), with examples.
    """
    from featurepipe.config import load_store
    from featurepipe.jobs.online_ops import verify_online

    store = load_store(repo)
    result = verify_online(store, list(views) or None, sample=sample, examples=examples, seed=seed,
                           progress=not as_json if progress is None else progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), default=str))
    else:
        _echo(result)
    sys.exit(0 if result.ok else 1)


def _echo(result: OnlineVerification) -> None:
    """The verification as a table, its examples and one closing line."""
    click.echo(table(
        ["view", "entities", "checked", "equal", "missing", "different", "extra", "quarantined", "seconds"],
        [[v.view, f"{v.entities:,}", f"{v.checked:,}", f"{v.equal:,}", f"{v.missing:,}", f"{v.different:,}",
          f"{v.extra:,}", f"{v.quarantined:,}", f"{v.seconds:.2f}"] for v in result.views],
    ))
    for v in result.views:
        for check, rows in v.blocked.items():
            click.echo(f"{v.view}: check {check!r} blocks its materialisation ({rows:,} rows): nothing of it "
                       "would be written; fix the data or the contract, then `featurepipe online rebuild`")
        if v.differing_fields:
            fields = ", ".join(f"{name} ({n:,})" for name, n in sorted(v.differing_fields.items()))
            newer = f"; online newer on {v.newer_online:,} (written since the offline data)" if v.newer_online else ""
            click.echo(f"{v.view}: differing fields: {fields}{newer}")
        for example in v.examples:
            click.echo(f"  {v.view}: {example.describe()}")
    for name, reason in result.skipped.items():
        click.echo(f"{name}: not verified ({reason})")
    entities = sum(v.checked for v in result.views)
    if result.ok:
        click.echo(f"online store {result.target} equals the offline store: {entities:,} entities of "
                   f"{len(result.views)} views compared in {result.seconds:.1f}s")
    else:
        bad = [v.view for v in result.views if not v.ok]
        click.echo(f"online store {result.target} DIFFERS from the offline store in {', '.join(bad)} "
                   f"({entities:,} entities compared in {result.seconds:.1f}s); `featurepipe online rebuild` "
                   "writes what is missing or older (a newer value online is kept)")
