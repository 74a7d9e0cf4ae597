"""Helper of tests/slurm/run.sh: set up the small study twice, then compare the two runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests"))

KEYS = ["aa", "bb", "cc"]
# differ between any two runs: when, where and in which SLURM job
VOLATILE = {"wall_time_s", "slurm_job_id"}
LOCAL_RULES = {"aggregate.log", "figures.log"}


def setup(*workdirs: str) -> None:
    from helpers import pairwise_study, synthetic_data_dir

    for workdir in map(Path, workdirs):
        workdir.mkdir(parents=True)
        synthetic_data_dir(workdir, {k: 50 for k in KEYS})
        (workdir / "config.yaml").write_text((ROOT / "config.yaml").read_text())
        (workdir / "tiny.yaml").write_text(yaml.safe_dump(pairwise_study(KEYS, trials=1)))


def check(cluster: str, local: str, cluster_log: str) -> None:
    cluster, local = Path(cluster), Path(local)
    logs = [p for p in (cluster / "results" / "logs").rglob("*.log") if p.name not in LOCAL_RULES]
    outside = [str(p) for p in logs if "running in SLURM job" not in p.read_text()]
    assert logs and not outside, f"jobs that did not run under sbatch: {outside}"
    submitted = [line for line in Path(cluster_log).read_text().splitlines() if "SLURM" in line]
    runs = pd.read_csv(cluster / "results" / "tables" / "runs.csv")
    assert runs["slurm_job_id"].notna().all(), "a training run without a SLURM job id"
    print(
        f"{len(logs)} job logs, all under SLURM; {runs['slurm_job_id'].nunique()} SLURM jobs "
        f"ran the {len(runs)} training runs ({len(submitted)} SLURM lines in the log)"
    )
    tables = sorted(p.name for p in (local / "results" / "tables").glob("*.csv"))
    for name in tables:
        a = pd.read_csv(cluster / "results" / "tables" / name)
        b = pd.read_csv(local / "results" / "tables" / name)
        a = a.drop(columns=[c for c in a.columns if c in VOLATILE])
        b = b.drop(columns=[c for c in b.columns if c in VOLATILE])
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    summary = [(d / "results" / "tables" / "summary.md").read_text() for d in (cluster, local)]
    assert summary[0] == summary[1], "summary.md differs"
    print(f"tables identical to the local run: {', '.join(tables)}, summary.md")


if __name__ == "__main__":
    {"setup": setup, "check": check}[sys.argv[1]](*sys.argv[2:])
