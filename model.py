"""
The foundation: what every model family shares, and the loader. A family file (qwen3_vl_moe.py, kimi_vl.py,
internvl.py) holds one model read top to bottom (config, vision tower, attention, MoE, model); this file holds the
rest.

Notable features
- Shared types: the routing record `Routing`, the skipped-slot id SKIP and the modality codes TEXT / VISION /
  SPECIAL, which the skip policies (router.py, baselines.py) and the expert kernels (moe_kernels.py) read.
- One MoE block, `MoE`, with two declared switches: `policy` (None = plain top-k, or a module that drops
  (token, slot) pairs) and `expert_impl` (the readable loop `routed_experts` below, or a moe_kernels.py path).
  Every routed expert of every family is computed in `routed_experts`; the model knows no policy.
- One module-swap mechanism: `DecoderLayers.wrap / unwrap / wrapped` put a `Wrapper` around a decoder layer or its
  MLP (calibration's removal and capture, MC-MoE's token importance, training's gate tap) and take it off again.
- The pieces of a forward as methods: `embed` (tokens, vision features, the per-forward Context), `layers(h, ctx,
  start, stop)` (the one layer loop), `head`; `forward` and `decode_step` are those three in a row.
- A static per-layer KV cache with tensor positions: a decode step is tensors only, so moe_kernels.DecodeStep can
  compile it and capture it in a CUDA graph.
- Lazy, strict loading: the model is built on the meta device, each parameter allocated once on the target
  device and filled tensor by tensor from safetensors, checkpoint names mapped by the family's prefix table (or
  tables: the key layouts it reads, told apart by the names in the folder); every missing, unexpected or misshapen
  tensor is reported at once.
- One model over several processes under torchrun (parallel.py's `Shard`): each rank holds and loads only its own
  routed experts, attention heads, dense-MLP rows and vocabulary rows.

A family file imports this one; `read_config` finds the family of a config.json by its model_type in FAMILIES and
imports it by name, so this file imports no family (and nothing but torch, safetensors, moe_kernels and parallel).
Generation and its command line are in generate.py.
"""
import contextlib
import importlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_kernels
from parallel import ParallelEmbedding, ParallelHead, Shard, rank_part

# model_type in config.json -> the family file that holds its config (CONFIG) and model (MODEL)
FAMILIES = {"qwen3_vl_moe": "qwen3_vl_moe", "kimi_vl": "kimi_vl", "internvl": "internvl"}
EXPERT_IMPLS = ("auto", "ref") + moe_kernels.PATHS  # "ref": the loop in routed_experts below


def check(ok, message):
    """Refuse bad input with one line (the scripts print it as `error: ...` and exit 2)."""
    if not ok:
        raise ValueError(message)


def read_json(path, what):
    """A JSON file's content; a missing, unreadable or malformed file is one line naming it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} file {path}: is a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


# ---------------------------------------------------------------------------------------------------------------
# Shared types

# T tokens, K top-k slots, E routed experts, H hidden size, I expert hidden size, B batch, S sequence

SKIP = -1  # expert id of a skipped (token, slot) pair; moe_kernels.py skips every negative id
TEXT, VISION, SPECIAL = 0, 1, 2  # token modality codes; SPECIAL: chat-template tokens, never skipped


@dataclass
class Routing:
    """One MoE layer's routing for T tokens before any skipping."""
    weights: torch.Tensor  # [T, K] fp32 final mixing coefficients (renormalised, routed-scaled)
    ids: torch.Tensor      # [T, K] int64 expert ids, by descending selection score
    pi_hat: torch.Tensor   # [T, K] fp32 top-k weights renormalised to sum 1, before routed scaling
    probs: torch.Tensor    # [T, E] fp32 full distribution (Qwen softmax, Kimi sigmoid scores)


# ---------------------------------------------------------------------------------------------------------------
# Configuration: each family's dataclass reads its own config.json dialects (family file, from_hf)


