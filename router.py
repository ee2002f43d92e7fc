"""MoDES (arXiv 2511.15690): GMLG + DMT as a skip policy, its ablations, installing a policy into a model, counting
what it skips, and the alpha / thresholds files it is configured from. The baselines are in baselines.py.

Every MoE layer routes with its model's own rule into a `Routing` record, then asks its `policy` module which
(token, slot) pairs to drop:

    weights, ids = policy(routing, modality, layer)    # same [T, K] shapes; a dropped slot has id SKIP, weight 0

Notable features
- MoDES = GMLG + DMT: score s = alpha[layer, modality] * pi_hat, slot dropped iff s < tau_text / tau_vision,
  compared strictly in fp32, so tau = 0 skips nothing. No minimum number of kept experts; kept weights are not
  renormalised.
- Ablations: Threshold (one tau for both modalities, with or without alpha) and DMT without alpha.
- install gives every MoE layer its policy (model.MoE.set_policy); a policy that needs more than the routing (MC-MoE's
  token importance) names a PolicyWrapper that install puts around the decoder layer (model.DecoderLayers.wrap).
- SPECIAL tokens keep all k slots under every policy; decode tokens arrive as TEXT, so no policy needs a phase.
- Policies have static shapes and no host syncs, so a model that calls them compiles with fullgraph=True. Their
  tables are checked once, when built and when installed, never on the hot path.
- SkipStats counts skipped slots on device, per phase, layer and modality.
- File formats: the alpha file (calibrate.py) and the thresholds file (search.py), checked field by field against
  the model they are used with (fingerprint, every MoE layer covered, finite non-negative values).
"""
import hashlib
import json
import math

import torch
from torch import nn

from model import SKIP, SPECIAL, TEXT, VISION, Routing, Wrapper, check, read_json

PHASES = ("prefill", "decode")
ALPHA_FORMAT = "modes-alpha/1"
THRESHOLDS_FORMAT = "modes-thresholds/1"

# T tokens, K top-k slots, E routed experts, L decoder layers


def table(name: str, value, ndims: tuple) -> torch.Tensor:
    """A finite, non-negative fp32 table with one of the allowed numbers of dims (rows = decoder layers)."""
    table = torch.as_tensor(value, dtype=torch.float32)
    check(table.ndim in ndims, f"{name} has shape {tuple(table.shape)}, expected {' or '.join(map(str, ndims))} dims")
    check(bool(torch.isfinite(table).all() and (table >= 0).all()), f"{name} must be finite and >= 0")
    return table


def layer_row(table: torch.Tensor, layer: int) -> torch.Tensor:
    return table if table.ndim == 0 else table[layer]


def apply_skip(routing: Routing, modality: torch.Tensor, skip: torch.Tensor):
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
        # a buffer, moved in place by set_thresholds: an installed policy (and a compiled graph) stays valid
        self.register_buffer("tau", table("tau", [float(tau_text), float(tau_vision)], ndims=(1,)))
        if alpha is not None:
            alpha = table("alpha", alpha, ndims=(1, 2))
            check(alpha.ndim == 1 or alpha.shape[1] == 2,
                  f"alpha has shape {tuple(alpha.shape)}, expected [L] or [L, 2] (text, vision)")
        self.register_buffer("alpha", alpha)
        self.use_full_softmax = use_full_softmax

    def set_thresholds(self, tau_text: float, tau_vision: float):
        """New thresholds, written in place, so a model that has this policy installed needs no reinstall."""
        self.tau.copy_(table("tau", [float(tau_text), float(tau_vision)], ndims=(1,)))

    def scores(self, routing: Routing, modality: torch.Tensor, layer: int) -> torch.Tensor:
        """s [T, K] fp32: GMLG's alpha[layer, modality] * pi_hat (or pi_hat alone without alpha)."""
        column = modality.clamp(max=VISION)  # [T] 0 text, 1 vision; SPECIAL rows are kept by apply_skip anyway
        pi = routing.probs.gather(-1, routing.ids) if self.use_full_softmax else routing.pi_hat  # [T, K]
        score = pi.float()
        if self.alpha is not None:
            alpha = layer_row(self.alpha, layer)  # [2] per modality or [] per layer
            score = score * (alpha[column] if alpha.ndim else alpha.expand_as(column))[:, None]
        return score

    def forward(self, routing: Routing, modality: torch.Tensor, layer: int):
        column = modality.clamp(max=VISION)
        return apply_skip(routing, modality, self.scores(routing, modality, layer) < self.tau[column][:, None])


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
# installing policies and counting what they skip


