"""InternVL-3.5 with the gpt-oss decoder (InternVL3_5-GPT-OSS-20B-A4B-Preview-HF) against transformers'
InternVLForConditionalGeneration with a GptOssConfig text config (fp32, tiny random checkpoints, eager attention):
sinks, a sliding window of 4 on layers 0 and 2, YaRN rotary, biased router and experts, clamped GLU."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import internvl
import moe_kernels
import router
from generate import generate
from model import load, set_expert_impl
from test_internvl_model import IMG_CONTEXT, TILE, assert_logits_close, image_prompt, pixels

WINDOW = 4
TRITON_ON_CPU = moe_kernels.HAS_TRITON and moe_kernels._TRITON_INTERPRET


def tiny_config():
    from transformers import InternVLConfig
    text_config = dict(model_type="gpt_oss", vocab_size=300, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=40,
                       num_local_experts=6, num_experts_per_tok=2, sliding_window=WINDOW,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                            beta_slow=1.0, truncate=False, original_max_position_embeddings=16))
    vision_config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=True)
    cfg = InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMG_CONTEXT,
                         image_seq_length=4, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return cfg


def reinit(model, seed=0):
    """Variance-preserving random weights, peaked routers, sinks around 0, and expert biases large enough that a
    wrong gate/up split or a missing clamp shows (h sometimes beyond the limit 7 would need huge weights: the
    clamp is exercised by tests/test_kernels.py with a small limit)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif "experts" in name:  # x @ W layout: the reduction axis is 1
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
            else:
                fan_in = p.shape[-1] if "embeddings" in name else p[0].numel()
                scale = 3.0 if name.endswith("router.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)
    return model


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(oracle, folder written by save_pretrained (llava-style names), the in-memory names in one file)."""
    from transformers import InternVLForConditionalGeneration
    tmp = str(tmp_path_factory.mktemp("internvl_gptoss"))
    torch.manual_seed(0)
    hf = reinit(InternVLForConditionalGeneration(tiny_config()).eval())
    disk, memory = os.path.join(tmp, "disk"), os.path.join(tmp, "memory")
    hf.save_pretrained(disk)
    os.makedirs(memory)
    save_file({n: t.contiguous() for n, t in hf.state_dict().items()}, os.path.join(memory, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(disk, "config.json")) as f, open(os.path.join(memory, "config.json"), "w") as out:
        out.write(f.read())
    return hf, disk, memory


TEXT = [5, 17, 33, 2, 250, 9, 9, 41, 7, 120, 64]  # longer than the window


def inputs(tiles):
    ids = torch.tensor([image_prompt(tiles)]) if tiles else torch.tensor([TEXT])
    return ids, (dict(pixel_values=pixels(sum(tiles))) if tiles else {})


def test_config_reads_the_gpt_oss_fields(oracle):
    cfg = internvl.InternVLConfig.from_hf(json.load(open(os.path.join(oracle[1], "config.json"))), "c")
    assert cfg.decoder == "gpt_oss" and cfg.layer_types == ("sliding_attention", "full_attention",
                                                            "sliding_attention")
    assert (cfg.sliding_window, cfg.num_experts, cfg.moe_intermediate_size, cfg.rope_factor) == (4, 6, 40, 32.0)
    assert abs(cfg.rope_attention_factor - (0.1 * torch.tensor(32.0).log().item() + 1)) < 1e-9
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](oracle[0].config.text_config, "cpu")
    assert torch.equal(internvl.yarn_inv_freq(cfg, "cpu"), inv_freq) and factor == cfg.rope_attention_factor


@pytest.mark.parametrize("layout", ["disk", "memory"])
@pytest.mark.parametrize("tiles", [[], [1]], ids=["text_only", "one_image"])
def test_logits_match_oracle(oracle, layout, tiles):
    hf, disk, memory = oracle
    ours = load(disk if layout == "disk" else memory, dtype=torch.float32)
    ids, kw = inputs(tiles)
    assert ids.shape[1] > 2 * WINDOW
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits
        got = ours(ids, **kw)
    print(f"max |dlogit| {layout} {len(tiles)} image(s): {(got - ref).abs().max():.3g} (scale {ref.abs().max():.3g})")
    assert_logits_close(got, ref)


def test_padded_batch_matches_oracle(oracle):
    hf, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    rows = [TEXT, TEXT[3:8]]
    ids = torch.tensor([[0] * (len(TEXT) - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (len(TEXT) - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask)
    assert_logits_close(got[mask.bool()], ref[mask.bool()])


def test_cached_decode_beyond_the_window_equals_recompute(oracle):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([1])
    new = torch.tensor([[7, 3, 99, 42, 5, 6, 11]])  # more decode steps than the window
    full_ids = torch.cat([ids, new], 1)
    with torch.no_grad():
        full = ours(full_ids, **kw)
        cache = ours.new_cache(1, full_ids.shape[1] + 4)
        steps = [ours(ids, cache=cache, **kw)[:, -1]]
        for j in range(new.shape[1]):
            steps.append(ours.decode_step(new[:, j:j + 1], cache))
            cache.length += 1
    S = ids.shape[1]
    for j, logits in enumerate(steps):
        assert_logits_close(logits, full[:, S - 1 + j])


def test_greedy_generation_matches_oracle(oracle):
    hf, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([1])
    ref = hf.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                      **kw)[0, ids.shape[1]:]
    out = generate(ours, ids, max_new_tokens=10, **kw)[0]
    assert out.tolist() == ref.tolist()
    assert len(set(out.tolist())) > 1, "degenerate generation cannot catch mistakes"


# the triton path runs on a CPU only through Triton's interpreter (TRITON_INTERPRET=1); tests/test_kernels.py, which
# CI runs that way, also decodes a gpt-oss model with it
@pytest.mark.parametrize("impl", ["grouped", "gather"] + (["triton"] if TRITON_ON_CPU else []))
def test_kernel_paths_and_skipping(oracle, impl):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([1])
    with torch.no_grad():
        ref = ours(ids, **kw)
        router.install(ours, router.Threshold(0.0))  # tau 0 skips nothing: the same logits
        torch.testing.assert_close(ours(ids, **kw), ref, rtol=0, atol=0)
        set_expert_impl(ours, impl)
        torch.testing.assert_close(ours(ids, **kw), ref, rtol=1e-5, atol=1e-5)
        router.install(ours, router.Threshold(0.3))  # with skipping on, the same slots skipped on every path
        stats = router.SkipStats(len(ours.layers))
        fast = ours(ids, stats=stats, **kw)
        set_expert_impl(ours, "ref")
        skipped = ours(ids, **kw)
        torch.testing.assert_close(fast, skipped, rtol=1e-5, atol=1e-5)
    assert 0 < stats.summary()["prefill"]["all"] < 1
    assert (skipped - ref).abs().max() > 1e-3  # skipping changes the output


def test_mxfp4_is_refused(oracle, tmp_path):
    _, disk, _ = oracle
    raw = json.load(open(os.path.join(disk, "config.json")))
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    with pytest.raises(ValueError, match=r"^c: quantization_config \(quant_method 'mxfp4'.*use bf16 weights$"):
        internvl.InternVLConfig.from_hf(raw, "c")
    folder = tmp_path / "mxfp4"
    os.makedirs(folder)
    tensors = load_file(os.path.join(disk, "model.safetensors"))
    w = tensors.pop("language_model.model.layers.0.mlp.experts.gate_up_proj")
    tensors["language_model.model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(6, 80, 2, 16,
                                                                                          dtype=torch.uint8)
    tensors["language_model.model.layers.0.mlp.experts.gate_up_proj_scales"] = torch.zeros(6, 80, 2,
                                                                                          dtype=torch.uint8)
    assert w.shape == (6, 48, 80)
    save_file(tensors, str(folder / "model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(disk, "config.json"))), f)
    with pytest.raises(ValueError, match=r"MXFP4-quantised experts \(2 \*_blocks / \*_scales tensors.*bf16"):
        load(str(folder), dtype=torch.float32)


def test_save_checkpoint_round_trip(oracle, tmp_path):
    from model import save_checkpoint
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    save_checkpoint(ours, json.load(open(os.path.join(disk, "config.json"))), str(tmp_path), dtype=torch.float32)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))[
        "language_model.model.layers.1.mlp.experts.gate_up_proj"],
        load_file(os.path.join(disk, "model.safetensors"))["language_model.model.layers.1.mlp.experts.gate_up_proj"])
    ids, kw = inputs([1])
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path), dtype=torch.float32)(ids, **kw), ours(ids, **kw))