def family(model_type, where):
    """The family file of a model_type (its CONFIG and MODEL), imported on first use."""
    check(model_type in FAMILIES, f"{where}: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])


def read_config(path):
    """The dataclass config of a checkpoint folder (or of a config.json file), chosen by its model_type."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
    return config_from_dict(read_json(file, "config"), file)


def config_from_dict(raw, where):
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    cfg = family(kind, where).CONFIG.from_hf(raw, where)
    cfg.config_json = raw  # as read, for the fingerprints earlier versions wrote (router.py: legacy_fingerprints)
    return cfg


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

    def forward(self, x):
        return self.shard.reduce(self.partial(x))


class Experts(nn.Module):
    """E routed SwiGLU experts stacked in nn.Linear orientation: gate rows then up rows in gate_up_proj. Split over
    ranks (expert parallel), a rank holds experts first .. first + E / world - 1.

    gpt-oss's experts: bias=True adds gate_up_proj_bias [E, 2I] (gate then up) and down_proj_bias [E, H]; clamp =
    (alpha, limit) switches the activation to its clamped GLU (moe_kernels.glu). Without them: Qwen / Kimi."""

    def __init__(self, n_experts, dim, hidden, shard, bias=False, clamp=None):
        super().__init__()
        n = shard.split(n_experts, "number of routed experts")
        self.first = shard.rank * n
        self.clamp = clamp
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden, dim))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))  # [E, H, I]
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n, 2 * hidden)) if bias else None  # [E, 2I]
        self.down_proj_bias = nn.Parameter(torch.empty(n, dim)) if bias else None  # [E, H]

    def local(self, ids):
        """Expert ids [T, K] -> indices into this rank's experts; the other ranks' experts (and SKIP) become SKIP."""
        ids = ids - self.first
        return torch.where((ids >= 0) & (ids < self.down_proj.shape[0]), ids, SKIP)


def routed_experts(x, experts, ids, weights, impl="ref"):
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the kept slots (ids != SKIP) -> [T, H]: the one place
    routed experts are computed. impl "ref" is the loop below; any other is a moe_kernels.py path ("auto" takes
    this loop on an eager CPU, where it is the fastest)."""
    # gpt-oss's biases and clamped GLU (Experts); any object with gate_up_proj and down_proj has neither
    b_gate_up, b_down = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    clamp = getattr(experts, "clamp", None)
    if impl == "auto":
        impl = moe_kernels.auto_path(x, ids)
    if impl != "ref":
        return moe_kernels.run(x, experts.gate_up_proj, experts.down_proj, ids, weights, impl, b_gate_up, b_down,
                               clamp)
    # DeepSeek-V3's loop: only routed pairs are computed, but .tolist() and torch.where make it eager-only;
    # moe_kernels.py has the sync-free paths.
    T, H = x.shape
    I = experts.down_proj.shape[-1]
    # one view per expert up front: indexing the stacked weight per expert would make training's backward zero-fill
    # a whole [E, ...] gradient for every expert used (half of a training step's time); unbind's stacks them once
    gate_up_proj, down_proj = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e == SKIP:
            continue
        tok, slot = torch.where(ids == e)  # [n], [n]
        if b_gate_up is None and clamp is None:  # Qwen, Kimi
            gate, up = (x[tok] @ gate_up_proj[e].T).split(I, dim=-1)  # [n, I] each
            y = (F.silu(gate) * up) @ down_proj[e].T  # [n, H]
        else:  # gpt-oss: biases inside the expert, clamped GLU
            h = x[tok] @ gate_up_proj[e].T  # [n, 2I]
            h = h if b_gate_up is None else h + b_gate_up[e]
            y = moe_kernels.glu(h, I, clamp) @ down_proj[e].T  # [n, H]
            y = y if b_down is None else y + b_down[e]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


class MoE(nn.Module):
    """What every family's MoE layer does once its own router has routed: ask the skip policy, count, compute.

    Two declared switches, set from outside through set_policy / set_expert_impl and never read by anything else:
    - policy: None (plain top-k) or a module (routing, modality [T], layer) -> (weights, ids) of the same [T, K]
      shapes, a dropped slot with id SKIP (router.py's MoDES, baselines.py's baselines);
    - expert_impl: "ref" (routed_experts' loop), "auto" or a moe_kernels.py path.
    Split over ranks, every rank routes, skips and counts the same (replicated) way and computes only its own
    experts."""

    def __init__(self, layer_idx, experts, shard):
        super().__init__()
        self.layer_idx, self.experts, self.shard = layer_idx, experts, shard
        self.policy = None
        self.expert_impl = "ref"

    def set_policy(self, policy):
        self.policy = policy

    def set_expert_impl(self, impl):
        self.expert_impl = impl

    def routed(self, x, routing, ctx):
        """Routed-expert output [T, H] (this rank's experts' share) of x [T, H] routed as `routing`."""
        weights, ids = routing.weights, routing.ids
        modality = ctx.modality.reshape(-1)
        if self.policy is not None:
            weights, ids = self.policy(routing, modality, self.layer_idx)
        if ctx.stats is not None:
            ctx.stats.record(self.layer_idx, ids, modality, ctx.valid.reshape(-1), ctx.phase)
        if self.shard.world > 1:
            ids = self.experts.local(ids)
        return routed_experts(x, self.experts, ids, weights, self.expert_impl)


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


def is_any(ids, choices):
    """ids [...] equal to any of choices [n] -> bool [...]: elementwise, no sort, no host sync (unlike torch.isin)."""
    return (ids[..., None] == choices).any(-1)


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
    q, k, v [N, h, d], lengths summing to N. Each segment goes to SDPA as a 4-D [1, h, n, d] batch, the form its
    fused (flash / memory-efficient) kernels accept; 3-D inputs fall back to the math kernel on a GPU."""
    out = torch.empty_like(q)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        q_s, k_s, v_s = (t[s].transpose(0, 1)[None] for t in (q, k, v))  # [1, h, n, d] each
        out[s] = F.scaled_dot_product_attention(q_s, k_s, v_s)[0].transpose(0, 1)  # [n, h, d]
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
        self.is_moe = cfg.is_moe_layer(i)
        self.mlp = moe(cfg, i, shard) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, shard)

    def forward(self, h, ctx):
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        return h + (self.mlp(self.post_attention_layernorm(h), ctx) if self.is_moe else
                    self.mlp(self.post_attention_layernorm(h)))


class Wrapper(nn.Module):
    """What a script puts around a decoder layer or its MLP to change what it computes (calibration's removal and
    capture, MC-MoE's token importance, training's gate tap): the original is `inner`, called with the same
    arguments. Only DecoderLayers.wrap puts one in place, and unwrap takes it off."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


class DecoderLayers(nn.ModuleList):
    """The decoder layers. Calling it runs layers start .. stop-1 in order: the one layer loop of the project
    (calibrate.py resumes from a layer's cached input).

    The one module-swap mechanism: wrap(i, part, make) replaces layer i ("layer") or its MLP ("mlp") by
    make(original), a Wrapper; unwrap(i, part) restores the original; `wrapped` does both around a block."""
    PARTS = ("layer", "mlp")

    def forward(self, h, ctx, start=0, stop=None):
        for i, layer in enumerate(self[start:stop], start):
            h = layer(h, ctx)
            if i < len(ctx.deepstack):  # Qwen's DeepStack: early ViT features join the first layers' outputs
                h = h.index_put((ctx.visual,), ctx.deepstack[i], accumulate=True)
        return h

    def _get(self, i, part):
        check(part in self.PARTS, f"wrap: part {part!r}, expected one of {self.PARTS}")
        return self[i] if part == "layer" else self.layer(i).mlp

    def _set(self, i, part, module):
        if part == "layer":
            self[i] = module
        else:
            self.layer(i).mlp = module

    def wrap(self, i, part, make):
        """Layer i's `part` becomes make(part), a Wrapper around it -> the wrapper."""
        wrapper = make(self._get(i, part))
        check(isinstance(wrapper, Wrapper), f"wrap: {type(wrapper).__name__} is not a model.Wrapper")
        self._set(i, part, wrapper)
        return wrapper

    def unwrap(self, i, part):
        """Take the outermost Wrapper off layer i's `part` (nothing if it has none)."""
        module = self._get(i, part)
        if isinstance(module, Wrapper):
            self._set(i, part, module.inner)

    def unwrap_all(self, kind):
        """Take every Wrapper of type `kind` off every layer and MLP."""
        for i in range(len(self)):
            for part in self.PARTS:
                if isinstance(self._get(i, part), kind):
                    self.unwrap(i, part)

    def layer(self, i):
        """Decoder layer i itself, whatever wraps it."""
        layer = self[i]
        while isinstance(layer, Wrapper):
            layer = layer.inner
        return layer

    @contextlib.contextmanager
    def wrapped(self, i, part, make):
        """Within the block, layer i's `part` is wrapped by make; the wrapper is yielded."""
        wrapper = self.wrap(i, part, make)
        try:
            yield wrapper
        finally:
            self.unwrap(i, part)


# ---------------------------------------------------------------------------------------------------------------
# The model around the decoder layers, the same for both families: embedding, layer loop, head, modality


class VisionLanguageModel(nn.Module):
    """What both models do around their own vision tower, rotary and decoder layers: embed the tokens with the
    vision features in place of the media pads, run the layers, norm and lm_head; each token's modality."""
    CHECKPOINT_PREFIXES = {}  # checkpoint name prefix -> our parameter name prefix; the loader renames both ways
    FP32_PARAMETERS = ()  # parameter name suffixes kept in fp32 whatever the model's dtype
    PER_EXPERT_TENSORS = False  # the checkpoint stores one tensor per expert (stacked at load), not stacked ones
    OTHER_LAYOUTS = ()  # more (CHECKPOINT_PREFIXES, PER_EXPERT_TENSORS) pairs a checkpoint may use instead
    INTERLEAVED_GATE_UP = False  # gpt-oss: the checkpoint interleaves gate and up (gate = even columns, up = odd)

    def __init__(self, cfg, shard, layers, **vision):
        """vision: the vision tower (and projector) by name, registered first, as the checkpoints order them."""
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
        """token [B, 1] -> logits [B, V] at the cache's next position, tensors only, so moe_kernels.DecodeStep can
        compile it and capture it in a CUDA graph. The caller advances cache.length."""
        h, ctx = self.embed(token, cache=cache, stats=stats, phase="decode")
        return self.head(self.layers(h, ctx))[:, -1]

    def head(self, h):
        return self.lm_head(self.norm(h))

    def moe_layers(self):
        """Indices of the MoE decoder layers (Kimi-VL's first layer is dense)."""
        return [i for i in range(len(self.layers)) if self.cfg.is_moe_layer(i)]

    def modality(self, input_ids, phase):
        """TEXT, VISION (the media pads of a prompt) or SPECIAL (chat-template tokens) per token. A generated pad
        is text. Compared against every id at once rather than with torch.isin, which sorts (a host sync on CUDA,
        fatal inside a captured decode graph) once there are about ten ids; a decode step reads no host tensor."""
        m = torch.where(is_any(input_ids, self.special_ids), SPECIAL, TEXT)
        if phase == "decode":
            return m
        media = torch.tensor(self.cfg.media_token_ids, device=input_ids.device)
        return torch.where(is_any(input_ids, media), VISION, m)

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
# Loading: meta-device build, one allocation per parameter, tensor-by-tensor fill from safetensors


def build(cfg, device="cpu", dtype=torch.bfloat16, shard=Shard()):
    """The model of `cfg` (this rank's part of it) with uninitialised weights on `device`: built on the meta
    device, then allocated once."""
    with torch.device("meta"):
        model = family(cfg.model_type, "build").MODEL(cfg, shard)
    model.to(dtype)
    for name, p in model.named_parameters():
        if name.endswith(model.FP32_PARAMETERS):
            p.data = p.data.float()
    model.to_empty(device=device)
    model.tie_weights()
    return model


def checkpoint_names(model, layout=None):
    """checkpoint tensor name -> (our parameter name, index into it or None) for every tensor the model reads in
    `layout` (a (prefix table, per-expert) pair; the model's CHECKPOINT_PREFIXES and PER_EXPERT_TENSORS if None).
    Names are renamed by the prefix table; per-expert tensors fill slices of stacked parameters."""
    prefixes, per_expert = layout or (model.CHECKPOINT_PREFIXES, model.PER_EXPERT_TENSORS)
    ours_to_checkpoint = {ours: theirs for theirs, ours in prefixes.items()}
    names = {}
    for pname, _ in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        prefix = next(p for p in ours_to_checkpoint if pname.startswith(p))
        names[ours_to_checkpoint[prefix] + pname[len(prefix):]] = (pname, None)
    if per_expert:
        # the checkpoint stores experts.{e}.{gate,up,down}_proj.weight; we hold one stacked gate_up_proj [E, 2I, H]
        # (gate rows, then up rows) and down_proj [E, H, I] per layer. Split over ranks: this rank's experts only
        layers = ours_to_checkpoint["layers."]
        for i, layer in enumerate(model.layers):
            if not layer.is_moe:
                continue
            experts = layer.mlp.experts
            n, I = experts.down_proj.shape[0], experts.down_proj.shape[2]
            ours, theirs = f"layers.{i}.mlp.experts", f"{layers}{i}.mlp.experts"
            del names[f"{theirs}.gate_up_proj"], names[f"{theirs}.down_proj"]
            for e in range(n):
                names[f"{theirs}.{experts.first + e}.gate_proj.weight"] = (f"{ours}.gate_up_proj", (e, slice(0, I)))
                names[f"{theirs}.{experts.first + e}.up_proj.weight"] = (f"{ours}.gate_up_proj", (e, slice(I, 2 * I)))
                names[f"{theirs}.{experts.first + e}.down_proj.weight"] = (f"{ours}.down_proj", (e,))
    return names


def checkpoint_layout(model, names):
    """The layout (see checkpoint_names) of the model's whose tensor names the checkpoint holds most of: a family
    reads every layout it declares, and which one a folder uses is decided by its names, never by a setting."""
    layouts = [(model.CHECKPOINT_PREFIXES, model.PER_EXPERT_TENSORS), *model.OTHER_LAYOUTS]
    return max(layouts, key=lambda layout: len(names & set(checkpoint_names(model, layout))))  # first on a tie


def safetensors_header(file):
    """{tensor name: shape} of a safetensors file from its header, refused in one line unless the file is whole:
    a header that parses and data as long as the header says (a truncated download or copy is found here, before
    any tensor is read)."""
    with open(file, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):
            raise ValueError(f"{file}: a git-lfs pointer file, not the weights (run `git lfs pull` in that folder)")
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            check(0 < size <= 100 << 20, "no header")
            header = json.loads(f.read(size))
            check(isinstance(header, dict), "no header")
            tensors = {n: t for n, t in header.items() if n != "__metadata__"}
            end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
            shapes = {n: tuple(t["shape"]) for n, t in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            raise ValueError(f"{file}: not a readable safetensors file (damaged or truncated header)") from None
    have = os.path.getsize(file) - 8 - size
    check(have >= end, f"{file}: truncated ({have} of {end} data bytes); download or copy it again")
    return shapes


def checkpoint_files(path):
    """checkpoint tensor name -> safetensors file, from the index or the single model.safetensors. Every file is
    checked to be whole, and an index to name only tensors its shards hold."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        check(isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) and f
                                                                  for f in weight_map.values()),
              f"{index}: not a valid safetensors index (no weight_map of tensor name -> file name)")
        files = {n: os.path.join(path, f) for n, f in weight_map.items()}
        missing = sorted({os.path.basename(f) for f in files.values() if not os.path.isfile(f)})
        if missing:
            raise FileNotFoundError(f"{index}: {len(missing)} shard(s) listed but missing: {', '.join(missing)}")
        held = {f: safetensors_header(f) for f in sorted(set(files.values()))}
        lies = sorted(n for n, f in files.items() if n not in held[f])
        check(not lies, f"{index}: names {len(lies)} tensor(s) in shards that do not hold them: " + ", ".join(
            f"{n} ({os.path.basename(files[n])})" for n in lies[:4]) + (" ..." if len(lies) > 4 else ""))
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors")
    return {n: single for n in safetensors_header(single)}


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


def deinterleave(t, dim=-1):
    """gpt-oss's fused gate/up along axis dim, gate = even entries, up = odd -> gate entries, then up."""
    n = t.shape[dim]
    return torch.cat([t.index_select(dim, torch.arange(start, n, 2)) for start in (0, 1)], dim=dim)


def interleave(t):
    """The inverse of deinterleave: [gate | up] along the last axis -> gate, up, gate, up, ..."""
    return torch.stack(t.chunk(2, dim=-1), dim=-1).flatten(-2)


def copy_chunked(src, target, transpose, part, chunk_bytes=16 << 20, split_gate_up=None):
    """target <- src[part] (src a safetensors slice, part one slice per axis), transposed in its last two axes if
    asked, in pieces along the first axis: the host never holds more than one piece beside the parameters, and
    nothing outside `part` is read. split_gate_up: the axis (as stored) of each piece to de-interleave first."""
    fix = (lambda t: t) if split_gate_up is None else (lambda t: deinterleave(t, split_gate_up))
    if not part:
        target.copy_(fix(src[...]))
        return
    rows, rest = part[0], part[1:]
    step = max(1, chunk_bytes // max(1, math.prod(target.shape[1:]) * target.element_size()))
    for a in range(rows.start, rows.stop, step):
        piece = fix(src[(slice(a, min(a + step, rows.stop)),) + rest])
        target[a - rows.start:a - rows.start + step].copy_(piece.transpose(-2, -1) if transpose else piece)


def fill_from_checkpoint(model, path):
    """Copy every checkpoint tensor into its parameter (slice), one tensor (or one expert) at a time, after
    checking every name and shape; all problems are reported together. A model split over ranks is checked as
    the whole model, and each rank reads only its own part of each tensor."""
    files = checkpoint_files(path)
    packed = sorted(n for n in files if n.endswith(("_proj_blocks", "_proj_scales")))
    check(not packed, f"{path}: MXFP4-quantised experts ({len(packed)} *_blocks / *_scales tensors, e.g. "
                      f"{packed[0] if packed else ''}) are not supported; use a bf16 checkpoint")
    whole = build(model.cfg, "meta") if model.shard.world > 1 else model
    layout = checkpoint_layout(whole, set(files))
    wanted = checkpoint_names(whole, layout)
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
    mine, local = checkpoint_names(model, layout), dict(model.named_parameters())
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in [n for n in names if n in mine]:
                pname, index = mine[name]
                target = local[pname].data if index is None else local[pname].data[index]
                part, flip = rank_part(target_shape[name], target.shape, model.shard), name in stacked and transpose
                split = None  # gpt-oss: gate/up interleaved along the 2I axis (the last one, as the hub stores them)
                if model.INTERLEAVED_GATE_UP and name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
                    split = -1 if flip or name.endswith("_bias") else -2
                try:
                    copy_chunked(f.get_slice(name), target, flip, part[:1] + part[1:][::-1] if flip else part,
                                 split_gate_up=split)
                except Exception as e:  # a shard cut short after its header, say
                    raise ValueError(f"{file}: tensor {name} is unreadable ({e})") from None


def load(path, device="cpu", dtype=torch.bfloat16, shard=Shard(), special_ids=()):
    """The model of checkpoint folder `path` (this rank's part of it) with its weights on `device` in `dtype`,
    strictly checked. special_ids: the tokenizer's special tokens (processor.special_token_ids), the SPECIAL modality."""
    cfg = read_config(path)
    model = build(cfg, device, dtype, shard)
    special = set(special_ids) - set(cfg.media_token_ids)  # media pads are VISION tokens
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
        if model.INTERLEAVED_GATE_UP and name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
            t = interleave(t)
        tensors[name] = t.to(torch.float32 if pname.endswith(model.FP32_PARAMETERS) else dtype).contiguous()

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(raw_config, f, indent=2)
    write_replacing(os.path.join(path, "model.safetensors"),
                    lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_replacing(os.path.join(path, "config.json"), write_config)


def write_replacing(path, write):
    """write(tmp) into a temporary file beside `path`, give it the mode the user's umask gives new files (mkstemp
    makes 0600, as does safetensors' save_file), then rename it over `path`: a reader never sees half a file, and
    an interrupted write leaves the earlier file as it was and nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def set_expert_impl(model, impl):
    """Route every MoE layer's expert compute through `impl` (EXPERT_IMPLS), checked once here."""
    check(impl in EXPERT_IMPLS, f"--expert-impl {impl!r}: choose one of {', '.join(EXPERT_IMPLS)}")
    if impl not in ("auto", "ref"):
        moe_kernels.check_path(impl, model.lm_head.weight.device)
    for i in model.moe_layers():
        model.layers.layer(i).mlp.set_expert_impl(impl)
    return model
