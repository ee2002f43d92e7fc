"""
Qwen3-VL-MoE and Kimi-VL in plain PyTorch, loaded straight from an unmodified Hugging Face checkpoint folder.

Notable features
- Qwen3-VL-MoE: ViT with Conv3d-as-linear patches, bilinear-resampled learned positions, 2-D rotary, per-image
  attention, patch merger and DeepStack mergers; decoder with q/k-norm, GQA, interleaved MRoPE, 128-expert MoE.
- Kimi-VL: MoonViT (bicubic-resampled positions, 2-D rotary, per-image attention, pixel-shuffle merge, projector);
  DeepSeek-V3 decoder with multi-head latent attention (naive, or absorbed with a latent-only cache), a dense
  first layer, sigmoid group-limited routing with a selection-only bias, and always-on shared experts.
- One choke point for routed-expert compute, `expert_compute(..., impl)`: "ref" is the readable per-expert loop
  below, anything else is a path of kernels.moe_experts. Skipped (token, slot) pairs carry the expert id SKIP.
- Every MoE layer has a replaceable `policy` (router.py) and reports to an explicit stats collector.
- Lazy, strict loading: the model is built on the meta device, each parameter is allocated once on the target
  device and filled tensor by tensor from safetensors; every problem is reported at once.
- A static KV cache with tensor positions, greedy decoding with stop tokens.

Examples
    python model.py --prompt hi                                   # tiny built-in checkpoint, made on first use
    python model.py --model ~/Qwen3-VL-30B-A3B-Instruct --prompt "What is this?" --image cat.jpg \
        --device cuda --dtype bfloat16 --max-new-tokens 64
    python model.py --prompt "Describe the clip" --video frames/ --json
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from router import Routing

SKIP = -1  # expert id of a skipped (token, slot) pair
TEXT, VISION, SPECIAL = 0, 1, 2  # token modality codes


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class QwenVisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304  # a square learned grid, 48 x 48
    deepstack_visual_indexes: tuple = (8, 16, 24)
    rope_theta: float = 10000.0  # not in config.json; the reference hard-codes it
    eps: float = 1e-6


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 6144  # dense SwiGLU width, used only by layers in mlp_only_layers
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5e6
    mrope_section: tuple = (24, 20, 20)  # frequency channels given to the T, H and W position streams
    mrope_interleaved: bool = True  # THWTHW... channel map (Qwen3-VL) instead of TT..HH..WW.. (Qwen2-VL)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    model_type = "qwen3_vl_moe"

    def is_moe_layer(self, i):
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, raw, where):
        """Both dialects in the wild: the hub's rope_scaling + rope_theta and num_experts, and transformers 5's
        rope_parameters and num_local_experts."""
        t, v = raw.get("text_config"), raw.get("vision_config")
        if t is None or v is None:
            raise ValueError(f"{where}: qwen3_vl_moe config.json needs text_config and vision_config")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        try:
            vision = QwenVisionConfig(
                depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
                intermediate_size=v["intermediate_size"], in_channels=v.get("in_channels", 3),
                patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                spatial_merge_size=v["spatial_merge_size"], out_hidden_size=v["out_hidden_size"],
                num_position_embeddings=v["num_position_embeddings"],
                deepstack_visual_indexes=tuple(v["deepstack_visual_indexes"]),
                rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            cfg = cls(
                vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_hidden_layers=t["num_hidden_layers"],
                num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                intermediate_size=t.get("intermediate_size", 0), moe_intermediate_size=t["moe_intermediate_size"],
                num_experts=t["num_experts"] if "num_experts" in t else t["num_local_experts"],
                num_experts_per_tok=t["num_experts_per_tok"], norm_topk_prob=t.get("norm_topk_prob", True),
                decoder_sparse_step=t.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(t.get("mlp_only_layers") or ()), rms_norm_eps=t["rms_norm_eps"],
                rope_theta=rope.get("rope_theta", t.get("rope_theta", 5e6)),
                mrope_section=tuple(rope["mrope_section"]), mrope_interleaved=rope.get("mrope_interleaved", False),
                attention_bias=t.get("attention_bias", False),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                image_token_id=raw["image_token_id"], video_token_id=raw["video_token_id"],
                vision_start_token_id=raw["vision_start_token_id"], vision_end_token_id=raw["vision_end_token_id"],
                eos_token_id=t.get("eos_token_id", raw.get("eos_token_id", 151645)), vision=vision)
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e.args[0]!r} in qwen3_vl_moe config") from None
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ValueError(f"{where}: mrope_section {list(cfg.mrope_section)} must sum to head_dim/2 "
                             f"= {cfg.head_dim // 2}")
        return cfg


def read_config(path):
    """The dataclass config of a checkpoint folder (or of a config.json file), chosen by its model_type."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    kind = raw.get("model_type")
    if kind not in CONFIGS:
        raise ValueError(f"{file}: unknown model_type {kind!r} (supported: {', '.join(CONFIGS)})")
    return CONFIGS[kind].from_hf(raw, file)


# ---------------------------------------------------------------------------------------------------------------
# Shared primitives: RMSNorm, rotary, SwiGLU, routed-expert compute, KV cache, forward context


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32, cast back before the weight, as both reference implementations do
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    # NeoX pairing: channel j rotates with channel j + d/2
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, step=None, importance=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E routed SwiGLU experts stacked in nn.Linear orientation: gate rows then up rows in gate_up_proj."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))  # [E, H, I]


def expert_compute(x, w_gate_up, w_down, ids, weights, impl="ref"):
    """Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]) over kept slots. The single choke point for routed experts."""
    if impl != "ref":
        import kernels
        return kernels.moe_experts(x, w_gate_up, w_down, ids, weights, path=impl)
    # T tokens, K slots, H hidden, I expert hidden. DeepSeek-V3's loop: only routed pairs are computed, but
    # .tolist() and torch.where make this eager-only; kernels.py has the sync-free paths.
    T, H = x.shape
    I = w_down.shape[-1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e == SKIP:
            continue
        tok, slot = torch.where(ids == e)
        gate_up = x[tok] @ w_gate_up[e].T  # [n, 2I]
        act = F.silu(gate_up[:, :I]) * gate_up[:, I:]  # [n, I]
        out.index_add_(0, tok, (act @ w_down[e].T).float() * weights[tok, slot, None])
    return out.to(x.dtype)


def routed_experts(moe, x, routing, step, importance=None):
    """What both models' MoE layers do once routed: the skip policy, the statistics, then the routed-expert choke
    point. x [T, H]; importance [B, S] (MC-MoE's attention-based token importance, prefill only) or None."""
    if importance is not None:
        routing.importance = importance.reshape(-1)
    weights, ids = routing.weights, routing.ids
    modality = step.modality.reshape(-1)
    if moe.policy is not None:
        weights, ids = moe.policy(routing, modality, moe.layer_idx)
    if step.stats is not None:
        step.stats.record(moe.layer_idx, ids, modality, step.valid.reshape(-1), step.phase)
    return expert_compute(x, moe.experts.gate_up_proj, moe.experts.down_proj, ids, weights, moe.impl)


@dataclass
class Step:
    """What every MoE layer needs to know about the tokens of one forward: modality [B, S] (TEXT / VISION /
    SPECIAL), valid [B, S] (False at padding), the phase, and the optional statistics collector."""
    modality: torch.Tensor
    valid: torch.Tensor
    phase: str  # "prefill" or "decode"
    stats: object = None


class KVCache:
    """Static per-layer K/V buffers [L, B, kv_heads, S_max, D]. Positions are written by index tensors, so one
    decode step has the same shapes at every position."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(n_layers, batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rope position of the next token
        self.length = 0  # tokens written so far (host side, for the decode loop)
        self.max_len = max_len

    def reset(self):
        """Empty the cache in place (the buffers keep their addresses, so a captured decode graph stays valid)."""
        self.length = 0
        self.key_valid.zero_()
        self.next_pos.zero_()


def token_importance(q, k, mask, x, valid):
    """MC-MoE's token importance: ||x_j||_1 times the attention token j receives, averaged over heads and over the
    queries that can see it; padding gets -inf. q [B, h, S, d], k [B, h_kv, S_kv, d] of this call's keys only."""
    B, h, S, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)[:, :, :S]  # [B, h, S, d]
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k.float()) / d ** 0.5
    probs = scores.masked_fill(~mask[..., :S], float("-inf")).softmax(-1)  # [B, h, S, S]
    seen_by = mask[:, 0, :, :S].float().sum(1)  # [B, S]: how many queries attend to each key
    received = probs.sum((1, 2)) / (h * seen_by.clamp(min=1))
    return (received * x.float().abs().sum(-1)).masked_fill(~valid, float("-inf"))


