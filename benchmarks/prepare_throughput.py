"""Corpus preparation throughput (MB/s, tokens/s) for a few budgets: JSON lines, then a table.

    .venv/bin/python benchmarks/prepare_throughput.py [--budgets 2e6,2e7]
"""

import argparse
import json
import tempfile
from pathlib import Path

from fedjax_code.config import DataConfig
from fedjax_code.data.prepare import prepare, read_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="2e6,2e7", help="comma-separated --max-bytes values")
    parser.add_argument("--unit", default="file", choices=["file", "function"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (int(float(b)) for b in args.budgets.split(",")):
            out = prepare(DataConfig(max_bytes=budget, unit=args.unit), Path(tmp) / str(budget), progress=False)
            s = read_stats(out)
            row = {k: s[k] for k in ("records", "bytes", "tokens", "groups", "seconds", "mb_per_s", "tokens_per_s")}
            rows.append({"max_bytes": budget, "unit": args.unit, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'max_bytes':>10} {'records':>8} {'MB':>7} {'tokens':>10} {'s':>7} {'MB/s':>6} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['max_bytes']:>10} {r['records']:>8} {r['bytes'] / 1e6:>7.2f} {r['tokens']:>10} "
              f"{r['seconds']:>7.2f} {r['mb_per_s']:>6.2f} {r['tokens_per_s']:>10}")


if __name__ == "__main__":
    main()
