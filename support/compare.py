"""
transformers' own implementation holding this project's weights, for `bench.py --compare-transformers`: the same
config, the same tensors (shared wherever transformers' in-memory layout is ours) and the same prompt, so the row
times an implementation, not a different model. transformers is imported only when it is asked for.
"""
import os

import torch

import cli
import internvl
import kimi_vl
import qwen3_vl_moe
from model import checkpoint_names, interleave


@torch.no_grad()
def transformers_model(model, source, device):
    """transformers' own model of the same config (source: a config.json or a checkpoint folder) holding our
    weights: Qwen3VLMoeForConditionalGeneration, or InternVLForConditionalGeneration for either InternVL decoder.
    Every tensor is our parameter itself (assigned, not copied) but gpt-oss's gate_up_proj and gate_up_proj_bias:
    transformers holds those x @ W with gate and up interleaved, which no view of ours gives, so they are copied,
    two thirds of the expert weights in memory again (about 24 GiB in bf16 for GPT-OSS-20B). gpt-oss's down_proj is
    shared as a transposed view: the strides transformers' grouped_mm reads Qwen's experts with."""
    cli.check(not isinstance(model, kimi_vl.KimiVL), "--compare-transformers: transformers has no Kimi-VL class "
              "(Kimi-VL runs there only as the hub's trust_remote_code)")
    cli.check(model.shard.world == 1, "--compare-transformers: one process only (not under torchrun)")
    import transformers
    if isinstance(model, internvl.InternVL):
        hf_class, hf_config = transformers.InternVLForConditionalGeneration, transformers.InternVLConfig
        names = checkpoint_names(model, (internvl.IN_MEMORY, False))  # transformers' names, stacked experts
    else:
        hf_class, hf_config = transformers.Qwen3VLMoeForConditionalGeneration, transformers.Qwen3VLMoeConfig
        names = checkpoint_names(model)
    weights = {name: model.get_parameter(ours) for name, (ours, _) in names.items()}
    if isinstance(model, internvl.InternVLGptOss):  # from ours: nn.Linear orientation, gate rows then up rows
        for name, t in weights.items():
            if name.endswith("experts.gate_up_proj"):
                weights[name] = interleave(t.transpose(1, 2))
            elif name.endswith("experts.gate_up_proj_bias"):
                weights[name] = interleave(t)
            elif name.endswith("experts.down_proj"):
                weights[name] = t.transpose(1, 2)
    raw = cli.read_json(source if source.endswith(".json") else os.path.join(source, "config.json"), "config")
    with torch.device("meta"):
        hf = hf_class(hf_config(**raw)).eval()
    hf.load_state_dict(weights, strict=True, assign=True)
    for mod in hf.modules():  # rotary tables are buffers that the state dict does not carry: rebuild them
        for name in [name for name, buf in mod.named_buffers(recurse=False) if buf.is_meta]:
            setattr(mod, name, getattr(type(mod)(mod.config), name).to(device))
    hf.tie_weights()
    return hf


def transformers_prompt(model, ids, pixels):
    """The arguments of transformers' forward for our prompt (ids, pixels: synthetic_inputs). Qwen3-VL's 3-D
    rotary finds the image tokens by their type; InternVL's 1-D positions need nothing beside the tiles."""
    if isinstance(model, qwen3_vl_moe.Qwen3VLMoe):
        return dict(input_ids=ids, mm_token_type_ids=(ids == model.cfg.image_token_id).long(), **pixels)
    return dict(input_ids=ids, **pixels)
