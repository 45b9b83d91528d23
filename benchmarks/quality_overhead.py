"""Overhead of the data quality gates on a backfill of the demo-size data.

Generates the demo data (1M transactions, 30 days) into a temporary copy of the feature
repo, registers it with ``feast apply`` (online store switched to SQLite: a backfill never
touches it), then backfills every view with and without the gates, alternating, and
prints the median wall time of each, the ratio, and how long the checks themselves took
(schema, row-level checks, volume, freshness, and the per-day statistics with the anomaly
detector judging every day: stored statistics are removed before each gated run). The
gated runs also write the run log, the Prometheus textfile and OpenLineage events.

    .venv/bin/python benchmarks/quality_overhead.py                 # 1M rows, 3 rounds
    .venv/bin/python benchmarks/quality_overhead.py --rows 200000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        repo, data = Path(tmp) / "feature_repo", Path(tmp) / "data"
        shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
        yaml = (repo / "feature_store.yaml").read_text()
        yaml = re.sub(r"online_store:\n(  .*\n)+", "online_store:\n  type: sqlite\n  path: online.db\n", yaml)
        (repo / "feature_store.yaml").write_text(yaml)
        env = {**os.environ, "FEATUREPIPE_DATA_DIR": str(data), "FEATUREPIPE_REPO": str(repo)}
        os.environ.update(FEATUREPIPE_DATA_DIR=str(data), FEATUREPIPE_REPO=str(repo))
        bin_dir = Path(sys.executable).parent
        t0 = time.perf_counter()
        subprocess.run([str(bin_dir / "featurepipe"), "generate", "--rows", str(args.rows),
                        "--out", str(data / "raw" / "transactions"), "--repo", str(repo)], env=env, check=True)
        subprocess.run([str(bin_dir / "feast"), "--chdir", str(repo), "apply"], env=env, check=True,
                       capture_output=True)
        print(f"setup (generate + feast apply): {time.perf_counter() - t0:.1f}s")

        from featurepipe.config import load_store
        from featurepipe.jobs.backfill import backfill
        from featurepipe.quality.runlog import read_runs

        store = load_store(repo)
        backfill(store, progress=False, quality=False)  # warm the page cache and imports
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeat):
            for quality in ((False, True) if i % 2 == 0 else (True, False)):
                # no stored statistics: every gated run judges every day (as a first run does)
                shutil.rmtree(data / "runs" / "stats", ignore_errors=True)
                t = time.perf_counter()
                backfill(store, progress=False, quality=quality)
                times[quality].append(time.perf_counter() - t)
        run = read_runs(data)[-1]
        checks = sum(i.check_seconds for i in run.inputs) + sum(o.check_seconds for o in run.outputs)
        plain, gated = statistics.median(times[False]), statistics.median(times[True])
        print(f"rows {args.rows:,}, rounds {args.repeat} (median seconds)")
        print(f"backfill without gates: {plain:.2f}s  {[round(t, 2) for t in times[False]]}")
        print(f"backfill with gates:    {gated:.2f}s  {[round(t, 2) for t in times[True]]}")
        print(f"ratio with/without:     {gated / plain:.3f}  (overhead {100 * (gated / plain - 1):+.1f}%)")
        fastest = min(times[True]) / min(times[False])
        print(f"fastest with/without:   {fastest:.3f}  (overhead {100 * (fastest - 1):+.1f}%; on a noisy machine "
              "the check time below is the steadier figure)")
        print(f"checks inside the last gated run: {checks:.2f}s = {100 * checks / plain:.1f}% of the ungated median "
              f"(raw {sum(i.check_seconds for i in run.inputs):.2f}s, "
              f"features {sum(o.check_seconds for o in run.outputs):.2f}s), "
              f"{len(run.checks)} checks, {sum(not c.passed for c in run.checks)} failed")
        anomalies = [c for c in run.checks if c.check.startswith("anomaly")]
        print(f"anomaly checks: {len(anomalies)} (columns and tables), days judged "
              f"{sum(int(c.detail.split(' day(s) judged')[0].rsplit(' ', 1)[-1]) for c in anomalies if c.passed)}"
              f", failed: {[(c.table, c.column, c.detail[:160]) for c in anomalies if not c.passed]}")


if __name__ == "__main__":
    main()
