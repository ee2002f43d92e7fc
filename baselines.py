"""
The baselines MoDES is compared with, each read in one place: its skip rule, the statistic it needs from the model
(DiEP's expert similarity, MC-MoE's token importance) and fitting its knob to a skip ratio.

Every rule is a skip policy like router.MoDES (routing, modality, layer) -> (weights, ids), installed with
router.install; none looks at modality beyond never dropping SPECIAL slots, except ReduceK's optional k_vision.

- ReduceK: top-k' routing.  NAEE: drop the low-probability tail of the top-k.
- MC-MoE: NAEE's tail plus attention-based token importance (the TokenImportance wrapper around each layer).
- DiEP: NAEE's tail scaled by the similarity of each expert to the token's top expert (expert_similarity).
- fit_baseline: one knob per rule, bisected (or, for DMT without alpha, frontier-searched) to a target skip ratio.
"""
import torch
from torch import nn

import search
from data import make_batch
from model import SKIP, VISION, Routing, Wrapper, check
from router import DMT, PolicyWrapper, Threshold, apply_skip, layer_row, table, threshold_grid

# T tokens, K top-k slots, E routed experts, L decoder layers, B batch, S sequence, H hidden, h heads


# ---------------------------------------------------------------------------------------------------------------
# The rules


class ReduceK(nn.Module):
    """Top-k' routing: keep the first k slots (k_vision for vision tokens), i.e. the k experts with the highest
    selection score, since ids arrive sorted. k = 0 keeps none. Not renormalised, like the official gate_dict."""

    def __init__(self, k: int, k_vision: int | None = None):
        super().__init__()
        k_vision = k if k_vision is None else k_vision
        for name, value in (("k", k), ("k_vision", k_vision)):
            check(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        self.register_buffer("k", torch.tensor([k, k_vision]))

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        K = routing.ids.shape[1]
        rank = torch.arange(K, device=routing.ids.device)  # [K]
        keep_k = self.k[modality.clamp(max=VISION)]  # [T]
        return apply_skip(routing, modality, rank[None, :] >= keep_k[:, None])


def _tail_skip(pi_sorted: torch.Tensor, order: torch.Tensor, ratio) -> torch.Tensor:
    """NAEE's top-k tail rule on descending pi_sorted [T, K]: find the first rank i whose tail mass
    sum_{u>=i} pi_(u) is below ratio_i * sum_v pi_(v), and drop ranks i..K. Returns skip [T, K] in slot order."""
    tail = pi_sorted.flip(-1).cumsum(-1).flip(-1)  # [T, K] tail[:, i] = sum_{u >= i} pi_(u)
    hit = tail < ratio * tail[:, :1]
    skip_sorted = hit.cumsum(-1) > 0  # everything behind the first qualifying rank goes too
    return torch.zeros_like(skip_sorted).scatter(-1, order, skip_sorted)


class NAEE(nn.Module):
    """NAEE adapted to top-k: drop the longest low-probability tail whose share of the top-k mass
    is below beta[layer]. beta: one float for all layers or a tensor [L] (from the genetic search). Any beta > 1
    drops every slot."""

    def __init__(self, beta):
        super().__init__()
        self.register_buffer("beta", table("beta", beta, ndims=(0, 1)))

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        # pi_hat is sorted again because Kimi's slots are ordered by the bias-corrected score, not by pi
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        return _tail_skip(pi_sorted, order, layer_row(self.beta, layer))

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        return apply_skip(routing, modality, self.skip_mask(routing, layer))


class MCMoE(NAEE):
    """MC-MoE's ODP skipping adapted to top-k: the NAEE tail rule, plus, in prefill, the top protect_frac of each
    sequence's tokens by importance keep all k slots and its bottom drop_frac lose all of them; protection wins
    where both apply. The kept weights are renormalised to the routing's total, as the official wrapper does.
    `importance` [B, S] (or [S], one sequence) is set before each layer by the TokenImportance wrapper that
    router.install puts around the decoder layer (None in decode); padding has importance -inf.

    Unspecified by MoDES: both fractions. The defaults 0.1 / 0.1 and the floor int(frac * n) follow the official
    MC-MoE code (tau_h, tau_l). Tokens are ranked within their own sequence over its n real tokens, as the official
    wrapper does (it runs one sequence at a time), so padding never uses up a quota and a batch changes nothing. A
    layer range like the official block_range is expressed as beta = 0 there.
    """

    def __init__(self, beta, protect_frac: float = 0.1, drop_frac: float = 0.1):
        super().__init__(beta)
        for name, frac in (("protect_frac", protect_frac), ("drop_frac", drop_frac)):
            check(0.0 <= frac <= 1.0, f"{name} must be in [0, 1], got {frac}")
        self.protect_frac, self.drop_frac = protect_frac, drop_frac
        self.importance = None

    def wrap_layer(self, layer):
        """The wrapper router.install puts around each decoder layer: it sets `importance` before the layer's MoE."""
        return TokenImportance(layer, self)

    def protect_and_drop(self, skip):
        """skip [T, K] with each sequence's most important tokens kept whole and its least important dropped."""
        importance = self.importance.reshape(-1, self.importance.shape[-1])  # [B, S]
        real = importance > float("-inf")
        n = real.sum(1, keepdim=True)  # [B, 1] real tokens per sequence
        rank = importance.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [B, S], 0 = most important
        protected = rank < (self.protect_frac * n).floor()
        dropped = real & (rank >= n - (self.drop_frac * n).floor())
        return (skip | dropped.reshape(-1, 1)) & ~protected.reshape(-1, 1)

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        skip = self.skip_mask(routing, layer)  # [T, K]
        if self.importance is not None:
            skip = self.protect_and_drop(skip)
        weights, ids = apply_skip(routing, modality, skip)
        total, kept = routing.weights.sum(-1, keepdim=True), weights.sum(-1, keepdim=True)  # [T, 1]
        rescale = (ids == SKIP).any(-1, keepdim=True) & (kept > 0)  # a token that lost some slots but not all
        return torch.where(rescale, weights * total / kept.clamp(min=torch.finfo(kept.dtype).tiny), weights), ids


def attention_probs(q, k, mask):
    """Softmax attention weights [B, h, S, S] of a prefill's tokens among themselves, 1/sqrt(d) scaled as both
    models' attention is. q [B, h, S, d], k [B, h_kv, S, d]; mask [B, 1, S, S] bool or None (causal)."""
    S = q.shape[2]
    if mask is None:
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, h, S, d]
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k.float()) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def token_importance(probs, x, mask, valid):
    """MC-MoE's token importance [B, S]: ||x_j||_1 times the attention token j receives, averaged over heads and
    over the queries that can see it; padding gets -inf. probs [B, h, S, S] attention weights of the call's tokens
    among themselves, x [B, S, H] the attention input, mask [B, 1, S, S] bool or None (causal)."""
    B, h, S, _ = probs.shape
    if mask is None:
        mask = torch.ones(S, S, dtype=torch.bool, device=probs.device).tril()[None, None]
    seen_by = mask[:, 0].float().sum(1).expand(B, S)  # [B, S]: how many queries attend to each key
    received = probs.sum((1, 2)) / (h * seen_by.clamp(min=1))
    return (received * x.float().abs().sum(-1)).masked_fill(~valid, float("-inf"))


