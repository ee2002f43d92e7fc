"""
InternVL-3.5 MoE (OpenGVLab/InternVL3_5-30B-A3B-HF) read top to bottom: config, InternViT vision tower, pixel
shuffle and projector, model. The Qwen3-MoE text decoder is Qwen3-VL-MoE's with 1-D rotary, so its attention and
MoE classes are imported from qwen3_vl_moe.py; the MoE choke point and the loader are in model.py.

- Vision: InternViT-300M on 448 px tiles (tiles are the batch): patch conv, a CLS token and learned absolute
  positions, pre-norm blocks with q/k/v biases and layer scale, exact GELU, no final norm, CLS dropped.
- Pixel shuffle folds each 2x2 block of the 32x32 patch grid into one token (1024 -> 256 per tile, 4x the
  channels); a LayerNorm + GELU MLP projects it to the text width, into the <IMG_CONTEXT> positions.
- Decoder: Qwen3-MoE (q/k-norm, GQA, 1-D rotary over all positions, image tokens included; softmax top-8 MoE with
  renormalisation). Only the transformers ("-HF") release is read; its weights come in two key layouts.
- Or (InternVL3_5-GPT-OSS-20B-A4B-Preview-HF) gpt-oss-20b: attention with biases and a learned per-head sink
  logit, a sliding window on the layers layer_types names, YaRN rotary with its attention factor on cos/sin,
  RMSNorm with the weight applied before the cast, a biased router (top-4 on the logits, softmax over the four)
  and experts with biases and a clamped GLU, stored fused, x @ W, gate/up interleaved (split at load).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (MoE, DecoderLayer, Experts, KVCache, RMSNorm, Routing, VisionLanguageModel, check,
                   rotate_half)
from parallel import Shard
from qwen3_vl_moe import QwenAttention, QwenMoE

# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class InternVisionConfig:
    """InternViT-300M-448px (vision_config, model_type internvl_vision)."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    attention_bias: bool = True  # q/k/v biases; the output projection always has one
    layer_norm_eps: float = 1e-6
    image_size: int = 448  # square tiles
    patch_size: int = 14
    num_channels: int = 3

    @property
    def grid(self):
        return self.image_size // self.patch_size  # patches per tile side: 32