def causal_mask(cache_pos, key_valid):
    """[B, 1, S, S_kv] bool: causal over cache indices, padding keys hidden. A padding query may always see itself
    so that no row is empty (an empty softmax row is NaN, and 0·NaN would leak into real rows through V)."""
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = keys[None, :] <= cache_pos[:, None]  # [S, S_kv]
    mask = causal[None] & key_valid[:, None, :]  # [B, S, S_kv]
    mask = mask | (keys[None, :] == cache_pos[:, None])[None]
    return mask[:, None]


def run_decoder(model, input_ids, attention_mask, cache, stats, media, last_only, pixels):
    """Both models' forward: input_ids [B, S] (left padding marked 0 in attention_mask) -> logits [B, S, V]
    ([B, 1, V] with last_only). With a cache, appends the tokens to it (prefill when it is empty, decode
    otherwise)."""
    cache_pos = None
    if cache is not None:
        cache_pos = torch.arange(cache.length, cache.length + input_ids.shape[1], device=input_ids.device)
    h, state = model.embed(input_ids, attention_mask, cache=cache, cache_pos=cache_pos, stats=stats, media=media,
                           **pixels)
    for i in range(len(model.layers)):
        h = model.layer(i, h, state)
    if cache is not None:
        cache.length += input_ids.shape[1]
    return model.head(h[:, -1:] if last_only else h)


