"""moeforge in PyTorch (docs/python.md).

Every router of moeforge's registry as an ``nn.Module`` layer (:class:`MoE`), a drop-in for Hugging Face's
Mixtral block (:class:`MixtralSparseMoeBlock`), whole moeforge models (:func:`load`, :func:`build`), the
routing measures, and the trainer's own pieces (:class:`AdamW`, :func:`learning_rate`, :class:`Batcher`) for a
plain PyTorch training loop that reproduces ``moeforge train``.

The tensors of these modules are the C++ modules' own: PyTorch's optimisers, ``state_dict`` and autograd see
the same storage and the same gradients, and a module's parameter and buffer names are the C++ checkpoint's.
"""
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import _C

__all__ = [
    "MoE", "MixtralSparseMoeBlock", "RoutingResult", "LanguageModel", "routers", "after_step", "add_token_loss",
    "load", "build", "Data", "Batcher", "AdamW", "learning_rate", "clip_grad_norm", "max_vio", "specialization",
    "causal_leak", "optimality_gap",
]

_C.init_threads(0)  # LibTorch defaults to one thread on some machines; moeforge uses the cores it may use
if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
    warnings.warn("moeforge: OMP_WAIT_POLICY is not PASSIVE, so LibTorch's OpenMP threads and OpenBLAS's spin "
                  "against each other on the CPU (a plain Python training loop ran at 0.40 of the CLI's speed so, "
                  "0.92 with it: docs/python.md, \"Speed\"). Set OMP_WAIT_POLICY=PASSIVE and "
                  "OPENBLAS_THREAD_TIMEOUT=16 before Python starts; the .venv that make python builds does.",
                  RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------------------
# Configuration: keyword arguments named like the config keys (docs/routing.md), as TOML overrides.

def _toml(value, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v, name) for v in value) + "]"
    raise TypeError(f"{name}: expected a bool, int, float, str or list, got {type(value).__name__}")


def routers() -> List[dict]:
    """Every registered router: ``name``, ``summary`` and its own ``options`` with their defaults (TOML
    literals). The keys every router reads are in ``common_options()``."""
    return [dict(r) for r in _C.routers()]


def common_options() -> Dict[str, str]:
    """The MoE keys every router reads (widths, score, capacity, aux-loss coefficients, ...) and their defaults."""
    return dict(_C.common_options())


def _moe_overrides(router: str, options: dict, fixed: dict) -> List[str]:
    table = {r["name"]: r for r in _C.routers()}
    if not isinstance(router, str):
        raise TypeError(f"router must be a str, got {type(router).__name__}")
    if router not in table:
        raise ValueError(f"router {router!r} is not one of: {', '.join(table)}")
    known = set(_C.common_options())
    for r in table.values():
        known |= set(r["options"])
    for key in options:
        if key not in known:
            raise TypeError(f"unexpected option {key!r} (router {router!r} takes: "
                            f"{', '.join(sorted(table[router]['options']))}; every router takes: "
                            f"{', '.join(sorted(_C.common_options()))})")
    merged = dict(options)
    merged.update(fixed)
    out = [f"moe.router={json.dumps(router)}"]
    out += [f"moe.{k}={_toml(v, k)}" for k, v in merged.items()]
    return out


# ---------------------------------------------------------------------------------------------------------
# Mirroring a C++ module's tensors into an nn.Module tree with the same names.

def _container(root: nn.Module, dotted: str):
    parts = dotted.split(".")
    m = root
    for p in parts[:-1]:
        if p not in m._modules:
            m.add_module(p, nn.Module())
        m = m._modules[p]
    return m, parts[-1]


def _attach(root: nn.Module, named_parameters, named_buffers, prefix_skip: str = "") -> None:
    for name, t in named_parameters:
        if prefix_skip and name.startswith(prefix_skip):
            continue
        t._is_param = True  # the C++ tensor itself becomes the nn.Parameter (torch.nn.parameter._ParameterMeta)
        mod, leaf = _container(root, name)
        mod.register_parameter(leaf, t)
    for name, t in named_buffers:
        mod, leaf = _container(root, name)
        mod.register_buffer(leaf, t)


def _resync_buffers(root: nn.Module, named_buffers) -> None:
    for name, t in named_buffers:
        mod, leaf = _container(root, name)
        if mod._buffers.get(leaf) is not t:
            mod._buffers[leaf] = t


