"""``featurepipe redis`` (the repo's local online store) and ``featurepipe notebooks``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from featurepipe.cli.options import REPO_OPTION
from featurepipe.redis_server import LocalRedis, run_with_redis


@click.group()
def redis() -> None:
    """The repo's local redis-server: the online store when REDIS_URL is not set.

    \b
    Any command that needs Redis starts it on demand (files under <repo>/.redis/: the RDB
    snapshot, its log, its pid and port) and it keeps running between commands, so what
    `make demo` materialised is there for `featurepipe serve`, the notebooks and the Feast
    SDK. With REDIS_URL set, featurepipe uses that server instead and never starts this one.
    """


redis.add_command(run_with_redis)  # featurepipe redis run -- COMMAND: a private server instead


def _local(repo: Path | None) -> LocalRedis:
    from featurepipe.config import find_repo

    return LocalRedis(find_repo(repo))


@redis.command("status")
@REPO_OPTION
def redis_status(repo: Path | None) -> None:
    """Say whether the local server runs, where, and how many keys it holds (exit 1: stopped)."""
    import redis as redis_py

    local = _local(repo)
    if os.environ.get("REDIS_URL"):
        click.echo(f"REDIS_URL is set ({os.environ['REDIS_URL']}): featurepipe uses that server, not the local one")
    state = local.status()
    if state is None:
        click.echo(f"the local redis-server is not running (files: {local.dir}); "
                   "any command that needs it starts it, or run `featurepipe redis start`")
        sys.exit(1)
    client = redis_py.Redis(host="127.0.0.1", port=state.port)
    try:
        keys = client.dbsize()
        info = client.info("memory")
        assert isinstance(info, dict)  # a sync client's reply
        memory = info.get("used_memory_human", "?")
    finally:
        client.close()
    click.echo(f"running at {state.url} (pid {state.pid}, since {state.started}); {keys:,} keys, "
               f"{memory} used; files in {state.dir}")


@redis.command("start")
@REPO_OPTION
def redis_start(repo: Path | None) -> None:
    """Start the local server now (nothing happens if it already runs)."""
    local = _local(repo)
    before = local.status()
    state = local.ensure()
    click.echo(f"{'already running' if before else 'started'} at {state.url} (pid {state.pid}); files in {state.dir}")


@redis.command("stop")
@REPO_OPTION
def redis_stop(repo: Path | None) -> None:
    """Stop the local server, saving its snapshot first (the data is back on the next start)."""
    local = _local(repo)
    state = local.stop()
    if state is None:
        click.echo("the local redis-server was not running")
    else:
        click.echo(f"stopped the local redis-server (pid {state.pid}); its data is saved in {state.dir}")


@click.command()
@click.option("--port", type=int, default=8888, show_default=True, help="Port of Jupyter on 127.0.0.1.")
@click.option("--no-browser", is_flag=True, help="Do not open a browser.")
@click.option("--execute", "execute", is_flag=True,
              help="Run every notebook top to bottom in place of opening Jupyter (exit 1 on an error).")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Notebooks folder (default: notebooks/ beside the repo, else ./notebooks).")
@REPO_OPTION
def notebooks(port: int, no_browser: bool, execute: bool, folder: Path | None, repo: Path | None) -> None:
    """Open the data-science notebooks in Jupyter on 127.0.0.1, with the repo set.

    Run `make demo` first: the notebooks read its training data and its online store. The
    kernel finds the repo through FEATUREPIPE_REPO (set here) and the online store as every
    featurepipe command does (REDIS_URL, else the repo's local redis-server, started now).
    """
    from featurepipe.config import find_repo, load_store, online_connection_string

    repo_path = find_repo(repo)
    if folder is None:
        folder = next((f for f in (repo_path.parent / "notebooks", Path.cwd() / "notebooks") if f.is_dir()),
                      repo_path.parent / "notebooks")
    folder = folder.resolve()
    if not folder.is_dir():
        raise click.ClickException(f"no notebooks folder at {folder}; pass --dir")
    store = load_store(repo_path)
    if not store.list_feature_views():
        raise click.ClickException("the registry is empty: run `make demo` (or `featurepipe apply` "
                                   "and `featurepipe backfill`) first")
    online_connection_string(store.config)  # start the local server before the kernels need it
    env = {**os.environ, "FEATUREPIPE_REPO": str(repo_path)}
    if execute:
        sys.exit(_execute_all(sorted(folder.glob("*.ipynb")), env))
    try:
        import jupyterlab  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            "Jupyter is not installed in this environment: run `make notebooks` (it installs the "
            "`notebooks` extra), or `pip install -e '.[notebooks]'`"
        ) from exc
    cmd = [sys.executable, "-m", "jupyter", "lab", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={folder}"]
    if no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI machines often run as root
    click.echo(f"Jupyter on http://127.0.0.1:{port}/ (notebooks in {folder}); Ctrl-C stops it")
    sys.exit(subprocess.call(cmd, env=env, cwd=folder))


def _execute_all(paths: list[Path], env: dict[str, str]) -> int:
    """Run each notebook in a kernel with ``env``; print one line per notebook."""
    import time

    import nbformat
    from nbclient import NotebookClient

    failed = 0
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        for path in paths:
            t0 = time.perf_counter()
            notebook = nbformat.read(path, as_version=4)
            try:
                NotebookClient(notebook, timeout=600, kernel_name="python3",
                               resources={"metadata": {"path": str(path.parent)}}).execute()
                click.echo(f"ok      {path.name} ({time.perf_counter() - t0:.0f}s)")
            except Exception as exc:  # a failing cell, a dead kernel, a timeout: report, go on
                failed += 1
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                click.echo(f"FAILED  {path.name}: {lines[-1]}")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return 1 if failed else 0
