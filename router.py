"""Expert-skipping policies: MoDES (arXiv 2511.15690), its ablations and the baselines it is compared with.

Every MoE layer routes with its model's own rule into a `Routing` record, then asks its `policy` module
which (token, slot) pairs to drop:

    weights, ids = policy(routing, modality, layer)    # same [T, K] shapes; a dropped slot has id SKIP, weight 0

Notable features:
- MoDES = GMLG + DMT: score s = alpha[layer, modality] * pi_hat, slot dropped iff s < tau_text / tau_vision,
  compared strictly in fp32. No minimum number of kept experts; kept weights are not renormalised.
- Ablations (Threshold, DMT with or without alpha) and the baselines of modes.md §8: ReduceK, NAEE, MCMoE, DiEP.
- SPECIAL tokens keep all k slots under every policy; decode tokens arrive as TEXT, so no policy needs a phase.
- Policies have static shapes and no host syncs, so a model that calls them compiles with fullgraph=True.
- install / uninstall swap policies by module replacement; SkipStats counts skipped slots on device.
- threshold_grid builds the rectified-sigmoid tau grid of the frontier search.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

SKIP = -1
TEXT, VISION, SPECIAL = 0, 1, 2
PHASES = ("prefill", "decode")

# T tokens, K top-k slots, E routed experts, L decoder layers


@dataclass
class Routing:
    """One MoE layer's routing for T tokens before any skipping."""
    weights: torch.Tensor                   # [T, K] fp32 final mixing coefficients (renormalised, routed-scaled)
    ids: torch.Tensor                       # [T, K] int64 expert ids, by descending selection score
    pi_hat: torch.Tensor                    # [T, K] fp32 top-k weights renormalised to sum 1, before routed scaling
    probs: torch.Tensor                     # [T, E] fp32 full distribution (Qwen softmax, Kimi sigmoid scores)
    importance: torch.Tensor | None = None  # [T] fp32 MC-MoE token importance (prefill only, else None)

    def __post_init__(self):
        if self.weights.ndim != 2:
            raise ValueError(f"Routing.weights has shape {tuple(self.weights.shape)}, expected (T, K)")
        T, K = self.weights.shape
        for name in ("ids", "pi_hat"):
            if getattr(self, name).shape != (T, K):
                raise ValueError(f"Routing.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {(T, K)} like Routing.weights")
        if self.probs.ndim != 2 or self.probs.shape[0] != T:
            raise ValueError(f"Routing.probs has shape {tuple(self.probs.shape)}, expected ({T}, E)")
        if self.importance is not None and self.importance.shape != (T,):
            raise ValueError(f"Routing.importance has shape {tuple(self.importance.shape)}, expected ({T},)")


def _check_modality(routing: Routing, modality: torch.Tensor):
    T = routing.ids.shape[0]
    if modality.shape != (T,):
        raise ValueError(f"modality has shape {tuple(modality.shape)}, expected ({T},) like Routing.ids")


def _per_layer(name: str, value, ndims: tuple) -> torch.Tensor:
    """A finite, non-negative fp32 table with one of the allowed numbers of dims (rows = decoder layers)."""
    table = torch.as_tensor(value, dtype=torch.float32)
    if table.ndim not in ndims:
        raise ValueError(f"{name} has shape {tuple(table.shape)}, expected {' or '.join(map(str, ndims))} dims")
    if not (torch.isfinite(table).all() and (table >= 0).all()):
        raise ValueError(f"{name} must be finite and >= 0")
    return table


def _fp32(name: str, table: torch.Tensor) -> torch.Tensor:
    # Module.to(dtype) casts float buffers too, which would silently coarsen the fp32 comparison
    if table.dtype != torch.float32:
        raise ValueError(f"{name} was cast to {table.dtype}; install policies after Module.to(dtype)")
    return table