class _Mirror(nn.Module):
    """An nn.Module whose tensors are a C++ module's: conversions (``.double()``, ``.to()``) change the
    tensors in place, so the C++ side keeps using the same ones."""

    def _apply(self, fn):
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None:
                    p.data = fn(p.data)
                    if p.grad is not None:
                        p.grad.data = fn(p.grad.data)
            for b in m._buffers.values():
                if b is not None:
                    b.data = fn(b.data)
        return self


# ---------------------------------------------------------------------------------------------------------
# The routing result of one forward.

@dataclass
class RoutingResult:
    """What the router decided for one forward (docs/routing.md, section 0).

    ``aux_loss`` is differentiable (add it to the task loss); ``token_index``, ``expert_offsets`` and ``gate``
    are the assignments grouped by expert (``gate`` differentiable); the rest are measures of this batch.
    """
    aux_loss: torch.Tensor
    token_index: torch.Tensor
    expert_offsets: torch.Tensor
    gate: torch.Tensor
    load: List[int]
    max_vio: float
    dropped_share: float
    n_tokens: int
    tokens_without_expert: float
    router_logits: Optional[torch.Tensor] = None
    plan: object = field(default=None, repr=False)

    @staticmethod
    def of(plan, router_logits=None) -> "RoutingResult":
        s = plan.stats
        n_tokens = int(s["n_tokens"])
        served = plan.token_index.unique().numel() if plan.token_index.numel() else 0
        return RoutingResult(aux_loss=plan.aux_loss, token_index=plan.token_index,
                             expert_offsets=plan.expert_offsets, gate=plan.gate, load=list(s["load"]),
                             max_vio=float(s["max_vio"]), dropped_share=float(s["dropped_share"]),
                             n_tokens=n_tokens,
                             tokens_without_expert=(1.0 - served / n_tokens) if n_tokens else 0.0,
                             router_logits=router_logits, plan=plan)


# ---------------------------------------------------------------------------------------------------------
# Layers.

