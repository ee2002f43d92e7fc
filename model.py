"""
Qwen3-VL-MoE and Kimi-VL in plain PyTorch, loaded straight from an unmodified Hugging Face checkpoint folder.

Notable features
- Qwen3-VL-MoE: ViT with Conv3d-as-linear patches, bilinear-resampled learned positions, 2-D rotary, per-image
  attention, patch merger and DeepStack mergers; decoder with q/k-norm, GQA, interleaved MRoPE, 128-expert MoE.
- Kimi-VL: MoonViT (bicubic-resampled positions, 2-D rotary, per-image attention, pixel-shuffle merge, projector);
  DeepSeek-V3 decoder with multi-head latent attention (naive, or absorbed with a latent-only cache), a dense
  first layer, sigmoid group-limited routing with a selection-only bias, and always-on shared experts.
- One choke point for routed-expert compute, `moe_experts(..., impl)`: "ref" is the readable per-expert loop
  below, anything else a path of kernels.py. A skipped (token, slot) pair carries the expert id SKIP.
- Every MoE layer asks a replaceable `policy` (router.py) which slots to skip and reports to an explicit
  statistics collector; the model itself knows no policy.
- Lazy, strict loading: the model is built on the meta device, each parameter is allocated once on the target
  device and filled tensor by tensor from safetensors, checkpoint names mapped by one prefix table per model;
  every problem is reported at once.
- A static per-layer KV cache with tensor positions: a decode step is tensors only, so kernels.py can compile it
  and capture it in a CUDA graph. Greedy generation with stop tokens.
- One model over several processes under torchrun (parallel.py's `Shard`, DeepSeek-V3's layout): each rank holds
  and loads only its own routed experts, attention heads, dense-MLP rows and vocabulary rows; one all-reduce
  completes each attention and each MLP. Without torchrun nothing of this runs.

Examples
    python model.py --prompt hi                                   # tiny built-in checkpoint (random weights)
    python model.py --model tiny-vqa --prompt "what color is the shape?" --image shape.png
    python model.py --model ~/Qwen3-VL-30B-A3B-Instruct --prompt "What is this?" --image cat.jpg \
        --device cuda --dtype bfloat16 --max-new-tokens 64
    python model.py --prompt "Describe the clip" --video frames/ --json
    torchrun --nproc_per_node 8 model.py --model ~/Qwen3-VL-235B-A22B-Instruct --prompt "What is this?" \
        --image cat.jpg --device cuda --dtype bfloat16                # one model over 8 GPUs
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

import cli
import kernels
import processor
import router
import tiny
from kernels import SKIP
from parallel import ParallelEmbedding, ParallelHead, Shard, rank_part
from router import SPECIAL, TEXT, VISION, Routing

EXPERT_IMPLS = ("auto", "ref") + kernels.PATHS  # "ref": the loop in moe_experts below


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

    @classmethod
    def from_hf(cls, raw, where):
        """Both dialects in the wild: the hub's rope_scaling + rope_theta and num_experts, and transformers 5's
        rope_parameters and num_local_experts. Keys named like our fields are taken as they are. norm_topk_prob
        and mrope_interleaved are not read: Qwen3-VL-MoE always renormalises its top-k weights and always
        interleaves MRoPE (both reference implementations hard-code it; Qwen2-VL's chunked map must not be used)."""
        t, v = raw.get("text_config"), raw.get("vision_config")
        cli.check(isinstance(t, dict) and isinstance(v, dict),
                  f"{where}: qwen3_vl_moe config.json needs text_config and vision_config objects")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        for part, d, keys in (("text_config", t, QWEN_TEXT_KEYS), ("vision_config", v, QWEN_VISION_KEYS),
                              ("the top level", raw, QWEN_TOKEN_KEYS)):
            missing = next((k for k in keys if k not in d), None)
            cli.check(missing is None, f"{where}: missing key {missing!r} in {part} of a qwen3_vl_moe config")
        for part, d, key, supported in (("text_config", t, "hidden_act", "silu"),
                                        ("vision_config", v, "hidden_act", "gelu_pytorch_tanh")):
            cli.check(d.get(key, supported) == supported,
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
        cli.check(len(cfg.mrope_section) == 3, f"{where}: mrope_section {list(cfg.mrope_section)} must be 3 numbers")
        cli.check(cfg.num_experts_per_tok <= cfg.num_experts,
                  f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} exceeds num_experts {cfg.num_experts}")
        return cfg


QWEN_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "moe_intermediate_size", "num_experts_per_tok", "rms_norm_eps")
QWEN_VISION_KEYS = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                    "spatial_merge_size", "out_hidden_size", "num_position_embeddings", "deepstack_visual_indexes")
QWEN_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


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
        cli.check(self.q_lora_rank is None, f"q_lora_rank={self.q_lora_rank} is not supported (Kimi-VL uses null)")
        cli.check(self.scoring_func == "sigmoid",
                  f"scoring_func={self.scoring_func!r} is not supported (need 'sigmoid')")
        cli.check(self.topk_method in ("noaux_tc", "greedy"), f"topk_method={self.topk_method!r} is not supported")
        cli.check(self.n_routed_experts % self.n_group == 0, f"n_group={self.n_group} must divide n_routed_experts")
        cli.check(self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        cli.check(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok exceeds n_routed_experts")
        cli.check(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
                  f"n_shared_experts={self.n_shared_experts!r} is not supported (need an integer >= 0)")
        cli.check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        cli.check(self.vision_head_dim % 4 == 0, f"vision head dim {self.vision_head_dim} must be a multiple of 4")
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

    @classmethod
    def from_hf(cls, raw: dict, where: str) -> "KimiVLConfig":
        """Translate the checkpoint's config.json (kimi_vl / deepseek_v3 / moonvit) into our fields."""
        text, vision = raw.get("text_config"), raw.get("vision_config")
        cli.check(raw.get("model_type") == cls.model_type,
                  f"{where}: model_type {raw.get('model_type')!r}, expected 'kimi_vl'")
        cli.check(isinstance(text, dict) and text.get("model_type") == "deepseek_v3",
                  f"{where}: text_config.model_type must be 'deepseek_v3'")
        cli.check(isinstance(vision, dict) and vision.get("model_type") == "moonvit",
                  f"{where}: vision_config.model_type must be 'moonvit'")
        for key, default, supported in (("rope_scaling", None, None), ("attention_bias", False, False),
                                        ("hidden_act", "silu", "silu")):  # no yarn, no bias, SwiGLU
            cli.check(text.get(key, default) == supported,
                      f"{where}: text_config.{key} {text.get(key)!r} is not supported (need {supported!r})")
        kw = {k: text[k] for k in {f.name for f in fields(cls)} & set(text)}
        kw.update({f"vision_{k}": vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "intermediate_size") if k in vision})
        kw.update({k: vision[k] for k in ("patch_size", "init_pos_emb_height", "init_pos_emb_width",
                                          "merge_kernel_size") if k in vision})
        kw.update({k: raw[k] for k in ("media_placeholder_token_id", "tie_word_embeddings") if k in raw})
        try:
            return cls(**kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


def read_config(path):
    """The dataclass config of a checkpoint folder (or of a config.json file), chosen by its model_type."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
    return config_from_dict(cli.read_json(file, "config"), file)


def config_from_dict(raw, where):
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    cli.check(kind in CONFIGS, f"{where}: unknown model_type {kind!r} (supported: {', '.join(CONFIGS)})")
    return CONFIGS[kind].from_hf(raw, where)


# ---------------------------------------------------------------------------------------------------------------
# Shared primitives: norms, rotary, MLPs, routed-expert compute, the forward context, KV cache, attention


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
    # NeoX pairing (Qwen): channel j rotates with channel j + d/2
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_interleaved(x, cos, sin):
    """Rotate the interleaved pairs (x0, x1), (x2, x3), ... of the last dim (DeepSeek / MoonViT pairing), pair i by
    its angle. Checkpoints store the rope dims in this order, so no weight permutation is needed; q and k agree,
    so the dot products are those of the reference. x [..., r], cos/sin broadcastable to [..., r/2]."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # [..., r/2] each
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): dense MLP layers and shared experts. Split over ranks by hidden units."""

    def __init__(self, dim, hidden, shard):
        super().__init__()
        hidden = shard.split(hidden, "MLP width")
        self.shard = shard
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def partial(self, x):
        """This rank's hidden units' share of the output."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x, ctx=None):  # ctx unused: a dense layer takes what an MoE layer takes
        return self.shard.reduce(self.partial(x))


class Experts(nn.Module):
    """E routed SwiGLU experts stacked in nn.Linear orientation: gate rows then up rows in gate_up_proj. Split over
    ranks (expert parallel), a rank holds experts first .. first + E / world - 1."""

    def __init__(self, n_experts, dim, hidden, shard):
        super().__init__()
        n = shard.split(n_experts, "number of routed experts")
        self.first = shard.rank * n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden, dim))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))  # [E, H, I]

    def local(self, ids):
        """Expert ids [T, K] -> indices into this rank's experts; the other ranks' experts (and SKIP) become SKIP."""
        ids = ids - self.first
        return torch.where((ids >= 0) & (ids < self.down_proj.shape[0]), ids, SKIP)