class PolicyWrapper(Wrapper):
    """A decoder-layer wrapper that a policy needs beside the routing (a policy names it with a wrap_layer method,
    layer -> PolicyWrapper); install puts it in place and the next install takes it off."""


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
    A policy with a wrap_layer method gets its PolicyWrapper around the decoder layer (undone by the next install)."""
    device = model.lm_head.weight.device
    model.layers.unwrap_all(PolicyWrapper)
    moe = model.moe_layers()
    L, E = len(model.layers), model.layers.layer(moe[0]).mlp.gate.weight.shape[0]  # all E, also when split
    for i in moe:
        p = policy(i) if callable(policy) and not isinstance(policy, nn.Module) else policy
        check(p is None or isinstance(p, nn.Module),
              f"install: policy for layer {i} is a {type(p).__name__}, expected an nn.Module or None")
        if p is not None:
            _check_fits(p, L, E)
            p.to(device)
        model.layers.layer(i).mlp.set_policy(p)
        if hasattr(p, "wrap_layer"):
            model.layers.wrap(i, "layer", p.wrap_layer)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Back to plain top-k routing on every MoE layer."""
    return install(model, None)


def _ratio(skipped: int, total: int) -> float | None:
    return skipped / total if total else None


class SkipStats:
    """Skipped and total top-k slots per phase x decoder layer x modality, accumulated on `device`.

    counts [2, L, 3, 2] int64: phase (prefill, decode), layer, modality (text, vision, special),
    (skipped, total). Padding is left out; special tokens count in the total, as the official code counts.
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
        """Plain-Python skip ratios (None where nothing was counted) for prefill, decode and both together. Two
        denominators: "all" counts every routed slot, special tokens' (never skipped) included, as the official code
        does; "text_vision" counts only the text and vision slots a policy may skip."""
        counts = self.counts.cpu()
        out = {}
        for name, part in (("prefill", counts[0]), ("decode", counts[1]), ("total", counts.sum(0))):
            kinds = torch.stack([part[:, TEXT], part[:, VISION], part.sum(1)], dim=1)  # [L, 3, 2] text, vision, all
            by_layer, by_kind = kinds.tolist(), kinds.sum(0).tolist()
            out[name] = {
                **{kind: _ratio(*by_kind[i]) for i, kind in enumerate(("text", "vision", "all"))},
                "text_vision": _ratio(by_kind[0][0] + by_kind[1][0], by_kind[0][1] + by_kind[1][1]),
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
    The official search uses x_max = 0.71 for text and 0.6 for vision with n = 100."""
    check(n >= 1, f"n must be >= 1, got {n}")
    check(x_min <= x_max, f"x_min {x_min} must be <= x_max {x_max}")
    check(mapping in ("exp", "linear"), f"mapping must be 'exp' or 'linear', got {mapping!r}")
    x = torch.linspace(x_min, x_max, n, dtype=torch.float64)
    return 2 * torch.sigmoid(coeff * (x - 1)) if mapping == "exp" else x


# -----------------------------------------------------------------------------
# alpha and thresholds files


def _whole(model):
    """The whole model of a model split over ranks (on the meta device), else the model itself."""
    if model.shard.world > 1:
        with torch.device("meta"):
            return type(model)(model.cfg)
    return model


def _sha256(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(model) -> str:
    """What alpha and thresholds files are made for: sha256 of the checkpoint's architecture, i.e. what its
    config.json says (the family's architecture(): hub key names and values, whatever dialect the file was written
    in) and the shape of every checkpoint tensor by its checkpoint name (the stacked experts in nn.Linear
    orientation). Equal for the same checkpoint in any dtype, device, config dialect, rank split or version of
    this code; weights are not read (it works on the meta device)."""
    from model import checkpoint_names
    whole = _whole(model)
    params = dict(whole.named_parameters())
    tensors = {name: list(params[p].shape if i is None else params[p][i].shape)
               for name, (p, i) in checkpoint_names(whole).items()}
    return _sha256({"fingerprint": 2, "model_type": model.cfg.model_type,
                    "architecture": model.cfg.architecture(), "tensors": tensors})


# Files made before 2026-12-07 hold the sha256 of the code's own config dataclass (dataclasses.asdict) and
# parameter names and shapes, which changed with the code although the checkpoint did not. The two dataclass
# versions of that time (before and after 2026-12-01, when Qwen's norm_topk_prob and mrope_interleaved stopped
# being read) are rebuilt here from the config.json as read, exactly as those versions built them.

QWEN_TEXT_2026_11 = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=(),
                         rms_norm_eps=1e-6, rope_theta=5e6, mrope_section=(24, 20, 20), max_position_embeddings=262144,
                         attention_bias=False, tie_word_embeddings=False, image_token_id=151655,
                         video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
QWEN_VISION_2026_11 = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, in_channels=3,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24), rope_theta=10000.0,
                           eps=1e-6)
