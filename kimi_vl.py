"""
Kimi-VL (moonshotai/Kimi-VL-A3B-Instruct, -Thinking) read top to bottom: config, DeepSeek-V3 text decoder, MoonViT
vision tower and projector, model. The shared blocks, the MoE choke point and the loader are in model.py.

- Decoder: multi-head latent attention (naive, or absorbed with a latent-only cache), a dense first layer, sigmoid
  group-limited routing with a selection-only bias, and always-on shared experts.
- Vision: MoonViT (bicubic-resampled positions, 2-D rotary, per-image attention, pixel-shuffle merge, projector).
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (MoE, DecoderLayer, Experts, KVCache, RMSNorm, Routing, SwiGLU, VisionLanguageModel, attention,
                   block_diagonal_attention, check, rope_interleaved)
from parallel import Shard

# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class KimiVLConfig:
    # text decoder (text_config, model_type deepseek_v3)
    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264            # dense MLP of the first_k_dense_replace layers
    moe_intermediate_size: int = 1408         # one routed expert
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None            # None = full-rank q_proj (the only form Kimi-VL ships)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2                 # run as one MLP of width n_shared_experts * moe_intermediate_size
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"             # noaux_tc: e_score_correction_bias picks experts; greedy: no bias
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.446
    rms_norm_eps: float = 1e-5
    kv_norm_eps: float = 1e-6                 # kv_a_layernorm: HF builds it with the class default, not rms_norm_eps
    rope_theta: float = 800000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    # vision tower (vision_config, model_type moonvit)
    patch_size: int = 14
    vision_hidden_size: int = 1152
    vision_num_hidden_layers: int = 27
    vision_num_attention_heads: int = 16
    vision_intermediate_size: int = 4304
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    merge_kernel_size: tuple = (2, 2)
    vision_rope_theta: float = 10000.0
    vision_norm_eps: float = 1e-5             # every LayerNorm of the tower and the projector
    # top level
    media_placeholder_token_id: int = 163605
    model_type = "kimi_vl"

    def __post_init__(self):
        check(self.q_lora_rank is None, f"q_lora_rank={self.q_lora_rank} is not supported (Kimi-VL uses null)")
        check(self.scoring_func == "sigmoid",
                  f"scoring_func={self.scoring_func!r} is not supported (need 'sigmoid')")
        check(self.topk_method in ("noaux_tc", "greedy"), f"topk_method={self.topk_method!r} is not supported")
        check(self.n_routed_experts % self.n_group == 0, f"n_group={self.n_group} must divide n_routed_experts")
        check(self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        check(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok exceeds n_routed_experts")
        check(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
                  f"n_shared_experts={self.n_shared_experts!r} is not supported (need an integer >= 0)")
        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        check(self.vision_head_dim % 4 == 0, f"vision head dim {self.vision_head_dim} must be a multiple of 4")
        self.merge_kernel_size = tuple(self.merge_kernel_size)

    @property
    def media_token_ids(self):
        return (self.media_placeholder_token_id,)  # images and video frames alike

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def architecture(self):
        """Every config.json value the model is built from, by its name in the hub's config.json: what alpha and
        thresholds files are made for (router.py: fingerprint). Fixed names, not this dataclass's fields, so a
        refactor keeps the fingerprint; a key read in the future enters only where it differs from today's
        behaviour. kv_norm_eps and the vision rope_theta and eps are not listed: config.json does not set them."""
        floats = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
        return {
            **{f"text_config.{k}": float(getattr(self, k)) if k in floats else getattr(self, k) for k in KIMI_TEXT_ARCH},
            **{f"vision_config.{k}": getattr(self, f"vision_{k}") for k in KIMI_VISION_PREFIXED},
            **{f"vision_config.{k}": getattr(self, k) for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width")},
            "vision_config.merge_kernel_size": list(self.merge_kernel_size),
            "media_placeholder_token_id": self.media_placeholder_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    @classmethod
    def from_hf(cls, raw: dict, where: str) -> "KimiVLConfig":
        """Translate the checkpoint's config.json (kimi_vl / deepseek_v3 / moonvit) into our fields."""
        text, vision = raw.get("text_config"), raw.get("vision_config")
        check(raw.get("model_type") == cls.model_type,
                  f"{where}: model_type {raw.get('model_type')!r}, expected 'kimi_vl'")
        check(isinstance(text, dict) and text.get("model_type") == "deepseek_v3",
                  f"{where}: text_config.model_type must be 'deepseek_v3'")
        check(isinstance(vision, dict) and vision.get("model_type") == "moonvit",
                  f"{where}: vision_config.model_type must be 'moonvit'")
        for key, default, supported in (("rope_scaling", None, None), ("attention_bias", False, False),
                                        ("hidden_act", "silu", "silu")):  # no yarn, no bias, SwiGLU
            check(text.get(key, default) == supported,
                      f"{where}: text_config.{key} {text.get(key)!r} is not supported (need {supported!r})")
        kw = {k: text[k] for k in {f.name for f in fields(cls)} & set(text)}
        kw.update({f"vision_{k}": vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "intermediate_size") if k in vision})
        kw.update({k: vision[k] for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width",
                                          "merge_kernel_size") if k in vision})
        kw.update({k: raw[k] for k in ("media_placeholder_token_id", "tie_word_embeddings") if k in raw})
        check_types(kw, where)
        try:
            return cls(**kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


def check_types(kw, where):
    """Type and range of every value read from config.json (by its name there), before the dataclass's own
    checks of their agreement: a number written as a string or a top-k of 0 reaches no tensor code."""
    names = {**{k: f"text_config.{k}" for k in KIMI_TEXT_ARCH},
             **{f"vision_{k}": f"vision_config.{k}" for k in KIMI_VISION_PREFIXED},
             **{k: f"vision_config.{k}" for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width")}}
    zero_ok = ("n_shared_experts", "first_k_dense_replace")
    for key, value in kw.items():
        name = names.get(key, key)
        if key in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "kv_norm_eps"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            check(ok, f"{where}: {name} must be a number > 0, got {value!r}")
        elif key in ("scoring_func", "topk_method"):
            check(isinstance(value, str), f"{where}: {name} must be a string, got {value!r}")
        elif key in ("norm_topk_prob", "tie_word_embeddings"):
            check(isinstance(value, bool), f"{where}: {name} must be true or false, got {value!r}")
        elif key == "merge_kernel_size":
            check(isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value),
                  f"{where}: {name} must be 2 integers >= 1, got {value!r}")
        elif key == "q_lora_rank" and value is None:
            continue
        elif key in names or key == "media_placeholder_token_id":
            low = 0 if key in zero_ok or key == "media_placeholder_token_id" else 1
            check(is_int(value, low), f"{where}: {name} must be an integer >= {low}, got {value!r}")
    vocab, media = kw.get("vocab_size", 163840), kw.get("media_placeholder_token_id", 163605)
    check(media < vocab, f"{where}: media_placeholder_token_id {media} must be below vocab_size {vocab}")


def is_int(value, low=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


KIMI_TEXT_ARCH = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
                  "moe_layer_freq", "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
                  "routed_scaling_factor", "rms_norm_eps", "rope_theta", "max_position_embeddings")
KIMI_VISION_PREFIXED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


# ---------------------------------------------------------------------------------------------------------------
# Text decoder (DeepSeek-V3): MLA, router, MoE


class MLA(nn.Module):
    """Multi-head latent attention with a full-rank q_proj (q_lora_rank null). Split over ranks by heads (q_proj,
    kv_b_proj, o_proj); the latent projection is replicated, so is an absorbed cache."""

    def __init__(self, cfg: KimiVLConfig, layer_idx, attn_impl, shard):
        super().__init__()
        check(attn_impl in ("naive", "absorbed"), f"attn_impl {attn_impl!r}, expected 'naive' or 'absorbed'")
        self.layer_idx, self.attn_impl, self.shard = layer_idx, attn_impl, shard
        self.nh = shard.split(cfg.num_attention_heads, "num_attention_heads")  # this rank's heads
        self.d, self.r, self.dv, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim ** -0.5  # the full 192-d q/k head; no yarn, so no mscale
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * (self.d + self.r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.c + self.r, bias=False)  # latent, then one shared rope key
        self.kv_a_layernorm = RMSNorm(self.c, cfg.kv_norm_eps)
        self.kv_b_proj = nn.Linear(self.c, self.nh * (self.d + self.dv), bias=False)  # per head: k_nope, v
        self.o_proj = nn.Linear(self.nh * self.dv, H, bias=False)

    def latent(self, x, ctx):
        # b batch, s query pos, t key pos, h head, d nope / value head dim, r rope dim, c latent rank
        B, S, _ = x.shape
        q_nope, q_rope = self.q_proj(x).view(B, S, self.nh, self.d + self.r).split([self.d, self.r], -1)
        q_rope = rope_interleaved(q_rope, ctx.cos[:, :, None], ctx.sin[:, :, None])  # [b, s, h, r]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.c, self.r], dim=-1)  # [b, s, c], [b, s, r]
        return q_nope, q_rope, self.kv_a_layernorm(latent), rope_interleaved(k_rope, ctx.cos, ctx.sin)

    def expand(self, q_nope, q_rope, latent, k_rope):
        """Per-head q [b, h, s, d+r], k [b, h, t, d+r], v [b, h, t, d] from the latents."""
        B, T, _ = latent.shape
        k_nope, v = self.kv_b_proj(latent).view(B, T, self.nh, self.d + self.dv).split([self.d, self.dv], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.nh, -1)], dim=-1)  # [b, t, h, d+r]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [b, s, h, d+r]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, ctx):
        B, S, _ = x.shape
        q_nope, q_rope, latent, k_rope = self.latent(x, ctx)
        if self.attn_impl == "absorbed":
            latents, rope_keys = ctx.cached(self.layer_idx, latent, k_rope, dim=1)  # cache [b, t, c], [b, t, r]
            if ctx.phase == "decode":
                out = self.absorbed(q_nope, q_rope, latents, rope_keys, ctx.mask)  # [b, s, h, d]
                return self.shard.reduce(self.o_proj(out.reshape(B, S, self.nh * self.dv)))
            # a prefill is compute-bound: per-head K/V from the call's latents, as in naive
        q, k, v = self.expand(q_nope, q_rope, latent, k_rope)
        if self.attn_impl == "naive":
            k, v = ctx.cached(self.layer_idx, k, v, dim=2)  # cache [b, h, t, d+r], [b, h, t, d]
        out = attention(q, k, v, ctx.mask, self.scale).transpose(1, 2)  # [b, s, h, d]
        return self.shard.reduce(self.o_proj(out.reshape(B, S, self.nh * self.dv)))  # heads concatenated

    def absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        """Decode in the latent space. kv_b_proj holds per head W_UK [d, c] and W_UV [d, c]: k_nope = W_UK c and
        v = W_UV c. So q_nope . k_nope = (W_UK^T q_nope) . c, and sum_t a_t v_t = W_UV (sum_t a_t c_t): the query
        moves into the latent space once, scores and the weighted sum run against the cached latents, and only
        the result is lifted to per-head values. No per-head K/V is ever built."""
        w_kv = self.kv_b_proj.weight.view(self.nh, self.d + self.dv, self.c)  # [h, d+d, c]
        w_uk, w_uv = w_kv.split([self.d, self.dv], dim=1)  # [h, d, c] each
        q_latent = torch.einsum("bshd,hdc->bhsc", q_nope, w_uk)
        scores = (torch.einsum("bhsc,btc->bhst", q_latent, latent)
                  + torch.einsum("bshr,btr->bhst", q_rope, k_rope)) * self.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q_nope.dtype)
        return torch.einsum("bhsc,hdc->bshd", torch.einsum("bhst,btc->bhsc", probs, latent), w_uv)

    def project(self, x, ctx):
        """Per-head q, k, v of the call's tokens, as the naive path builds them."""
        return self.expand(*self.latent(x, ctx))


