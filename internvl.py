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
"""
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DecoderLayer, KVCache, VisionLanguageModel, check
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

    def architecture(self):
        """Every config.json value the model is built from, by its name in the -HF config.json: what alpha and
        thresholds files are made for (router.py: fingerprint). Fixed names, not this dataclass's fields, so a
        refactor keeps the fingerprint."""
        v = self.vision
        return {
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
        check(t.get("model_type") == "qwen3_moe",
              f"{where}: text_config.model_type {t.get('model_type')!r} is not supported (need 'qwen3_moe'; the "
              f"GPT-OSS decoder is not implemented)")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        for part, d, key, default, supported in (
                ("text_config", t, "hidden_act", "silu", "silu"),
                ("text_config", t, "norm_topk_prob", False, True),  # transformers' default is False
                ("text_config", t, "use_sliding_window", False, False),
                ("text_config", rope, "rope_type", "default", "default"),
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


CONFIG, MODEL = InternVLConfig, InternVL
