"""What the processor cache saves per batch: the demo's collation (tiny Qwen2-VL, builtin:mnist digits, batches of
8) four ways, in one process: the plain batch collator (one processor call per batch), examples encoded one processor
call each, cache misses (one call per batch's misses, split per example, written as safetensors), hits from disk (a
new cache object on the same directory, nothing in memory) and hits from memory.

    python benchmarks/collate_cache.py [--examples 256] [--batch 8] [--repeats 5]

Prints the median milliseconds per batch over `--repeats` passes (misses: one pass per fresh directory).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.chat.rows import EncodedCache, RowCollator, processor_fingerprint
    from vlmfit.data.builtin import load_builtin
    from vlmfit.models.load import load

    loaded = load("tiny:qwen2_vl")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    ds = load_builtin("mnist")["train"].select(range(args.examples))
    examples = [ds[i] for i in range(len(ds))]
    batches = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    chat(batches[0])  # the processor's first call pays one-off costs
    fp = processor_fingerprint(chat)

    def per_batch(fn) -> float:
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        return (time.perf_counter() - t0) / len(batches) * 1e3

    results: dict[str, list[float]] = {k: [] for k in ("plain batch collator", "one processor call per example",
                                                       "cache misses", "hits from disk", "hits from memory")}
    for _ in range(args.repeats):
        results["plain batch collator"].append(per_batch(chat))
        results["one processor call per example"].append(per_batch(lambda b: [chat([ex]) for ex in b]))
        root = tempfile.mkdtemp()
        results["cache misses"].append(per_batch(RowCollator(chat, EncodedCache(root, fp))))
        warm = RowCollator(chat, EncodedCache(root, fp))
        results["hits from disk"].append(per_batch(warm))
        results["hits from memory"].append(per_batch(warm))
    print(f"tiny:qwen2_vl, {args.examples} digits, batches of {args.batch}, median of {args.repeats} passes\n")
    print("| collation | ms per batch |\n|---|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
