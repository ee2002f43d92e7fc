"""InternVL-3.5 (Qwen3-MoE decoder) against transformers' InternVLForConditionalGeneration (fp32, tiny random
checkpoints in both key layouts transformers reads)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import internvl
import router
from generate import generate
from model import load, read_config, set_expert_impl

IMG_START, IMG_END, IMG_CONTEXT = 297, 298, 299  # small-vocabulary stand-ins for <img>, </img>, <IMG_CONTEXT>
TILE = 56  # 4 x 4 patches of 14 px, shuffled into 2 x 2 = 4 tokens per tile


def tiny_config(tie_word_embeddings=False, **text):
    from transformers import InternVLConfig
    text_config = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
                       moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                       mlp_only_layers=[1], rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
                       rope_parameters=dict(rope_type="default", rope_theta=1e6))
    text_config.update(text)
    vision_config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=True)
    return InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMG_CONTEXT,
                          image_seq_length=4, tie_word_embeddings=tie_word_embeddings)


def reinit(model, seed=0):
    """Variance-preserving random weights and peaked routers (transformers' init, std 0.02 and zero positions,
    gives near-constant outputs that would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms around 1; biases and layer scales around 0
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if "experts" in name or "embeddings" in name else p[0].numel()
                scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)
    return model


def make_oracle(tmp_path, seed=0, **config):
    """(oracle in eval mode, folder written by save_pretrained: llava-style names and one tensor per expert,
    the same weights under the in-memory names with stacked experts, sharded with an index)."""
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    hf = reinit(InternVLForConditionalGeneration(tiny_config(**config)).eval(), seed)
    disk = os.path.join(tmp_path, "disk")
    hf.save_pretrained(disk)
    memory = os.path.join(tmp_path, "memory")
    os.makedirs(memory)
    tensors = {n: t.contiguous() for n, t in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # one copy of a tied matrix, as a save keeps it
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, os.path.join(memory, f), metadata={"format": "pt"})
    with open(os.path.join(memory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}, fh)
    with open(os.path.join(disk, "config.json")) as fh, open(os.path.join(memory, "config.json"), "w") as out:
        out.write(fh.read())
    return hf, disk, memory


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return make_oracle(str(tmp_path_factory.mktemp("internvl")))


def assert_logits_close(ours, ref):
    scale = ref.abs().max()
    err = (ours - ref).abs().max()
    assert err <= 1e-4 * scale, f"max |Δlogit| {err:.3g} vs logit scale {scale:.3g}"


def image_prompt(tiles_per_image, text_before=(5, 6, 7), text_after=(8, 9, 10, 11)):
    """input_ids <text> then per image <img> <IMG_CONTEXT> x 4 per tile </img> \\n-stand-in, then <text>."""
    ids = list(text_before)
    for n in tiles_per_image:
        ids += [IMG_START] + [IMG_CONTEXT] * 4 * n + [IMG_END, 12]
    return ids + list(text_after)


