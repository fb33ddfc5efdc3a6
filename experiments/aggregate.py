"""Aggregate sweeps: outputs/**/summary.csv -> test-results/summary.csv, plots, report.html.

python experiments/aggregate.py                 # every tag under outputs/
python experiments/aggregate.py --tag default study --out test-results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rag.harness.report import aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="sweep folders")
    parser.add_argument("--tag", nargs="*", default=None, help="only these tags (default: all)")
    parser.add_argument("--out", type=Path, default=Path("test-results"), help="where to write")
    args = parser.parse_args()
    table = aggregate(args.outputs, args.out, args.tag)
    print(f"{len(table)} points -> {args.out}/summary.csv, report.html and plots")


if __name__ == "__main__":
    main()