@dataclass
class InternVLConfig:
    # text decoder (text_config, model_type qwen3_moe), under the field names QwenAttention and QwenMoE read
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
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    # gpt-oss decoder only (decoder "gpt_oss"); the Qwen3-MoE decoder reads none of these
    decoder: str = "qwen3_moe"  # text_config.model_type
    layer_types: tuple = ()  # per layer "sliding_attention" or "full_attention"
    sliding_window: int = 0  # a query sees itself and the sliding_window - 1 keys before it
    rope_type: str = "default"  # or "yarn"
    rope_factor: float = 1.0  # YaRN: factor, beta_fast, beta_slow, original_max_position_embeddings, truncate
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max: int = 4096
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0  # multiplies cos and sin (YaRN: 0.1 ln(factor) + 1 unless given)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # top level
    tie_word_embeddings: bool = False
    image_token_id: int = 151671  # <IMG_CONTEXT>
    downsample_ratio: float = 0.5  # pixel shuffle: each 2x2 block of patches becomes one token
    vision: InternVisionConfig = field(default_factory=InternVisionConfig)
    model_type = "internvl"

    @property
    def media_token_ids(self):
        return (self.image_token_id,)  # images and video frames alike

    @property
    def shuffle(self):
        return round(1 / self.downsample_ratio)  # 2: the side of the block folded into one token

    @property
    def tokens_per_tile(self):
        return (self.vision.grid // self.shuffle) ** 2  # 256

    def is_moe_layer(self, i):
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def is_sliding(self, i):
        return self.decoder == "gpt_oss" and self.layer_types[i] == "sliding_attention"

    def architecture(self):
        """Every config.json value the model is built from, by its name in the -HF config.json: what alpha and
        thresholds files are made for (router.py: fingerprint). Fixed names, not this dataclass's fields, so a
        refactor keeps the fingerprint."""
        v = self.vision
        gpt_oss = {} if self.decoder != "gpt_oss" else {
            "text_config.model_type": "gpt_oss", "text_config.layer_types": list(self.layer_types),
            "text_config.sliding_window": self.sliding_window,
            "text_config.swiglu_alpha": float(self.swiglu_alpha), "text_config.swiglu_limit": float(self.swiglu_limit),
            **{f"text_config.rope_parameters.{k}": getattr(self, a) for k, a in (
                ("rope_type", "rope_type"), ("factor", "rope_factor"), ("beta_fast", "rope_beta_fast"),
                ("beta_slow", "rope_beta_slow"), ("original_max_position_embeddings", "rope_original_max"),
                ("truncate", "rope_truncate"), ("attention_factor", "rope_attention_factor"))}}
        return {**gpt_oss,
            **{f"text_config.{k}": getattr(self, k) for k in TEXT_ARCH},
            "text_config.rope_theta": float(self.rope_theta), "text_config.rms_norm_eps": float(self.rms_norm_eps),
            "text_config.mlp_only_layers": sorted(self.mlp_only_layers),
            **{f"vision_config.{k}": getattr(v, k) for k in VISION_ARCH},
            "vision_config.layer_norm_eps": float(v.layer_norm_eps), "downsample_ratio": float(self.downsample_ratio),
            **{k: getattr(self, k) for k in ("image_token_id", "tie_word_embeddings")},
        }

    @classmethod
    def from_hf(cls, raw, where):
        """An -HF config.json (transformers' InternVLConfig: vision_config + text_config), in either dialect of the
        text config (rope_theta or rope_parameters, num_experts or num_local_experts). A key that is absent takes
        transformers' class default, as the oracle does. What this file does not implement is refused by name."""
        check(raw.get("model_type") != "internvl_chat",
              f"{where}: model_type 'internvl_chat' is the original trust_remote_code release; use the -HF "
              f"repository (e.g. OpenGVLab/InternVL3_5-30B-A3B-HF, model_type 'internvl')")
        t, v = raw.get("text_config"), raw.get("vision_config")
        check(isinstance(t, dict) and isinstance(v, dict),
              f"{where}: an internvl config.json needs text_config and vision_config objects")
        check(t.get("model_type") in ("qwen3_moe", "gpt_oss"),
              f"{where}: text_config.model_type {t.get('model_type')!r} is not supported (need 'qwen3_moe' or "
              f"'gpt_oss')")
        gpt_oss = t["model_type"] == "gpt_oss"
        for d in (raw, t):
            q = d.get("quantization_config")
            check(q is None, f"{where}: quantization_config (quant_method {(q or {}).get('quant_method')!r}, e.g. "
                             f"gpt-oss's MXFP4 experts) is not supported; use bf16 weights")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        text_checks = (("text_config", t, "hidden_act", "silu", "silu"),
                       ("text_config", t, "norm_topk_prob", False, True),  # transformers' default is False
                       ("text_config", t, "use_sliding_window", False, False),
                       ("text_config", rope, "rope_type", "default", "default"))
        if gpt_oss:  # an absent rope_type is configuration_gpt_oss.py's default, yarn
            check(rope.get("rope_type", "yarn") == "yarn",
                  f"{where}: text_config.rope_parameters.rope_type {rope.get('rope_type')!r} is not supported for "
                  f"text_config.model_type 'gpt_oss' (need 'yarn')")
            text_checks = ()
        for part, d, key, default, supported in (
                *text_checks,
                ("vision_config", v, "hidden_act", "gelu", "gelu"),
                ("vision_config", v, "norm_type", "layer_norm", "layer_norm"),
                ("vision_config", v, "use_qk_norm", False, False),
                ("vision_config", v, "use_mean_pooling", True, True),  # False adds a final LayerNorm
                ("vision_config", v, "use_mask_token", False, False),
                ("vision_config", v, "use_absolute_position_embeddings", True, True),
                ("the top level", raw, "projector_hidden_act", "gelu", "gelu"),
                ("the top level", raw, "vision_feature_layer", -1, -1),
                ("the top level", raw, "vision_feature_select_strategy", "default", "default")):
            check(d.get(key, default) == supported,
                  f"{where}: {part}.{key} {d.get(key)!r} is not supported (need {supported!r})")
        if gpt_oss:
            t = gpt_oss_text(t, rope, where)
        for key in TEXT_KEYS:
            check(key in t, f"{where}: missing key {key!r} in text_config of an internvl config")
        sizes = {}
        for key, default in (("image_size", 448), ("patch_size", 14)):
            value = v.get(key, default)
            value = value if isinstance(value, (list, tuple)) else (value, value)
            check(len(value) == 2 and value[0] == value[1], f"{where}: vision_config.{key} {value} must be square")
            sizes[key] = value[0]
        vision = InternVisionConfig(**{k: v[k] for k in VISION_KEYS if k in v}, **sizes,
                                    attention_bias=v.get("attention_bias", False))  # transformers' default
        kw = {k: t[k] for k in {f.name for f in fields(cls)} & set(t)}
        kw.update(vision=vision, mlp_only_layers=tuple(t.get("mlp_only_layers") or ()),
                  layer_types=tuple(t.get("layer_types") or ()),
                  num_experts=t["num_experts"] if "num_experts" in t else t["num_local_experts"],
                  head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                  rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),  # transformers' default
                  tie_word_embeddings=raw.get("tie_word_embeddings", True),  # InternVLConfig's default
                  image_token_id=raw.get("image_token_id", 151667),  # InternVLConfig's default (InternVL3's)
                  downsample_ratio=raw.get("downsample_ratio", 0.5))
        cfg = cls(**kw)
        r = 1 / cfg.downsample_ratio
        check(r == round(r) and cfg.vision.grid % r == 0 and cfg.vision.image_size % cfg.vision.patch_size == 0,
              f"{where}: downsample_ratio {cfg.downsample_ratio} must fold the {cfg.vision.grid}x{cfg.vision.grid} "
              f"patch grid into whole blocks")
        check(raw.get("image_seq_length", cfg.tokens_per_tile) == cfg.tokens_per_tile,
              f"{where}: image_seq_length {raw.get('image_seq_length')} but a tile gives {cfg.tokens_per_tile} tokens")
        check(cfg.num_experts_per_tok <= cfg.num_experts,
              f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} exceeds num_experts {cfg.num_experts}")
        return cfg