def _layer_row(name: str, table: torch.Tensor, layer: int) -> torch.Tensor:
    if table.ndim == 0:
        return table
    if not 0 <= layer < table.shape[0]:
        raise ValueError(f"layer {layer} is out of range for {name} with {table.shape[0]} rows")
    return table[layer]


def _apply_skip(routing: Routing, modality: torch.Tensor, skip: torch.Tensor):
    """Drops the slots where skip [T, K] holds, except on SPECIAL tokens. Kept weights stay as they were."""
    skip = skip & (modality != SPECIAL)[:, None]
    return routing.weights.masked_fill(skip, 0.0), routing.ids.masked_fill(skip, SKIP)


# -----------------------------------------------------------------------------
# MoDES and its ablations


class FullTopK(nn.Module):
    """The unmodified model: every slot is kept."""

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        _check_modality(routing, modality)
        return routing.weights, routing.ids


class DMT(nn.Module):
    """Dual-modality thresholding: a slot of a text (vision) token is dropped iff its score s < tau_text (tau_vision).

    Without alpha, s = pi_hat ("DMT w/o GMLG"). With GMLG, s = alpha[layer, modality] * pi_hat for alpha [L, 2]
    (columns text, vision; the official code) or s = alpha[layer] * pi_hat for alpha [L] (the paper's Eq. 4).
    Rows are indexed by decoder layer; each column is used as given, already normalised over the MoE layers.
    pi_hat is renormalised over the top-k as in the official code; use_full_softmax scores with the full
    distribution at the top-k ids instead, as the paper's Eq. 3 writes it.
    """

    def __init__(self, tau_text: float, tau_vision: float, alpha=None, use_full_softmax: bool = False):
        super().__init__()
        for name, tau in (("tau_text", tau_text), ("tau_vision", tau_vision)):
            if math.isnan(float(tau)):
                raise ValueError(f"{name} is NaN")
        # a buffer, so search.py can move the thresholds in place without rebuilding or recompiling the model
        self.register_buffer("tau", torch.tensor([float(tau_text), float(tau_vision)], dtype=torch.float32))
        if alpha is not None:
            alpha = _per_layer("alpha", alpha, ndims=(1, 2))
            if alpha.ndim == 2 and alpha.shape[1] != 2:
                raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected [L] or [L, 2] (text, vision)")
        self.register_buffer("alpha", alpha)
        self.use_full_softmax = use_full_softmax

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        _check_modality(routing, modality)
        column = modality.clamp(max=VISION)  # [T] 0 text, 1 vision; SPECIAL rows are kept by _apply_skip anyway
        pi = routing.probs.gather(-1, routing.ids) if self.use_full_softmax else routing.pi_hat  # [T, K]
        score = pi.float()
        if self.alpha is not None:
            alpha = _layer_row("alpha", _fp32("alpha", self.alpha), layer)  # [2] per modality or [] per layer
            score = score * (alpha[column] if alpha.ndim else alpha.expand_as(column))[:, None]
        return _apply_skip(routing, modality, score < _fp32("tau", self.tau)[column][:, None])


class Threshold(DMT):
    """One threshold for text and vision tokens alike (the "Thresholding" ablation, +GMLG with alpha)."""

    def __init__(self, tau: float, alpha=None, use_full_softmax: bool = False):
        super().__init__(tau, tau, alpha, use_full_softmax)


class MoDES(DMT):
    """The full method, DMT with GMLG: alpha is required."""

    def __init__(self, tau_text: float, tau_vision: float, alpha, use_full_softmax: bool = False):
        if alpha is None:
            raise ValueError("MoDES needs alpha ([L] or [L, 2]); use DMT for thresholding without GMLG")
        super().__init__(tau_text, tau_vision, alpha, use_full_softmax)


# -----------------------------------------------------------------------------
# baselines (modes.md §8): none of them looks at modality beyond never dropping SPECIAL slots, except ReduceK's
# optional k_vision (the official gate_dict analysis)


