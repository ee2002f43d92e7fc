"""Tiny random Qwen3-VL-MoE checkpoints written by transformers (the test-only oracle) and the inputs to feed them."""
import json
import os

import torch
from safetensors.torch import load_file, save_file

IMAGE, VIDEO, VSTART, VEND = 290, 291, 288, 289  # small-vocabulary stand-ins for 151655, 151656, 151652, 151653


def tiny_config(tie_word_embeddings=False, **text):
    from transformers import Qwen3VLMoeConfig
    text_config = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=16,
                       num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5],
                                            mrope_interleaved=True))
    text_config.update(text)
    vision_config = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16,
                         temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                         num_position_embeddings=16, deepstack_visual_indexes=[0, 2, 3])
    return Qwen3VLMoeConfig(text_config=text_config, vision_config=vision_config, image_token_id=IMAGE,
                            video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                            tie_word_embeddings=tie_word_embeddings)


def reinit(model, seed=0):
    """Variance-preserving random weights and peaked routers: transformers' default init (std 0.02) gives
    near-constant outputs that would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: around 1 for norm weights, around 0 for biases
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if "experts" in name else p[0].numel()  # experts are [E, out, in]
                scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)
    return model


def make_oracle(tmp_path, seed=0, **config):
    """(oracle model in eval mode, folder saved by save_pretrained, same folder rewritten in the hub layout).
    config: tie_word_embeddings and text_config overrides."""
    from transformers import Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(seed)
    hf = Qwen3VLMoeForConditionalGeneration(tiny_config(**config)).eval()
    reinit(hf, seed)
    saved = os.path.join(tmp_path, "hf")
    hf.save_pretrained(saved)
    hub = os.path.join(tmp_path, "hub")
    to_hub_layout(saved, hub)
    return hf, saved, hub


def to_hub_layout(src, dst):
    """Rewrite a transformers-5 save into the official hub dialect: experts as x @ W ([E, H, 2I], [E, I, H]),
    rope_scaling + rope_theta, num_experts; sharded with an index file."""
    os.makedirs(dst, exist_ok=True)
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    for n in tensors:
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[n] = tensors[n].transpose(1, 2).contiguous()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, os.path.join(dst, f), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}, fh)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    t = cfg["text_config"]
    rope = t.pop("rope_parameters")
    t["rope_theta"] = rope.pop("rope_theta")
    t["rope_scaling"] = rope
    t["num_experts"] = t.pop("num_local_experts")
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def image_prompt(grids, text_before=(5, 6, 7), text_after=(8, 9, 10, 11), merge=2):
    """input_ids for <text><vs><pads><ve>... with one pad block per grid (t, h, w) in patches."""
    ids = list(text_before)
    for t, h, w in grids:
        ids += [VSTART] + [IMAGE] * (t * h * w // merge ** 2) + [VEND] + [12]
    return ids + list(text_after)


def video_prompt(grid, merge=2):
    """A video of grid (t, h, w): one <timestamp text><vs><pads><ve> block per temporal group."""
    t, h, w = grid
    ids = [5, 6]
    for g in range(t):
        ids += [20 + g, 21] + [VSTART] + [VIDEO] * (h * w // merge ** 2) + [VEND]
    return ids + [7, 8, 9]


def pixels(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 16 * 16, generator=g), torch.tensor(grids)


def mm_token_type_ids(input_ids):
    return (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
