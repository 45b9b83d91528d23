"""Several ``featurepipe`` commands in one Python process, each with a result of its own.

Every ``python -m featurepipe.cli ...`` process pays Feast's import (5-7 s here, more on a
loaded machine). Tests that check several read-only commands on the same data run them one
after another in one process instead: each command still gets its own exit code, stdout and
stderr, captured at the file descriptors (so what C libraries or child processes write is
caught too), starts from the environment and working folder the process started with, and
an uncaught exception prints its traceback and gives exit code 1, as the interpreter would.
A command a test checks keeps a process of its own when it reads what the previous one wrote
(a backfill after an apply, an index after an index), starts a server or handles signals; a
fixture may run its setup steps together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any


def run_commands(commands: list[tuple[str, ...]], env: dict[str, str] | None = None,
                 timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Each of ``commands`` (the arguments after ``featurepipe``) run in order in one fresh
    process with ``env``; their results in the order given, as ``subprocess.run`` gives them."""
    with tempfile.TemporaryDirectory(prefix="cli-batch-") as folder:
        spec, out = Path(folder) / "commands.json", Path(folder) / "results.json"
        spec.write_text(json.dumps([list(args) for args in commands]))
        done = subprocess.run([sys.executable, __file__, str(spec), str(out)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0 and out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
        results = json.loads(out.read_text())
    return [subprocess.CompletedProcess(["featurepipe", *r["args"]], r["returncode"], r["stdout"], r["stderr"])
            for r in results]


def _run_one(main: Any, args: list[str]) -> dict[str, Any]:
    """One command with fds 1 and 2 pointed at files of its own, and the environment and
    working folder the process started with (a command that sets a variable, as
    ``export_redis_env`` does, does not set it for the next one)."""
    environ, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                main.main(args=args, prog_name="featurepipe")
                code = 0
            except SystemExit as exc:  # click's standalone mode ends every command this way
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001  (what the interpreter does with it)
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.environ.clear()
            os.environ.update(environ)
            os.chdir(cwd)
        out.seek(0)
        err.seek(0)
        return {"args": args, "returncode": code, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    from featurepipe.cli import main as featurepipe_main

    commands = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps([_run_one(featurepipe_main, args) for args in commands]))
