"""Summary of scripts/interop/decode_bench.sh's decode.jsonl: each engine and weight type's min / median /
max tokens/s, and moeforge's speed over llama.cpp's paired within each repetition (which ran them back to
back), for the same weight type and for the others (docs/interop.md, "Decode speed").
    python3 scripts/interop/decode_summary.py DECODE.jsonl
"""
import json
import statistics
import sys


def spread(v):
    return "%.1f / %.1f / %.1f" % (min(v), statistics.median(v), max(v))


def main():
    rows = [json.loads(line) for line in open(sys.argv[1])]
    keys = sorted({(r["engine"], r["weights"]) for r in rows}, key=lambda k: (k[0] != "moeforge", k[1]))
    by = {k: {r["rep"]: r["tokens_per_s"] for r in rows if (r["engine"], r["weights"]) == k} for k in keys}
    print("engine    weights  min / median / max tokens/s")
    for k in keys:
        print("%-9s %-7s  %s" % (k[0], k[1], spread(list(by[k].values()))))
    print("moeforge / llama.cpp, paired by repetition: min / median / max (repetitions moeforge is ahead)")
    for ours in ("fp32", "bf16"):
        for theirs in ("f32", "bf16", "f16", "q8_0"):
            a, b = by.get(("moeforge", ours)), by.get(("llama.cpp", theirs))
            if not a or not b:
                continue
            ratios = [a[r] / b[r] for r in sorted(a) if r in b]
            ahead = sum(x >= 1 for x in ratios)
            print("  moeforge %-4s / llama.cpp %-4s  %.2f / %.2f / %.2f  (%d of %d)" %
                  (ours, theirs, min(ratios), statistics.median(ratios), max(ratios), ahead, len(ratios)))


if __name__ == "__main__":
    main()
