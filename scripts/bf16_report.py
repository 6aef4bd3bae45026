"""The bf16-vs-fp32 accuracy comparison of scripts/bf16-accuracy.sh (docs/performance.md, "bf16 training:
accuracy"): runs OUT/<fp32|bf16>-seed<k>/metrics.jsonl, paired by seed.

Writes OUT/bf16-accuracy.json (per-seed final validation losses, the paired differences bf16 - fp32, their
mean and 95% Student-t interval, tokens/s) and OUT/bf16-loss.png (training loss of both precisions, mean
over seeds, and the validation points) through gnuplot, and prints a summary.

    /usr/bin/python3 scripts/bf16_report.py OUT
"""
import glob
import json
import math
import os
import re
import subprocess
import sys

from paired_t import paired_interval

def read(path):
    train, val = {}, {}
    tok = []
    with open(path) as f:
        for line in f:
            j = json.loads(line)
            if j.get("split") == "train":
                train[j["step"]] = j["loss"]
                if "tokens_per_s" in j:
                    tok.append(j["tokens_per_s"])
            elif j.get("split") == "validation":
                val[j["step"]] = j["loss"]
    return train, val, tok


def main():
    out = sys.argv[1]
    runs = {}
    for d in glob.glob(os.path.join(out, "*-seed*")):
        m = re.match(r"(fp32|bf16)-seed(\d+)$", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "metrics.jsonl")):
            runs[(m.group(1), int(m.group(2)))] = read(os.path.join(d, "metrics.jsonl"))
    seeds = sorted(s for (p, s) in runs if p == "fp32" and ("bf16", s) in runs)
    if not seeds:
        sys.exit(f"bf16_report: no seed with both an fp32 and a bf16 run under {out}")
    rows = []
    for s in seeds:
        (_, v32, t32), (_, v16, t16) = runs[("fp32", s)], runs[("bf16", s)]
        last = max(set(v32) & set(v16))
        rows.append({"seed": s, "step": last, "fp32": v32[last], "bf16": v16[last], "diff": v16[last] - v32[last],
                     "tokens_per_s_fp32": sorted(t32)[len(t32) // 2], "tokens_per_s_bf16": sorted(t16)[len(t16) // 2]})
    d = [r["diff"] for r in rows]
    n = len(d)
    ci = paired_interval(d)
    mean = ci["mean"]
    res = {"seeds": rows, "n": n, "mean_diff": mean}
    if ci["lo"] is not None:
        res.update({"sd_diff": ci["sd"], "ci95": [ci["lo"], ci["hi"]], "t_quantile": ci["t_quantile"]})
    with open(os.path.join(out, "bf16-accuracy.json"), "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        print(f"seed {r['seed']}: validation loss @{r['step']} fp32 {r['fp32']:.4f}  bf16 {r['bf16']:.4f}  "
              f"bf16 - fp32 {r['diff']:+.4f}  tokens/s {r['tokens_per_s_fp32']:.0f} / {r['tokens_per_s_bf16']:.0f}")
    if "ci95" in res:
        lo, hi = res["ci95"]
        print(f"paired difference bf16 - fp32: {mean:+.4f} nats, 95% t interval [{lo:+.4f}, {hi:+.4f}] "
              f"({n} seeds; perplexity ratio {math.exp(mean):.4f}, [{math.exp(lo):.4f}, {math.exp(hi):.4f}])")
    # Loss curves: mean over seeds of the training loss, and the validation points.
    data = os.path.join(out, "bf16-loss.dat")
    with open(data, "w") as f:
        for p in ("fp32", "bf16"):
            steps = sorted(set.intersection(*[set(runs[(p, s)][0]) for s in seeds]))
            for st in steps:
                f.write(f"{st} {sum(runs[(p, s)][0][st] for s in seeds) / n}\n")
            f.write("\n\n")
        for p in ("fp32", "bf16"):
            steps = sorted(set.intersection(*[set(runs[(p, s)][1]) for s in seeds]))
            for st in steps:
                f.write(f"{st} {sum(runs[(p, s)][1][st] for s in seeds) / n}\n")
            f.write("\n\n")
    png = os.path.join(out, "bf16-loss.png")
    script = f"""set terminal pngcairo size 900,520
set output '{png}'
set title 'default run, fp32 vs bf16 products, mean of {n} seeds'
set xlabel 'step'
set ylabel 'loss (nats)'
set yrange [3.5:7]
set key top right
plot '{data}' index 0 with lines lw 2 lc rgb '#1f77b4' title 'train fp32', \\
     '{data}' index 1 with lines lw 2 lc rgb '#d62728' title 'train bf16', \\
     '{data}' index 2 with linespoints pt 7 lc rgb '#1f77b4' title 'validation fp32', \\
     '{data}' index 3 with linespoints pt 5 lc rgb '#d62728' title 'validation bf16'
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    print(f"wrote {png} and {os.path.join(out, 'bf16-accuracy.json')}")


if __name__ == "__main__":
    main()
