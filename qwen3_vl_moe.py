"""
Qwen3-VL-MoE (Qwen/Qwen3-VL-30B-A3B-Instruct, Qwen3-VL-235B-A22B-Instruct) read top to bottom: config, vision
tower, text decoder, model. The shared blocks, the MoE choke point and the loader are in model.py.

- Vision: a ViT with Conv3d-as-linear patches, bilinear-resampled learned positions, 2-D rotary, per-image
  attention, a patch merger and DeepStack mergers whose features join the first decoder layers' outputs.
- Decoder: q/k-norm, GQA, interleaved MRoPE (3-D positions: time, row, column), 128-expert softmax top-8 MoE.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (MoE, DecoderLayer, Experts, KVCache, RMSNorm, Routing, VisionLanguageModel, attention,
                   block_diagonal_attention, check, rotate_half)
from parallel import Shard

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
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5e6
    mrope_section: tuple = (24, 20, 20)  # frequency channels given to the T, H and W position streams
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    model_type = "qwen3_vl_moe"

    @property
    def media_token_ids(self):
        return (self.image_token_id, self.video_token_id)

    def is_moe_layer(self, i):
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def architecture(self):
        """Every config.json value the model is built from, by its name in the hub's config.json: what alpha and
        thresholds files are made for (router.py: fingerprint). Fixed names, not this dataclass's fields, so a
        refactor keeps the fingerprint; a key read in the future enters only where it differs from today's
        behaviour. vision rope_theta and eps are not listed: config.json does not set them."""
        v = self.vision
        return {
            **{f"text_config.{k}": getattr(self, k) for k in QWEN_TEXT_ARCH},
            "text_config.rope_theta": float(self.rope_theta), "text_config.rms_norm_eps": float(self.rms_norm_eps),
            "text_config.mlp_only_layers": sorted(self.mlp_only_layers),
            "text_config.rope_scaling.mrope_section": list(self.mrope_section),
            **{f"vision_config.{k}": getattr(v, k) for k in QWEN_VISION_ARCH},
            "vision_config.deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            **{k: getattr(self, k) for k in QWEN_TOKEN_KEYS + ("tie_word_embeddings",)},
        }

    @classmethod
    def from_hf(cls, raw, where):
        """Both dialects in the wild: the hub's rope_scaling + rope_theta and num_experts, and transformers 5's
        rope_parameters and num_local_experts. Keys named like our fields are taken as they are. norm_topk_prob
        and mrope_interleaved are not read: Qwen3-VL-MoE always renormalises its top-k weights and always
        interleaves MRoPE (both reference implementations hard-code it; Qwen2-VL's chunked map must not be used)."""
        t, v = raw.get("text_config"), raw.get("vision_config")
        check(isinstance(t, dict) and isinstance(v, dict),
                  f"{where}: qwen3_vl_moe config.json needs text_config and vision_config objects")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        for part, d, keys in (("text_config", t, QWEN_TEXT_KEYS), ("vision_config", v, QWEN_VISION_KEYS),
                              ("the top level", raw, QWEN_TOKEN_KEYS)):
            missing = next((k for k in keys if k not in d), None)
            check(missing is None, f"{where}: missing key {missing!r} in {part} of a qwen3_vl_moe config")
        for part, d, key, supported in (("text_config", t, "hidden_act", "silu"),
                                        ("vision_config", v, "hidden_act", "gelu_pytorch_tanh")):
            check(d.get(key, supported) == supported,
                      f"{where}: {part}.{key} {d.get(key)!r} is not supported (need {supported!r})")
        vision = QwenVisionConfig(**{k: v[k] for k in QWEN_VISION_KEYS + ("in_channels",) if k in v},
                                  rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        vision.deepstack_visual_indexes = tuple(vision.deepstack_visual_indexes)
        kw = {k: t[k] for k in {f.name for f in fields(cls)} & set(t)}
        kw.update({k: raw[k] for k in QWEN_TOKEN_KEYS}, vision=vision,
                  mlp_only_layers=tuple(t.get("mlp_only_layers") or ()),
                  num_experts=t["num_experts"] if "num_experts" in t else t["num_local_experts"],
                  head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                  rope_theta=rope.get("rope_theta", t.get("rope_theta", 5e5)),  # transformers' default when absent
                  mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),  # transformers' default
                  tie_word_embeddings=raw.get("tie_word_embeddings", False))
        cfg = cls(**kw)
        check(len(cfg.mrope_section) == 3, f"{where}: mrope_section {list(cfg.mrope_section)} must be 3 numbers")
        check_values(cfg, where)
        check(cfg.num_experts_per_tok <= cfg.num_experts,
                  f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} exceeds num_experts {cfg.num_experts}")
        return cfg


def is_int(value, low=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_values(cfg, where):
    """Type and range of every value the model is built from, and their agreement, so that a number written as a
    string, a top-k of 0 or a head count that does not divide reaches no tensor code (config.json names)."""
    v = cfg.vision
    ints = [(f"text_config.{k}", getattr(cfg, k), 1) for k in QWEN_TEXT_ARCH if k != "attention_bias"]
    ints += [("text_config.intermediate_size", cfg.intermediate_size, 0)]
    ints += [(f"vision_config.{k}", getattr(v, k), 1) for k in QWEN_VISION_ARCH]
    ints += [(k, getattr(cfg, k), 0) for k in QWEN_TOKEN_KEYS]
    for name, value, low in ints:
        check(is_int(value, low), f"{where}: {name} must be an integer >= {low}, got {value!r}")
    for name, value in (("text_config.rms_norm_eps", cfg.rms_norm_eps), ("text_config.rope_theta", cfg.rope_theta)):
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
              f"{where}: {name} must be a number > 0, got {value!r}")
    for name in ("attention_bias", "tie_word_embeddings"):
        check(isinstance(getattr(cfg, name), bool), f"{where}: {name} must be true or false, got "
                                                    f"{getattr(cfg, name)!r}")
    L = cfg.num_hidden_layers
    check(all(is_int(i, 0) and i < L for i in cfg.mlp_only_layers),
          f"{where}: mlp_only_layers {list(cfg.mlp_only_layers)} must be layer indices below {L}")
    check(all(is_int(n, 0) for n in cfg.mrope_section), f"{where}: mrope_section {list(cfg.mrope_section)} must "
          f"be integers >= 0")  # any sum: the reference slices whatever it is given
    check(cfg.num_attention_heads % cfg.num_key_value_heads == 0, f"{where}: num_attention_heads "
          f"{cfg.num_attention_heads} is not a multiple of num_key_value_heads {cfg.num_key_value_heads}")
    check(all(t < cfg.vocab_size for t in cfg.media_token_ids + (cfg.vision_start_token_id, cfg.vision_end_token_id)),
          f"{where}: the vision token ids must be below vocab_size {cfg.vocab_size}")
    check(v.hidden_size % v.num_heads == 0 and (v.hidden_size // v.num_heads) % 4 == 0,
          f"{where}: vision_config.hidden_size {v.hidden_size} must split into num_heads {v.num_heads} heads of a "
          f"multiple of 4 dims (2-D rotary)")
    check(math.isqrt(v.num_position_embeddings) ** 2 == v.num_position_embeddings,
          f"{where}: vision_config.num_position_embeddings {v.num_position_embeddings} must be a square (a grid)")
    check(v.out_hidden_size == cfg.hidden_size, f"{where}: vision_config.out_hidden_size {v.out_hidden_size} must "
          f"be text_config.hidden_size {cfg.hidden_size} (the merger feeds the decoder)")
    idx = v.deepstack_visual_indexes
    check(all(is_int(i, 0) and i < v.depth for i in idx) and len(set(idx)) == len(idx) and len(idx) <= L,
          f"{where}: deepstack_visual_indexes {list(idx)} must be distinct vision block indices below depth "
          f"{v.depth}, at most num_hidden_layers {L} of them")


QWEN_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "moe_intermediate_size", "num_experts_per_tok", "rms_norm_eps")
QWEN_VISION_KEYS = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                    "spatial_merge_size", "out_hidden_size", "num_position_embeddings", "deepstack_visual_indexes")
QWEN_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
QWEN_TEXT_ARCH = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                  "decoder_sparse_step", "max_position_embeddings", "attention_bias")
QWEN_VISION_ARCH = ("depth", "hidden_size", "num_heads", "intermediate_size", "in_channels", "patch_size",
                    "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings")