def moe_experts(x, experts, ids, weights, impl="ref"):
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the kept slots (ids != SKIP) -> [T, H]: the one place
    routed experts are computed. impl "ref" is the loop below; any other is a kernels.py path ("auto" takes this
    loop on an eager CPU, where it is the fastest)."""
    if impl == "auto":
        impl = kernels.auto_path(x, ids)
    if impl != "ref":
        return kernels.moe_experts(x, experts.gate_up_proj, experts.down_proj, ids, weights, impl)
    # T tokens, K slots, H hidden, I expert hidden. DeepSeek-V3's loop: only routed pairs are computed, but
    # .tolist() and torch.where make it eager-only; kernels.py has the sync-free paths.
    T, H = x.shape
    I = experts.down_proj.shape[-1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e == SKIP:
            continue
        tok, slot = torch.where(ids == e)  # [n], [n]
        gate, up = (x[tok] @ experts.gate_up_proj[e].T).split(I, dim=-1)  # [n, I] each
        y = (F.silu(gate) * up) @ experts.down_proj[e].T  # [n, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


def routed(moe, x, routing, ctx):
    """What both models' MoE layers do once routed: ask the skip policy, count, compute. x [T, H]. Split over
    ranks, every rank routes, skips and counts the same (replicated) way and computes only its own experts."""
    weights, ids = routing.weights, routing.ids
    modality = ctx.modality.reshape(-1)
    if moe.policy is not None:
        weights, ids = moe.policy(routing, modality, moe.layer_idx)
    if ctx.stats is not None:
        ctx.stats.record(moe.layer_idx, ids, modality, ctx.valid.reshape(-1), ctx.phase)
    if moe.shard.world > 1:
        ids = moe.experts.local(ids)
    return moe_experts(x, moe.experts, ids, weights, moe.impl)


@dataclass
class Context:
    """What every decoder layer needs about one forward besides the hidden states; built once by `embed`."""
    cos: torch.Tensor                   # [B, S, rotary dim] (Qwen: head_dim, Kimi: qk_rope_head_dim / 2)
    sin: torch.Tensor
    mask: torch.Tensor | None           # [B, 1, S, S_kv] bool; None: plain causal over the call's own keys
    modality: torch.Tensor              # [B, S] TEXT / VISION / SPECIAL
    valid: torch.Tensor                 # [B, S] False at padding
    phase: str                          # "prefill" or "decode"
    stats: object = None                # router.SkipStats, or anything with its record()
    cache: "KVCache" = None
    cache_pos: torch.Tensor = None      # [S] cache indices the tokens are written to
    visual: torch.Tensor = None         # Qwen: [B, S] positions of the image / video features
    deepstack: list = field(default_factory=list)  # Qwen: per early layer, features [n_visual, H] added after it

    def cached(self, i, k, v, dim):
        """Write the call's keys and values into layer i's cache buffers (at cache_pos along dim) -> what its
        attention reads: the call's own keys and values in a prefill, the whole buffers when decoding."""
        if self.cache is None:
            return k, v
        self.cache.k[i].index_copy_(dim, self.cache_pos, k)
        self.cache.v[i].index_copy_(dim, self.cache_pos, v)
        return (self.cache.k[i], self.cache.v[i]) if self.phase == "decode" else (k, v)