class KimiGate(nn.Module):
    """Sigmoid scores in fp32. noaux_tc: the correction bias (kept in fp32) is added only to choose the experts
    (group-limited top-k); the weights are the unbiased scores of the chosen experts, renormalised, times
    routed_scaling_factor."""

    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x):
        # T tokens, E experts, G groups, K top-k
        cfg = self.cfg
        T, E, G, K = x.shape[0], cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        probs = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = probs + self.e_score_correction_bias.float() if cfg.topk_method == "noaux_tc" else probs
        if cfg.topk_method == "noaux_tc" and G > 1:
            # a group scores the sum of its two best biased scores; all but the topk_group best groups are
            # dropped with -inf (the remote code's 0.0 would let a dropped expert beat a negative biased score)
            grouped = choice.view(T, G, E // G)  # [T, G, E/G]
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros(T, G, dtype=torch.bool, device=x.device).scatter(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
        ids = choice.topk(K, dim=-1).indices  # [T, K], by descending biased score
        top = probs.gather(1, ids)
        pi_hat = top / (top.sum(-1, keepdim=True) + 1e-20)
        weights = (pi_hat if cfg.norm_topk_prob else top) * cfg.routed_scaling_factor
        return Routing(weights=weights, ids=ids, pi_hat=pi_hat, probs=probs)


class KimiMoE(MoE):
    """Routed experts (skippable by the policy) plus shared experts that every token always runs, unweighted."""

    def __init__(self, cfg: KimiVLConfig, layer_idx, shard):
        super().__init__(layer_idx, Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, shard),
                         shard)
        self.gate = KimiGate(cfg)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, shard)

    def forward(self, x, ctx):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        # split over ranks, the shared experts' partial sum joins the routed one in a single all-reduce
        return self.shard.reduce(self.routed(x, self.gate(x), ctx) + self.shared_experts.partial(x)).view(B, S, H)


