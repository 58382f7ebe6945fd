"""Throughput and peak memory of `vlmfit prepare` on a generated image-folder dataset, at two sizes, against
datasets' own imagefolder loader (baseline) in the same run. Each measurement runs in a fresh child process and
reports that process's peak RSS (VmHWM) and its peak anonymous memory (RssAnon, sampled every 20 ms). RSS also
counts pages of the memory-mapped Arrow files the run reads back, which grow with the dataset but are page cache,
not held data; RssAnon is the heap: what "holds decoded images in memory" would show up in.

    python benchmarks/prepare.py --sizes 20000 100000 --workdir /tmp/vlmfit-bench-prepare
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = {
    "vlmfit": (
        "from vlmfit.config import DataConfig; from vlmfit.data.prepare import prepare\n"
        "r = prepare(DataConfig(source={src!r}), {out!r}); print(r['kept'], r['skipped'])\n"
    ),
    "datasets imagefolder": (
        "import datasets; datasets.disable_progress_bars()\n"
        "d = datasets.load_dataset('imagefolder', data_dir={src!r}, cache_dir={out!r}+'-cache', split='train')\n"
        "d.save_to_disk({out!r}); print(len(d), 0)\n"
    ),
}


SAMPLER = (
    "import threading, time\n"
    "peak = [0]\n"
    "def _sample():\n"
    "    while True:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('RssAnon:'): peak[0] = max(peak[0], int(line.split()[1]))\n"
    "        time.sleep(0.02)\n"
    "threading.Thread(target=_sample, daemon=True).start()\n"
)


def make_folder(root: Path, n: int, classes: int = 10, side: int = 32) -> None:
    """n random-noise PNGs in `classes` class folders (content is irrelevant to throughput; count and size matter)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"class{i % classes}" / f"{i:06d}.png")


def measure(name: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + "-cache", ignore_errors=True)
    code = SAMPLER + CHILD[name].format(src=str(src), out=str(out))
    # The child prints its own peak RSS (ru_maxrss, KiB on Linux) and peak RssAnon (KiB) after the work.
    code += "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak[0])\n"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_DATASETS_OFFLINE": "1", "PATH": ""})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    lines = r.stdout.split("\n")
    kept, skipped = map(int, lines[-3].split())
    rss, anon = map(int, lines[-2].split())
    return {"tool": name, "kept": kept, "skipped": skipped, "seconds": round(wall, 1),
            "rows_per_s": round((kept + skipped) / wall, 1), "peak_rss_mib": round(rss / 1024, 1),
            "peak_anon_mib": round(anon / 1024, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vlmfit-bench-prepare"))
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        src = args.workdir / f"folder-{n}"
        if not src.exists():
            t0 = time.perf_counter()
            make_folder(src, n)
            print(f"generated {n} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for name in CHILD:
            res = {"rows": n, **measure(name, src, args.workdir / f"out-{n}-{name.split()[0]}")}
            print(json.dumps(res), file=sys.stderr)
            results.append(res)
    print("| rows | tool | kept | seconds | rows/s | peak RSS (MiB) | peak RssAnon (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['tool']} | {r['kept']:,} | {r['seconds']} | {r['rows_per_s']} | {r['peak_rss_mib']} | {r['peak_anon_mib']} |")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
