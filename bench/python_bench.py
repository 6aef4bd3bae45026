"""moeforge from Python against plain PyTorch, ratios in one run (docs/python.md, "Speed").

    .venv/bin/python bench/python_bench.py [--reps 9] [--steps 40] [--json FILE]

1. The layer: moeforge.MoE (top-2) forward+backward against the Hugging Face-style Mixtral block a user
   writes in plain PyTorch (router softmax, top-k, a loop over experts with index_add), with the same
   weights, at the default model's MoE shape (2048 tokens of d_model 128, 16 experts of 172, top-2) and a
   wide one (2048 tokens of 512, 16 experts of 688, top-2). Interleaved, median of --reps after a warm-up.
2. The training loop: tokens/s of a plain Python loop over moeforge's model, data, optimiser and schedule
   against `moeforge train` (the CLI, its own process) on the same config for --steps steps.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import moeforge

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python" / "tests"))
from test_layers import PlainMixtralBlock  # noqa: E402  (the user's block of the tests)


def interleaved(fns, reps):
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:  # each round starts one later
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def layer_bench(name, C, E, F_, K, T, reps):
    torch.manual_seed(0)
    ours = moeforge.MoE(C, E, K, F_, router="topk", balance_coef=0.0, z_loss_coef=0.0)
    plain = PlainMixtralBlock(C, F_, E, K)
    sd = ours.state_dict()
    with torch.no_grad():
        plain.gate.weight.copy_(sd["router.weight"])
        for e, ex in enumerate(plain.experts):
            ex["w1"].weight.copy_(sd["experts.w_gate"][e])
            ex["w3"].weight.copy_(sd["experts.w_up"][e])
            ex["w2"].weight.copy_(sd["experts.w_down"][e])
    x = torch.randn(T // 128, 128, C)

    def run(m):
        def f():
            xi = x.clone().requires_grad_()
            y = m(xi)[0]
            y.sum().backward()
        return f

    a, b_, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    ms = interleaved({"moeforge.MoE": run(ours), "plain Mixtral block": run(plain),
                      "sgemm 1024^3": lambda: torch.mm(a, b_, out=c)}, reps)
    # The experts' matmul work: 3 GEMMs of C x F per assignment, forward and twice that backward.
    gflop = 2 * 3 * C * F_ * T * K * 3 / 1e9
    rate = {k: gflop / (ms[k] / 1e3) for k in ("moeforge.MoE", "plain Mixtral block")}
    sgemm = 2 * 1024 ** 3 / 1e9 / (ms["sgemm 1024^3"] / 1e3)
    out = {"shape": name, "tokens": T, "d_model": C, "experts": E, "d_expert": F_, "k": K, "ms": ms,
           "expert_gflop": gflop, "gflop_per_s": rate, "sgemm_gflop_per_s": sgemm,
           "speedup": ms["plain Mixtral block"] / ms["moeforge.MoE"]}
    print(f"{name}: moeforge.MoE {ms['moeforge.MoE']:.2f} ms ({rate['moeforge.MoE']:.0f} GFLOP/s of expert work), "
          f"plain Mixtral block {ms['plain Mixtral block']:.2f} ms ({rate['plain Mixtral block']:.0f} GFLOP/s); "
          f"sgemm {sgemm:.0f} GFLOP/s (forward+backward, {T} tokens): {out['speedup']:.2f}x", flush=True)
    return out


def loop_bench(steps):
    import tomllib
    sets = {"moe__router": "topk", "train__steps": steps, "train__log_every": steps, "train__eval_every": 0,
            "train__eval_batches": 1}
    with tempfile.TemporaryDirectory() as tmp:
        cli = os.environ.get("MOEFORGE_CLI", str(ROOT / "build" / "moeforge"))
        args = [cli, "train", "--out", tmp + "/run", "--no-report", "--overwrite"]
        for k, v in sets.items():
            args += ["--set", k.replace("__", ".", 1) + "=" + (json.dumps(v) if isinstance(v, str) else str(v))]
        subprocess.run(args, check=True, capture_output=True)
        rows = [json.loads(l) for l in open(tmp + "/run/metrics.jsonl")]
        cli_tok_s = [r for r in rows if r["split"] == "train"][-1]["tokens_per_s"]
    data = moeforge.Data.prepare("", **sets)
    model = moeforge.build(data, "", seed=1, **sets)
    tc = tomllib.loads(model.config_toml())["train"]
    opts = {k: tc[k] for k in ("lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "adam_eps", "steps")}
    opt = moeforge.AdamW(model, **opts)
    batches = moeforge.Batcher(data, tc["batch_size"], tc["seed"])
    start, tokens = time.perf_counter(), 0
    for step in range(steps):
        batch = next(batches)
        loss, aux, token_loss = model.training_loss(batch)
        (loss + aux).backward()
        moeforge.add_token_loss(model, token_loss)
        moeforge.clip_grad_norm(model, tc["grad_clip"])
        opt.step(moeforge.learning_rate(step, **opts))
        moeforge.after_step(model)
        opt.zero_grad()
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    py_tok_s = tokens / (time.perf_counter() - start)
    out = {"steps": steps, "cli_tokens_per_s": cli_tok_s, "python_tokens_per_s": py_tok_s, "ratio": py_tok_s / cli_tok_s}
    print(f"training loop (default model, topk, {steps} steps): Python {py_tok_s:.0f} tokens/s, CLI {cli_tok_s:.0f} "
          f"tokens/s: {out['ratio']:.2f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json")
    a = ap.parse_args()
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")},
              "layer": [layer_bench("default", 128, 16, 172, 2, 2048, a.reps),
                        layer_bench("wide", 512, 16, 688, 2, 2048, a.reps)],
              "loop": loop_bench(a.steps)}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