# ---------------------------------------------------------------------------------------------------------------
# Vision tower


class QwenPatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        C, P, Tp = cfg.in_channels, cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Conv3d(C, cfg.hidden_size, (Tp, P, P), (Tp, P, P))

    def forward(self, pixels):
        # a Conv3d whose stride equals its kernel on one patch is a matmul with the flattened kernel
        return pixels.to(self.proj.weight.dtype) @ self.proj.weight.view(self.proj.out_channels, -1).T + self.proj.bias


class QwenVisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, lengths):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # 3 x [N, h, d]
        # rotary in fp32, as the reference does
        q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(x.dtype) for t in (q, k))
        return self.proj(block_diagonal_attention(q, k, v, lengths).reshape(N, D))


class QwenVisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.attn = QwenVisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = QwenVisionMLP(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


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
        self.patch_embed = QwenPatchEmbed(cfg)
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
        """The learned G x G table resampled bilinearly to an h x w grid: the reference samples it at
        linspace(0, G - 1, h) x linspace(0, G - 1, w), which is align_corners=True."""
        G = math.isqrt(self.cfg.num_position_embeddings)
        table = self.pos_embed.weight.float().view(G, G, -1).permute(2, 0, 1)[None]  # [1, D, G, G]
        pe = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)  # [h, w, D]
        return self.block_major(pe, h, w)

    def rotary(self, h, w, device):
        """Rotary angles [h*w, 1, d]: the first half of the frequencies rotate by row, the second by column."""
        d = self.cfg.hidden_size // self.cfg.num_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d // 2, 2, device=device).float() / (d // 2))
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        pos = self.block_major(torch.stack([rows, cols], -1), h, w).float()  # [h*w, 2]
        angles = (pos[:, :, None] * inv_freq).flatten(1)  # [h*w, d/2]: row freqs then column freqs
        return torch.cat([angles, angles], -1)[:, None]  # [h*w, 1, d]

    def forward(self, pixels, grid_thw):
        """pixels [N, C*Tp*P*P] in block-major row order, grid_thw [n, 3] in patches -> (tokens [N/4, D_text],
        DeepStack features list of [N/4, D_text])."""
        x = self.patch_embed(pixels)  # [N, D]
        pos, angles, lengths = [], [], []
        for t, h, w in grid_thw.tolist():
            pos += [self.position_embedding(h, w)] * t
            angles += [self.rotary(h, w, x.device)] * t
            lengths += [h * w] * t  # every temporal group attends only to itself
        x = x + torch.cat(pos).to(x.dtype)
        angles = torch.cat(angles)
        cos, sin = angles.cos(), angles.sin()
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE text decoder