# ---------------------------------------------------------------------------------------------------------------
# MoonViT vision tower and projector


class MoonViTPosEmb(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.init_pos_emb_height, cfg.init_pos_emb_width,
                                               cfg.vision_hidden_size))

    def forward(self, grid_hws: list) -> torch.Tensor:
        # the learned (row, col, C) table is resampled to each image's grid: torch bicubic (Keys a=-0.75,
        # align_corners=False, no antialias), also for downsampling; an exact-size grid uses the table as is
        out = []
        for h, w in grid_hws:
            if (h, w) == tuple(self.weight.shape[:2]):
                pos = self.weight
            else:
                pos = F.interpolate(self.weight.permute(2, 0, 1)[None], size=(h, w), mode="bicubic",
                                    align_corners=False)[0].permute(1, 2, 0)  # [h, w, C]
            out.append(pos.flatten(0, 1))  # [h*w, C], row-major
        return torch.cat(out)


class MoonViTPatchEmbed(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.vision_hidden_size, kernel_size=p, stride=p)
        self.pos_emb = MoonViTPosEmb(cfg)

    def forward(self, pixel_values, grid_hws: list):
        x = self.proj(pixel_values).flatten(1)  # [L, C]
        return x + self.pos_emb(grid_hws).to(x.dtype)