class MoE(_Mirror):
    """A moeforge MoE layer: router -> dispatch -> experts -> combine, with moeforge's fused CPU kernels.

    ``MoE(d_model, n_expert, n_expert_used=2, d_expert=None, router="topk", **options)``; ``options`` are the
    router's config keys (``moeforge.routers()`` lists them; ``capacity_factor``, ``balance_coef``, ... are
    common). ``d_expert`` defaults to ``4 * d_model``.

    ``forward(x, prompt_len=None) -> (y, RoutingResult)`` for ``x`` [B, S, C] (or [T, C]); ``prompt_len`` [B]
    is the prompt length of each row, for routers that pool prompts (MoCE's ``moce_pool="prompt"``).
    Training mode follows ``self.training``. Routers with state (loss-free bias, BIP dual, expert-choice
    thresholds, reliabilities, centroids) learn from every training forward since the last
    ``moeforge.after_step(model)``, which a training loop calls once after ``optimizer.step()``.
    """

    def __init__(self, d_model: int, n_expert: int, n_expert_used: int = 2, d_expert: Optional[int] = None,
                 router: str = "topk", **options):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_expert", n_expert), ("n_expert_used", n_expert_used)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if d_expert is None:
            d_expert = 4 * d_model
        fixed = {"n_expert": n_expert, "n_expert_used": n_expert_used, "d_expert": d_expert}
        for k in fixed:
            if k in options:
                raise TypeError(f"{k} is a positional argument of MoE, not an option")
        self._layer = _C.Layer(_moe_overrides(router, options, fixed), d_model)
        self.d_model = d_model
        self.router_name = router
        _attach(self, self._layer.named_parameters(), self._layer.named_buffers())

    def forward(self, x: torch.Tensor, prompt_len: Optional[torch.Tensor] = None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        y, plan = self._layer.forward(x, prompt_len, self.training)
        return y, RoutingResult.of(plan)

    # -- the router's own statistics (ClusterMoE's get_expert_utilization / get_reliability_stats) --------
    def router_state(self) -> dict:
        """The router's state as ``moeforge inspect`` prints it (pruned experts, utilisation, reliability,
        thresholds, bias, dual, centroid sizes)."""
        return json.loads(self._layer.describe_state())

    def _clusters(self) -> list:
        s = self.router_state()
        if "summary" not in s or "clusters" not in s["summary"]:
            raise ValueError(f"router {self.router_name!r} has no clusters of experts (the hierarchical router has)")
        return s["summary"]

    def get_expert_utilization(self) -> dict:
        """The hierarchical router's utilisation since its counters were last reset (ClusterMoE's method):
        assignments and share per expert and per cluster, and MaxVio of each."""
        s = self._clusters()
        return {"experts": {e["id"]: {"load": e["load"], "share": e["share"]} for c in s["clusters"]
                            for e in c["experts"]},
                "clusters": {c["id"]: {"load": c["load"], "share": c["share"]} for c in s["clusters"]},
                "max_vio_expert": s["max_vio_expert"], "max_vio_cluster": s["max_vio_cluster"]}

    def get_reliability_stats(self) -> dict:
        """The hierarchical router's reliability of every expert and cluster, in (0, 1] (ClusterMoE's method;
        docs/routing.md section 5)."""
        s = self._clusters()
        return {"experts": {e["id"]: e["reliability"] for c in s["clusters"] for e in c["experts"]},
                "clusters": {c["id"]: c["reliability"] for c in s["clusters"]}}

    def token_clusters(self, result: RoutingResult) -> Optional[torch.Tensor]:
        """The cluster each token of ``result`` was routed in, for routers that assign one (MoCE), else None."""
        t = self._layer.token_clusters(result.plan)
        return t if t is not None and t.numel() else None

    def _after_step(self):
        self._layer.after_step()
        _resync_buffers(self, self._layer.named_buffers())

    def _add_token_loss(self, token_loss: torch.Tensor):
        self._layer.add_token_loss(token_loss.detach().reshape(-1))


class _ExpertMLP(nn.Module):
    """One expert in Hugging Face's Mixtral layout: w1 (gate) and w3 (up) [F, C], w2 (down) [C, F]."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        self.w1 = nn.Linear(w_gate.shape[1], w_gate.shape[0], bias=False)
        self.w3 = nn.Linear(w_up.shape[1], w_up.shape[0], bias=False)
        self.w2 = nn.Linear(w_down.shape[1], w_down.shape[0], bias=False)
        with torch.no_grad():
            self.w1.weight.copy_(w_gate)
            self.w3.weight.copy_(w_up)
            self.w2.weight.copy_(w_down)


class MixtralSparseMoeBlock(_Mirror):
    """A drop-in for Hugging Face's ``MixtralSparseMoeBlock`` with any moeforge router.

    ``state_dict`` names are Hugging Face's (``gate.weight`` [E, C] for the token-choice routers,
    ``experts.{e}.w1.weight`` [F, C], ``experts.{e}.w2.weight`` [C, F], ``experts.{e}.w3.weight`` [F, C]);
    ``forward(hidden_states [B, S, C]) -> (hidden_states [B, S, C], router_logits [B*S, E])``. The experts are
    per-expert parameters as in Hugging Face; each forward stacks them for moeforge's grouped kernels (a copy
    of the expert weights per call).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_local_experts: int,
                 num_experts_per_tok: int, router: str = "topk", **options):
        super().__init__()
        options.setdefault("balance_coef", 0.0)  # Hugging Face adds its own aux loss from router_logits
        options.setdefault("z_loss_coef", 0.0)
        self.hidden_dim = hidden_size
        self.ffn_dim = intermediate_size
        self.num_experts = num_local_experts
        self.top_k = num_experts_per_tok
        self._moe = MoE(hidden_size, num_local_experts, num_experts_per_tok, intermediate_size, router=router,
                        **options)
        # Hugging Face names: the router's tensors under "gate", the experts as a ModuleList of MLPs.
        self.gate = nn.Module()
        _attach(self.gate, [(n[len("router."):], p) for n, p in self._moe._layer.named_parameters()
                            if n.startswith("router.")],
                [(n[len("router."):], b) for n, b in self._moe._layer.named_buffers() if n.startswith("router.")])
        # The pruning mask (all ones unless pruned) is no Hugging Face tensor: kept out of the state_dict so
        # that a Mixtral checkpoint loads strictly. A stateful router's own state (a loss-free bias, ...) stays.
        if "expert_active" in self.gate._buffers:
            self.gate._non_persistent_buffers_set.add("expert_active")
        e = dict(self._moe._layer.named_parameters())
        self.experts = nn.ModuleList(_ExpertMLP(e["experts.w_gate"][i], e["experts.w_up"][i], e["experts.w_down"][i])
                                     for i in range(num_local_experts))
        # The C++ experts' own stacked weights are not this block's parameters: each forward passes the stack.
        self._moe_modules = [self._moe]

    def forward(self, hidden_states: torch.Tensor):
        moe = self._moe_modules[0]
        w_gate = torch.stack([m.w1.weight for m in self.experts])
        w_up = torch.stack([m.w3.weight for m in self.experts])
        w_down = torch.stack([m.w2.weight for m in self.experts])
        y, plan = moe._layer.forward(hidden_states, None, self.training, w_gate, w_up, w_down)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        weight = getattr(self.gate, "weight", None)
        logits = flat @ weight.t() if weight is not None and weight.dim() == 2 else plan.scores
        self.last_routing = RoutingResult.of(plan, logits)
        return y, logits

    def _after_step(self):
        self._moe_modules[0]._after_step()

    def _add_token_loss(self, token_loss):
        self._moe_modules[0]._add_token_loss(token_loss)

    # nn.Module would otherwise register the inner MoE (and its stacked expert tensors) as a child.
    def __setattr__(self, name, value):
        if name == "_moe":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def _stateful(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (MoE, MixtralSparseMoeBlock, LanguageModel))]