def decode_step(model, token, cache, cache_pos, stats=None):
    """One decode step with tensors only (token [B, 1], cache_pos [1]) -> logits [B, V]: the function the entry
    scripts compile and capture in a CUDA graph. The caller advances cache.length."""
    h, state = model.embed(token, cache=cache, cache_pos=cache_pos, phase="decode", stats=stats)
    for i in range(len(model.layers)):
        h = model.layer(i, h, state)
    return model.head(h)[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE vision tower


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.attn.proj = nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(D, cfg.intermediate_size)
        self.mlp.linear_fc2 = nn.Linear(cfg.intermediate_size, D)

    def forward(self, x, cos, sin, segments):
        N, D = x.shape
        h = self.num_heads
        q, k, v = self.attn.qkv(self.norm1(x)).view(N, 3, h, D // h).unbind(1)  # 3 x [N, h, d]
        # rotary in fp32, as the reference does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        out = torch.empty_like(q)
        for s, e in segments:  # each image / temporal group attends only to itself
            out[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)).transpose(0, 1)
        x = x + self.attn.proj(out.reshape(N, D))
        return x + self.mlp.linear_fc2(F.gelu(self.mlp.linear_fc1(self.norm2(x)), approximate="tanh"))


class QwenPatchMerger(nn.Module):
    """Groups each 2x2 block of patches (4 consecutive rows) into one token of the text width. The main merger
    normalises per patch before grouping; the DeepStack mergers normalise the grouped 4D vector."""

    def __init__(self, cfg: QwenVisionConfig, postshuffle_norm):
        super().__init__()
        D, M = cfg.hidden_size, cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(M if postshuffle_norm else D, eps=cfg.eps)
        self.linear_fc1 = nn.Linear(M, M)
        self.linear_fc2 = nn.Linear(M, cfg.out_hidden_size)

    def forward(self, x):
        M = self.linear_fc1.in_features
        x = self.norm(x.view(-1, M)) if self.postshuffle_norm else self.norm(x).view(-1, M)  # [N/4, 4D]
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class QwenVision(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        C, P, Tp = cfg.in_channels, cfg.patch_size, cfg.temporal_patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(C, cfg.hidden_size, (Tp, P, P), (Tp, P, P))
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = QwenPatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            QwenPatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    def block_major(self, a, h, w):
        """Raster [h, w, ...] -> the 2x2-merge-block-major order of the pixel rows, flattened."""
        m = self.cfg.spatial_merge_size
        a = a.view(h // m, m, w // m, m, *a.shape[2:]).transpose(1, 2)  # [h/m, w/m, m, m, ...]
        return a.reshape(h * w, *a.shape[4:])

    def position_embedding(self, h, w):
        """The learned G x G table resampled bilinearly (align_corners) to an h x w grid."""
        G = math.isqrt(self.cfg.num_position_embeddings)
        table = self.pos_embed.weight.float().view(G, G, -1)
        ys = torch.linspace(0, G - 1, h, device=table.device)
        xs = torch.linspace(0, G - 1, w, device=table.device)
        y0, x0 = ys.floor().long(), xs.floor().long()
        y1, x1 = (y0 + 1).clamp(max=G - 1), (x0 + 1).clamp(max=G - 1)
        dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        pe = ((1 - dy) * (1 - dx) * table[y0][:, x0] + (1 - dy) * dx * table[y0][:, x1]
              + dy * (1 - dx) * table[y1][:, x0] + dy * dx * table[y1][:, x1])  # [h, w, D]
        return self.block_major(pe, h, w)

    def rotary(self, h, w, device):
        """cos, sin [h*w, 1, d]: the first half of the frequencies rotate by row, the second by column."""
        d = self.cfg.hidden_size // self.cfg.num_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d // 2, 2, device=device).float() / (d // 2))
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        pos = self.block_major(torch.stack([rows, cols], -1), h, w).float()  # [h*w, 2]
        angles = (pos[:, :, None] * inv_freq).flatten(1)  # [h*w, d/2]: row freqs then column freqs
        emb = torch.cat([angles, angles], -1)[:, None]  # [h*w, 1, d]
        return emb.cos(), emb.sin()

    def forward(self, pixels, grid_thw):
        """pixels [N, C*Tp*P*P] in block-major row order, grid_thw [n, 3] in patches -> (tokens [N/4, D_text],
        DeepStack features list of [N/4, D_text])."""
        proj = self.patch_embed.proj
        x = pixels.to(proj.weight.dtype) @ proj.weight.view(proj.out_channels, -1).T + proj.bias  # Conv3d as linear
        pos, cos, sin, segments, start = [], [], [], [], 0
        for t, h, w in grid_thw.tolist():
            pe = self.position_embedding(h, w)
            c, s = self.rotary(h, w, x.device)
            pos += [pe] * t
            cos += [c] * t
            sin += [s] * t
            for _ in range(t):  # every temporal group is its own attention segment
                segments.append((start, start + h * w))
                start += h * w
        x = x + torch.cat(pos).to(x.dtype)
        cos, sin = torch.cat(cos), torch.cat(sin)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE text decoder


def mrope_axis(cfg: QwenConfig):
    """Which position stream (0 = T, 1 = H, 2 = W) drives each of the head_dim/2 frequency channels.
    Interleaved (Qwen3-VL): THWTHW...THW then T for the rest, e.g. [24, 20, 20] -> 'THW' x 20 + 'TTTT'.
    Chunked (Qwen2-VL): 24 T, then 20 H, then 20 W."""
    sT, sH, sW = cfg.mrope_section
    i = torch.arange(sT + sH + sW)
    if not cfg.mrope_interleaved:
        return (i >= sT).long() + (i >= sT + sH).long()
    axis = torch.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * sH)] = 1
    axis[(i % 3 == 2) & (i < 3 * sW)] = 2
    return axis


def mrope_cos_sin(cfg: QwenConfig, positions, dtype):
    """positions [3, B, S] -> cos, sin [B, S, head_dim] (made in fp32, then cast like the reference)."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d)  # [d/2]
    angles = positions[..., None].float() * inv_freq  # [3, B, S, d/2]
    axis = mrope_axis(cfg).to(positions.device)
    angles = angles.gather(0, axis.expand_as(angles[:1]))[0]  # [B, S, d/2]
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class QwenAttention(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        H, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.d = nh, nkv, d
        self.q_proj = nn.Linear(H, nh * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, nkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, nkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * d, H, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # one weight shared by all heads, applied before rotary
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv, step=None, want_importance=False):
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.nh, self.d))
        k = self.k_norm(self.k_proj(x).view(B, S, self.nkv, self.d))
        v = self.v_proj(x).view(B, S, self.nkv, self.d)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, S, 1, d]
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)  # [B, nh, S, d]
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)  # [B, nkv, S, d]
        v = v.transpose(1, 2)
        importance = token_importance(q, k, mask, x, step.valid) if want_importance else None
        if kv is not None:
            k_cache, v_cache, cache_pos = kv
            k_cache[:, :, cache_pos] = k
            v_cache[:, :, cache_pos] = v
            k, v = k_cache, v_cache  # [B, nkv, S_max, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, nh, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.d)), importance


class QwenMoE(nn.Module):
    """Softmax over all experts in fp32, then top-k, then renormalise the k weights to sum 1 (softmax before top-k,
    as in DeepSeek/Qwen; gpt-oss does top-k first). No shared expert."""

    def __init__(self, cfg: QwenConfig, layer_idx):
        super().__init__()
        self.k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.layer_idx = layer_idx
        self.policy = None  # a router.py skip policy, installed by router.install
        self.impl = "ref"

    def route(self, x):
        probs = self.gate(x).float().softmax(-1)  # [T, E]
        top, ids = probs.topk(self.k, dim=-1)  # [T, K]
        pi_hat = top / top.sum(-1, keepdim=True)
        return Routing(weights=pi_hat if self.norm_topk_prob else top, ids=ids, pi_hat=pi_hat, probs=probs)

    def forward(self, x, step, importance=None):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        return routed_experts(self, x, self.route(x), step, importance).view(B, S, H)


class QwenDecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = QwenAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = QwenMoE(cfg, i) if cfg.is_moe_layer(i) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask, kv, step):
        # MC-MoE ranks prefill tokens by the attention they receive in this layer
        want = step.phase == "prefill" and getattr(getattr(self.mlp, "policy", None), "wants_importance", False)
        a, importance = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, step, want)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), step, importance)


@dataclass
class QwenState:
    """Everything the decoder layers need besides the hidden states; built once per forward by `embed`."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    step: Step
    cache: KVCache = None
    cache_pos: torch.Tensor = None
    visual: torch.Tensor = None  # [B, S] bool, positions of image/video pads
    deepstack: list = field(default_factory=list)  # per injected layer: [n_visual, H]


class Qwen3VLMoe(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.cfg = cfg
        lm = nn.Module()
        lm.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        lm.layers = nn.ModuleList(QwenDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        lm.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.model = nn.ModuleDict(dict(visual=QwenVision(cfg.vision), language_model=lm))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # ids of the special tokens (SPECIAL modality), set by the loader from the tokenizer files
        self.register_buffer("special_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model["language_model"].embed_tokens.weight

    def head_weight(self):
        return self.lm_head.weight

    def checkpoint_names(self):
        """checkpoint tensor name -> (parameter name, index into it); here the names coincide."""
        return {n: (n, None) for n, _ in self.named_parameters()}  # a tied lm_head is listed once, as embed

    def modality(self, input_ids, phase):
        vision = (input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)
        special = torch.isin(input_ids, self.special_ids)
        m = torch.full_like(input_ids, TEXT)
        m[special] = SPECIAL
        if phase == "prefill":  # a generated vision pad is text
            m[vision] = VISION
        return m

    def rope_index(self, input_ids, valid, image_grid_thw, video_grid_thw):
        """3-D positions [3, B, S] and each row's next position [B]. Text advances all three streams by one; a
        block of visual pads with merged grid (gh, gw) gets (p, p + row, p + col), then p += max(gh, gw). Every
        temporal group of a video is its own block. Padding is skipped (and gets position 0)."""
        m = self.cfg.vision.spatial_merge_size
        images = [] if image_grid_thw is None else image_grid_thw.tolist()
        videos = [] if video_grid_thw is None else video_grid_thw.tolist()
        grids = {self.cfg.image_token_id: iter(images),
                 self.cfg.video_token_id: iter([g for t, h, w in videos for g in [(1, h, w)] * t])}
        B, S = input_ids.shape
        positions = torch.zeros(3, B, S, dtype=torch.long)
        next_pos = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            ids = input_ids[b].tolist()
            keep = valid[b].tolist()
            s, p = 0, 0
            while s < S:
                if not keep[s]:
                    s += 1
                elif ids[s] in grids:
                    _, gh, gw = next(grids[ids[s]])
                    gh, gw = gh // m, gw // m
                    rows = torch.arange(gh).repeat_interleave(gw)
                    cols = torch.arange(gw).repeat(gh)
                    positions[:, b, s:s + gh * gw] = torch.stack([torch.zeros_like(rows), rows, cols]) + p
                    s, p = s + gh * gw, p + max(gh, gw)
                else:
                    positions[:, b, s] = p
                    s, p = s + 1, p + 1
            next_pos[b] = p
        return positions.to(input_ids.device), next_pos.to(input_ids.device)

    def new_cache(self, batch, max_len, device=None, dtype=None):
        w = self.lm_head.weight
        c = self.cfg
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       device or w.device, dtype or w.dtype)

    def encode_vision(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                      video_grid_thw=None):
        """Run the vision tower -> (visual [B, S] bool, features [n, H], DeepStack features list of [n, H]), the
        rows in sequence order of the image and video pads they replace."""
        B, S = input_ids.shape
        H = self.cfg.hidden_size
        visual = torch.zeros(B, S, dtype=torch.bool, device=input_ids.device)
        n_extra = len(self.cfg.vision.deepstack_visual_indexes)
        full = input_ids.new_zeros(1 + n_extra, B, S, H, dtype=self.lm_head.weight.dtype)  # main, deepstack...
        for pix, grid, token in ((pixel_values, image_grid_thw, self.cfg.image_token_id),
                                 (pixel_values_videos, video_grid_thw, self.cfg.video_token_id)):
            if pix is None:
                continue
            pads = input_ids == token
            main, extra = self.model["visual"](pix, grid)
            if main.shape[0] != int(pads.sum()):
                raise ValueError(f"{int(pads.sum())} pad tokens (id {token}) for {main.shape[0]} visual features")
            for j, feats in enumerate([main] + extra):
                full[j][pads] = feats.to(full.dtype)
            visual |= pads
        main, *deepstack = full[:, visual]  # images and videos merged by position
        return visual, main, deepstack

    def embed(self, input_ids, attention_mask=None, *, cache=None, cache_pos=None, phase=None, stats=None,
              media=None, **pixels):
        """Token embeddings with the vision features (`media` from encode_vision, computed here when pixels are
        given instead) in place of the pads, positions, mask: the state of the first layer. With a cache, the
        tokens go to cache indices cache_pos [S]; a decode step reads its positions from the cache, so with
        phase="decode" given nothing here depends on host-side state."""
        B, S = input_ids.shape
        dev = input_ids.device
        lm = self.model["language_model"]
        valid = torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        phase = phase or ("decode" if cache is not None and cache.length > 0 else "prefill")
        step = Step(self.modality(input_ids, phase), valid, phase, stats)
        h = lm.embed_tokens(input_ids)  # [B, S, H]
        if media is None and any(v is not None for k, v in pixels.items() if k.startswith("pixel")):
            media = self.encode_vision(input_ids, **pixels)
        visual, deepstack = None, []
        if media is not None and phase == "prefill":
            visual, main, deepstack = media
            h = h.clone()
            h[visual] = main  # the main features replace the pad embeddings
        if phase == "decode":
            positions = (cache.next_pos[:, None] + torch.arange(S, device=dev)).expand(3, B, S)
            cache.next_pos += S
        else:
            positions, next_pos = self.rope_index(input_ids, valid, pixels.get("image_grid_thw"),
                                                  pixels.get("video_grid_thw"))
        if cache is None:
            cache_pos = torch.arange(S, device=dev)
            mask = causal_mask(cache_pos, valid)
        else:
            if phase == "prefill":
                cache.next_pos.copy_(next_pos)
            cache.key_valid[:, cache_pos] = valid
            mask = causal_mask(cache_pos, cache.key_valid)
        cos, sin = mrope_cos_sin(self.cfg, positions, h.dtype)
        return h, QwenState(cos, sin, mask, step, cache, cache_pos, visual, deepstack)

    @property
    def layers(self):
        return self.model["language_model"].layers

    def layer(self, i, h, state: QwenState):
        kv = None if state.cache is None else (state.cache.k[i], state.cache.v[i], state.cache_pos)
        h = self.model["language_model"].layers[i](h, state.cos, state.sin, state.mask, kv, state.step)
        if i < len(state.deepstack):  # DeepStack: features of early ViT blocks added after the first layers
            h = h.clone()
            h[state.visual] += state.deepstack[i]
        return h

    def head(self, h):
        return self.lm_head(self.model["language_model"].norm(h))

    def forward(self, input_ids, attention_mask=None, *, cache=None, stats=None, media=None, last_only=False,
                **pixels):
        """pixels: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, as the processor returns them."""
        return run_decoder(self, input_ids, attention_mask, cache, stats, media, last_only, pixels)

    def decode_step(self, token, cache, cache_pos, stats=None):
        return decode_step(self, token, cache, cache_pos, stats)


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL config


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
    pad_token_id: int = 163839
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    model_type = "kimi_vl"

    def __post_init__(self):
        checks = [
            (self.q_lora_rank is None, f"q_lora_rank={self.q_lora_rank} is not supported (Kimi-VL uses null)"),
            (self.scoring_func == "sigmoid", f"scoring_func={self.scoring_func!r} is not supported (need 'sigmoid')"),
            (self.topk_method in ("noaux_tc", "greedy"), f"topk_method={self.topk_method!r} is not supported"),
            (self.n_routed_experts % self.n_group == 0, f"n_group={self.n_group} must divide n_routed_experts"),
            (self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}"),
            (self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok exceeds n_routed_experts"),
            (self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even"),
            (self.vision_head_dim % 4 == 0, f"vision head dim {self.vision_head_dim} must be a multiple of 4"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.merge_kernel_size = tuple(self.merge_kernel_size)

    @property
    def image_token_id(self) -> int:
        # the name model.py's shared code (special-token bookkeeping) uses; Kimi-VL has one media placeholder
        return self.media_placeholder_token_id

    @property
    def video_token_id(self) -> int:
        return self.media_placeholder_token_id

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_hf(cls, raw: dict, where: str) -> "KimiVLConfig":
        """Translate the checkpoint's config.json (kimi_vl / deepseek_v3 / moonvit) into our fields."""
        text, vision = raw.get("text_config"), raw.get("vision_config")
        if raw.get("model_type") != cls.model_type:
            raise ValueError(f"{where}: model_type {raw.get('model_type')!r}, expected 'kimi_vl'")
        if not isinstance(text, dict) or text.get("model_type") != "deepseek_v3":
            raise ValueError(f"{where}: text_config.model_type must be 'deepseek_v3'")
        if not isinstance(vision, dict) or vision.get("model_type") != "moonvit":
            raise ValueError(f"{where}: vision_config.model_type must be 'moonvit'")
        if text.get("rope_scaling") is not None:
            raise ValueError(f"{where}: text_config.rope_scaling {text['rope_scaling']} is not supported (no yarn)")
        if text.get("attention_bias", False):
            raise ValueError(f"{where}: text_config.attention_bias=true is not supported")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: text_config.hidden_act {text['hidden_act']!r}, expected 'silu'")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in text.items() if k in names}
        kw.update({f"vision_{k}": vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "intermediate_size") if k in vision})
        kw.update({k: vision[k] for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width",
                                          "merge_kernel_size") if k in vision})
        kw.update({k: raw[k] for k in ("media_placeholder_token_id", "pad_token_id", "tie_word_embeddings")
                   if k in raw})
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def kimi_checkpoint_slots(cfg: KimiVLConfig):
    """Yield (checkpoint name, parameter name, index) for every per-expert checkpoint tensor.

    The checkpoint stores experts.{e}.{gate,up,down}_proj.weight; we hold one stacked gate_up_proj [E, 2I, H]
    (gate rows, then up rows) and down_proj [E, H, I] per layer, so param[index] is where the tensor goes.
    """
    I = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        prefix = f"language_model.model.layers.{i}.mlp.experts"
        for e in range(cfg.n_routed_experts):
            yield f"{prefix}.{e}.gate_proj.weight", f"{prefix}.gate_up_proj", (e, slice(0, I))
            yield f"{prefix}.{e}.up_proj.weight", f"{prefix}.gate_up_proj", (e, slice(I, 2 * I))
            yield f"{prefix}.{e}.down_proj.weight", f"{prefix}.down_proj", (e,)


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL text decoder (DeepSeek-V3): MLA, router, MoE


def rope_interleaved(x, cos, sin):
    """Rotate the interleaved pairs (x0, x1), (x2, x3), ... of the last dim, pair i by angle pos * theta_i.

    DeepSeek checkpoints store the rope dims as interleaved pairs, not split halves, so no weight permutation is
    needed. The output keeps that layout; q and k agree, so the dot products are those of the reference.
    x [..., r], cos/sin broadcastable to [..., r/2].
    """
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # [..., r/2] each
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class MLACache:
    """Static per-layer buffers written at index tensors, with KVCache's bookkeeping (key_valid, next_pos,
    length). naive: k = per-head keys [L, B, h, S_max, d+r], v = values [L, B, h, S_max, d]. absorbed: k = the
    normalised latent [L, B, S_max, c], v = the rotated shared rope key [L, B, S_max, r]; at full size 576
    numbers per token and layer instead of 5120."""

    def __init__(self, cfg, attn_impl, batch, max_len, device, dtype):
        L, B, T, nh = cfg.num_hidden_layers, batch, max_len, cfg.num_attention_heads
        if attn_impl == "naive":
            k_shape, v_shape = (L, B, nh, T, cfg.qk_head_dim), (L, B, nh, T, cfg.v_head_dim)
        else:
            k_shape, v_shape = (L, B, T, cfg.kv_lora_rank), (L, B, T, cfg.qk_rope_head_dim)
        self.k = torch.zeros(k_shape, device=device, dtype=dtype)
        self.v = torch.zeros(v_shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rope position of the next token
        self.length = 0  # tokens written so far (host side, for the decode loop)
        self.max_len = max_len

    reset = KVCache.reset


class MLA(nn.Module):
    """Multi-head latent attention with a full-rank q_proj (q_lora_rank null)."""

    def __init__(self, cfg: KimiVLConfig, attn_impl="naive"):
        super().__init__()
        if attn_impl not in ("naive", "absorbed"):
            raise ValueError(f"attn_impl {attn_impl!r}, expected 'naive' or 'absorbed'")
        self.attn_impl = attn_impl
        self.nh, self.d, self.r, self.dv, self.c = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                    cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        self.scale = cfg.qk_head_dim ** -0.5  # the full 192-d q/k head; no yarn, so no mscale
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * (self.d + self.r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.c + self.r, bias=False)  # latent, then one shared rope key
        self.kv_a_layernorm = RMSNorm(self.c, cfg.kv_norm_eps)
        self.kv_b_proj = nn.Linear(self.c, self.nh * (self.d + self.dv), bias=False)  # per head: k_nope, v
        self.o_proj = nn.Linear(self.nh * self.dv, H, bias=False)

    def forward(self, x, cos, sin, mask, kv, step=None, want_importance=False):
        # b batch, s query pos, t key pos, h head, d nope / value head dim, r rope dim, c latent rank
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.d + self.r)  # [b, s, h, d+r]
        q_nope, q_rope = q.split([self.d, self.r], dim=-1)
        q_rope = rope_interleaved(q_rope, cos[:, :, None], sin[:, :, None])
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.c, self.r], dim=-1)  # [b, s, c], [b, s, r]
        latent = self.kv_a_layernorm(latent)
        k_rope = rope_interleaved(k_rope, cos, sin)
        if self.attn_impl == "absorbed" and kv is not None:
            latent_cache, rope_cache, cache_pos = kv
            latent_cache[:, cache_pos] = latent
            rope_cache[:, cache_pos] = k_rope
            latent, k_rope, kv = latent_cache, rope_cache, None  # [b, t, c], [b, t, r]
            if S == 1:
                return self.o_proj(self.absorbed(q_nope, q_rope, latent, k_rope, mask).reshape(B, S, -1)), None
            # a multi-token call (prefill) is compute-bound: expand the cached latents to per-head K/V below
        T = latent.shape[1]
        k_nope, v = self.kv_b_proj(latent).view(B, T, self.nh, self.d + self.dv).split([self.d, self.dv], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.nh, -1)], dim=-1)  # [b, t, h, d+r]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [b, h, s, d+r]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, h, t, d+r], [b, h, t, d]
        # the softmax scale is 1/sqrt(d + r), the one token_importance uses
        importance = token_importance(q, k, mask, x, step.valid) if want_importance else None
        if kv is not None:
            k_cache, v_cache, cache_pos = kv
            k_cache[:, :, cache_pos] = k
            v_cache[:, :, cache_pos] = v
            k, v = k_cache, v_cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)
        return self.o_proj(out.reshape(B, S, self.nh * self.dv)), importance  # heads concatenated

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