KIMI_2026_11 = dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                    num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1,
                    scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=2.446, rms_norm_eps=1e-5, kv_norm_eps=1e-6, rope_theta=800000.0,
                    max_position_embeddings=131072, tie_word_embeddings=False, patch_size=14,
                    vision_hidden_size=1152, vision_num_hidden_layers=27, vision_num_attention_heads=16,
                    vision_intermediate_size=4304, init_pos_emb_height=64, init_pos_emb_width=64,
                    merge_kernel_size=(2, 2), vision_rope_theta=10000.0, vision_norm_eps=1e-5,
                    media_placeholder_token_id=163605)


def _legacy_qwen(raw, before_12_01):
    t, v = raw["text_config"], raw["vision_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    vision = dict(QWEN_VISION_2026_11)
    vision.update({k: v[k] for k in vision if k in v and k not in ("rope_theta", "eps")},
                  rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    text = dict(QWEN_TEXT_2026_11, **(dict(norm_topk_prob=True, mrope_interleaved=True) if before_12_01 else {}))
    text.update({k: t[k] for k in text if k in t})
    text.update({k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")}, vision=vision,
                mlp_only_layers=t.get("mlp_only_layers") or (),
                num_experts=t["num_experts"] if "num_experts" in t else t["num_local_experts"],
                head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                rope_theta=rope.get("rope_theta", t.get("rope_theta", 5e6 if before_12_01 else 5e5)),
                mrope_section=rope.get("mrope_section", (24, 20, 20)),
                tie_word_embeddings=raw.get("tie_word_embeddings", False))
    if before_12_01:
        text["mrope_interleaved"] = rope.get("mrope_interleaved", False)
    return text


def _legacy_kimi(raw):
    text, vision = raw["text_config"], raw["vision_config"]
    cfg = dict(KIMI_2026_11)
    cfg.update({k: text[k] for k in cfg if k in text})
    cfg.update({f"vision_{k}": vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size") if k in vision})
    cfg.update({k: vision[k] for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width",
                                       "merge_kernel_size") if k in vision})
    cfg.update({k: raw[k] for k in ("media_placeholder_token_id", "tie_word_embeddings") if k in raw})
    return cfg


def legacy_fingerprints(model) -> set:
    """The fingerprints that versions before 2026-12-07 wrote for this checkpoint (empty for a config that was not
    read from a config.json, or a family those versions did not have)."""
    raw, kind = getattr(model.cfg, "config_json", None), model.cfg.model_type
    if not isinstance(raw, dict) or kind not in ("qwen3_vl_moe", "kimi_vl"):
        return set()
    shapes = {name: list(p.shape) for name, p in _whole(model).named_parameters()}
    configs = [_legacy_qwen(raw, True), _legacy_qwen(raw, False)] if kind == "qwen3_vl_moe" else [_legacy_kimi(raw)]
    return {_sha256({"model_type": kind, "config": c, "shapes": shapes}) for c in configs}


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
    this = fingerprint(model)
    check(made_for == this or made_for in legacy_fingerprints(model),
          f"{path}: made for another model (fingerprint {str(made_for)[:12]}..., this model {this[:12]}...); "
          f"recalibrate for this checkpoint")
    return doc


def alpha_table(doc, model, where) -> torch.Tensor:
    """[L, 2] fp32 alpha (text, vision) by decoder layer from the `layers` rows of an alpha or thresholds document:
    every MoE layer exactly once, values finite and >= 0; dense layers stay 0."""
    rows, moe = doc.get("layers"), model.moe_layers()
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