def after_step(model: nn.Module) -> None:
    """The routers' state update of one optimiser step (docs/routing.md, "State updates"): call once after
    ``optimizer.step()``. Every moeforge layer in ``model`` hands its router what the training forwards since
    the last call taught it (all micro-batches of a gradient-accumulation step)."""
    for m in _stateful(model):
        m._after_step()


def add_token_loss(model: nn.Module, token_loss: torch.Tensor) -> None:
    """The per-token loss [B*S] of the last training forward, for routers that learn from it (reliability
    tracking); call after each forward, before ``after_step``."""
    for m in _stateful(model):
        m._add_token_loss(token_loss)


# ---------------------------------------------------------------------------------------------------------
# Whole models.

class LanguageModel(_Mirror):
    """A moeforge language model (the transformer with MoE layers of ``moeforge train``) as an nn.Module.

    Parameter and buffer names are the checkpoint's, so ``state_dict()`` / ``load_state_dict()`` round-trip
    with moeforge checkpoints and ``save(dir)`` writes one the CLI reads.
    """

    def __init__(self, core):
        super().__init__()
        self._core = core
        _attach(self, core.named_parameters(), core.named_buffers())

    def forward(self, tokens: torch.Tensor, prompt_len: Optional[torch.Tensor] = None):
        """tokens [B, S] int64 -> (logits [B, S, V], aux_loss, routing results of the MoE layers)."""
        logits, aux, plans = self._core.forward(tokens, self.training, prompt_len)
        return logits, aux, [RoutingResult.of(p) for p in plans]

    def training_loss(self, tokens: torch.Tensor):
        """The trainer's loss of a batch [B, S+1] (next-token cross-entropy) and its aux loss, and the
        per-token loss for ``add_token_loss``: exactly what ``moeforge train`` computes."""
        return _C.training_loss(self._core, tokens, self.training)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0, ignore_eos: bool = False) -> str:
        """The prompt continued (with the tokenizer's <s>; </s> ends it unless ignore_eos), KV-cached."""
        ids = self._core.encode(prompt)
        out = self._core.generate(ids, max_tokens, temperature, top_p, seed, -1 if ignore_eos else self._core.eos_id())
        if out and out[-1] == self._core.eos_id():
            out = out[:-1]
        before = self._core.decode(ids)
        whole = self._core.decode(ids + list(out))
        return prompt + (whole[len(before):] if whole.startswith(before) else self._core.decode(list(out)))

    def config_toml(self) -> str:
        return self._core.config_toml()

    def save(self, directory: str, step: int = 0) -> None:
        """Writes a moeforge checkpoint (config.toml, tokenizer.model, model.safetensors) the CLI reads."""
        self._core.save(directory, step)

    def _after_step(self):
        self._core.after_step()
        _resync_buffers(self, self._core.named_buffers())

    def _add_token_loss(self, token_loss):
        self._core.add_token_loss(token_loss.detach().reshape(-1))


def load(checkpoint_dir: str, dtype: str = "fp32") -> LanguageModel:
    """A checkpoint folder (or a run's checkpoints/ folder) as a :class:`LanguageModel` in eval mode.

    ``dtype="bf16"`` stores the matrix weights in bf16 for inference (``generate --dtype bf16``; routers and
    norms stay float32; on CPUs with bf16 products only, else ``ValueError``); such a model cannot be saved
    or trained. ``"auto"``: the precision the checkpoint was trained in."""
    if not isinstance(checkpoint_dir, str):
        raise TypeError(f"checkpoint_dir must be a str, got {type(checkpoint_dir).__name__}")
    m = LanguageModel(_C.Model.load(checkpoint_dir, dtype))
    m.eval()
    return m