class KimiGate(nn.Module):
    """Sigmoid scores in fp32. noaux_tc: the correction bias is added only to choose the experts (group-limited
    top-k); the weights are the unbiased scores of the chosen experts, renormalised, times routed_scaling_factor."""

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


class KimiMoE(nn.Module):
    """Routed experts (skippable by the policy) plus shared experts that every token always runs, unweighted."""

    def __init__(self, cfg: KimiVLConfig, layer_idx):
        super().__init__()
        self.gate = KimiGate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
        self.layer_idx = layer_idx
        self.policy = None  # a router.py skip policy, installed by router.install
        self.impl = "ref"

    def forward(self, x, step, importance=None):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        return (routed_experts(self, x, self.gate(x), step, importance) + self.shared_experts(x)).view(B, S, H)


class KimiDecoderLayer(nn.Module):
    def __init__(self, cfg: KimiVLConfig, i, attn_impl):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, attn_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = KimiMoE(cfg, i) if cfg.is_moe_layer(i) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask, kv, step):
        # MC-MoE ranks prefill tokens by the attention they receive in this layer
        want = step.phase == "prefill" and getattr(getattr(self.mlp, "policy", None), "wants_importance", False)
        a, importance = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, step, want)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), step, importance)


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
                                    align_corners=False)[0].permute(1, 2, 0)     # [h, w, C]
            out.append(pos.flatten(0, 1))                                         # [h*w, C], row-major
        return torch.cat(out)


