"""Fixtures of the Python package's tests (docs/python.md): a tiny text corpus and checkpoints trained by the
CLI (MOEFORGE_CLI, set by CTest; else the build tree's)."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLI = os.environ.get("MOEFORGE_CLI", str(ROOT / "build" / "moeforge"))


def tiny_corpus(root: pathlib.Path) -> pathlib.Path:
    """Two domains of templated sentences (the C++ tests' tiny corpus, test_util.cpp)."""
    animals = ["cat", "dog", "bird", "fox", "horse", "mouse"]
    verbs = ["sees", "chases", "likes", "follows"]
    tools = ["hammer", "saw", "drill", "wrench", "chisel"]
    acts = ["cuts", "holds", "turns", "breaks"]
    for f in range(6):
        for domain in ("animals", "tools"):
            d = root / domain
            d.mkdir(parents=True, exist_ok=True)
            a = domain == "animals"
            text = "".join(
                f"the {animals[(i + f) % 6] if a else tools[(i + f) % 5]} {verbs[i % 4] if a else acts[i % 4]} the "
                f"{animals[(i * 7 + f) % 6] if a else tools[(i * 3 + f) % 5]}. " for i in range(60))
            (d / f"doc{f}.txt").write_text(text)
    return root


def tiny_sets(corpus: pathlib.Path, data_dir: pathlib.Path, extra=()):
    """--set overrides of the tests' tiny model (test_util.cpp's tiny_run_overrides)."""
    return ["model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=48", "model.moe_every=1",
            "moe.n_expert=4", "moe.d_expert=24", "train.steps=6", "train.batch_size=4", "train.lr=1e-2",
            "train.warmup=2", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1", "train.threads=2",
            f'data.corpus="text:{corpus}"', f'data.dir="{data_dir}"', "data.vocab_size=128",
            "data.byte_fallback=false",  # no room for 256 byte pieces, whatever a config's default says
            "data.seq_len=16",
            "data.validation_fraction=0.2", "data.heldout_genres=[]"] + list(extra)


def train_cli(out: pathlib.Path, sets):
    args = [CLI, "train", "--out", str(out), "--no-report", "--overwrite"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def topk_run(tmp_path_factory, corpus, data_dir):
    out = tmp_path_factory.mktemp("runs") / "topk"
    return train_cli(out, tiny_sets(corpus, data_dir, ['moe.router="topk"']))


@pytest.fixture(scope="session")
def loss_free_run(tmp_path_factory, corpus, data_dir):
    out = tmp_path_factory.mktemp("runs") / "loss_free"
    return train_cli(out, tiny_sets(corpus, data_dir, ['moe.router="loss_free"', "moe.bias_update_rate=0.01"]))