class Data:
    """A run config's data: the split, the tokenizer and the packed sequences ``moeforge train`` uses."""

    def __init__(self, core):
        self._core = core

    @staticmethod
    def prepare(config: str = "", **sets) -> "Data":
        """``config``: TOML text ("" = the embedded default); ``sets``: ``{"data.seq_len": 64, ...}`` style
        overrides given as ``section__key=value`` keyword arguments (``data__seq_len=64``)."""
        return Data(_C.Data.prepare(config, _overrides(sets)))

    def split(self, which: str = "train"):
        """(tokens [N, S+1] int64, domain id [N], domain names) of "train", "validation" or "heldout"."""
        if which not in ("train", "validation", "heldout"):
            raise ValueError(f"which must be 'train', 'validation' or 'heldout', got {which!r}")
        return self._core.split(which)

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size()


def _overrides(sets: dict) -> List[str]:
    out = []
    for k, v in sets.items():
        if "__" not in k:
            raise TypeError(f"{k!r}: overrides are section__key=value (e.g. train__steps=10)")
        out.append(k.replace("__", ".", 1) + "=" + _toml(v, k))
    return out


def build(data: Data, config: str = "", seed: int = 1, **sets) -> LanguageModel:
    """A fresh model of a run config (``config`` TOML text, "" = the embedded default, plus ``sets``
    overrides as in :meth:`Data.prepare`) initialised as ``moeforge train`` initialises it with ``train.seed =
    seed``, with the tokenizer of ``data``."""
    core = _C.Model.build(config, _overrides(sets), data.vocab_size, seed)
    core.set_tokenizer(data._core)
    m = LanguageModel(core)
    m.train()
    return m


class Batcher:
    """The trainer's batches: a seeded shuffle per epoch over the training sequences, the ones ``moeforge
    train`` draws for the same data, batch size and ``train.seed``."""

    def __init__(self, data: Data, batch_size: int, seed: int):
        self._core = _C.Batcher(data._core, batch_size, seed)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self._core.next()


class AdamW:
    """moeforge's AdamW (decoupled weight decay on matrices, the trainer's exact update) over a model's
    parameters; ``options`` are ``train`` keys (lr, weight_decay, beta1, beta2, adam_eps, ...). ``step(lr)``
    takes the learning rate of the step (``learning_rate``)."""

    def __init__(self, model: nn.Module, **options):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._core = _C.AdamW(params, [f"train.{k}={_toml(v, k)}" for k, v in options.items()])

    def step(self, lr: float) -> None:
        self._core.step(lr)

    def zero_grad(self) -> None:
        self._core.zero_grad()


def learning_rate(step: int, **options) -> float:
    """The trainer's learning rate at ``step`` (linear warm-up, cosine to ``min_lr_ratio``) for ``train``
    keys ``options`` (lr, warmup, steps, min_lr_ratio)."""
    return _C.learning_rate([f"train.{k}={_toml(v, k)}" for k, v in options.items()], step)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """The trainer's gradient clipping (global norm); returns the norm before clipping."""
    return _C.clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm)


# ---------------------------------------------------------------------------------------------------------
# Measures over routing results (docs/routing.md, section 9).

def max_vio(load: Sequence[float]) -> float:
    """MaxVio = (max load - mean load) / mean load."""
    return _C.max_violation([float(x) for x in load])


def specialization(domain_expert_counts: torch.Tensor):
    """I(domain; expert) / H(domain) and each expert's purity from a [D, E] count table."""
    if not isinstance(domain_expert_counts, torch.Tensor) or domain_expert_counts.dim() != 2:
        raise ValueError("domain_expert_counts must be a [D, E] tensor")
    return _C.specialisation(domain_expert_counts)


def causal_leak(layer: MoE, x: torch.Tensor, training: bool = False):
    """(same_row, other_rows, trials): the largest change of a layer's outputs at positions <= p when the
    inputs after p change, in the row itself and in the other rows (0 for a causal router)."""
    if not isinstance(layer, MoE):
        raise TypeError("causal_leak measures a moeforge.MoE layer")
    if x.dim() != 3:
        raise ValueError("x must be [B, S, C]")
    return layer._layer.causal_leak(x, training)


def optimality_gap(layer: MoE, x: torch.Tensor, result: RoutingResult, capacity: Optional[int] = None):
    """(optimum, router objective, gap, capacity violation) of the layer's assignments of ``x`` against the
    exact balanced optimum (GLPK), each router scoring its own assignments without bias."""
    if not isinstance(layer, MoE):
        raise TypeError("optimality_gap measures a moeforge.MoE layer")
    scores = layer._layer.assignment_scores(x, result.plan)
    T, E = scores.shape
    k = round(len(result.token_index) / max(T, 1)) or 1
    cap = capacity if capacity is not None else -(-T * k // E)
    return _C.optimality_gap(scores, result.plan, k, cap)