def mrope_axis(cfg: QwenConfig, device=None):
    """Which position stream (0 = T, 1 = H, 2 = W) drives each of the head_dim/2 frequency channels, interleaved:
    THWTHW...THW then T for the rest, e.g. [24, 20, 20] -> 'THW' x 20 + 'TTTT'. As in the reference, channels
    past 3 * s_H (3 * s_W) take no H (W), whatever the section sums to. Made on `device`, so a decode step reads
    no host tensor."""
    _, sH, sW = cfg.mrope_section
    i = torch.arange(cfg.head_dim // 2, device=device)
    return torch.where((i % 3 == 1) & (i < 3 * sH), 1, torch.where((i % 3 == 2) & (i < 3 * sW), 2, 0))


class QwenAttention(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx, shard):
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        nh = shard.split(cfg.num_attention_heads, "num_attention_heads")  # this rank's heads
        nkv = shard.split(cfg.num_key_value_heads, "num_key_value_heads", shared=True)
        self.layer_idx, self.nh, self.nkv, self.d, self.shard = layer_idx, nh, nkv, d, shard
        self.q_proj = nn.Linear(H, nh * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, nkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, nkv * d, bias=cfg.attention_bias)
        # the ranks' outputs are summed, so only rank 0 adds the bias
        self.o_proj = nn.Linear(nh * d, H, bias=cfg.attention_bias and shard.rank == 0)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # one weight shared by all heads, applied before rotary
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def project(self, x, ctx):
        """q [B, nh, S, d], k, v [B, nkv, S, d] of the call's tokens, rotary applied."""
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.nh, self.d))
        k = self.k_norm(self.k_proj(x).view(B, S, self.nkv, self.d))
        v = self.v_proj(x).view(B, S, self.nkv, self.d)
        cos, sin = ctx.cos[:, :, None], ctx.sin[:, :, None]  # [B, S, 1, d]
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)  # [B, nh, S, d]
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)  # [B, nkv, S, d]
        return q, k, v.transpose(1, 2)

    def forward(self, x, ctx):
        B, S, _ = x.shape
        q, k, v = self.project(x, ctx)
        k, v = ctx.cached(self.layer_idx, k, v, dim=2)  # decoding: the whole cache [B, nkv, S_max, d]
        out = attention(q, k, v, ctx.mask)  # [B, nh, S, d]
        return self.shard.reduce(self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.d)))


class QwenMoE(MoE):
    """Softmax over all experts in fp32, then top-k, then renormalise the k weights to sum 1 (softmax before top-k,
    as in DeepSeek/Qwen; gpt-oss does top-k first), always (see QwenConfig.from_hf). No shared expert."""

    def __init__(self, cfg: QwenConfig, layer_idx, shard):
        super().__init__(layer_idx, Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, shard), shard)
        self.k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)

    def route(self, x):
        probs = self.gate(x).float().softmax(-1)  # [T, E]
        top, ids = probs.topk(self.k, dim=-1)  # [T, K]
        pi_hat = top / top.sum(-1, keepdim=True)
        return Routing(weights=pi_hat, ids=ids, pi_hat=pi_hat, probs=probs)

    def forward(self, x, ctx):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        return self.shard.reduce(self.routed(x, self.route(x), ctx)).view(B, S, H)


