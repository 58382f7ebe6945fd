"""The charts-vqa figures by question kind, against chance, from a finished run's eval_after.json: colour questions
(tallest / shortest bar, one of three colours) and value questions (a number 10-99, exact and within 5%), with what a
uniform guess in 10-99 and the best constant guess would score on the same value questions.

    vlmfit train charts-vqa [--set train.seed=1]
    python benchmarks/charts_breakdown.py runs/RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vlmfit.evaluate.tasks import exact_match, relaxed_accuracy

VALUES = [str(v) for v in range(10, 100)]  # builtin:charts draws bars of 10-99


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    result = json.loads((args.run_dir / "eval_after.json").read_text())
    pairs = list(zip(result["gold"], result["generate"]["answers"]))
    colour = [(g, a) for g, a in pairs if not g.isdigit()]
    value = [(g, a) for g, a in pairs if g.isdigit()]

    def score(metric, rows):
        return 100 * statistics.fmean(metric(a, [g]) for g, a in rows)

    print(f"colour questions ({len(colour)}): {score(exact_match, colour):.1f}% (chance 33.3%)")
    print(f"value questions ({len(value)}): exact {score(exact_match, value):.1f}%, "
          f"relaxed {score(relaxed_accuracy, value):.1f}%")
    golds = [g for g, _ in value]
    uniform = [statistics.fmean(m(v, [g]) for v in VALUES for g in golds) * 100 for m in (exact_match, relaxed_accuracy)]
    print(f"  uniform guess in 10-99: exact {uniform[0]:.1f}%, relaxed {uniform[1]:.1f}%")
    best = max(VALUES, key=lambda v: (statistics.fmean(relaxed_accuracy(v, [g]) for g in golds), v))
    print(f"  best constant guess ({best}): exact {score(exact_match, [(g, best) for g in golds]):.1f}%, "
          f"relaxed {score(relaxed_accuracy, [(g, best) for g in golds]):.1f}%")


if __name__ == "__main__":
    main()
