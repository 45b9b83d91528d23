"""``featurepipe registry backup|restore``: the Feast registry to a file and back.

The library (:mod:`featurepipe.feast.registry_backup`) imports Feast only when a command
runs, so this module imports it at the top and ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from featurepipe.cli.options import REPO_OPTION
from featurepipe.feast.registry_backup import backup_registry, restore_registry


@click.group()
def registry() -> None:
    """Back up the repo's Feast registry, or restore it from a backup.

    \b
    The registry is what `feast apply` wrote: every entity, source, view and service, their
    materialisation intervals and the online store's infrastructure. What else to back up
    (contracts.yaml, the offline store, the run log): docs/runbook.md.
    """


@registry.command("backup")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: <data>/backups/registry-<UTC time>.pb); never overwritten.")
@REPO_OPTION
def registry_backup(out: Path | None, repo: Path | None) -> None:
    """Write the registry to a file, with a JSON sidecar.

    The file is Feast's registry proto, whatever the registry kind (for a file registry, the
    bytes of registry.db); the sidecar beside it (<file>.json) records the project, the Feast
    and featurepipe versions, the UTC time and the file's SHA-256.
    """
    backup = backup_registry(repo, out)
    click.echo(f"backed up the registry of project {backup.project} ({backup.describe()}) to {backup.path} "
               f"({backup.size:,} bytes, sha256 {backup.sha256[:16]}...); sidecar {backup.sidecar}")


@registry.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True,
              help="Replace a registry that already holds definitions (it is backed up first).")
@REPO_OPTION
def registry_restore(file: Path, force: bool, repo: Path | None) -> None:
    """Write a backup into the repo's registry.

    FILE is a backup with its sidecar FILE.json; the registry is the one the repo's
    feature_store.yaml configures. The sidecar's project must be the repo's and the file's
    SHA-256 the sidecar's. A
    registry that holds definitions is only replaced with --force. Afterwards `featurepipe
    feast plan` compares the restored registry with the definitions in the repo.
    """
    result = restore_registry(file, repo, force=force)
    if result.replaced is not None:
        click.echo(f"the registry it replaced ({result.replaced.describe()}) is saved in {result.replaced.path}")
    click.echo(f"restored the registry of project {result.backup.project} ({result.backup.describe()}) from "
               f"{result.backup.path} into the {result.target}; `featurepipe feast plan` compares it with the "
               "definitions")