class TokenImportance(PolicyWrapper):
    """A decoder layer whose MC-MoE policy learns, before each prefill, every token's importance in this layer
    (token_importance of the layer's own attention weights). Put around the layer by router.install (MCMoE's
    wrap_layer), so the model computes nothing for this one baseline."""

    def __init__(self, layer: nn.Module, policy: MCMoE):
        super().__init__(layer)
        self.policy = policy

    def forward(self, h, ctx):
        self.policy.importance = None
        if ctx.phase == "prefill":
            x = self.inner.input_layernorm(h)
            q, k, _ = self.inner.self_attn.project(x, ctx)  # [B, h, S, d], [B, h_kv, S, d]: the call's own tokens
            probs = attention_probs(q, k, ctx.mask)
            importance = token_importance(probs, x, ctx.mask, ctx.valid)  # [B, S]
            shard = self.inner.self_attn.shard  # split over ranks, each has its heads' mean: average those
            self.policy.importance = shard.reduce(importance) / shard.world
        return self.inner(h, ctx)


def diep_gamma(cka: torch.Tensor) -> torch.Tensor:
    """DiEP's gamma2 table [L, E, E]: the pairwise CKA of expert outputs divided by the layer's mean off-diagonal
    CKA, so a pair more alike than average gets gamma2 > 1. Layers whose CKA is all zero (dense) get ones."""
    check(cka.ndim == 3 and cka.shape[1] == cka.shape[2] and cka.shape[1] >= 2,
          f"cka has shape {tuple(cka.shape)}, expected [L, E, E] with E >= 2")
    L, E, _ = cka.shape
    cka = cka.double()
    off_diagonal_mean = (cka.sum((1, 2)) - cka.diagonal(dim1=1, dim2=2).sum(1)) / (E * (E - 1))  # [L]
    gamma = cka / off_diagonal_mean.clamp(min=torch.finfo(torch.float64).tiny)[:, None, None]
    return torch.where((off_diagonal_mean == 0)[:, None, None], torch.ones_like(gamma), gamma).float()