class KVCache:
    """Static per-layer key and value buffers, written in place at index tensors, so a decode step has the same
    shapes (and, for a CUDA graph, the same addresses) at every position. k[i], v[i] are layer i's buffers in the
    layout its attention chooses; the bookkeeping tensors are shared by all layers."""

    def __init__(self, n_layers, k_shape, v_shape, max_len, device, dtype):
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(n_layers)]
        batch = k_shape[0]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # written and not padding
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # each row's next rope position
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # cache index of the next token, on device
        self.length = 0  # tokens written so far, host side, for the caller's loop
        self.max_len = max_len

    def reset(self):
        """Empty the cache in place: the buffers keep their addresses, so a captured decode graph stays valid."""
        self.length = 0
        self.key_valid.zero_()
        self.next_pos.zero_()
        self.pos.zero_()


def causal_mask(query_pos, key_valid):
    """[B, 1, S, S_kv] bool: causal over cache indices, padding keys hidden. A padding query may always see itself
    so that no row is empty (an empty softmax row is NaN, and 0 * NaN would leak into real rows through V)."""
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = keys[None, :] <= query_pos[:, None]  # [S, S_kv]
    mask = (causal[None] & key_valid[:, None, :]) | (keys[None, :] == query_pos[:, None])[None]  # [B, S, S_kv]
    return mask[:, None]


def cache_and_mask(phase, valid, cache, next_pos):
    """Record the call's tokens in the cache's bookkeeping and make its attention mask -> (mask, cache_pos).

    The mask is None for an unpadded prefill (causal over the call's own keys: SDPA may take a fused kernel),
    [B, 1, S, S] over the call's keys for a padded prefill, and [B, 1, S, S_max] over the cache when decoding.
    A prefill always starts at an empty cache, so its attention needs no earlier keys."""
    B, S = valid.shape
    cache_pos = None
    if cache is not None:
        cache_pos = cache.pos + torch.arange(S, device=valid.device)  # [S]
        cache.key_valid.index_copy_(1, cache_pos, valid)
        cache.next_pos.copy_(next_pos)
        cache.pos += S
    if phase == "decode":
        return causal_mask(cache_pos, cache.key_valid), cache_pos
    if bool(valid.all()):
        return None, cache_pos
    return causal_mask(torch.arange(S, device=valid.device), valid), cache_pos