def gpt_oss_text(t, rope, where):
    """A gpt_oss text_config -> the same dict under the names InternVLConfig reads, absent keys taking
    configuration_gpt_oss.py's defaults (as the oracle does): its experts' width is intermediate_size, every layer
    is MoE, layer_types default to sliding on even layers, the rotary to YaRN factor 32 over 4096 positions."""
    n = t["num_hidden_layers"] if "num_hidden_layers" in t else 36
    layer_types = t.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    check(len(layer_types) == n and set(layer_types) <= {"sliding_attention", "full_attention"},
          f"{where}: text_config.layer_types must name sliding_attention or full_attention for each of {n} layers")
    rope = rope or dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                        original_max_position_embeddings=4096)
    theta = rope.get("rope_theta", t.get("rope_theta", 150000.0))  # either dialect; gpt-oss's default
    factor = rope.get("factor") or t.get("max_position_embeddings", 131072) / rope["original_max_position_embeddings"]
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    scale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731 (transformers' get_mscale)
    attention_factor = rope.get("attention_factor") or (
        scale(mscale) / scale(mscale_all) if mscale and mscale_all else scale(1))
    out = {**{k: v for k, v in t.items() if k not in ("layer_types", "sliding_window")},
           "num_hidden_layers": n, "decoder": "gpt_oss", "layer_types": layer_types,
           "sliding_window": t.get("sliding_window", 128), "moe_intermediate_size": t.get("intermediate_size", 2880),
           "num_experts_per_tok": t.get("num_experts_per_tok", 4), "attention_bias": t.get("attention_bias", True),
           "rms_norm_eps": t.get("rms_norm_eps", 1e-5), "rope_theta": theta,
           "rope_type": "yarn", "rope_factor": float(factor), "rope_beta_fast": float(rope.get("beta_fast") or 32),
           "rope_beta_slow": float(rope.get("beta_slow") or 1),
           "rope_original_max": rope["original_max_position_embeddings"],
           "rope_truncate": bool(rope.get("truncate", True)), "rope_attention_factor": float(attention_factor),
           "swiglu_alpha": t.get("swiglu_alpha", 1.702), "swiglu_limit": t.get("swiglu_limit", 7.0),
           "rope_parameters": {"rope_theta": theta}}
    check(out["attention_bias"], f"{where}: text_config.attention_bias false is not supported for gpt_oss")
    return out


TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "moe_intermediate_size", "num_experts_per_tok")
TEXT_ARCH = TEXT_KEYS + ("head_dim", "intermediate_size", "num_experts", "decoder_sparse_step",
                         "max_position_embeddings", "attention_bias")
VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
               "num_channels")
VISION_ARCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
               "attention_bias", "image_size", "patch_size")


# ---------------------------------------------------------------------------------------------------------------
# InternViT vision tower