class Qwen3VLMoe(VisionLanguageModel):
    CHECKPOINT_PREFIXES = {"model.visual.": "visual.", "model.language_model.embed_tokens.": "embed_tokens.",
                           "model.language_model.layers.": "layers.", "model.language_model.norm.": "norm.",
                           "lm_head.": "lm_head."}

    def __init__(self, cfg: QwenConfig, shard=Shard()):
        super().__init__(cfg, shard, (DecoderLayer(cfg, i, QwenAttention(cfg, i, shard), QwenMoE, shard)
                                      for i in range(cfg.num_hidden_layers)), visual=QwenVision(cfg.vision))

    def new_cache(self, batch, max_len, device=None, dtype=None):
        c, w = self.cfg, self.lm_head.weight
        nkv = self.shard.split(c.num_key_value_heads, "num_key_value_heads", shared=True)  # this rank's kv heads
        shape = (batch, nkv, max_len, c.head_dim)
        return KVCache(c.num_hidden_layers, shape, shape, max_len, device or w.device, dtype or w.dtype)

    def encode_vision(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                      video_grid_thw=None):
        """Run the vision tower -> (visual [B, S] bool, features [n, H], DeepStack features list of [n, H]), the
        rows in sequence order of the image and video pads they replace."""
        visual = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, S]
        full = input_ids.new_zeros(1 + len(self.cfg.vision.deepstack_visual_indexes), *input_ids.shape,
                                   self.cfg.hidden_size, dtype=self.lm_head.weight.dtype)  # [1 + n_deepstack, B, S, H]
        for pix, grid, token in ((pixel_values, image_grid_thw, self.cfg.image_token_id),
                                 (pixel_values_videos, video_grid_thw, self.cfg.video_token_id)):
            if pix is None:
                continue
            pads = input_ids == token
            main, extra = self.visual(pix, grid)
            n = int(pads.sum())
            check(main.shape[0] == n, f"{n} pad tokens (id {token}) for {main.shape[0]} visual features")
            for j, feats in enumerate([main] + extra):
                full[j][pads] = feats.to(full.dtype)
            visual |= pads
        main, *deepstack = full[:, visual]  # images and videos merged by position
        return visual, main, deepstack

    def rope_index(self, input_ids, valid, pixels):
        """3-D positions [3, B, S] and each row's next position [B]. Text advances all three streams by one; a
        block of visual pads with merged grid (gh, gw) gets (p, p + row, p + col), then p += max(gh, gw). Every
        temporal group of a video is its own block. Padding is skipped (and gets position 0). pixels: the
        processor's tensors; only image_grid_thw and video_grid_thw matter here."""
        m = self.cfg.vision.spatial_merge_size
        thw = {k: [] if pixels.get(k) is None else pixels[k].tolist() for k in ("image_grid_thw", "video_grid_thw")}
        grids = {self.cfg.image_token_id: iter(thw["image_grid_thw"]),
                 self.cfg.video_token_id: iter([g for t, h, w in thw["video_grid_thw"] for g in [(1, h, w)] * t])}
        B, S = input_ids.shape
        positions = torch.zeros(3, B, S, dtype=torch.long)
        next_pos = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            ids, keep = input_ids[b].tolist(), valid[b].tolist()
            s, p = 0, 0
            while s < S:
                if not keep[s]:
                    s += 1
                elif ids[s] in grids:
                    _, gh, gw = next(grids[ids[s]])
                    gh, gw = gh // m, gw // m
                    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # [gh, gw] each
                    positions[:, b, s:s + gh * gw] = torch.stack([rows * 0, rows, cols]).flatten(1) + p
                    s, p = s + gh * gw, p + max(gh, gw)
                else:
                    positions[:, b, s] = p
                    s, p = s + 1, p + 1
            next_pos[b] = p
        return positions.to(input_ids.device), next_pos.to(input_ids.device)

    def rotary(self, positions, dtype):
        """positions [3, B, S] (a decode step's [B, S]: text, all three streams alike) -> interleaved MRoPE
        cos, sin [B, S, head_dim] (made in fp32, then cast like the reference)."""
        d = self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d)  # [d/2]
        angles = positions.expand(3, *positions.shape[-2:])[..., None].float() * inv_freq  # [3, B, S, d/2]
        axis = mrope_axis(self.cfg, positions.device)
        angles = angles.gather(0, axis.expand_as(angles[:1]))[0]  # [B, S, d/2]
        emb = torch.cat([angles, angles], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


CONFIG, MODEL = QwenConfig, Qwen3VLMoe