def pixels(n_tiles, seed=1):
    return torch.randn(n_tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


CASES = {
    "text_only": [],
    "one_tile": [1],
    "tiles_and_thumbnail": [5],  # a 2 x 2 grid plus its thumbnail: 5 tiles of one image
    "two_images": [3, 1],
}


def inputs(tiles):
    ids = torch.tensor([image_prompt(tiles)]) if tiles else torch.tensor([[5, 17, 33, 2, 250, 9, 9, 41]])
    return ids, (dict(pixel_values=pixels(sum(tiles))) if tiles else {})


@pytest.mark.parametrize("layout", ["disk", "memory"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_oracle(oracle, layout, case):
    hf, disk, memory = oracle
    ours = load(disk if layout == "disk" else memory, dtype=torch.float32)
    ids, kw = inputs(CASES[case])
    with torch.no_grad():
        assert_logits_close(ours(ids, **kw), hf(input_ids=ids, **kw).logits)


VARIANTS = {
    "tied_embeddings": dict(tie_word_embeddings=True),
    "sparse_step_2": dict(mlp_only_layers=[], decoder_sparse_step=2),
    "attention_bias": dict(attention_bias=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_oracle(tmp_path, variant):
    hf, disk, memory = make_oracle(str(tmp_path), **VARIANTS[variant])
    ids, kw = inputs([1])
    ref = hf(input_ids=ids, **kw).logits.detach()
    for path in (disk, memory):
        with torch.no_grad():
            assert_logits_close(load(path, dtype=torch.float32)(ids, **kw), ref)


def test_pixel_shuffle_channel_order():
    # token (i, j) holds patches (2i + m, 2j + k) at channel block 2m + k: row offset major
    g = torch.arange(4 * 4).float().view(1, 4, 4, 1)  # patch value = its raster index
    out = internvl.pixel_shuffle(g, 2)  # [1, 4, 4]
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def left_padded_batch():
    rows = [image_prompt([1]), image_prompt([2], text_before=(5,), text_after=(8,))]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, dict(pixel_values=pixels(3))


def test_cached_decode_equals_recompute(oracle):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, mask, kw = left_padded_batch()
    new = torch.tensor([[7, 3, 99], [42, 5, 6]])
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask, **kw)
        cache = ours.new_cache(2, full_ids.shape[1] + 4)
        steps = [ours(ids, mask, cache=cache, **kw)[:, -1]]
        for j in range(new.shape[1]):
            steps.append(ours.decode_step(new[:, j:j + 1], cache))
            cache.length += 1
    S = ids.shape[1]
    for j, logits in enumerate(steps):
        assert_logits_close(logits, full[:, S - 1 + j])


def test_greedy_generation_matches_oracle(oracle):
    hf, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([5])
    ref = hf.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                      **kw)[0, ids.shape[1]:]
    out = generate(ours, ids, max_new_tokens=8, **kw)[0]
    assert out.tolist() == ref.tolist()
    assert len(set(out.tolist())) > 1, "degenerate generation cannot catch mistakes"


@pytest.mark.parametrize("impl", ["grouped", "gather"])
def test_kernel_paths_and_skipping(oracle, impl):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([1])
    with torch.no_grad():
        ref = ours(ids, **kw)
        set_expert_impl(ours, impl)
        torch.testing.assert_close(ours(ids, **kw), ref, rtol=1e-5, atol=1e-5)
        router.install(ours, router.Threshold(0.3))  # with skipping on, the same slots skipped on every path
        stats = router.SkipStats(len(ours.layers))
        fast = ours(ids, stats=stats, **kw)
        set_expert_impl(ours, "ref")
        torch.testing.assert_close(fast, ours(ids, **kw), rtol=1e-5, atol=1e-5)
    assert 0 < stats.summary()["prefill"]["all"] < 1


def test_image_tokens_are_vision_modality(oracle):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32, special_ids=[IMG_START, IMG_END, IMG_CONTEXT])
    ids, _ = inputs([1])
    m = ours.modality(ids, "prefill")[0]
    assert (m[ids[0] == IMG_CONTEXT] == 1).all() and (m[ids[0] == IMG_START] == 2).all() and m[0] == 0


def test_context_count_must_match_the_tiles(oracle):
    _, disk, _ = oracle
    ours = load(disk, dtype=torch.float32)
    ids, kw = inputs([2])
    with pytest.raises(ValueError, match=r"^8 <IMG_CONTEXT> tokens \(id 299\) for 4 image features \(1 tiles\)$"):
        ours(ids, pixel_values=kw["pixel_values"][:1])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def without(src, dst, drop=(), rename=None):
    """A copy of checkpoint folder src without the tensors `drop` (and with one renamed), one safetensors file."""
    from safetensors.torch import load_file
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for n in drop:
        del tensors[n]
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as out:
        out.write(f.read())
    return dst


def test_missing_tensor_is_named(oracle, tmp_path):
    _, disk, _ = oracle
    gone = "language_model.model.layers.2.mlp.experts.5.up_proj.weight"
    folder = without(disk, str(tmp_path / "m"), drop=[gone, "vision_tower.encoder.layer.1.lambda_2"])
    with pytest.raises(ValueError, match=rf"2 checkpoint problem\(s\): missing tensor {gone}; missing tensor "
                                         r"vision_tower.encoder.layer.1.lambda_2$"):
        load(folder, dtype=torch.float32)


def test_wrong_expert_count_lists_every_problem(oracle, tmp_path):
    _, disk, _ = oracle
    folder = without(disk, str(tmp_path / "e"))
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    raw["text_config"]["num_local_experts"] = 6  # the checkpoint holds 8 per MoE layer
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError) as e:
        load(folder, dtype=torch.float32)
    msg = str(e.value)
    assert "unexpected tensor language_model.model.layers.0.mlp.experts.6.down_proj.weight" in msg
    assert "language_model.model.layers.3.mlp.gate.weight: expected shape (6, 64), found (8, 64)" in msg
    assert msg.startswith(f"{folder}: 21 checkpoint problem(s): ") and "\n" not in msg


def test_internvl_chat_config_is_refused():
    raw = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "llm_config": {}, "vision_config": {}}
    with pytest.raises(ValueError, match=r"^config.json: model_type 'internvl_chat' .* use the -HF repository"):
        internvl.InternVLConfig.from_hf(raw, "config.json")


@pytest.mark.parametrize("part, change", [("text_config", {"norm_topk_prob": False}),
                                          ("text_config", {"model_type": "gpt_oss"}),
                                          ("vision_config", {"use_qk_norm": True}),
                                          ("vision_config", {"norm_type": "rms_norm"}),
                                          (None, {"vision_feature_layer": -2}),
                                          (None, {"downsample_ratio": 0.3})])
def test_unsupported_config_is_one_clear_error(oracle, part, change):
    with open(os.path.join(oracle[1], "config.json")) as f:
        raw = json.load(f)
    (raw[part] if part else raw).update(change)
    with pytest.raises(ValueError, match=rf"^config.json: .*{next(iter(change))}"):
        internvl.InternVLConfig.from_hf(raw, "config.json")


def test_both_text_dialects_and_the_real_config_agree():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "internvl3_5_30b_a3b.json")
    cfg = read_config(path)
    with open(path) as f:
        raw = json.load(f)
    t = raw["text_config"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": t.pop("rope_theta")}
    t["num_local_experts"] = t.pop("num_experts")
    t.pop("rope_scaling", None)
    assert internvl.InternVLConfig.from_hf(raw, "transformers 5 dialect") == cfg
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.tokens_per_tile, cfg.vision.grid) == (128, 8, 256, 32)
    with torch.device("meta"):
        model = internvl.InternVL(cfg)
    assert cfg.is_moe_layer(0) and len(model.moe_layers()) == 48
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("visual.", "projector.")))
    assert abs(vision / 1e9 - 0.3) < 0.05  # the model card's InternViT-300M (+ projector)
