"""Scale benchmark: the Taobao pipeline (synth -> tokenize -> pack) on Taobao-shaped logs of growing size,
beside the floor: DuckDB alone doing the core relational work of tokenize on the same file (read, drop
users with < 5 events, dense vocabularies, sort by (user, timestamp), per-user offsets).

Each step runs in a fresh process that reports its own wall time and peak RSS, so the figures are what
`lumctl tokenize` / `lumctl pack` cost on this machine.

    python benchmarks/bench_scale.py --rows 1e6,1e7,1e8 --workdir /tmp/lumctl-scale
    python benchmarks/bench_scale.py --rows 1e8 --log /data/UserBehavior.csv   # a given Taobao-format file

Writes benchmarks/results/scale.json (one record per size) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = textwrap.dedent("""
    import json, resource, sys, time
    started = time.time()
    {body}
    print(json.dumps({{"wall_s": round(time.time() - started, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}}))
""")

FLOOR = """
import duckdb, os
con = duckdb.connect(sys.argv[2])
con.execute("SET memory_limit = '{memory_gb}GB'; SET threads = {threads}; SET preserve_insertion_order = true")
con.execute("SET enable_progress_bar = false")
con.execute(f\"\"\"CREATE TABLE raw AS SELECT * FROM read_csv('{{sys.argv[1]}}', header = false, auto_detect = false,
    columns = {{{{'user': 'BIGINT', 'item': 'BIGINT', 'category': 'BIGINT', 'behavior': 'VARCHAR', 'timestamp': 'BIGINT'}}}},
    ignore_errors = true)\"\"\")
con.execute("CREATE TABLE users AS SELECT user, row_number() OVER (ORDER BY user) - 1 AS code, n FROM "
            "(SELECT user, count(*) AS n FROM raw GROUP BY user HAVING count(*) >= 5)")
con.execute("CREATE TABLE items AS SELECT item, row_number() OVER (ORDER BY item) + 1 AS code FROM "
            "(SELECT DISTINCT item FROM raw SEMI JOIN users USING (user))")
offsets = con.sql("SELECT sum(n) OVER (ORDER BY code) FROM users").fetchnumpy()
rel = con.sql("SELECT u.code, i.code, r.timestamp FROM raw r JOIN users u USING (user) JOIN items i USING (item) "
              "ORDER BY u.code, r.timestamp")
reader = rel.to_arrow_reader(1 << 22) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(1 << 22)
n = sum(b.num_rows for b in reader)
"""


def step(body: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", STEP.format(body=textwrap.indent(body, "").strip()), *args],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"step failed:\n{p.stderr[-3000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def spec_text(work: Path, rows: int, log: str | None, memory_gb: float) -> str:
    synth = "" if log else f'[synth]\nkind = "taobao"\nrows = {rows}\n'
    path = log or str(work / "stores" / "scale" / "synth" / "UserBehavior.csv")
    return textwrap.dedent(f"""\
        experiment = "scale"
        store_root = "{work / 'stores'}"
        {synth}
        [tokenize]
        format = "taobao"
        path = "{path}"
        conditions = [
          {{ name = "behavior", source = "column", column = "behavior" }},
          {{ name = "category", source = "column", column = "category" }},
        ]
        min_user_events = 5
        memory_gb = {memory_gb}
        split = {{ kind = "time", valid_from = 1512144000, test_from = 1512230400 }}

        [pack]
        seq_len = 4096
        max_items = 500
        """)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e6,1e7,1e8", help="comma-separated log sizes")
    ap.add_argument("--workdir", default="/tmp/lumctl-scale", help="where logs and stores go (needs ~40 bytes/row)")
    ap.add_argument("--log", default=None, help="use this Taobao-format file instead of synthesizing one")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="[tokenize] memory_gb (and the floor's DuckDB limit)")
    ap.add_argument("--keep", action="store_true", help="keep the stores of the last size")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    a = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    results = []
    for rows in [int(float(r)) for r in a.rows.split(",")]:
        work = Path(a.workdir) / f"rows-{rows}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        spec = work / "spec.toml"
        spec.write_text(spec_text(work, rows, a.log, a.memory_gb))
        rec = {"rows": rows, "cpus": threads, "memory_gb": a.memory_gb}
        run = "from lumctl.specs import load_spec\nfrom {m} import run\nrun(load_spec(sys.argv[1]))"
        if not a.log:
            rec["synth"] = step(run.format(m="lumctl.synth"), str(spec))
        log = a.log or str(work / "stores" / "scale" / "synth" / "UserBehavior.csv")
        rec["log_bytes"] = Path(log).stat().st_size
        rec["floor_duckdb"] = step(FLOOR.format(memory_gb=a.memory_gb, threads=threads), log, str(work / "floor.duckdb"))
        (work / "floor.duckdb").unlink(missing_ok=True)
        rec["tokenize"] = step(run.format(m="lumctl.stages.tokenize"), str(spec))
        rec["pack"] = step(run.format(m="lumctl.stages.pack"), str(spec))
        man = json.loads((work / "stores" / "scale" / "tokenize" / "manifest.json").read_text())["counts"]
        rec["counts"] = {k: man[k] for k in ("users", "items", "events", "duplicate_events", "malformed_rows")}
        pm = json.loads((work / "stores" / "scale" / "pack" / "manifest.json").read_text())["counts"]
        rec["pack_counts"] = {k: pm.get(k) for k in ("rows", "tokens", "efficiency")}
        rec["tokenize_over_floor"] = round(rec["tokenize"]["wall_s"] / rec["floor_duckdb"]["wall_s"], 2)
        results.append(rec)
        print(json.dumps(rec), flush=True)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = {"machine": f"{platform.node()} ({threads} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB)",
           "python": platform.python_version(), "results": results}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| rows | floor (DuckDB) s / GiB | tokenize s / GiB | tokenize / floor | pack s / GiB |\n|---|---|---|---|---|")
    for r in results:
        f, t, p = r["floor_duckdb"], r["tokenize"], r["pack"]
        print(f"| {r['rows']:,} | {f['wall_s']} / {f['peak_rss_gib']} | {t['wall_s']} / {t['peak_rss_gib']} | "
              f"{r['tokenize_over_floor']} | {p['wall_s']} / {p['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