class InternViTAttention(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(C, C, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.attention_bias)
        self.projection_layer = nn.Linear(C, C)

    def forward(self, x):
        # n tiles, N tokens per tile (CLS + patches), h heads; no rotary, no mask: every token sees its tile
        n, N, C = x.shape
        q, k, v = (p(x).view(n, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))  # [n, h, N, d]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d)
        return self.projection_layer(out.transpose(1, 2).reshape(n, N, C))


class InternViTMLP(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class InternViTLayer(nn.Module):
    """Pre-norm block with layer scale: each branch's output is multiplied channel-wise by a learned lambda."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.layernorm_before = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.attention = InternViTAttention(cfg)
        self.lambda_1 = nn.Parameter(torch.empty(C))
        self.layernorm_after = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.mlp = InternViTMLP(cfg)
        self.lambda_2 = nn.Parameter(torch.empty(C))

    def forward(self, x):
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternViT(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        C, P = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.empty(1, 1, C))
        self.patch_embed = nn.Conv2d(cfg.num_channels, C, kernel_size=P, stride=P)
        self.position_embeddings = nn.Parameter(torch.empty(1, 1 + cfg.grid ** 2, C))  # CLS, then row-major
        self.layers = nn.ModuleList(InternViTLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixel_values):
        """pixel_values [n, 3, 448, 448] -> patch features [n, 32, 32, C] of the last layer, CLS dropped. The
        positions are never resampled: every tile has the table's own size."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [n, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings
        for layer in self.layers:
            x = layer(x)
        g = self.cfg.grid
        return x[:, 1:].unflatten(1, (g, g))  # no final norm (use_mean_pooling)


def pixel_shuffle(x, r):
    """[n, g, g, C] -> [n, (g/r)^2, r*r*C]: token (i, j) holds the r x r block of patches at rows r*i + m, columns
    r*j + k, row offset major: channel (m*r + k)*C + c. This is the order transformers' view/permute sequence
    produces; another order runs just as well and is wrong."""
    n, g, _, C = x.shape
    x = x.view(n, g // r, r, g // r, r, C).permute(0, 1, 3, 2, 4, 5)  # (n, i, j, m, k, c)
    return x.reshape(n, (g // r) ** 2, r * r * C)


class InternProjector(nn.Module):
    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        n = cfg.vision.hidden_size * cfg.shuffle ** 2
        self.layer_norm = nn.LayerNorm(n)  # eps 1e-5: nn.LayerNorm's default, unlike the tower's 1e-6
        self.linear_1 = nn.Linear(n, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))  # exact erf GELU


# ---------------------------------------------------------------------------------------------------------------
# InternVL whole model

VISION_NAMES = {"vision_tower.embeddings.cls_token": "visual.cls_token",
                "vision_tower.embeddings.position_embeddings": "visual.position_embeddings",
                "vision_tower.embeddings.patch_embeddings.projection.": "visual.patch_embed.",
                "vision_tower.encoder.layer.": "visual.layers.", "multi_modal_projector.": "projector."}
# the names transformers writes on disk (llava-style) and the ones it holds in memory (which some saves keep)
ON_DISK = {**VISION_NAMES, "language_model.model.embed_tokens.": "embed_tokens.",
           "language_model.model.layers.": "layers.", "language_model.model.norm.": "norm.",
           "language_model.lm_head.": "lm_head."}
IN_MEMORY = {**{"model." + k: v for k, v in VISION_NAMES.items()},
             "model.language_model.embed_tokens.": "embed_tokens.", "model.language_model.layers.": "layers.",
             "model.language_model.norm.": "norm.", "lm_head.": "lm_head."}


class InternVL(VisionLanguageModel):
    # on disk the Qwen3-MoE experts are one tensor per expert; transformers 5 holds them stacked in memory
    CHECKPOINT_PREFIXES, PER_EXPERT_TENSORS = ON_DISK, True
    OTHER_LAYOUTS = ((ON_DISK, False), (IN_MEMORY, False), (IN_MEMORY, True))

    def __init__(self, cfg: InternVLConfig, shard=Shard()):
        super().__init__(cfg, shard, (DecoderLayer(cfg, i, QwenAttention(cfg, i, shard), QwenMoE, shard)
                                      for i in range(cfg.num_hidden_layers)),
                         visual=InternViT(cfg.vision), projector=InternProjector(cfg))

    def new_cache(self, batch, max_len, device=None, dtype=None):
        c, w = self.cfg, self.lm_head.weight
        nkv = self.shard.split(c.num_key_value_heads, "num_key_value_heads", shared=True)  # this rank's kv heads
        shape = (batch, nkv, max_len, c.head_dim)
        return KVCache(c.num_hidden_layers, shape, shape, max_len, device or w.device, dtype or w.dtype)

    def encode_vision(self, input_ids, pixel_values=None):
        """Run InternViT, the pixel shuffle and the projector over all tiles (images' tiles and thumbnails, video
        frames) -> (media [B, S] bool, features [n_tiles * 256, H], no DeepStack features []), the rows in the
        order of the <IMG_CONTEXT> tokens they replace. pixel_values [n_tiles, 3, 448, 448]."""
        cfg, v = self.cfg, self.cfg.vision
        want = (v.num_channels, v.image_size, v.image_size)
        check(pixel_values.ndim == 4 and tuple(pixel_values.shape[1:]) == want,
              f"pixel_values has shape {tuple(pixel_values.shape)}, InternVL needs [tiles, {want[0]}, {want[1]}, "
              f"{want[2]}]")
        feats = self.projector(pixel_shuffle(self.visual(pixel_values), cfg.shuffle)).flatten(0, 1)  # [n*256, H]
        media = input_ids == cfg.image_token_id
        n = int(media.sum())
        check(feats.shape[0] == n, f"{n} <IMG_CONTEXT> tokens (id {cfg.image_token_id}) for {feats.shape[0]} "
                                   f"image features ({pixel_values.shape[0]} tiles)")
        return media, feats, []

    def rope_index(self, input_ids, valid, pixels):
        """Plain 1-D positions [B, S] over every token, image tokens included, counting only real tokens (a
        left-padded row starts at 0, as transformers' generate numbers it), and each row's next position [B]."""
        return (valid.long().cumsum(-1) - 1).clamp(min=0), valid.long().sum(-1)

    def rotary(self, positions, dtype):
        """cos, sin [B, S, head_dim] of positions [B, S]: rotate-half pairing, so each frequency appears twice
        (made in fp32, then cast like the reference)."""
        d = self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d)
        angles = positions[..., None].float() * inv_freq  # [B, S, d/2]
        emb = torch.cat([angles, angles], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The gpt-oss decoder (InternVL3_5-GPT-OSS-20B-A4B-Preview-HF)


class GptOssRMSNorm(RMSNorm):
    """gpt-oss's RMSNorm: the weight multiplies in fp32, then the cast (model.RMSNorm casts first)."""

    def forward(self, x):
        xf = x.float()
        return (self.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def yarn_inv_freq(cfg: InternVLConfig, device):
    """YaRN's inverse frequencies [head_dim / 2], computed as transformers' _compute_yarn_parameters does:
    interpolated (divided by factor) below the correction range, extrapolated (unchanged) above it, a linear ramp
    between; truncate floors / ceils the range."""
    d, base = cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations):
        return d * math.log(cfg.rope_original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2, device=device).float() / d)
    extrapolation = 1 - ramp
    return (1.0 / (cfg.rope_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def sink_attention(q, k, v, mask, sinks, scale):
    """softmax over [q k^T * scale (masked), sink_h] with the sink column dropped, times v -> [B, h, S, dv].
    q [B, h, S, d], k, v [B, h_kv, S_kv, *], mask [B or 1, 1, S, S_kv] bool, sinks [h]. Written out (SDPA takes
    no sink): the sink only adds probability mass that goes nowhere, so a row may attend to little. The h / h_kv
    query heads that share a K/V head are extra query rows, as in model.attention; tensors only (graph-safe)."""
    B, h, S, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    q = q.reshape(B, n_kv, g * S, d)  # head n_kv * g + j is rows j*S .. j*S + S - 1
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, h_kv, g*S, S_kv]
    scores = scores.masked_fill(~mask.repeat(1, 1, g, 1), float("-inf"))
    sink = sinks.float().view(1, n_kv, g, 1, 1).expand(B, n_kv, g, S, 1).reshape(B, n_kv, g * S, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return (probs.to(v.dtype) @ v).reshape(B, h, S, -1)


class GptOssAttention(nn.Module):
    def __init__(self, cfg: InternVLConfig, layer_idx, shard):
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        nh = shard.split(cfg.num_attention_heads, "num_attention_heads")  # this rank's heads
        nkv = shard.split(cfg.num_key_value_heads, "num_key_value_heads", shared=True)
        self.layer_idx, self.nh, self.nkv, self.d, self.shard = layer_idx, nh, nkv, d, shard
        self.window = cfg.sliding_window if cfg.is_sliding(layer_idx) else None
        self.q_proj = nn.Linear(H, nh * d, bias=True)
        self.k_proj = nn.Linear(H, nkv * d, bias=True)
        self.v_proj = nn.Linear(H, nkv * d, bias=True)
        self.o_proj = nn.Linear(nh * d, H, bias=shard.rank == 0)  # the ranks' outputs are summed
        self.sinks = nn.Parameter(torch.empty(nh))  # per head: the logit of a key that every query sees

    def project(self, x, ctx):
        """q [B, nh, S, d], k, v [B, nkv, S, d] of the call's tokens, rotary applied (the interface
        qwen3_vl_moe.QwenAttention has, which baselines.py's MC-MoE token importance calls)."""
        B, S, _ = x.shape
        cos, sin = ctx.cos[:, :, None], ctx.sin[:, :, None]  # [B, S, 1, d]
        q, k, v = (p(x).view(B, S, -1, self.d) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)  # [B, nh, S, d]
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)  # [B, nkv, S, d]
        return q, k, v.transpose(1, 2)

    def forward(self, x, ctx):
        B, S, _ = x.shape
        q, k, v = self.project(x, ctx)
        k, v = ctx.cached(self.layer_idx, k, v, dim=2)  # decoding: the whole cache
        # cache indices of the queries and keys (a prefill starts at an empty cache); the window counts indices,
        # padding included, as transformers' sliding mask does
        query = ctx.cache_pos if ctx.cache_pos is not None else torch.arange(S, device=x.device)  # [S]
        keys = torch.arange(k.shape[2], device=x.device)  # [S_kv]
        mask = ctx.mask if ctx.mask is not None else (keys[None, :] <= query[:, None])[None, None]
        if self.window is not None:
            mask = mask & (keys[None, :] > query[:, None] - self.window)[None, None]
        out = sink_attention(q, k, v, mask, self.sinks, self.d ** -0.5)  # [B, nh, S, d]
        return self.shard.reduce(self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.d)))


class GptOssMoE(MoE):
    """Router x W^T + b, top-k on the logits, softmax over the k selected (= the full softmax renormalised to the
    top-k: pi_hat; probs is the full softmax). Experts with biases and the clamped GLU. No shared expert."""

    def __init__(self, cfg: InternVLConfig, layer_idx, shard):
        experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, shard, bias=True,
                          clamp=(cfg.swiglu_alpha, cfg.swiglu_limit))
        super().__init__(layer_idx, experts, shard)
        self.k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)

    @property
    def gate(self):
        """The router under the name the other families' routers have (router.py reads gate.weight's E)."""
        return self.router

    def route(self, x):
        logits = self.router(x)  # [T, E]
        top, ids = logits.topk(self.k, dim=-1)  # [T, K]
        pi_hat = top.float().softmax(-1)
        return Routing(weights=pi_hat, ids=ids, pi_hat=pi_hat, probs=logits.float().softmax(-1))

    def forward(self, x, ctx):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        return self.shard.reduce(self.routed(x, self.route(x), ctx)).view(B, S, H)