class MoonViTPatchEmbed(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.vision_hidden_size, kernel_size=p, stride=p)
        self.pos_emb = MoonViTPosEmb(cfg)

    def forward(self, pixel_values, grid_hws: list):
        L = pixel_values.shape[0]
        x = self.proj(pixel_values).view(L, -1)                                   # [L, C]
        return x + self.pos_emb(grid_hws).to(x.dtype)


def apply_rope_2d(x, cos, sin):
    """x [L, h, D]; rotate the D/2 (real, imag) pairs in fp32; cos/sin [L, D/2] (per-pair angles)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)                            # [L, h, D/2] each
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


class MoonViTBlock(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        C, eps = cfg.vision_hidden_size, cfg.vision_norm_eps
        self.n_heads = cfg.vision_num_attention_heads
        self.norm0 = nn.LayerNorm(C, eps=eps)
        self.wqkv = nn.Linear(C, 3 * C)                                           # rows: all q | all k | all v
        self.wo = nn.Linear(C, C)
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.mlp = nn.ModuleDict(dict(fc0=nn.Linear(C, cfg.vision_intermediate_size),
                                      fc1=nn.Linear(cfg.vision_intermediate_size, C)))

    def forward(self, x, cos, sin, seqlens: list):
        # L patches of all images, h heads, D head dim
        L, C = x.shape
        q, k, v = self.wqkv(self.norm0(x)).view(L, 3, self.n_heads, -1).unbind(1)  # [L, h, D] each
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        # block-diagonal attention: each image attends only to its own patches (the remote eager path's
        # additive boolean mask leaks across images; flash varlen, which everyone runs, does not)
        out = torch.empty_like(q)
        start = 0
        for n in seqlens:
            s = slice(start, start + n)
            out[s] = F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1),
                                                    v[s].transpose(0, 1)).transpose(0, 1)  # [n, h, D]
            start += n
        x = x + self.wo(out.reshape(L, C))
        return x + self.mlp.fc1(F.gelu(self.mlp.fc0(self.norm1(x)), approximate="tanh"))


class MoonViT(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MoonViTPatchEmbed(cfg)
        self.encoder = nn.ModuleDict(dict(
            blocks=nn.ModuleList(MoonViTBlock(cfg) for _ in range(cfg.vision_num_hidden_layers)),
            final_layernorm=nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_norm_eps)))

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
        seqlens = [h * w for h, w in grids]
        for block in self.encoder.blocks:
            x = block(x, cos, sin, seqlens)
        x = self.encoder.final_layernorm(x)
        merged = []
        for xi, (h, w) in zip(x.split(seqlens), grids):
            xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)     # [h/2, w/2, 2, 2, C]
            merged.append(xi.reshape((h // kh) * (w // kw), kh * kw, -1))         # [h*w/4, 4, C]; tl, tr, bl, br
        return torch.cat(merged)


class KimiProjector(nn.Module):
    def __init__(self, cfg: KimiVLConfig):
        super().__init__()
        C = cfg.vision_hidden_size
        n = C * cfg.merge_kernel_size[0] * cfg.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(C, eps=cfg.vision_norm_eps)                 # per sub-patch, not over 4C
        self.linear_1 = nn.Linear(n, n)
        self.linear_2 = nn.Linear(n, cfg.hidden_size)

    def forward(self, x):
        x = self.pre_norm(x).flatten(1)                                           # [M, 4C], sub-patch major
        return self.linear_2(F.gelu(self.linear_1(x)))                            # exact erf GELU


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL whole model


@dataclass
class KimiState:
    """Everything the decoder layers need besides the hidden states; built once per forward by `embed`."""
    cos: torch.Tensor  # [B, S, r/2]
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, S, S_kv] bool
    step: Step
    cache: MLACache = None
    cache_pos: torch.Tensor = None


class KimiVL(nn.Module):
    def __init__(self, cfg: KimiVLConfig, attn_impl="absorbed"):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = attn_impl
        self.vision_tower = MoonViT(cfg)
        self.multi_modal_projector = KimiProjector(cfg)
        lm = nn.Module()
        lm.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        lm.layers = nn.ModuleList(KimiDecoderLayer(cfg, i, attn_impl) for i in range(cfg.num_hidden_layers))
        lm.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.language_model = nn.ModuleDict(dict(model=lm, lm_head=nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                             bias=False)))
        self.tie_weights()
        # ids of the special tokens (SPECIAL modality), set by the loader from the tokenizer files
        self.register_buffer("special_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def tie_weights(self):
        """Share the embedding with lm_head when the config says so; again after to_empty, which unties them."""
        if self.cfg.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    def head_weight(self):
        return self.language_model.lm_head.weight

    def checkpoint_names(self):
        """checkpoint tensor name -> (parameter name, index into it): the names coincide except the experts."""
        names = {n: (n, None) for n, _ in self.named_parameters(remove_duplicate=False)}
        for n, p, index in kimi_checkpoint_slots(self.cfg):
            names.pop(p, None)  # the stacked parameter is filled slot by slot instead
            names[n] = (p, index)
        if self.cfg.tie_word_embeddings:
            del names["language_model.lm_head.weight"]
        return names

    def modality(self, input_ids, phase):
        media = input_ids == self.cfg.media_placeholder_token_id
        special = torch.isin(input_ids, self.special_ids)
        m = torch.full_like(input_ids, TEXT)
        m[special & ~media] = SPECIAL
        if phase == "prefill":  # a generated media placeholder is text
            m[media] = VISION
        return m

    def new_cache(self, batch, max_len, device=None, dtype=None):
        w = self.language_model.lm_head.weight
        return MLACache(self.cfg, self.attn_impl, batch, max_len, device or w.device, dtype or w.dtype)

    def encode_vision(self, input_ids, pixel_values=None, image_grid_hws=None):
        """Run MoonViT and the projector -> (media [B, S] bool, features [n, H]), the rows in sequence order of
        the media placeholders they replace. pixel_values [L, 3, 14, 14], image_grid_hws [n_images, 2]."""
        cfg = self.cfg
        kh, kw = cfg.merge_kernel_size
        if image_grid_hws is None or image_grid_hws.ndim != 2 or image_grid_hws.shape[1] != 2:
            raise ValueError("image_grid_hws must be an integer tensor [n_images, 2] of (h, w) patch counts")
        if bool(((image_grid_hws[:, 0] % kh) != 0).any() or ((image_grid_hws[:, 1] % kw) != 0).any()):
            raise ValueError(f"image_grid_hws {image_grid_hws.tolist()} must be multiples of the {kh}x{kw} merge")
        L, p = int(image_grid_hws.prod(-1).sum()), cfg.patch_size
        if tuple(pixel_values.shape) != (L, 3, p, p):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, image_grid_hws needs "
                             f"{(L, 3, p, p)}")
        media = input_ids == cfg.media_placeholder_token_id
        feats = self.multi_modal_projector(self.vision_tower(pixel_values, image_grid_hws))  # [n, H]
        if feats.shape[0] != int(media.sum()):
            raise ValueError(f"{int(media.sum())} media placeholder tokens (id {cfg.media_placeholder_token_id}) "
                             f"for {feats.shape[0]} image features")
        return media, feats

    def embed(self, input_ids, attention_mask=None, *, cache=None, cache_pos=None, phase=None, stats=None,
              media=None, **pixels):
        """Token embeddings with the image features (`media` from encode_vision, computed here when pixels are
        given instead) in place of the placeholders, positions, mask: the state of the first layer. With a
        cache, the tokens go to cache indices cache_pos [S]; a decode step reads its positions from the cache."""
        B, S = input_ids.shape
        dev = input_ids.device
        valid = torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        phase = phase or ("decode" if cache is not None and cache.length > 0 else "prefill")
        step = Step(self.modality(input_ids, phase), valid, phase, stats)
        h = self.language_model.model.embed_tokens(input_ids)  # [B, S, H]
        if media is None and pixels.get("pixel_values") is not None:
            media = self.encode_vision(input_ids, **pixels)
        if media is not None and phase == "prefill":
            where, feats = media
            h = h.masked_scatter(where[..., None], feats.to(h.dtype))  # replaces the placeholders in order
        # plain 1-D positions (no M-RoPE) that count only real tokens, so a left-padded row starts at 0
        if phase == "decode":
            positions = cache.next_pos[:, None] + torch.arange(S, device=dev)  # [B, S]
            cache.next_pos += S
        else:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        if cache is None:
            cache_pos = torch.arange(S, device=dev)
            mask = causal_mask(cache_pos, valid)
        else:
            if phase == "prefill":
                cache.next_pos.copy_(valid.long().sum(-1))
            cache.key_valid[:, cache_pos] = valid
            mask = causal_mask(cache_pos, cache.key_valid)
        r = self.cfg.qk_rope_head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, r, 2, device=dev).float() / r)  # [r/2]
        angles = positions[..., None].float() * inv_freq  # [B, S, r/2], fp32 like the reference
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)  # then cast, as the reference does
        return h, KimiState(cos, sin, mask, step, cache, cache_pos)

    @property
    def layers(self):
        return self.language_model.model.layers

    def layer(self, i, h, state: KimiState):
        kv = None if state.cache is None else (state.cache.k[i], state.cache.v[i], state.cache_pos)
        return self.language_model.model.layers[i](h, state.cos, state.sin, state.mask, kv, state.step)

    def head(self, h):
        # the remote code returns fp32 logits
        return self.language_model.lm_head(self.language_model.model.norm(h)).float()

    def forward(self, input_ids, attention_mask=None, *, cache=None, stats=None, media=None, last_only=False,
                **pixels):
        """pixels: pixel_values, image_grid_hws, as the processor returns them."""
        return run_decoder(self, input_ids, attention_mask, cache, stats, media, last_only, pixels)

    def decode_step(self, token, cache, cache_pos, stats=None):
        return decode_step(self, token, cache, cache_pos, stats)


# ---------------------------------------------------------------------------------------------------------------
# Loading: meta-device build, one allocation per parameter, tensor-by-tensor fill from safetensors


CONFIGS = {"qwen3_vl_moe": QwenConfig, "kimi_vl": KimiVLConfig}
MODELS = {QwenConfig: Qwen3VLMoe, KimiVLConfig: KimiVL}


def read_special_ids(path, cfg):
    """Ids of the tokens marked special in the tokenizer files, minus the vision pads (they are VISION tokens)."""
    ids = set()
    tok, tok_cfg = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tok):
        with open(tok) as f:
            ids |= {t["id"] for t in json.load(f).get("added_tokens", []) if t.get("special")}
    elif os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            added = json.load(f).get("added_tokens_decoder", {})
        ids |= {int(i) for i, t in added.items() if t.get("special")}
    return tuple(sorted(ids - {cfg.image_token_id, cfg.video_token_id}))


def checkpoint_files(path):
    """checkpoint tensor name -> safetensors file, from the index or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise FileNotFoundError(f"{index}: {len(missing)} shard(s) listed but missing: {', '.join(missing)}")
        return {n: os.path.join(path, f) for n, f in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors")
    return {n: single for n in safetensors_keys(single)}


def open_safetensors(file):
    from safetensors import safe_open
    with open(file, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{file}: a git-lfs pointer file, not the weights (run `git lfs pull` in that folder)")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def safetensors_keys(file):
    with open_safetensors(file) as f:
        return list(f.keys())


def copy_chunked(src, target, shape, transpose, chunk_bytes=16 << 20):
    """target <- src (a safetensors slice) in pieces of at most chunk_bytes along the first axis, so the host
    never holds more than one piece beside the parameters."""
    if not shape:
        target.copy_(src[...])
        return
    row_bytes = max(1, math.prod(shape[1:]) * target.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for a in range(0, shape[0], step):
        piece = src[a:a + step]
        if transpose:
            piece = piece.transpose(-2, -1)
        (target[:, a:a + step] if transpose and len(shape) == 2 else target[a:a + step]).copy_(piece)


def load(path, device="cpu", dtype=torch.bfloat16):
    """The model of checkpoint folder `path` with its weights on `device` in `dtype`, strictly checked."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = MODELS[type(cfg)](cfg)
    model.to(dtype).to_empty(device=device)  # the only allocation of the weights
    model.special_ids = torch.tensor(read_special_ids(path, cfg), dtype=torch.long, device=device)
    model.tie_weights()  # to_empty unties shared parameters
    fill_from_checkpoint(model, path)
    return model.eval().requires_grad_(False)


def fill_from_checkpoint(model, path):
    """Copy every checkpoint tensor into its parameter slice, reading one tensor (or one expert) at a time.
    A stored [.., a, b] tensor whose parameter slot is [.., b, a] is transposed: the hub stores experts as
    x @ W ([E, H, 2I]), transformers 5 re-saves them as [E, 2I, H]; H != 2I, so the shape decides."""
    files = checkpoint_files(path)
    wanted = model.checkpoint_names()
    params = dict(model.named_parameters())
    problems = [f"missing tensor {n}" for n in sorted(set(wanted) - set(files))]
    problems += [f"unexpected tensor {n} in {os.path.basename(files[n])}" for n in sorted(set(files) - set(wanted))]
    by_file = {}
    for name in wanted:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                pname, index = wanted[name]
                target = params[pname].data if index is None else params[pname].data[index]
                src = f.get_slice(name)
                shape = tuple(src.get_shape())
                if shape == tuple(target.shape):
                    transpose = False
                elif len(shape) >= 2 and shape[:-2] + shape[-2:][::-1] == tuple(target.shape):
                    transpose = True
                else:
                    problems.append(f"{name}: expected shape {tuple(target.shape)}, found {shape} "
                                    f"in {os.path.basename(file)}")
                    continue
                try:
                    copy_chunked(src, target, shape, transpose)
                except Exception as e:
                    problems.append(f"{name}: unreadable in {os.path.basename(file)} ({e})")
    if problems:
        raise ValueError(f"{path}: {len(problems)} checkpoint problem(s): " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Generation


def set_expert_impl(model, impl):
    """Route every MoE layer's expert compute through `impl`: "ref" (the loop above) or a kernels.py path."""
    for layer in model.layers:
        if hasattr(layer.mlp, "impl"):
            layer.mlp.impl = impl
    return model


def decode_step_fn(model, cache, *, compile=False, cuda_graph=False, stats=None):
    """step(token [B, 1], cache_pos [1]) -> logits [B, V] for `cache`. compile: torch.compile with fullgraph, so a
    graph break is an error; cuda_graph: capture the compiled step once and replay it (the cache tensors are
    written in place, so their addresses stay fixed as a graph requires)."""
    def step(token, cache_pos):
        return model.decode_step(token, cache, cache_pos, stats)
    if compile:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    if not cuda_graph:
        return step
    B = cache.k.shape[1]
    static_token = torch.zeros(B, 1, dtype=torch.long, device=cache.k.device)
    # warm-up writes at the last cache index, which a decode that fits the cache never reaches
    static_pos = torch.full((1,), cache.max_len - 1, dtype=torch.long, device=cache.k.device)
    if stats is not None:
        stats.counts = stats.counts.to(cache.k.device)  # its final address, before the graph records it
    written = [cache.next_pos, cache.key_valid] + ([] if stats is None else [stats.counts])
    saved = [t.clone() for t in written]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up runs (compilation, autotuning) outside the capture
        for _ in range(2):
            step(static_token, static_pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = step(static_token, static_pos)
    # undo what the warm-up wrote, in place: the graph holds these addresses
    for t, old in zip(written, saved):
        t.copy_(old)

    def replay(token, cache_pos):
        static_token.copy_(token)
        static_pos.copy_(cache_pos)
        graph.replay()
        return static_logits
    return replay


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=32, stop_ids=(), stats=None, compile=False,
             cuda_graph=False, **pixels):
    """Greedy decoding with the KV cache. input_ids [B, S] (left padded) -> new token ids [B, n]; a row that hit
    a stop id keeps emitting it."""
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens)
    logits = model(input_ids, attention_mask, cache=cache, stats=stats, last_only=True, **pixels)[:, -1]
    step = decode_step_fn(model, cache, compile=compile, cuda_graph=cuda_graph, stats=stats)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for i in range(max_new_tokens):
        token = logits.argmax(-1)  # [B]
        token = torch.where(done, out[-1] if out else token, token)
        out.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(token[:, None], torch.tensor([cache.length], device=input_ids.device))
        cache.length += 1
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------------
# The embedded default: a tiny deterministic checkpoint in the exact Hugging Face layout, made on first use


def tiny_qwen_config():
    """config.json of the tiny default, in the hub dialect, with the real special-token ids."""
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "vocab_size": 151936, "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 5000000, "attention_bias": False, "max_position_embeddings": 32768,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16"},
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": 4, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "out_hidden_size": 128, "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1, 2, 3]},
    }