class DiEP(NAEE):
    """DiEP's adaptive skipping adapted to top-k: the NAEE tail rule with beta scaled per rank by
    gamma2(e_(1), e_(i)), the similarity of that rank's expert to the top expert (gamma [L, E, E], see diep_gamma).

    Unspecified by MoDES: the exact top-k form. We test each rank i >= 2 against beta[layer] * gamma2(e_(1), e_(i))
    and rank 1 against beta alone (it has no partner); the first qualifying rank drops its whole tail.
    """

    def __init__(self, beta, gamma: torch.Tensor):
        super().__init__(beta)
        gamma = table("gamma", gamma, ndims=(3,))
        check(gamma.shape[1] == gamma.shape[2], f"gamma has shape {tuple(gamma.shape)}, expected [L, E, E]")
        self.register_buffer("gamma", gamma)

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        ids_sorted = routing.ids.gather(-1, order)  # [T, K] expert at each rank
        pair = self.gamma[layer][ids_sorted[:, :1], ids_sorted]  # [T, K] gamma2(e_(1), e_(i))
        pair = torch.cat([torch.ones_like(pair[:, :1]), pair[:, 1:]], dim=-1)  # [T, K]
        return _tail_skip(pi_sorted, order, layer_row(self.beta, layer) * pair)


# ---------------------------------------------------------------------------------------------------------------
# DiEP's expert similarity: its calibration statistic


class CaptureInput(Wrapper):
    """An MoE wrapper that keeps up to n non-padding rows of its input."""

    def __init__(self, moe, n):
        super().__init__(moe)
        self.n, self.rows = n, []

    def forward(self, x, ctx):
        if sum(len(r) for r in self.rows) < self.n:
            self.rows.append(x[ctx.valid].float())
        return self.inner(x, ctx)


def linear_cka(Y):
    """Linear CKA between every pair of E output matrices Y [E, n, H] -> [E, E] (Kornblith et al. 2019)."""
    Y = Y - Y.mean(1, keepdim=True)
    gram = (Y @ Y.transpose(1, 2)).flatten(1)  # [E, n*n]
    hsic = gram @ gram.T  # [E, E]
    norm = hsic.diagonal().sqrt()
    return hsic / (norm[:, None] * norm[None, :]).clamp(min=1e-30)


@torch.no_grad()
def expert_similarity(model, proc, samples, batch_size=4, tokens=256):
    """DiEP's expert-output similarity on calibration data: [L, E, E] linear CKA of the outputs of every pair of
    routed experts of each MoE layer on its first `tokens` input rows; zeros for dense layers."""
    layers = model.moe_layers()
    E = model.layers.layer(layers[0]).mlp.gate.weight.shape[0]
    device = model.lm_head.weight.device
    wrappers = {i: model.layers.wrap(i, "mlp", lambda moe: CaptureInput(moe, tokens)) for i in layers}
    try:
        for start in range(0, len(samples), batch_size):
            batch = make_batch(samples[start:start + batch_size], proc, device,
                               max_positions=model.cfg.max_position_embeddings)
            model.layers(*model.embed(batch.input_ids, batch.attention_mask, **batch.pixels))
            if all(sum(len(r) for r in w.rows) >= tokens for w in wrappers.values()):
                break
    finally:
        for i in layers:
            model.layers.unwrap(i, "mlp")
    cka = torch.zeros(len(model.layers), E, E)
    for i, w in wrappers.items():
        experts = w.inner.experts
        x = torch.cat(w.rows)[:tokens].to(experts.gate_up_proj.dtype)  # [n, H]
        gate, up = torch.einsum("nh,eih->eni", x, experts.gate_up_proj).chunk(2, dim=-1)  # [E, n, I] each
        y = torch.einsum("eni,ehi->enh", nn.functional.silu(gate) * up, experts.down_proj)  # [E, n, H]
        if model.shard.world > 1:  # split over ranks: each holds a range of the experts, gathered in order
            parts = [torch.empty_like(y) for _ in range(model.shard.world)]
            torch.distributed.all_gather(parts, y.contiguous())
            y = torch.cat(parts)
        cka[i] = linear_cka(y.float()).cpu()
    return cka