class InternVLGptOss(InternVL):
    """InternVL with the gpt-oss decoder. Its experts are stacked on disk too (fused gate/up, interleaved: the
    loader splits them into gate rows then up rows)."""
    CHECKPOINT_PREFIXES, PER_EXPERT_TENSORS = ON_DISK, False
    OTHER_LAYOUTS = ((IN_MEMORY, False),)
    INTERLEAVED_GATE_UP = True

    def __init__(self, cfg: InternVLConfig, shard=Shard()):
        layers = [DecoderLayer(cfg, i, GptOssAttention(cfg, i, shard), GptOssMoE, shard)
                  for i in range(cfg.num_hidden_layers)]
        for layer in layers:
            layer.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            layer.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        VisionLanguageModel.__init__(self, cfg, shard, layers, visual=InternViT(cfg.vision),
                                     projector=InternProjector(cfg))
        self.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rotary(self, positions, dtype):
        """YaRN: cos, sin [B, S, head_dim] of positions [B, S], times the attention factor (in fp32, then cast)."""
        angles = positions[..., None].float() * yarn_inv_freq(self.cfg, positions.device)  # [B, S, d/2]
        f = self.cfg.rope_attention_factor
        cos, sin = (angles.cos() * f).to(dtype), (angles.sin() * f).to(dtype)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def build_model(cfg: InternVLConfig, shard=Shard()):
    """The model class of the config's decoder."""
    return (InternVLGptOss if cfg.decoder == "gpt_oss" else InternVL)(cfg, shard)


CONFIG, MODEL = InternVLConfig, build_model
