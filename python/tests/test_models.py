"""Whole moeforge models in PyTorch against the CLI and a PyTorch reference (docs/python.md)."""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moeforge
from conftest import CLI, ROOT

sys.path.insert(0, str(ROOT / "scripts" / "golden"))
from transformer import attention, rms_norm  # noqa: E402  (the golden files' PyTorch reference)


def checkpoint_of(run: pathlib.Path) -> pathlib.Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def reference_logits(sd, cfg, tokens):
    """The transformer of scripts/golden/transformer.py over a checkpoint's tensors, in float64, top-K
    routing as moeforge's topk router defines it."""
    d = torch.float64
    p = {k: v.to(d) for k, v in sd.items()}
    m, moe = cfg["model"], cfg["moe"]
    B, S = tokens.shape
    C, H = m["d_model"], m["n_head"]
    Dh = C // H
    inv = m["rope_theta"] ** (-torch.arange(0, Dh, 2, dtype=d) / Dh)
    ang = torch.outer(torch.arange(S, dtype=d), inv)
    cos, sin = ang.cos(), ang.sin()
    x = p["embedding"][tokens]
    for i in range(m["n_layer"]):
        pre = f"blocks.{i}."
        x = x + attention(rms_norm(x, p[pre + "attn_norm.weight"], m["norm_eps"]), p[pre + "attn.w_qkv"],
                          p[pre + "attn.w_out"], H, cos, sin)
        h = rms_norm(x, p[pre + "ffn_norm.weight"], m["norm_eps"]).reshape(B * S, C)
        probs = torch.softmax(h @ p[pre + "moe.router.weight"].t(), -1)
        g, e = probs.topk(moe["n_expert_used"], -1)
        g = g / g.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        for k in range(g.shape[1]):
            wg, wu, wd = (p[pre + "moe.experts." + n][e[:, k]] for n in ("w_gate", "w_up", "w_down"))
            a = F.silu(torch.einsum("tfc,tc->tf", wg, h)) * torch.einsum("tfc,tc->tf", wu, h)
            y = y + g[:, k:k + 1] * torch.einsum("tcf,tf->tc", wd, a)
        x = x + y.view(B, S, C)
    x = rms_norm(x, p["final_norm.weight"], m["norm_eps"])
    return x @ p["embedding"].t()


def config_of(ckpt: pathlib.Path) -> dict:
    import tomllib
    return tomllib.loads((ckpt / "config.toml").read_text())


def test_a_cli_checkpoint_gives_the_reference_logits(topk_run):
    ckpt = checkpoint_of(topk_run)
    model = moeforge.load(str(ckpt))
    tokens = torch.randint(0, 128, (2, 10))
    logits, aux, routing = model(tokens)
    ref = reference_logits(model.state_dict(), config_of(ckpt), tokens)
    # float32 model against the float64 reference: ~1e-5 relative error accumulates over 2 layers.
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-4)
    assert len(routing) == 2


def test_state_dict_and_save_round_trip_through_the_cli(topk_run, tmp_path):
    a = moeforge.load(str(checkpoint_of(topk_run)))
    b = moeforge.load(str(checkpoint_of(topk_run)))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 128, (2, 8))
    assert torch.equal(a(tokens)[0], b(tokens)[0])
    a.save(str(tmp_path / "saved"))
    r = subprocess.run([CLI, "eval", "--checkpoint", str(tmp_path / "saved"), "--batches", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "validation: loss" in r.stdout
    c = moeforge.load(str(tmp_path / "saved"))
    assert torch.equal(a(tokens)[0], c(tokens)[0])


def test_generation_equals_the_cli(topk_run):
    ckpt = checkpoint_of(topk_run)
    model = moeforge.load(str(ckpt))
    ours = model.generate("the cat", max_tokens=8, temperature=0.0)
    r = subprocess.run([CLI, "generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--max-tokens", "8",
                        "--temperature", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ours == r.stdout.rstrip("\n")
    with pytest.raises(ValueError, match="temperature"):
        model.generate("the cat", temperature=float("nan"))


def cpu_has_bf16() -> bool:
    r = subprocess.run([CLI, "info"], capture_output=True, text=True)
    return r.returncode == 0 and "bf16: none" not in r.stdout


def test_bf16_inference_is_the_clis(topk_run, tmp_path):
    ckpt = checkpoint_of(topk_run)
    with pytest.raises(ValueError, match="dtype"):
        moeforge.load(str(ckpt), dtype="bf17")
    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="dtype"):
            moeforge.load(str(ckpt), dtype="bf16")
        return
    model = moeforge.load(str(ckpt), dtype="bf16")
    params = dict(model.named_parameters())
    assert params["embedding"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in params.items() if "router" in n or "norm" in n)
    ours = model.generate("the cat", max_tokens=8, temperature=0.0)
    r = subprocess.run([CLI, "generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--max-tokens", "8",
                        "--temperature", "0", "--dtype", "bf16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ours == r.stdout.rstrip("\n")
    with pytest.raises(ValueError, match="float32 master weights"):
        model.save(str(tmp_path / "never-written"))
    assert not (tmp_path / "never-written").exists()


def test_a_python_training_loop_gives_the_cli_losses_and_router_state(loss_free_run):
    # The CLI's own run (6 steps, loss-free routing, log_every 1) against a plain Python loop over the same
    # data, initialisation, optimiser and schedule: the same C++ arithmetic, so bit-identical losses and bias.
    ckpt = checkpoint_of(loss_free_run)
    config = (ckpt / "config.toml").read_text()
    cfg = config_of(ckpt)
    tc = cfg["train"]
    data = moeforge.Data.prepare(config)
    model = moeforge.build(data, config, seed=tc["seed"])
    train_opts = {k: tc[k] for k in ("lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "adam_eps",
                                     "steps")}
    opt = moeforge.AdamW(model, **train_opts)
    batches = moeforge.Batcher(data, tc["batch_size"], tc["seed"])
    losses = []
    for step in range(tc["steps"]):
        lr = moeforge.learning_rate(step, **train_opts)
        loss, aux, token_loss = model.training_loss(next(batches))
        (loss + aux).backward()
        moeforge.add_token_loss(model, token_loss)
        moeforge.clip_grad_norm(model, tc["grad_clip"])
        opt.step(lr)
        moeforge.after_step(model)
        opt.zero_grad()
        losses.append(loss.item())
    cli = [json.loads(l)["loss"] for l in (loss_free_run / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "train"]
    assert losses == cli
    trained = moeforge.load(str(ckpt))
    ours, theirs = model.state_dict(), trained.state_dict()
    bias = [k for k in theirs if k.endswith("router.bias")]
    assert bias
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