# the real Qwen3-VL preprocessor_config.json values
TINY_QWEN_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                          "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                          "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                          "image_processor_type": "Qwen2VLImageProcessorFast"}


def random_weights(model, seed=0):
    """Variance-preserving random weights, drawn on the parameters' device. Routers are scaled up and share a
    low-rank preference so that routing is peaked and uneven across experts, as in real Qwen3 routers (uniform
    routing makes skipping degenerate)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            if p.ndim == 1:
                p.normal_(generator=g).mul_(0.05).add_(1.0 if "norm" in name else 0.0)
            elif name.endswith("mlp.gate.weight"):
                E, H = p.shape
                popular = torch.randn(E, 1, generator=g, device=p.device) @ torch.randn(1, H, generator=g,
                                                                                      device=p.device)
                p.copy_((2.0 * torch.randn(E, H, generator=g, device=p.device) + popular) / H ** 0.5)
            else:
                fan_in = p.shape[-1] if p.ndim != 5 else p[0].numel()
                p.normal_(generator=g).mul_(fan_in ** -0.5)
    return model


def save_checkpoint(model, raw_config, path, dtype=torch.bfloat16):
    """Write `model` as a Hugging Face checkpoint folder in the hub dialect (experts as x @ W, [E, H, 2I])."""
    from safetensors.torch import save_file
    tensors = {}
    for name, (pname, index) in model.checkpoint_names().items():
        t = dict(model.named_parameters())[pname].data
        t = t if index is None else t[index]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t = t.transpose(1, 2)
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw_config, f, indent=2)


def tiny_kimi_config():
    """config.json of the tiny Kimi-VL default, with the real special-token ids and vocabulary size."""
    return {
        "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
        "media_placeholder_token_id": 163605, "pad_token_id": 163839, "tie_word_embeddings": False,
        "vision_config": {"model_type": "moonvit", "patch_size": 14, "num_attention_heads": 4,
                          "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                          "init_pos_emb_height": 16, "init_pos_emb_width": 16, "merge_kernel_size": [2, 2]},
        "text_config": {
            "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 128, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "n_shared_experts": 2,
            "n_routed_experts": 16, "routed_scaling_factor": 2.446, "kv_lora_rank": 32, "q_lora_rank": None,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32, "topk_method": "noaux_tc",
            "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4, "moe_layer_freq": 1,
            "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
            "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 800000.0,
            "rope_scaling": None, "attention_bias": False, "bos_token_id": 163584, "eos_token_id": 163585,
            "pad_token_id": 163839, "tie_word_embeddings": False},
    }


# the real preprocessor_config.json values of Kimi-VL-A3B-Instruct
TINY_KIMI_PREPROCESSOR = {"in_token_limit": 4096, "patch_size": 14, "num_pooled_tokens": 1024,
                          "merge_kernel_size": [2, 2], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                          "pad_input": True, "image_processor_type": "KimiVLImageProcessor"}

TINY = {"qwen": ("tiny-qwen3-vl-moe-v1", tiny_qwen_config, TINY_QWEN_PREPROCESSOR),
        "kimi": ("tiny-kimi-vl-v1", tiny_kimi_config, TINY_KIMI_PREPROCESSOR)}


def tiny_vocabulary(folder, kind):
    """Ids the tiny tokenizer written in `folder` can produce: its regular tokens and its special tokens."""
    if kind == "qwen":
        with open(os.path.join(folder, "tokenizer.json")) as f:
            return list(json.load(f)["model"]["vocab"].values())
    with open(os.path.join(folder, "tiktoken.model")) as f:
        ranks = sum(1 for line in f if line.strip())
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        return list(range(ranks)) + [int(i) for i in json.load(f)["added_tokens_decoder"]]


def default_checkpoint(kind="qwen"):
    """Folder of a tiny built-in checkpoint ("qwen" or "kimi") in the real Hugging Face layout, written on first
    use (atomically: a temp folder renamed) with deterministic random weights and a small real-format tokenizer."""
    import shutil
    import tempfile
    import processor
    name, make_config, preprocessor = TINY[kind]
    cache = str(processor.cache_dir())
    path = os.path.join(cache, name)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache, prefix=".tmp-")
    try:
        raw = make_config()
        cfg = CONFIGS[raw["model_type"]].from_hf(raw, "tiny default")
        model = random_weights(MODELS[type(cfg)](cfg))
        if kind == "qwen":
            processor.write_tiny_tokenizer(tmp)
        else:
            processor.write_tiny_kimi_tokenizer(tmp)
        unused = torch.ones(cfg.vocab_size, dtype=torch.bool)
        unused[tiny_vocabulary(tmp, kind)] = False
        with torch.no_grad():
            model.head_weight()[unused] = 0.0  # like the real padding rows: ids the tokenizer lacks are unlikely
            model.head_weight()[~unused] *= 6.0  # peaked next-token distributions, as in a trained model
        save_checkpoint(model, raw, tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line


def resolve_model(name):
    """A checkpoint folder, or "tiny-qwen" / "tiny-kimi" (default tiny-qwen): a built-in tiny checkpoint."""
    if name in (None, "tiny-qwen", "tiny-kimi"):
        return default_checkpoint("kimi" if name == "tiny-kimi" else "qwen")
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model {name}: no such folder (or use tiny-qwen / tiny-kimi)")
    return name


PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_grid_hws")


def main(args):
    import processor
    path = resolve_model(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    model = set_expert_impl(load(path, device=args.device, dtype=dtype), args.expert_impl)
    proc = processor.for_model(path, model.cfg.model_type)
    load_s = time.perf_counter() - t0
    stats = None
    if args.thresholds:
        import router
        import search
        router.install(model, search.load_thresholds(args.thresholds, model))
        stats = router.SkipStats(len(model.layers))
    batch = proc.from_cli(args.prompt, images=args.image, video=args.video, system=args.system)
    pixels = {k: batch[k].to(args.device) for k in PIXEL_KEYS if batch.get(k) is not None}
    input_ids = batch["input_ids"][None].to(args.device)
    t0 = time.perf_counter()
    tokens = generate(model, input_ids, max_new_tokens=args.max_new_tokens, stop_ids=proc.stop_token_ids,
                      stats=stats, compile=args.compile, cuda_graph=args.compile and args.device == "cuda", **pixels)
    gen_s = time.perf_counter() - t0
    token_ids = tokens[0].tolist()
    if token_ids and token_ids[-1] in proc.stop_token_ids:
        token_ids = token_ids[: token_ids.index(token_ids[-1]) + 1]
    text = proc.decode(token_ids)
    print(text)
    report = dict(text=text, token_ids=token_ids, prompt_tokens=input_ids.shape[1], model=path,
                  load_s=round(load_s, 3), generate_s=round(gen_s, 3))
    if stats is not None:
        s = stats.summary()
        report["skip_ratio"] = {phase: {m: s[phase][m] for m in ("text", "vision", "all")}
                                for phase in ("prefill", "decode", "total")}
        print(f"skipped routed-expert slots: prefill {s['prefill']['all']:.1%} (text {s['prefill']['text']:.1%}, "
              f"vision {s['prefill']['vision'] or 0:.1%}), decode {s['decode']['all'] or 0:.1%}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Greedy generation with Qwen3-VL-MoE or Kimi-VL from a Hugging Face "
                                "checkpoint folder.")
    p.add_argument("--model", help="checkpoint folder, or tiny-qwen (default) / tiny-kimi: a tiny built-in "
                   "checkpoint made on first use")
    p.add_argument("--prompt", required=True, help="user text")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--video", help="a folder of frame images or an animated GIF")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--thresholds", help="MoDES thresholds file from search.py: skip experts while generating")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step and capture it in a CUDA graph (default: on for cuda)")
    p.add_argument("--expert-impl", default="auto", help="routed-expert compute: ref (the readable loop above) or a "
                   "kernels.py path: auto, experts, grouped, gather, triton")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON object with text and token ids")
    args = p.parse_args()
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    try:
        main(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
