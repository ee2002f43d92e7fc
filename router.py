"""Expert-skipping policies: MoDES (arXiv 2511.15690), its ablations and the baselines it is compared with, and
the alpha / thresholds files they are configured from.

Every MoE layer routes with its model's own rule into a `Routing` record, then asks its `policy` module which
(token, slot) pairs to drop:

    weights, ids = policy(routing, modality, layer)    # same [T, K] shapes; a dropped slot has id SKIP, weight 0

Notable features
- MoDES = GMLG + DMT: score s = alpha[layer, modality] * pi_hat, slot dropped iff s < tau_text / tau_vision,
  compared strictly in fp32, so tau = 0 skips nothing. No minimum number of kept experts; kept weights are not
  renormalised.
- Ablations (Threshold, DMT with or without alpha) and the baselines of modes.md §8: ReduceK, NAEE, MCMoE, DiEP.
  MC-MoE's attention-based token importance is computed by a wrapper that `install` puts around the decoder
  layer, not by the model.
- SPECIAL tokens keep all k slots under every policy; decode tokens arrive as TEXT, so no policy needs a phase.
- Policies have static shapes and no host syncs, so a model that calls them compiles with fullgraph=True. Their
  tables are checked once, when built and when installed, never on the hot path.
- SkipStats counts skipped slots on device, per phase, layer and modality.
- File formats: the alpha file (calibrate.py) and the thresholds file (search.py), checked field by field against
  the model they are used with (fingerprint, every MoE layer covered, finite non-negative values).

Not a script: calibrate.py, search.py, bench.py and model.py --thresholds use it (each has --help).
"""
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from cli import check, read_json
from kernels import SKIP

TEXT, VISION, SPECIAL = 0, 1, 2  # token modality codes
PHASES = ("prefill", "decode")
ALPHA_FORMAT = "modes-alpha/1"
THRESHOLDS_FORMAT = "modes-thresholds/1"

# T tokens, K top-k slots, E routed experts, L decoder layers


@dataclass
class Routing:
    """One MoE layer's routing for T tokens before any skipping."""
    weights: torch.Tensor  # [T, K] fp32 final mixing coefficients (renormalised, routed-scaled)
    ids: torch.Tensor      # [T, K] int64 expert ids, by descending selection score
    pi_hat: torch.Tensor   # [T, K] fp32 top-k weights renormalised to sum 1, before routed scaling
    probs: torch.Tensor    # [T, E] fp32 full distribution (Qwen softmax, Kimi sigmoid scores)


def _table(name: str, value, ndims: tuple) -> torch.Tensor:
    """A finite, non-negative fp32 table with one of the allowed numbers of dims (rows = decoder layers)."""
    table = torch.as_tensor(value, dtype=torch.float32)
    check(table.ndim in ndims, f"{name} has shape {tuple(table.shape)}, expected {' or '.join(map(str, ndims))} dims")
    check(bool(torch.isfinite(table).all() and (table >= 0).all()), f"{name} must be finite and >= 0")
    return table


def _layer_row(table: torch.Tensor, layer: int) -> torch.Tensor:
    return table if table.ndim == 0 else table[layer]


def _apply_skip(routing: Routing, modality: torch.Tensor, skip: torch.Tensor):
    """Drops the slots where skip [T, K] holds, except on SPECIAL tokens. Kept weights stay as they were."""
    skip = skip & (modality != SPECIAL)[:, None]
    return routing.weights.masked_fill(skip, 0.0), routing.ids.masked_fill(skip, SKIP)


# -----------------------------------------------------------------------------
# MoDES and its ablations


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
        # a buffer, so search.py and bench.py move the thresholds in place without rebuilding or recompiling
        self.register_buffer("tau", _table("tau", [float(tau_text), float(tau_vision)], ndims=(1,)))
        if alpha is not None:
            alpha = _table("alpha", alpha, ndims=(1, 2))
            check(alpha.ndim == 1 or alpha.shape[1] == 2,
                  f"alpha has shape {tuple(alpha.shape)}, expected [L] or [L, 2] (text, vision)")
        self.register_buffer("alpha", alpha)
        self.use_full_softmax = use_full_softmax

    def scores(self, routing: Routing, modality: torch.Tensor, layer: int) -> torch.Tensor:
        """s [T, K] fp32: GMLG's alpha[layer, modality] * pi_hat (or pi_hat alone without alpha)."""
        column = modality.clamp(max=VISION)  # [T] 0 text, 1 vision; SPECIAL rows are kept by _apply_skip anyway
        pi = routing.probs.gather(-1, routing.ids) if self.use_full_softmax else routing.pi_hat  # [T, K]
        score = pi.float()
        if self.alpha is not None:
            alpha = _layer_row(self.alpha, layer)  # [2] per modality or [] per layer
            score = score * (alpha[column] if alpha.ndim else alpha.expand_as(column))[:, None]
        return score

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        column = modality.clamp(max=VISION)
        return _apply_skip(routing, modality, self.scores(routing, modality, layer) < self.tau[column][:, None])