class ReduceK(nn.Module):
    """Top-k' routing: keep the first k slots (k_vision for vision tokens), i.e. the k experts with the highest
    selection score, since ids arrive sorted. Not renormalised, like the official gate_dict."""

    def __init__(self, k: int, k_vision: int | None = None):
        super().__init__()
        k_vision = k if k_vision is None else k_vision
        for name, value in (("k", k), ("k_vision", k_vision)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.register_buffer("k", torch.tensor([k, k_vision]))

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        _check_modality(routing, modality)
        K = routing.ids.shape[1]
        rank = torch.arange(K, device=routing.ids.device)  # [K]
        keep_k = self.k[modality.clamp(max=VISION)]  # [T]
        return _apply_skip(routing, modality, rank[None, :] >= keep_k[:, None])


def _tail_skip(pi_sorted: torch.Tensor, order: torch.Tensor, ratio) -> torch.Tensor:
    """NAEE's top-k tail rule on descending pi_sorted [T, K]: find the first rank i whose tail mass
    sum_{u>=i} pi_(u) is below ratio_i * sum_v pi_(v), and drop ranks i..K. Returns skip [T, K] in slot order."""
    tail = pi_sorted.flip(-1).cumsum(-1).flip(-1)  # [T, K] tail[:, i] = sum_{u >= i} pi_(u)
    hit = tail < ratio * tail[:, :1]
    skip_sorted = hit.cumsum(-1) > 0  # everything behind the first qualifying rank goes too
    return torch.zeros_like(skip_sorted).scatter(-1, order, skip_sorted)


class NAEE(nn.Module):
    """NAEE adapted to top-k (modes.md §8.2): drop the longest low-probability tail whose share of the top-k mass
    is below beta[layer]. beta: one float for all layers or a tensor [L] (from the genetic search)."""

    def __init__(self, beta):
        super().__init__()
        self.register_buffer("beta", _per_layer("beta", beta, ndims=(0, 1)))

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        beta = _layer_row("beta", _fp32("beta", self.beta), layer)
        # pi_hat is sorted again because Kimi's slots are ordered by the bias-corrected score, not by pi
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        return _tail_skip(pi_sorted, order, beta)

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        _check_modality(routing, modality)
        return _apply_skip(routing, modality, self.skip_mask(routing, layer))


class MCMoE(NAEE):
    """MC-MoE's ODP skipping adapted to top-k (modes.md §8.3): the NAEE tail rule, plus, in prefill (when
    Routing.importance is given), the top protect_frac of the T tokens by importance keep all k slots and the
    bottom drop_frac lose all of them; protection wins where both apply.

    Unspecified by MoDES: both fractions. The defaults 0.1 / 0.1 and the floor int(frac * T) follow the official
    MC-MoE code (tau_h, tau_l). A layer range like the official block_range is expressed as beta = 0 there.
    Tokens are ranked over all T rows of the call, so the model should give padding rows importance -inf.
    """

    wants_importance = True  # asks the model to compute attention-based token importance in prefill

    def __init__(self, beta, protect_frac: float = 0.1, drop_frac: float = 0.1):
        super().__init__(beta)
        for name, frac in (("protect_frac", protect_frac), ("drop_frac", drop_frac)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {frac}")
        self.protect_frac, self.drop_frac = protect_frac, drop_frac

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        _check_modality(routing, modality)
        skip = self.skip_mask(routing, layer)  # [T, K]
        if routing.importance is not None:
            T = modality.shape[0]
            importance = routing.importance.float()
            none = torch.zeros(T, dtype=torch.bool, device=skip.device)
            dropped = none.scatter(0, importance.topk(int(self.drop_frac * T), largest=False).indices, True)  # [T]
            protected = none.scatter(0, importance.topk(int(self.protect_frac * T)).indices, True)  # [T]
            skip = (skip | dropped[:, None]) & ~protected[:, None]
        return _apply_skip(routing, modality, skip)


def diep_gamma(cka: torch.Tensor) -> torch.Tensor:
    """DiEP's gamma2 table [L, E, E]: the pairwise CKA of expert outputs divided by the layer's mean off-diagonal
    CKA, so a pair more alike than average gets gamma2 > 1. Layers whose CKA is all zero (dense) get ones."""
    if cka.ndim != 3 or cka.shape[1] != cka.shape[2] or cka.shape[1] < 2:
        raise ValueError(f"cka has shape {tuple(cka.shape)}, expected [L, E, E] with E >= 2")
    L, E, _ = cka.shape
    cka = cka.double()
    off_diagonal_mean = (cka.sum((1, 2)) - cka.diagonal(dim1=1, dim2=2).sum(1)) / (E * (E - 1))  # [L]
    gamma = cka / off_diagonal_mean.clamp(min=torch.finfo(torch.float64).tiny)[:, None, None]
    return torch.where((off_diagonal_mean == 0)[:, None, None], torch.ones_like(gamma), gamma).float()


class DiEP(NAEE):
    """DiEP's adaptive skipping adapted to top-k (modes.md §8.4): the NAEE tail rule with beta scaled per rank by
    gamma2(e_(1), e_(i)), the similarity of that rank's expert to the top expert (gamma [L, E, E], see diep_gamma).

    Unspecified by MoDES: the exact top-k form. We test each rank i >= 2 against beta[layer] * gamma2(e_(1), e_(i))
    and rank 1 against beta alone (it has no partner); the first qualifying rank drops its whole tail.
    """

    def __init__(self, beta, gamma: torch.Tensor):
        super().__init__(beta)
        gamma = _per_layer("gamma", gamma, ndims=(3,))
        if gamma.shape[1] != gamma.shape[2]:
            raise ValueError(f"gamma has shape {tuple(gamma.shape)}, expected [L, E, E]")
        self.register_buffer("gamma", gamma)

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        E = routing.probs.shape[1]
        if self.gamma.shape[1] != E:
            raise ValueError(f"gamma has {self.gamma.shape[1]} experts but Routing.probs has {E}")
        beta = _layer_row("beta", _fp32("beta", self.beta), layer)
        gamma = _layer_row("gamma", _fp32("gamma", self.gamma), layer)  # [E, E]
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        ids_sorted = routing.ids.gather(-1, order)  # [T, K] expert at each rank
        pair = gamma[ids_sorted[:, :1], ids_sorted]  # [T, K] gamma2(e_(1), e_(i))
        pair = torch.cat([torch.ones_like(pair[:, :1]), pair[:, 1:]], dim=-1)  # [T, K]
        return _tail_skip(pi_sorted, order, beta * pair)


# -----------------------------------------------------------------------------
# installing policies and counting what they skip


def install(model: nn.Module, policy_for_layer) -> nn.Module:
    """Sets `policy` on every MoE layer of model (any module with `policy` and `layer_idx` attributes).

    policy_for_layer: one policy module shared by all layers, or a callable layer_idx -> policy module or None.
    A policy is moved to the device of its layer's parameters, where the routing tensors will be.
    """
    layers = [m for m in model.modules() if hasattr(m, "policy") and hasattr(m, "layer_idx")]
    if not layers:
        raise ValueError(f"install: {type(model).__name__} has no module with both `policy` and `layer_idx`")
    for layer in layers:
        policy = policy_for_layer if isinstance(policy_for_layer, nn.Module) else policy_for_layer(layer.layer_idx)
        if policy is not None and not isinstance(policy, nn.Module):
            raise ValueError(f"install: policy for layer {layer.layer_idx} is a {type(policy).__name__}, "
                             f"expected an nn.Module or None")
        param = next(layer.parameters(), None)
        if policy is not None and param is not None:
            policy.to(param.device)
        layer.policy = policy
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Back to plain top-k routing on every MoE layer."""
    return install(model, lambda layer_idx: None)


def _ratio(skipped: int, total: int) -> float | None:
    return skipped / total if total else None


class SkipStats:
    """Skipped and total top-k slots per phase x decoder layer x modality, accumulated on device.

    counts [2, L, 3, 2] int64: phase (prefill, decode), layer, modality (text, vision, special),
    (skipped, total). Padding is left out; special tokens count in the total (modes.md §6, §14.4).
    Data-parallel ranks sum `counts` (torch.distributed.all_reduce) before summary().
    """

    def __init__(self, n_layers: int, device=None):
        self.counts = torch.zeros(len(PHASES), n_layers, 3, 2, dtype=torch.int64, device=device)

    def record(self, layer: int, ids: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, phase: str):
        """ids [..., K] after the policy; modality and valid [...] (valid false on padding)."""
        K = ids.shape[-1]
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not 0 <= layer < self.counts.shape[1]:
            raise ValueError(f"layer {layer} is out of range for SkipStats with {self.counts.shape[1]} layers")
        for name, t in (("modality", modality), ("valid", valid)):
            if t.shape != ids.shape[:-1]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ids.shape[:-1])} like ids")
        if self.counts.device != ids.device:
            self.counts = self.counts.to(ids.device)
        valid = valid.reshape(-1).long()  # [T]
        modality = modality.reshape(-1)  # [T]
        skipped = (ids.reshape(-1, K) == SKIP).sum(-1) * valid  # [T]
        counts = self.counts[PHASES.index(phase), layer]  # [3, 2] view
        counts[:, 0].index_add_(0, modality, skipped)
        counts[:, 1].index_add_(0, modality, valid * K)

    def reset(self):
        self.counts.zero_()

    def merge(self, other: "SkipStats") -> "SkipStats":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge SkipStats of shape {tuple(other.counts.shape)} "
                             f"into {tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.counts.device)
        return self

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict):
        counts = state.get("counts")
        if not isinstance(counts, torch.Tensor) or counts.shape != self.counts.shape:
            raise ValueError(f"SkipStats state 'counts' must be a tensor of shape {tuple(self.counts.shape)}")
        self.counts = counts.to(self.counts.device, torch.int64).clone()

    def summary(self) -> dict:
        """Plain-Python skip ratios (None where nothing was counted) for prefill, decode and both together."""
        counts = self.counts.cpu()
        out = {}
        for name, part in (("prefill", counts[0]), ("decode", counts[1]), ("total", counts.sum(0))):
            kinds = torch.stack([part[:, TEXT], part[:, VISION], part.sum(1)], dim=1)  # [L, 3, 2] text, vision, all
            by_layer, by_kind = kinds.tolist(), kinds.sum(0).tolist()
            out[name] = {
                **{kind: _ratio(*by_kind[i]) for i, kind in enumerate(("text", "vision", "all"))},
                "skipped": by_kind[2][0],
                "slots": by_kind[2][1],
                "per_layer": {kind: [_ratio(*row[i]) for row in by_layer]
                              for i, kind in enumerate(("text", "vision", "all"))},
            }
        return out


# -----------------------------------------------------------------------------
# the tau grid of the frontier search


def threshold_grid(n: int, x_max: float = 1.0, x_min: float = 0.0, mapping: str = "exp",
                   coeff: float = 10.0) -> torch.Tensor:
    """n thresholds [n] float64, ascending: x = linspace(x_min, x_max, n) mapped by the paper's rectified sigmoid
    tau = 2 * sigmoid(coeff * (x - 1)) ("exp", nearly log-uniform, tau(1) = 1), or tau = x ("linear").
    The official search uses x_max = 0.71 for text and 0.6 for vision with n = 100 (modes.md §5.3)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not x_min <= x_max:
        raise ValueError(f"x_min {x_min} must be <= x_max {x_max}")
    if mapping not in ("exp", "linear"):
        raise ValueError(f"mapping must be 'exp' or 'linear', got {mapping!r}")
    x = torch.linspace(x_min, x_max, n, dtype=torch.float64)
    return 2 * torch.sigmoid(coeff * (x - 1)) if mapping == "exp" else x
