"""Collation speed of the label paths, in one run on the same examples: the structural default (special-token check +
one marker per assistant turn, else turn-by-turn rendering), the marker search alone (what vlmfit did before labels
came from structure: no check, no count), and turn-by-turn rendering for every example (the prefix method).

    python benchmarks/label_speed.py --family smolvlm --examples 400 --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from helpers import multi_turn_example  # noqa: E402

from vlmfit.chat.collate import VisionChatCollator  # noqa: E402
from vlmfit.data.builtin import load_builtin  # noqa: E402
from vlmfit.models.families import FAMILIES  # noqa: E402
from vlmfit.models.load import load_processor, resolve_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="smolvlm")
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    proc = load_processor(resolve_reference(f"tiny:{args.family}"))
    family = FAMILIES[args.family]
    mnist = load_builtin("mnist")["train"]
    single = [mnist[i] for i in range(args.examples)]
    multi = [multi_turn_example() for _ in range(args.examples // 4)]

    structural = VisionChatCollator(proc, family)
    markers_only = VisionChatCollator(proc, family)
    markers_only.check_content = lambda ex, where: None  # the old path: search markers, trust what is found
    markers_only._reply_mask = lambda ex, ids, valid: markers_only.assistant_mask(ids, valid)
    prefix = VisionChatCollator(proc, family, label_method="prefix")
    paths = {"structural (default)": structural, "marker search only (old)": markers_only, "prefix rendering": prefix}

    for name, data in (("single-turn digits", single), ("two-turn, two images", multi)):
        print(f"\n{args.family}, {name}: {len(data)} examples, batch {args.batch}, median of {args.repeats} passes")
        base = None
        for label, coll in paths.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for i in range(0, len(data), args.batch if name.startswith("single") else 1):
                    coll(data[i:i + (args.batch if name.startswith("single") else 1)])
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = base or med
            print(f"  {label:28s} {len(data) / med:8.1f} examples/s   {med / base:5.2f}x the default's time")


if __name__ == "__main__":
    main()