class Threshold(DMT):
    """One threshold for text and vision tokens alike (the "Thresholding" ablation, +GMLG with alpha)."""

    def __init__(self, tau: float, alpha=None, use_full_softmax: bool = False):
        super().__init__(tau, tau, alpha, use_full_softmax)


class MoDES(DMT):
    """The full method, DMT with GMLG: alpha is required."""

    def __init__(self, tau_text: float, tau_vision: float, alpha, use_full_softmax: bool = False):
        check(alpha is not None, "MoDES needs alpha ([L] or [L, 2]); use DMT for thresholding without GMLG")
        super().__init__(tau_text, tau_vision, alpha, use_full_softmax)


# -----------------------------------------------------------------------------
# baselines (modes.md §8): none of them looks at modality beyond never dropping SPECIAL slots, except ReduceK's
# optional k_vision (the official gate_dict analysis)


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
    is below beta[layer]. beta: one float for all layers or a tensor [L] (from the genetic search). Any beta > 1
    drops every slot."""

    def __init__(self, beta):
        super().__init__()
        self.register_buffer("beta", _table("beta", beta, ndims=(0, 1)))

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        # pi_hat is sorted again because Kimi's slots are ordered by the bias-corrected score, not by pi
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        return _tail_skip(pi_sorted, order, _layer_row(self.beta, layer))

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        return _apply_skip(routing, modality, self.skip_mask(routing, layer))


class MCMoE(NAEE):
    """MC-MoE's ODP skipping adapted to top-k (modes.md §8.3): the NAEE tail rule, plus, in prefill, the top
    protect_frac of the T tokens by importance keep all k slots and the bottom drop_frac lose all of them;
    protection wins where both apply. `importance` [T] is set before each layer by the TokenImportance wrapper
    that `install` puts around the decoder layer (None in decode).

    Unspecified by MoDES: both fractions. The defaults 0.1 / 0.1 and the floor int(frac * T) follow the official
    MC-MoE code (tau_h, tau_l). A layer range like the official block_range is expressed as beta = 0 there.
    Tokens are ranked over all T rows of the call; padding rows get importance -inf.
    """

    def __init__(self, beta, protect_frac: float = 0.1, drop_frac: float = 0.1):
        super().__init__(beta)
        for name, frac in (("protect_frac", protect_frac), ("drop_frac", drop_frac)):
            check(0.0 <= frac <= 1.0, f"{name} must be in [0, 1], got {frac}")
        self.protect_frac, self.drop_frac = protect_frac, drop_frac
        self.importance = None

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        skip = self.skip_mask(routing, layer)  # [T, K]
        if self.importance is not None:
            T = modality.shape[0]
            none = torch.zeros(T, dtype=torch.bool, device=skip.device)
            low = self.importance.topk(int(self.drop_frac * T), largest=False).indices
            dropped = none.scatter(0, low, True)  # [T]
            protected = none.scatter(0, self.importance.topk(int(self.protect_frac * T)).indices, True)  # [T]
            skip = (skip | dropped[:, None]) & ~protected[:, None]
        return _apply_skip(routing, modality, skip)


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


class TokenImportance(nn.Module):
    """A decoder layer whose MC-MoE policy learns, before each prefill, every token's importance in this layer
    (token_importance of the layer's own attention weights). Put in place of the layer by `install`, so the
    model computes nothing for this one baseline."""

    def __init__(self, layer: nn.Module, policy: MCMoE):
        super().__init__()
        self.layer, self.policy = layer, policy

    def forward(self, h, ctx):
        self.policy.importance = None
        if ctx.phase == "prefill":
            x = self.layer.input_layernorm(h)
            q, k, _ = self.layer.self_attn.project(x, ctx)  # [B, h, S, d], [B, h_kv, S, d]: the call's own tokens
            probs = attention_probs(q, k, ctx.mask)
            importance = token_importance(probs, x, ctx.mask, ctx.valid).reshape(-1)
            shard = self.layer.self_attn.shard  # split over ranks, each has its heads' mean: average those
            self.policy.importance = shard.reduce(importance) / shard.world
        return self.layer(h, ctx)


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
    """DiEP's adaptive skipping adapted to top-k (modes.md §8.4): the NAEE tail rule with beta scaled per rank by
    gamma2(e_(1), e_(i)), the similarity of that rank's expert to the top expert (gamma [L, E, E], see diep_gamma).

    Unspecified by MoDES: the exact top-k form. We test each rank i >= 2 against beta[layer] * gamma2(e_(1), e_(i))
    and rank 1 against beta alone (it has no partner); the first qualifying rank drops its whole tail.
    """

    def __init__(self, beta, gamma: torch.Tensor):
        super().__init__(beta)
        gamma = _table("gamma", gamma, ndims=(3,))
        check(gamma.shape[1] == gamma.shape[2], f"gamma has shape {tuple(gamma.shape)}, expected [L, E, E]")
        self.register_buffer("gamma", gamma)

    def skip_mask(self, routing: Routing, layer: int) -> torch.Tensor:
        pi_sorted, order = routing.pi_hat.float().sort(dim=-1, descending=True, stable=True)  # [T, K], [T, K]
        ids_sorted = routing.ids.gather(-1, order)  # [T, K] expert at each rank
        pair = self.gamma[layer][ids_sorted[:, :1], ids_sorted]  # [T, K] gamma2(e_(1), e_(i))
        pair = torch.cat([torch.ones_like(pair[:, :1]), pair[:, 1:]], dim=-1)  # [T, K]
        return _tail_skip(pi_sorted, order, _layer_row(self.beta, layer) * pair)


# -----------------------------------------------------------------------------
# installing policies and counting what they skip


def moe_layers(model) -> list:
    """Decoder-layer indices of the MoE layers (Kimi-VL's first layer is dense)."""
    return [i for i in range(len(model.layers)) if model.cfg.is_moe_layer(i)]


def _check_fits(policy: nn.Module, L: int, E: int) -> None:
    """The policy's tables have one row per decoder layer (L) and one column per expert (E), in fp32."""
    name = type(policy).__name__
    for field, t in policy.named_buffers():
        check(not t.is_floating_point() or t.dtype == torch.float32,
              f"{name}.{field} was cast to {t.dtype}; the skip comparison needs fp32 (install after Module.to)")
        if field in ("alpha", "beta", "gamma") and t.ndim >= 1:
            check(t.shape[0] == L, f"{name}.{field} has {t.shape[0]} rows, the model has {L} decoder layers")
        if field == "gamma":
            check(t.shape[1] == E, f"{name}.gamma has {t.shape[1]} experts, the model has {E}")


def install(model: nn.Module, policy) -> nn.Module:
    """Give every MoE layer the skip policy `policy`: one module for all layers, a callable layer index -> module
    or None, or None for plain top-k. Each policy is checked against the model and moved to its device once, here.
    An MCMoE policy's decoder layers are wrapped in TokenImportance (undone by the next install)."""
    device = model.lm_head.weight.device
    for i, layer in enumerate(model.layers):
        if isinstance(layer, TokenImportance):
            model.layers[i] = layer.layer
    L, E = len(model.layers), model.layers[moe_layers(model)[0]].mlp.gate.weight.shape[0]  # all E, also when split
    for i in moe_layers(model):
        p = policy(i) if callable(policy) and not isinstance(policy, nn.Module) else policy
        check(p is None or isinstance(p, nn.Module),
              f"install: policy for layer {i} is a {type(p).__name__}, expected an nn.Module or None")
        if p is not None:
            _check_fits(p, L, E)
            p.to(device)
        model.layers[i].mlp.policy = p
        if isinstance(p, MCMoE):
            model.layers[i] = TokenImportance(model.layers[i], p)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Back to plain top-k routing on every MoE layer."""
    return install(model, None)


def _ratio(skipped: int, total: int) -> float | None:
    return skipped / total if total else None


class SkipStats:
    """Skipped and total top-k slots per phase x decoder layer x modality, accumulated on `device`.

    counts [2, L, 3, 2] int64: phase (prefill, decode), layer, modality (text, vision, special),
    (skipped, total). Padding is left out; special tokens count in the total (modes.md §6, §14.4).
    Data-parallel ranks sum `counts` (torch.distributed.all_reduce) before summary().
    """

    def __init__(self, n_layers: int, device="cpu"):
        self.counts = torch.zeros(len(PHASES), n_layers, 3, 2, dtype=torch.int64, device=device)

    def record(self, layer: int, ids: torch.Tensor, modality: torch.Tensor, valid: torch.Tensor, phase: str):
        """ids [T, K] after the policy; modality and valid [T] (valid false on padding)."""
        valid = valid.long()
        counts = self.counts[PHASES.index(phase), layer]  # [3, 2] view
        counts[:, 0].index_add_(0, modality, (ids == SKIP).sum(-1) * valid)
        counts[:, 1].index_add_(0, modality, valid * ids.shape[-1])

    def reset(self):
        self.counts.zero_()

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
    check(n >= 1, f"n must be >= 1, got {n}")
    check(x_min <= x_max, f"x_min {x_min} must be <= x_max {x_max}")
    check(mapping in ("exp", "linear"), f"mapping must be 'exp' or 'linear', got {mapping!r}")
    x = torch.linspace(x_min, x_max, n, dtype=torch.float64)
    return 2 * torch.sigmoid(coeff * (x - 1)) if mapping == "exp" else x


# -----------------------------------------------------------------------------
# alpha and thresholds files


def fingerprint(model) -> str:
    """sha256 of the model's config and parameter shapes: equal for the same architecture in any dtype or device,
    different for any other checkpoint layout. Weights are not read (it works on the meta device). A model split
    over ranks has the fingerprint of the whole model."""
    if model.shard.world > 1:
        with torch.device("meta"):
            model = type(model)(model.cfg)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    blob = json.dumps({"model_type": model.cfg.model_type, "config": dataclasses.asdict(model.cfg), "shapes": shapes},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _number(value) -> bool:
    """A JSON number that is >= 0 and finite in fp32, the policies' dtype."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= torch.finfo(torch.float32).max)


def read_document(path, model, fmt, what):
    """The JSON object at `path`, refused unless it has format `fmt` and was made for this model."""
    doc = read_json(path, what)
    check(isinstance(doc, dict), f"{path}: expected a JSON object ({what} file), got a {type(doc).__name__}")
    check(doc.get("format") == fmt, f"{path}: not {'an' if what[0] in 'aeiou' else 'a'} {what} file "
                                    f"(format {doc.get('format')!r}, expected {fmt!r})")
    made_for = doc.get("model", {}).get("fingerprint") if isinstance(doc.get("model"), dict) else None
    check(made_for == fingerprint(model), f"{path}: made for another model (fingerprint {str(made_for)[:12]}..., "
                                          f"this model {fingerprint(model)[:12]}...); recalibrate for this checkpoint")
    return doc


def alpha_table(doc, model, where) -> torch.Tensor:
    """[L, 2] fp32 alpha (text, vision) by decoder layer from the `layers` rows of an alpha or thresholds document:
    every MoE layer exactly once, values finite and >= 0; dense layers stay 0."""
    rows, moe = doc.get("layers"), moe_layers(model)
    check(isinstance(rows, list), f"{where}: 'layers' must be a list of {{layer, text, vision}} rows")
    table, seen = torch.zeros(len(model.layers), 2), set()
    for k, row in enumerate(rows):
        at = f"{where}: layers[{k}]"
        check(isinstance(row, dict), f"{at} must be an object {{layer, text, vision}}")
        layer = row.get("layer")
        check(isinstance(layer, int) and not isinstance(layer, bool), f"{at}.layer must be an integer, got {layer!r}")
        check(layer in moe, f"{at}.layer {layer} is not an MoE layer of this model ({moe[0]}..{moe[-1]})")
        check(layer not in seen, f"{at}: layer {layer} is listed twice")
        for col, m in enumerate(("text", "vision")):
            check(_number(row.get(m)), f"{at}.{m} must be a number >= 0, finite in fp32, got {row.get(m)!r}")
            table[layer, col] = row[m]
        seen.add(layer)
    missing = [i for i in moe if i not in seen]
    check(not missing, f"{where}: no alpha for MoE layer(s) {', '.join(map(str, missing[:8]))}"
                       f"{' ...' if len(missing) > 8 else ''}; every MoE layer needs one")
    return table


def load_alpha(path, model) -> dict:
    """The alpha document at path (calibrate.py's output), checked against the model."""
    doc = read_document(path, model, ALPHA_FORMAT, "alpha")
    alpha_table(doc, model, path)
    return doc


def load_thresholds(path, model) -> MoDES:
    """The MoDES policy stored at path (search.py's output: alpha and both thresholds), checked against the model."""
    doc = read_document(path, model, THRESHOLDS_FORMAT, "thresholds")
    tau = doc.get("tau")
    check(isinstance(tau, dict), f"{path}: 'tau' must be an object {{text, vision}}")
    for m in ("text", "vision"):
        check(_number(tau.get(m)), f"{path}: tau.{m} must be a number >= 0, finite in fp32, got {tau.get(m)!r}")
    return MoDES(tau["text"], tau["vision"], alpha_table(doc, model, path))




if __name__ == "__main__":
    print("router.py is a library (the skip policies and their alpha / thresholds files); not a script: run "
          "model.py, calibrate.py, search.py, bench.py or plot.py (each has --help)")
