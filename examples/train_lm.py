"""A plain PyTorch training loop over Brown with a moeforge router (docs/python.md).

    .venv/bin/python examples/train_lm.py [--steps 200] [--router loss_free] [--set section__key=value ...]

The model, data, batches, optimiser and schedule are moeforge's (the ones `moeforge train` uses, so the
losses are the CLI's for the same config and seed); the loop itself is PyTorch: forward, backward, step.
It prints what the CLI prints: a progress line every train.log_every steps, the evaluation at the end, a
sample. With --torch-adamw the optimiser is torch.optim.AdamW instead (the same update up to the order of
the weight decay and the Adam step, so the losses drift apart in the last bits).
"""
import argparse
import math
import time

import torch

import moeforge


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--router", default="topk")
    ap.add_argument("--torch-adamw", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="section__key=value, e.g. data__seq_len=64")
    args = ap.parse_args()
    sets = {"moe__router": args.router, "train__steps": args.steps}
    for s in args.set:
        k, v = s.split("=", 1)
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        sets[k] = v

    data = moeforge.Data.prepare("", **sets)
    model = moeforge.build(data, "", seed=1, **sets)
    cfg = model.config_toml()
    import tomllib
    tc = tomllib.loads(cfg)["train"]
    opts = {k: tc[k] for k in ("lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "adam_eps",
                               "steps")}
    if args.torch_adamw:
        # moeforge's rule (nanoGPT's): matrices decay, norms and vectors do not.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=tc["lr"],
                                betas=(tc["beta1"], tc["beta2"]), eps=tc["adam_eps"])
    else:
        opt = moeforge.AdamW(model, **opts)
    batches = moeforge.Batcher(data, tc["batch_size"], tc["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters; router {args.router}; {torch.get_num_threads()} threads")
    start, tokens = time.perf_counter(), 0
    for step in range(tc["steps"]):
        lr = moeforge.learning_rate(step, **opts)
        batch = next(batches)
        loss, aux, token_loss = model.training_loss(batch)
        (loss + aux).backward()
        moeforge.add_token_loss(model, token_loss)
        moeforge.clip_grad_norm(model, tc["grad_clip"])
        if args.torch_adamw:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            opt.step(lr)
            opt.zero_grad()
        moeforge.after_step(model)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        if (step + 1) % tc["log_every"] == 0 or step + 1 == tc["steps"]:
            rate = tokens / (time.perf_counter() - start)
            print(f"train [{step + 1}/{tc['steps']}] | loss {loss.item():.3f} | {rate / 1000:.1f}k tok/s", flush=True)
    model.eval()
    val, _, _ = data.split("validation")
    with torch.no_grad():
        total, n = 0.0, 0
        for i in range(0, min(len(val), tc["batch_size"] * tc["eval_batches"]), tc["batch_size"]):
            b = val[i:i + tc["batch_size"]]
            logits, _, _ = model(b[:, :-1])
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            n += b[:, 1:].numel()
    print(f"eval @{tc['steps']}: validation loss {total / n:.4f} (ppl {math.exp(total / n):.2f})")
    print("sample:", model.generate("The jury said", max_tokens=48, seed=7))


if __name__ == "__main__":
    main()