def attention(q, k, v, mask, scale=None):
    """softmax(q k^T * scale) v -> [B, h, S, dv]; q [B, h, S, d], k, v [B, h_kv, S_kv, *], h a multiple of h_kv.

    With no mask: causal over k (a prefill's own keys). With a mask [B, 1, S, S_kv]: the h / h_kv query heads that
    share one K/V head become extra query rows, so SDPA needs neither GQA support nor a per-head mask (on a GPU the
    memory-efficient kernel takes it; flash attention takes no mask)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    B, h, S, d = q.shape
    g = h // k.shape[1]
    q = q.reshape(B, k.shape[1], g * S, d)  # [B, h_kv, g*S, d]: head h_kv*g + j is rows j*S .. j*S + S - 1
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, g, 1), scale=scale)
    return out.reshape(B, h, S, -1)


def block_diagonal_attention(q, k, v, lengths):
    """Attention within consecutive row segments (an image, or one temporal group of a video) -> [N, h, d]:
    q, k, v [N, h, d], lengths summing to N."""
    out = torch.empty_like(q)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        out[s] = F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1),
                                                v[s].transpose(0, 1)).transpose(0, 1)  # [n, h, d]
        start += n
    return out


class DecoderLayer(nn.Module):
    """Both decoders' pre-norm residual block: attention, then the MoE layer `moe` (a class) or, on the layers the
    config makes dense, a SwiGLU MLP."""

    def __init__(self, cfg, i, attn, moe, shard):
        super().__init__()
        self.layer_idx = i
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = moe(cfg, i, shard) if cfg.is_moe_layer(i) else SwiGLU(cfg.hidden_size, cfg.intermediate_size, shard)

    def forward(self, h, ctx):
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h), ctx)


class DecoderLayers(nn.ModuleList):
    """The decoder layers. Calling it runs layers start .. stop-1 in order: the one layer loop of the project
    (calibrate.py resumes from a layer's cached input)."""

    def forward(self, h, ctx, start=0, stop=None):
        for i, layer in enumerate(self[start:stop], start):
            h = layer(h, ctx)
            if i < len(ctx.deepstack):  # Qwen's DeepStack: early ViT features join the first layers' outputs
                h = h.index_put((ctx.visual,), ctx.deepstack[i], accumulate=True)
        return h


# ---------------------------------------------------------------------------------------------------------------
# The model around the decoder layers, the same for both families: embedding, layer loop, head, modality


class VisionLanguageModel(nn.Module):
    """What both models do around their own vision tower, rotary and decoder layers: embed the tokens with the
    vision features in place of the media pads, run the layers, norm and lm_head; each token's modality."""
    CHECKPOINT_PREFIXES = {}  # checkpoint name prefix -> our parameter name prefix; the loader renames both ways
    FP32_PARAMETERS = ()  # parameter name suffixes kept in fp32 whatever the model's dtype

    def __init__(self, cfg, shard, layers, **vision):
        """vision: the vision tower (and projector) by name, registered first, as the checkpoints order them (tiny.py
        seeds its random weights by parameter order)."""
        super().__init__()
        self.cfg, self.shard = cfg, shard
        for name, module in vision.items():
            self.add_module(name, module)
        self.embed_tokens = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
        self.layers = DecoderLayers(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelHead(cfg.hidden_size, cfg.vocab_size, shard)
        self.tie_weights()
        # ids of the special tokens (SPECIAL modality), set by the loader from the tokenizer files
        self.register_buffer("special_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def tie_weights(self):
        """Share the embedding with lm_head when the config says so; again after to_empty, which unties them."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, *, cache=None, stats=None, media=None, last_only=False,
                **pixels):
        """input_ids [B, S] (left padding marked 0 in attention_mask) -> logits [B, S, V] ([B, 1, V] with
        last_only). pixels: the pixel tensors and grids as the processor returns them; media: their encode_vision
        output, if computed beforehand. With a cache the tokens are appended to it: a prefill when it is empty,
        decode steps after."""
        h, ctx = self.embed(input_ids, attention_mask, cache=cache, stats=stats, media=media, **pixels)
        h = self.layers(h, ctx)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.head(h[:, -1:] if last_only else h)

    def decode_step(self, token, cache, stats=None):
        """token [B, 1] -> logits [B, V] at the cache's next position, tensors only, so kernels.DecodeStep can
        compile it and capture it in a CUDA graph. The caller advances cache.length."""
        h, ctx = self.embed(token, cache=cache, stats=stats, phase="decode")
        return self.head(self.layers(h, ctx))[:, -1]

    def head(self, h):
        return self.lm_head(self.norm(h))

    def modality(self, input_ids, phase):
        """TEXT, VISION (the media pads of a prompt) or SPECIAL (chat-template tokens) per token. A generated pad
        is text; a decode step reads no host tensor."""
        m = torch.where(torch.isin(input_ids, self.special_ids), SPECIAL, TEXT)
        if phase == "decode":
            return m
        media = torch.tensor(self.cfg.media_token_ids, device=input_ids.device)
        return torch.where(torch.isin(input_ids, media), VISION, m)

    def embed(self, input_ids, attention_mask=None, *, cache=None, stats=None, media=None, phase=None, **pixels):
        """Token embeddings, the vision features in place of the media pads, and the Context of this forward
        (rotary tables, mask, modality). A decode step (phase="decode") reads its positions from the cache's
        device tensors, so it creates no host tensor."""
        B, S = input_ids.shape
        dev = input_ids.device
        phase = phase or ("decode" if cache is not None and cache.length > 0 else "prefill")
        valid = torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        h = self.embed_tokens(input_ids)  # [B, S, H]
        visual, deepstack = None, []
        if phase == "prefill":
            if media is None and any(pixels.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
                media = self.encode_vision(input_ids, **pixels)
            if media is not None:
                visual, features, deepstack = media
                h = h.masked_scatter(visual[..., None], features.to(h.dtype))  # the features replace the pads in order
            positions, next_pos = self.rope_index(input_ids, valid, pixels)
        else:
            positions = cache.next_pos[:, None] + torch.arange(S, device=dev)  # [B, S]
            next_pos = cache.next_pos + S
        cos, sin = self.rotary(positions, h.dtype)
        mask, cache_pos = cache_and_mask(phase, valid, cache, next_pos)
        return h, Context(cos, sin, mask, self.modality(input_ids, phase), valid, phase, stats, cache, cache_pos,
                          visual, deepstack)


# ---------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE vision tower


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


class QwenMoE(nn.Module):
    """Softmax over all experts in fp32, then top-k, then renormalise the k weights to sum 1 (softmax before top-k,
    as in DeepSeek/Qwen; gpt-oss does top-k first), always (see QwenConfig.from_hf). No shared expert."""

    def __init__(self, cfg: QwenConfig, layer_idx, shard):
        super().__init__()
        self.k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, shard)
        self.layer_idx, self.shard = layer_idx, shard
        self.policy = None  # a router.py skip policy, set by router.install
        self.impl = "ref"  # routed-expert compute, set by set_expert_impl

    def route(self, x):
        probs = self.gate(x).float().softmax(-1)  # [T, E]
        top, ids = probs.topk(self.k, dim=-1)  # [T, K]
        pi_hat = top / top.sum(-1, keepdim=True)
        return Routing(weights=pi_hat, ids=ids, pi_hat=pi_hat, probs=probs)

    def forward(self, x, ctx):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        return self.shard.reduce(routed(self, x, self.route(x), ctx)).view(B, S, H)


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
            cli.check(main.shape[0] == n, f"{n} pad tokens (id {token}) for {main.shape[0]} visual features")
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


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL text decoder (DeepSeek-V3): MLA, router, MoE


class MLA(nn.Module):
    """Multi-head latent attention with a full-rank q_proj (q_lora_rank null). Split over ranks by heads (q_proj,
    kv_b_proj, o_proj); the latent projection is replicated, so is an absorbed cache."""

    def __init__(self, cfg: KimiVLConfig, layer_idx, attn_impl, shard):
        super().__init__()
        cli.check(attn_impl in ("naive", "absorbed"), f"attn_impl {attn_impl!r}, expected 'naive' or 'absorbed'")
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


class KimiMoE(nn.Module):
    """Routed experts (skippable by the policy) plus shared experts that every token always runs, unweighted."""

    def __init__(self, cfg: KimiVLConfig, layer_idx, shard):
        super().__init__()
        self.gate = KimiGate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, shard)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, shard)
        self.layer_idx, self.shard = layer_idx, shard
        self.policy = None  # a router.py skip policy, set by router.install
        self.impl = "ref"  # routed-expert compute, set by set_expert_impl

    def forward(self, x, ctx):
        B, S, H = x.shape
        x = x.view(B * S, H)  # [T, H]
        # split over ranks, the shared experts' partial sum joins the routed one in a single all-reduce
        return self.shard.reduce(routed(self, x, self.gate(x), ctx) + self.shared_experts.partial(x)).view(B, S, H)


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
        cli.check(image_grid_hws is not None and image_grid_hws.ndim == 2 and image_grid_hws.shape[1] == 2,
                  "image_grid_hws must be an integer tensor [n_images, 2] of (h, w) patch counts")
        grids = image_grid_hws.tolist()
        cli.check(all(h % kh == 0 and w % kw == 0 for h, w in grids),
                  f"image_grid_hws {grids} must be multiples of the {kh}x{kw} merge")
        L, p = sum(h * w for h, w in grids), cfg.patch_size
        cli.check(tuple(pixel_values.shape) == (L, 3, p, p),
                  f"pixel_values has shape {tuple(pixel_values.shape)}, image_grid_hws needs {(L, 3, p, p)}")
        media = input_ids == cfg.media_placeholder_token_id
        feats = self.projector(self.visual(pixel_values, image_grid_hws))  # [n, H]
        n = int(media.sum())
        cli.check(feats.shape[0] == n, f"{n} media placeholder tokens (id {cfg.media_placeholder_token_id}) "
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


# ---------------------------------------------------------------------------------------------------------------
# Loading: meta-device build, one allocation per parameter, tensor-by-tensor fill from safetensors


CONFIGS = {"qwen3_vl_moe": QwenConfig, "kimi_vl": KimiVLConfig}
MODELS = {QwenConfig: Qwen3VLMoe, KimiVLConfig: KimiVL}


def build(cfg, device="cpu", dtype=torch.bfloat16, shard=Shard()):
    """The model of `cfg` (this rank's part of it) with uninitialised weights on `device`: built on the meta
    device, then allocated once."""
    with torch.device("meta"):
        model = MODELS[type(cfg)](cfg, shard)
    model.to(dtype)
    for name, p in model.named_parameters():
        if name.endswith(model.FP32_PARAMETERS):
            p.data = p.data.float()
    model.to_empty(device=device)
    model.tie_weights()
    return model


def checkpoint_names(model):
    """checkpoint tensor name -> (our parameter name, index into it or None) for every tensor the model reads.
    Names are renamed by the model's prefix table; Kimi's per-expert tensors fill slices of stacked parameters."""
    ours_to_checkpoint = {ours: theirs for theirs, ours in model.CHECKPOINT_PREFIXES.items()}
    names = {}
    for pname, _ in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        prefix = next(p for p in ours_to_checkpoint if pname.startswith(p))
        names[ours_to_checkpoint[prefix] + pname[len(prefix):]] = (pname, None)
    if isinstance(model, KimiVL):
        # the checkpoint stores experts.{e}.{gate,up,down}_proj.weight; we hold one stacked gate_up_proj [E, 2I, H]
        # (gate rows, then up rows) and down_proj [E, H, I] per layer
        cfg, I = model.cfg, model.cfg.moe_intermediate_size
        n = model.shard.split(cfg.n_routed_experts, "number of routed experts")
        first = model.shard.rank * n  # split over ranks: this rank's experts only
        for i in filter(cfg.is_moe_layer, range(cfg.num_hidden_layers)):
            ours, theirs = f"layers.{i}.mlp.experts", f"language_model.model.layers.{i}.mlp.experts"
            del names[f"{theirs}.gate_up_proj"], names[f"{theirs}.down_proj"]
            for e in range(n):
                names[f"{theirs}.{first + e}.gate_proj.weight"] = (f"{ours}.gate_up_proj", (e, slice(0, I)))
                names[f"{theirs}.{first + e}.up_proj.weight"] = (f"{ours}.gate_up_proj", (e, slice(I, 2 * I)))
                names[f"{theirs}.{first + e}.down_proj.weight"] = (f"{ours}.down_proj", (e,))
    return names


def checkpoint_files(path):
    """checkpoint tensor name -> safetensors file, from the index or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = cli.read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        cli.check(isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values()),
                  f"{index}: not a valid safetensors index (no weight_map of tensor name -> file name)")
        files = {n: os.path.join(path, f) for n, f in weight_map.items()}
        missing = sorted({os.path.basename(f) for f in files.values() if not os.path.isfile(f)})
        if missing:
            raise FileNotFoundError(f"{index}: {len(missing)} shard(s) listed but missing: {', '.join(missing)}")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors")
    with open_safetensors(single) as f:
        return {n: single for n in f.keys()}


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


def expert_layout(stored, wanted):
    """Whether the checkpoint stores the stacked experts as x @ W (the hub: gate_up [E, H, 2I], down [E, I, H])
    rather than in nn.Linear orientation (transformers 5 re-saves: [E, 2I, H], [E, H, I]): True, False, or a
    problem string. Decided only by tensors whose two layouts differ in shape (down_proj unless I == H,
    gate_up_proj unless H == 2I), never guessed. stored / wanted: {checkpoint name: shape} of those tensors."""
    votes = set()
    for name, shape in stored.items():
        plain, transposed = wanted[name], wanted[name][:1] + wanted[name][1:][::-1]
        if plain != transposed and shape in (plain, transposed):
            votes.add(shape == transposed)
    if len(votes) == 1:
        return votes.pop()
    return "mixes both expert layouts" if votes else "the stacked experts' layout is ambiguous"


def copy_chunked(src, target, transpose, part, chunk_bytes=16 << 20):
    """target <- src[part] (src a safetensors slice, part one slice per axis), transposed in its last two axes if
    asked, in pieces along the first axis: the host never holds more than one piece beside the parameters, and
    nothing outside `part` is read."""
    if not part:
        target.copy_(src[...])
        return
    rows, rest = part[0], part[1:]
    step = max(1, chunk_bytes // max(1, math.prod(target.shape[1:]) * target.element_size()))
    for a in range(rows.start, rows.stop, step):
        piece = src[(slice(a, min(a + step, rows.stop)),) + rest]
        target[a - rows.start:a - rows.start + step].copy_(piece.transpose(-2, -1) if transpose else piece)


def fill_from_checkpoint(model, path):
    """Copy every checkpoint tensor into its parameter (slice), one tensor (or one expert) at a time, after
    checking every name and shape; all problems are reported together. A model split over ranks is checked as
    the whole model, and each rank reads only its own part of each tensor."""
    files = checkpoint_files(path)
    whole = build(model.cfg, "meta") if model.shard.world > 1 else model
    wanted = checkpoint_names(whole)
    params = dict(whole.named_parameters())
    problems = [f"missing tensor {n}" for n in sorted(set(wanted) - set(files))]
    problems += [f"unexpected tensor {n} in {os.path.basename(files[n])}" for n in sorted(set(files) - set(wanted))]
    by_file = {}
    for name in [n for n in wanted if n in files]:
        by_file.setdefault(files[name], []).append(name)
    shapes = {}
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in names})
    target_shape = {n: tuple(params[p][i].shape if i is not None else params[p].shape) for n, (p, i) in wanted.items()}
    stacked = {n: s for n, s in shapes.items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    transpose = expert_layout(stacked, target_shape) if stacked else False
    if isinstance(transpose, str):
        problems.append(f"{transpose} ({len(stacked)} stacked expert tensors)")
    for name, shape in shapes.items():
        want = target_shape[name]
        if name in stacked and transpose is True:
            want = want[:1] + want[1:][::-1]
        if shape != want:
            problems.append(f"{name}: expected shape {want}, found {shape} in {os.path.basename(files[name])}")
    if problems:
        raise ValueError(f"{path}: {len(problems)} checkpoint problem(s): " + "; ".join(problems))
    mine, local = checkpoint_names(model), dict(model.named_parameters())
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in [n for n in names if n in mine]:
                pname, index = mine[name]
                target = local[pname].data if index is None else local[pname].data[index]
                part, flip = rank_part(target_shape[name], target.shape, model.shard), name in stacked and transpose
                try:
                    copy_chunked(f.get_slice(name), target, flip, part[:1] + part[1:][::-1] if flip else part)
                except Exception as e:  # a shard cut short after its header, say
                    raise ValueError(f"{file}: tensor {name} is unreadable ({e})") from None


def load(path, device="cpu", dtype=torch.bfloat16, shard=Shard()):
    """The model of checkpoint folder `path` (this rank's part of it) with its weights on `device` in `dtype`,
    strictly checked."""
    cfg = read_config(path)
    model = build(cfg, device, dtype, shard)
    special = set(processor.special_token_ids(path)) - set(cfg.media_token_ids)  # media pads are VISION tokens
    model.special_ids = torch.tensor(sorted(special), dtype=torch.long, device=device)
    fill_from_checkpoint(model, path)
    return model.eval().requires_grad_(False)


def save_checkpoint(model, raw_config, path, dtype=torch.bfloat16):
    """Write `model` into folder `path` as a Hugging Face checkpoint (config.json + model.safetensors), in the
    hub's dialect: stacked experts as x @ W ([E, H, 2I]); the FP32_PARAMETERS stay fp32."""
    from safetensors.torch import save_file
    params = dict(model.named_parameters())
    tensors = {}
    for name, (pname, index) in checkpoint_names(model).items():
        t = params[pname].data if index is None else params[pname].data[index]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t = t.transpose(1, 2)
        tensors[name] = t.to(torch.float32 if pname.endswith(model.FP32_PARAMETERS) else dtype).contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw_config, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def set_expert_impl(model, impl):
    """Route every MoE layer's expert compute through `impl` (EXPERT_IMPLS), checked once here."""
    cli.check(impl in EXPERT_IMPLS, f"--expert-impl {impl!r}: choose one of {', '.join(EXPERT_IMPLS)}")
    if impl not in ("auto", "ref"):
        kernels.check_path(impl, model.lm_head.weight.device)
    for i in router.moe_layers(model):
        model.layers[i].mlp.impl = impl
    return model


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=32, stop_ids=(), stats=None, compile=False,
             **pixels):
    """Greedy decoding with the KV cache. input_ids [B, S] (left padded) -> new token ids [B, n]; a row that hit
    a stop id keeps emitting it. compile: decode steps through kernels.DecodeStep (torch.compile, and a CUDA graph
    on a GPU) instead of eagerly."""
    B, S = input_ids.shape
    cli.check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cli.check(S + max_new_tokens <= model.cfg.max_position_embeddings, f"{S} prompt tokens + {max_new_tokens} new "
              f"tokens exceed the model's max_position_embeddings {model.cfg.max_position_embeddings}")
    cache = model.new_cache(B, S + max_new_tokens)
    logits = model(input_ids, attention_mask, cache=cache, stats=stats, last_only=True, **pixels)[:, -1]
    step = kernels.DecodeStep(model, cache, stats) if compile else (lambda t: model.decode_step(t, cache, stats))
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
        logits = step(token[:, None])
        cache.length += 1
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def resolve_model(name):
    """A checkpoint folder, or the name of a built-in checkpoint (tiny.py; default tiny-qwen)."""
    name = name or "tiny-qwen"
    if name in tiny.CHECKPOINTS:
        return tiny.checkpoint(name, build=lambda raw: build(config_from_dict(raw, name), "cpu", torch.float32),
                               save=save_checkpoint)
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model {name}: no such folder (or a built-in name: {', '.join(tiny.CHECKPOINTS)})")
    return name


def main(args):
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rank, world, device = cli.init_distributed(cli.check_device(args.device))  # torchrun: the ranks run one model
    compile = device.startswith("cuda") if args.compile is None else args.compile
    path = resolve_model(args.model)
    # the inputs and the thresholds are read and checked before the weights load; the thresholds against the
    # architecture alone (a model on the meta device holds no weights)
    cfg = read_config(path)
    proc = processor.for_model(path, cfg.model_type)
    batch = proc.from_cli(args.prompt, images=args.image, video=args.video, system=args.system)
    prompt_tokens = len(batch["input_ids"])
    cli.check(prompt_tokens + args.max_new_tokens <= cfg.max_position_embeddings,
              f"--prompt with its images and video is {prompt_tokens} tokens; with --max-new-tokens "
              f"{args.max_new_tokens} that exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    policy = router.load_thresholds(args.thresholds, build(cfg, "meta")) if args.thresholds else None
    t0 = time.perf_counter()
    model = set_expert_impl(load(path, device, cli.DTYPES[args.dtype], Shard(rank, world)), args.expert_impl)
    load_s = time.perf_counter() - t0
    if policy is not None:
        router.install(model, policy)
    stats = router.SkipStats(len(model.layers), device) if policy is not None else None
    pixels = {k: batch[k].to(device) for k in processor.PIXEL_KEYS if batch.get(k) is not None}
    input_ids = batch["input_ids"][None].to(device)
    t0 = time.perf_counter()
    token_ids = generate(model, input_ids, max_new_tokens=args.max_new_tokens, stop_ids=proc.stop_token_ids,
                         stats=stats, compile=compile, **pixels)[0].tolist()
    report = dict(text=proc.decode(token_ids), token_ids=token_ids, prompt_tokens=input_ids.shape[1], model=path,
                  load_s=round(load_s, 3), generate_s=round(time.perf_counter() - t0, 3))
    if rank > 0:  # every rank has the same tokens and skip counts; rank 0 reports them
        return
    if tiny.random_weights_note(args.model):
        print(tiny.random_weights_note(args.model), file=sys.stderr)
    print(cli.printable(report["text"]))
    if stats is not None:
        s = stats.summary()
        report["skip_ratio"] = {phase: {m: s[phase][m] for m in ("text", "vision", "all")} for phase in s}
        report["skip_per_layer"] = {phase: s[phase]["per_layer"] for phase in ("prefill", "decode")}
        print(f"skipped routed-expert slots: prefill {s['prefill']['all']:.1%} (text {s['prefill']['text']:.1%}, "
              f"vision {s['prefill']['vision'] or 0:.1%}), decode {s['decode']['all'] or 0:.1%}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))


def parser():
    p = argparse.ArgumentParser(description="Greedy generation with Qwen3-VL-MoE or Kimi-VL from a Hugging Face "
                                "checkpoint folder.")
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   "(default tiny-qwen)")
    p.add_argument("--prompt", required=True, help="user text")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--video", help="a folder of frame images or an animated GIF")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many generated tokens (>= 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--thresholds", help="MoDES thresholds file from search.py: skip experts while generating")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step and capture it in a CUDA graph (default: on for cuda)")
    p.add_argument("--expert-impl", default="auto", choices=EXPERT_IMPLS,
                   help="routed-expert compute: ref (the readable loop) or a kernels.py path (default auto)")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON object with text and token ids")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