class MoonViTMLP(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.fc0 = nn.Linear(cfg.vision_hidden_size, cfg.vision_intermediate_size)
        self.fc1 = nn.Linear(cfg.vision_intermediate_size, cfg.vision_hidden_size)

    def forward(self, x):
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonViTBlock(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        C, eps = cfg.vision_hidden_size, cfg.vision_norm_eps
        self.n_heads = cfg.vision_num_attention_heads
        self.norm0 = nn.LayerNorm(C, eps=eps)
        self.wqkv = nn.Linear(C, 3 * C)  # rows: all q | all k | all v
        self.wo = nn.Linear(C, C)
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.mlp = MoonViTMLP(cfg)

    def forward(self, x, cos, sin, lengths: list):
        # L patches of all images, h heads, D head dim
        L, C = x.shape
        q, k, v = self.wqkv(self.norm0(x)).view(L, 3, self.n_heads, -1).unbind(1)  # [L, h, D] each
        # 2-D rotary in fp32; block-diagonal attention: each image attends only to its own patches (the remote
        # eager path's additive boolean mask leaks across images; flash varlen, which everyone runs, does not)
        q, k = (rope_interleaved(t.float(), cos[:, None], sin[:, None]).to(x.dtype) for t in (q, k))
        x = x + self.wo(block_diagonal_attention(q, k, v, lengths).reshape(L, C))
        return x + self.mlp(self.norm1(x))


class MoonViT(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MoonViTPatchEmbed(cfg)
        self.blocks = nn.ModuleList(MoonViTBlock(cfg) for _ in range(cfg.vision_num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_norm_eps)

    def rope_angles(self, grid_hws: list, device):
        """cos, sin [L, D/2] of the 2-D rotary: pair 2i turns by col * f_i and pair 2i+1 by row * f_i, with
        f_i = theta^(-4i/D). Column first, as the remote code does it (its docstring says the reverse)."""
        quarter = self.cfg.vision_head_dim // 4
        inv_freq = 1.0 / self.cfg.vision_rope_theta ** (torch.arange(0, 2 * quarter, 2, device=device).float()
                                                        / (2 * quarter))
        rows, cols = [], []
        for h, w in grid_hws:  # positions restart at (0, 0) for every image, row-major
            rows.append(torch.arange(h, device=device).repeat_interleave(w))
            cols.append(torch.arange(w, device=device).repeat(h))
        r, c = torch.cat(rows).float(), torch.cat(cols).float()  # [L]
        angles = torch.stack((c[:, None] * inv_freq, r[:, None] * inv_freq), dim=-1).flatten(1)  # [L, D/2]
        return angles.cos(), angles.sin()

    def forward(self, pixel_values, grid_hws):
        """pixel_values [L, 3, p, p], grid_hws [N, 2] (h, w) in patches -> merged tokens [sum h*w/4, 4, C]."""
        grids = [tuple(g) for g in grid_hws.tolist()]
        kh, kw = self.cfg.merge_kernel_size
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype), grids)
        cos, sin = self.rope_angles(grids, x.device)
        lengths = [h * w for h, w in grids]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.final_layernorm(x)
        merged = []
        for xi, (h, w) in zip(x.split(lengths), grids):
            xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)  # [h/2, w/2, 2, 2, C]
            merged.append(xi.reshape((h // kh) * (w // kw), kh * kw, -1))  # [h*w/4, 4, C]; tl, tr, bl, br
        return torch.cat(merged)


class KimiProjector(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        C = cfg.vision_hidden_size
        n = C * cfg.merge_kernel_size[0] * cfg.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(C, eps=cfg.vision_norm_eps)  # per sub-patch, not over 4C
        self.linear_1 = nn.Linear(n, n)
        self.linear_2 = nn.Linear(n, cfg.hidden_size)

    def forward(self, x):
        x = self.pre_norm(x).flatten(1)  # [M, 4C], sub-patch major
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact erf GELU


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL whole model


class KimiVL(VisionLanguageModel):
    CHECKPOINT_PREFIXES = {"vision_tower.patch_embed.": "visual.patch_embed.",
                           "vision_tower.encoder.blocks.": "visual.blocks.",
                           "vision_tower.encoder.final_layernorm.": "visual.final_layernorm.",
                           "multi_modal_projector.": "projector.",
                           "language_model.model.embed_tokens.": "embed_tokens.",
                           "language_model.model.layers.": "layers.", "language_model.model.norm.": "norm.",
                           "language_model.lm_head.": "lm_head."}
    FP32_PARAMETERS = ("e_score_correction_bias",)  # transformers keeps it fp32: near-tie expert choices
    PER_EXPERT_TENSORS = True

    def __init__(self, cfg: KimiVLConfig, shard=Shard(), attn_impl="absorbed"):
        super().__init__(cfg, shard, (DecoderLayer(cfg, i, MLA(cfg, i, attn_impl, shard), KimiMoE, shard)
                                      for i in range(cfg.num_hidden_layers)),
                         visual=MoonViT(cfg), projector=KimiProjector(cfg))
        self.attn_impl = attn_impl

    def head(self, h):
        return super().head(h).float()  # the remote code returns fp32 logits

    def new_cache(self, batch, max_len, device=None, dtype=None):
        c, w = self.cfg, self.lm_head.weight
        if self.attn_impl == "naive":  # per-head keys and values of this rank's heads
            nh = self.shard.split(c.num_attention_heads, "num_attention_heads")
            k, v = (batch, nh, max_len, c.qk_head_dim), (batch, nh, max_len, c.v_head_dim)
        else:  # the normalised latent and the rotated shared rope key: 576 numbers per token instead of 5120
            k, v = (batch, max_len, c.kv_lora_rank), (batch, max_len, c.qk_rope_head_dim)
        return KVCache(c.num_hidden_layers, k, v, max_len, device or w.device, dtype or w.dtype)

    def encode_vision(self, input_ids, pixel_values=None, image_grid_hws=None):
        """Run MoonViT and the projector -> (media [B, S] bool, features [n, H], no DeepStack features []), the
        rows in sequence order of the media placeholders they replace. pixel_values [L, 3, 14, 14],
        image_grid_hws [n_images, 2]."""
        cfg = self.cfg
        kh, kw = cfg.merge_kernel_size
        check(image_grid_hws is not None and image_grid_hws.ndim == 2 and image_grid_hws.shape[1] == 2,
                  "image_grid_hws must be an integer tensor [n_images, 2] of (h, w) patch counts")
        grids = image_grid_hws.tolist()
        check(all(h % kh == 0 and w % kw == 0 for h, w in grids),
                  f"image_grid_hws {grids} must be multiples of the {kh}x{kw} merge")
        L, p = sum(h * w for h, w in grids), cfg.patch_size
        check(tuple(pixel_values.shape) == (L, 3, p, p),
                  f"pixel_values has shape {tuple(pixel_values.shape)}, image_grid_hws needs {(L, 3, p, p)}")
        media = input_ids == cfg.media_placeholder_token_id
        feats = self.projector(self.visual(pixel_values, image_grid_hws))  # [n, H]
        n = int(media.sum())
        check(feats.shape[0] == n, f"{n} media placeholder tokens (id {cfg.media_placeholder_token_id}) "
                                       f"for {feats.shape[0]} image features")
        return media, feats, []

    def rope_index(self, input_ids, valid, pixels):
        """Plain 1-D positions [B, S] (no M-RoPE) that count only real tokens, so a left-padded row starts at 0,
        and each row's next position [B]; images take one position per placeholder, as text does."""
        return (valid.long().cumsum(-1) - 1).clamp(min=0), valid.long().sum(-1)

    def rotary(self, positions, dtype):
        """cos, sin [B, S, qk_rope_head_dim / 2] of positions [B, S] (made in fp32, then cast like the reference)."""
        r = self.cfg.qk_rope_head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, r, 2, device=positions.device).float() / r)
        angles = positions[..., None].float() * inv_freq  # [B, S, r/2]
        return angles.cos().to(dtype), angles.sin().to(dtype)


CONFIG, MODEL = KimiVLConfig, KimiVL