# ---------------------------------------------------------------------------------------------------------------
# Fitting a baseline's single knob to a skip ratio (the fidelity evaluation)


TOLERANCE = 0.02  # a fitted policy "reaches" the target when its skip ratio is within this of it


def fit_scalar(ratio, make, target, hi=1.0, steps=16):
    """(make(h), h, ratio) for the smallest h found by bisection (on [0, hi], hi doubled until feasible) with
    ratio(make(h)) >= target, for rules whose skip ratio never falls as h grows; None when no h reaches it."""
    while ratio(make(hi)) < target:
        if hi > 1e3:
            return None
        hi *= 2
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(make(mid)) < target else (lo, mid)
    policy = make(hi)
    return policy, hi, ratio(policy)


def fit_grid(ratio, make, grid, target):
    """(make(tau), tau, ratio) for the smallest tau of the ascending grid with ratio(make(tau)) >= target, by
    bisection over the grid's indices (the ratio never falls as tau grows); None when even the last misses."""
    lo, hi = 0, len(grid) - 1
    if ratio(make(float(grid[hi]))) < target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if ratio(make(float(grid[mid]))) < target else (lo, mid)
    policy = make(float(grid[hi]))
    return policy, float(grid[hi]), ratio(policy)


def fit_baseline(name, model, evaluator, alpha, gamma, target, grid_n=100):
    """A baseline fitted to `target` on the calibration evaluator -> dict(policy, hyper, calib_skip, reached, note).

    The threshold rules are searched as MoDES is (search.py): on grid_n-point grids of the same spacing
    (router.threshold_grid), scaled to just above the largest score the rule can produce (1 for pi_hat, max alpha
    with GMLG), DMT by the same frontier walk, one-threshold rules by bisection over the grid. The other rules have
    one knob for all layers where the paper searches a per-layer beta genetically: a documented simplification,
    bisected. A rule whose ratio jumps over the target (NAEE's beta > 1 drops everything; reduce-k's steps of 1/K)
    takes the nearest setting at or above it and is marked as not reaching it."""
    def ratio(policy):
        return evaluator.score(policy)["skip"]["all"]
    unit = threshold_grid(grid_n) * (1 + 1e-6)  # pi_hat <= 1: the last point skips every slot (strict <)
    if name == "reduce-k":  # discrete: the largest k' that still reaches the target, down to k' = 0
        K = model.cfg.num_experts_per_tok
        fits = [(k, ratio(ReduceK(k))) for k in range(K, -1, -1)]
        k, r = next(((k, r) for k, r in fits if r >= target), fits[-1])
        found = (ReduceK(k), k, r)
    elif name == "dmt":  # two thresholds without alpha: MoDES's frontier walk on MoDES's grid size
        def dmt(tau_text, tau_vision):
            result = evaluator.score(DMT(tau_text, tau_vision))
            return result["kl"], result["skip"]
        best, points = search.search(dmt, unit, unit, target, quiet=True)
        found = None
        if best is not None:
            tau = (float(unit[best[0]]), float(unit[best[1]]))
            found = (DMT(*tau), tau, points[best][1]["all"])
    elif name == "threshold":
        found = fit_grid(ratio, Threshold, unit, target)
    elif name == "threshold+gmlg":
        found = fit_grid(ratio, lambda t: Threshold(t, alpha), unit * float(alpha.max()), target)
    else:
        rules = {"naee": NAEE, "mc-moe": MCMoE, "diep": lambda b: DiEP(b, gamma)}
        check(name in rules, f"--baselines: unknown baseline {name!r} ({', '.join(BASELINES)})")
        found = fit_scalar(ratio, rules[name], target)
    if found is None:
        return dict(policy=None, hyper=None, calib_skip=None, reached=False, note="target out of reach")
    policy, hyper, achieved = found
    reached = abs(achieved - target) <= TOLERANCE
    note = "" if reached else f"nearest setting skips {achieved:.3f}, not {target:.3f} +- {TOLERANCE}"
    return dict(policy=policy, hyper=hyper, calib_skip=achieved, reached=reached, note=note)


BASELINES = ("reduce-k", "threshold", "threshold+gmlg", "dmt", "naee", "mc-moe", "diep")
