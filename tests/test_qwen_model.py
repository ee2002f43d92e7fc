"""Qwen3-VL-MoE against transformers' Qwen3VLMoeForConditionalGeneration (fp32, tiny random configs)."""
import json
import os

import pytest
import torch

import baselines
import qwen3_vl_moe
import router
from generate import generate
from model import attention, causal_mask, checkpoint_names, load, read_config, set_expert_impl
from qwen_oracle import (IMAGE, image_prompt, make_oracle, mm_token_type_ids, pixels, video_prompt)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "qwen3_vl_moe")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return make_oracle(str(tmp_path_factory.mktemp("qwen")))


def assert_logits_close(ours, ref):
    scale = ref.abs().max()
    err = (ours - ref).abs().max()
    assert err <= 1e-4 * scale, f"max |Δlogit| {err:.3g} vs logit scale {scale:.3g}"


def hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), **kw).logits


CASES = {
    "two_images": dict(grids=[(1, 4, 6), (1, 6, 4)]),
    "odd_grid": dict(grids=[(1, 10, 6)]),  # not the table's 4x4 grid: the position table is resampled
    "video": dict(video=(2, 4, 4)),
    "text_only": dict(),
}


# configurations transformers runs differently from the defaults, each against its own oracle; the reference
# ignores norm_topk_prob and mrope_interleaved (always renormalises, always interleaves) and, without an
# mrope_section, uses [24, 20, 20] even where it does not sum to head_dim / 2
VARIANTS = {
    "dense_layers": dict(mlp_only_layers=[1], decoder_sparse_step=1),
    "sparse_step_2": dict(decoder_sparse_step=2),
    "norm_topk_prob_false": dict(norm_topk_prob=False),
    "no_mrope_interleaved_key": dict(rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                          mrope_section=[6, 5, 5])),
    "no_mrope_section": dict(rope_parameters=dict(rope_type="default", rope_theta=5e6)),
    "attention_bias": dict(attention_bias=True),
    "tied_embeddings": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_oracle(tmp_path, variant):
    hf, saved, hub = make_oracle(str(tmp_path), **VARIANTS[variant])
    grids = [(1, 4, 6)]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    ref = hf_logits(hf, ids, pixel_values=pv, image_grid_thw=thw)
    for path in (saved, hub):
        with torch.no_grad():
            assert_logits_close(load(path, dtype=torch.float32)(ids, pixel_values=pv, image_grid_thw=thw), ref)


@pytest.mark.parametrize("part, change", [("text_config", {"hidden_act": "gelu"}),
                                          ("vision_config", {"hidden_act": "silu"}),
                                          ("text_config", {"rope_scaling": {"mrope_section": [32, 32]}}),
                                          ("text_config", {"num_experts_per_tok": 129})])
def test_unsupported_config_is_one_clear_error(part, change):
    with open(os.path.join(FIXTURES, "config.json")) as f:
        raw = json.load(f)
    raw[part].update(change)
    key = "mrope_section" if "rope_scaling" in change else next(iter(change))
    with pytest.raises(ValueError, match=f"config.json: .*{key}"):
        qwen3_vl_moe.QwenConfig.from_hf(raw, "config.json")


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_oracle(oracle, layout, case):
    hf, saved, hub = oracle
    ours = load(saved if layout == "transformers5" else hub, dtype=torch.float32)
    c = CASES[case]
    if "grids" in c:
        ids = torch.tensor([image_prompt(c["grids"])])
        pv, thw = pixels(c["grids"])
        kw = dict(pixel_values=pv, image_grid_thw=thw)
    elif "video" in c:
        ids = torch.tensor([video_prompt(c["video"])])
        pv, thw = pixels([c["video"]])
        kw = dict(pixel_values_videos=pv, video_grid_thw=thw)
    else:
        ids, kw = torch.tensor([[5, 17, 33, 2, 250, 9, 9, 41]]), {}
    with torch.no_grad():
        out = ours(ids, **kw)
    assert_logits_close(out, hf_logits(hf, ids, **kw))


def test_pad_count_must_match_the_visual_features(oracle):
    _, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    grids = CASES["two_images"]["grids"]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    pad = ours.cfg.image_token_id
    one_less = ids[:, torch.arange(ids.shape[1]) != int((ids[0] == pad).nonzero()[0])]  # the first pad dropped
    with pytest.raises(ValueError, match=rf"^{int((one_less == pad).sum())} pad tokens \(id {pad}\) for "
                                         rf"{int((ids == pad).sum())} visual features$"):
        ours(one_less, pixel_values=pv, image_grid_thw=thw)


def left_padded_batch():
    rows = [image_prompt([(1, 4, 4)]), image_prompt([(1, 2, 4)], text_before=(5,), text_after=(8,))]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    pv, thw = pixels([(1, 4, 4), (1, 2, 4)])
    return ids, mask, dict(pixel_values=pv, image_grid_thw=thw)


def test_left_padded_batch_matches_oracle(oracle):
    hf, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    ids, mask, kw = left_padded_batch()
    with torch.no_grad():
        out = ours(ids, mask, **kw)
    ref = hf_logits(hf, ids, attention_mask=mask, **kw)
    real = mask.bool()
    assert_logits_close(out[real], ref[real])
    assert torch.isfinite(out).all()


def test_cached_decode_equals_recompute(oracle):
    _, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    ids, mask, kw = left_padded_batch()
    new = torch.tensor([[7, 3, 99], [42, 5, 6]])
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask, **kw)
        cache = ours.new_cache(2, full_ids.shape[1] + 4)
        steps = [ours(ids, mask, cache=cache, **kw)[:, -1]]
        for j in range(new.shape[1]):
            steps.append(ours(new[:, j:j + 1], cache=cache)[:, -1])
    S = ids.shape[1]
    for j, logits in enumerate(steps):
        assert_logits_close(logits, full[:, S - 1 + j])


def test_greedy_generation_matches_oracle(oracle):
    hf, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    grids = [(1, 4, 6)]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    ref = hf.generate(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm_token_type_ids(ids),
                      max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    out = generate(ours, ids, max_new_tokens=8, pixel_values=pv, image_grid_thw=thw)[0]
    assert out.tolist() == ref.tolist()
    assert len(set(out.tolist())) > 1, "degenerate generation cannot catch mistakes"


def test_rope_index_worked_example():
    # qwen3_vl_moe.md §4: <|im_start|>user\n<|vision_start|> then a merged 2x4 image, then text; 22 tokens
    cfg = qwen3_vl_moe.QwenConfig(image_token_id=IMAGE)
    model = qwen3_vl_moe.Qwen3VLMoe.__new__(qwen3_vl_moe.Qwen3VLMoe)
    model.cfg = cfg
    ids = torch.tensor([[1, 2, 3, 4] + [IMAGE] * 8 + list(range(30, 40))])
    valid = torch.ones_like(ids, dtype=torch.bool)
    pos, next_pos = model.rope_index(ids, valid, {"image_grid_thw": torch.tensor([[1, 4, 8]])})
    assert pos[0, 0, :14].tolist() == [0, 1, 2, 3] + [4] * 8 + [8, 9]
    assert pos[1, 0, :14].tolist() == [0, 1, 2, 3] + [4] * 4 + [5] * 4 + [8, 9]
    assert pos[2, 0, :14].tolist() == [0, 1, 2, 3] + [4, 5, 6, 7] * 2 + [8, 9]
    assert next_pos.item() - ids.shape[1] == -4  # rope_delta


def test_mrope_interleaved_layout():
    axis = qwen3_vl_moe.mrope_axis(qwen3_vl_moe.QwenConfig())
    assert "".join("THW"[a] for a in axis.tolist()) == "THW" * 20 + "TTTT"


def test_real_config_tensor_names_and_shapes():
    cfg = read_config(FIXTURES)
    with torch.device("meta"):
        model = qwen3_vl_moe.Qwen3VLMoe(cfg)
    params = dict(model.named_parameters())
    ours = {}
    for name, (pname, _) in checkpoint_names(model).items():
        shape = tuple(params[pname].shape)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # hub stores x @ W
            shape = shape[:1] + shape[1:][::-1]
        ours[name] = shape
    expected = {}
    with open(os.path.join(FIXTURES, "checkpoint_tensors.tsv")) as f:
        for line in f:
            if line.startswith("#") or line.startswith("name\t"):
                continue
            name, shape = line.split("\t")[:2]
            expected[name] = tuple(json.loads(shape))
    assert len(expected) == 882
    assert ours == expected
    assert sum(p.numel() for p in params.values()) == 31_070_754_032


def test_both_config_dialects_agree():
    hub = read_config(FIXTURES)
    with open(os.path.join(FIXTURES, "config.json")) as f:
        raw = json.load(f)
    t = raw["text_config"]
    t["rope_parameters"] = dict(t.pop("rope_scaling"), rope_theta=t.pop("rope_theta"))
    t["num_local_experts"] = t.pop("num_experts")
    assert qwen3_vl_moe.QwenConfig.from_hf(raw, "transformers 5 dialect") == hub
    assert hub.num_experts == 128 and hub.rope_theta == 5e6 and hub.mrope_section == (24, 20, 20)


def test_token_importance_hand_example():
    # one head, three tokens, causal: q.k = 0 everywhere, so each query spreads uniformly over what it sees
    q = torch.zeros(1, 1, 3, 2)
    k = torch.zeros(1, 1, 3, 2)
    probs = baselines.attention_probs(q, k, None)
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]]])  # L1 norms 2, 2, 3
    valid = torch.tensor([[True, True, False]])
    got = baselines.token_importance(probs, x, None, valid)
    # token 0 receives 1 + 1/2 + 1/3 from its 3 viewers, token 1 receives 1/2 + 1/3 from 2
    assert torch.allclose(got[0, :2], torch.tensor([2 * (11 / 6) / 3, 2 * (5 / 6) / 2]))
    assert got[0, 2] == float("-inf")
    # the same with the padded-prefill mask form
    mask = causal_mask(torch.arange(3), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(baselines.token_importance(baselines.attention_probs(q, k, mask), x, mask, valid), got)


def test_fused_attention_forms_equal_the_masked_reference():
    """attention() folds the GQA group into the query rows when it has a mask, and uses is_causal without one;
    both equal plain masked softmax attention with K/V repeated per head, also for left-padded rows."""
    g = torch.Generator().manual_seed(0)
    B, h, h_kv, S, d = 2, 8, 2, 7, 16
    q, k, v = (torch.randn(B, n, S, d, generator=g) for n in (h, h_kv, h_kv))

    def reference(mask):
        kk, vv = (t.repeat_interleave(h // h_kv, dim=1) for t in (k, v))
        scores = (q @ kk.transpose(-1, -2)) / d ** 0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    causal = causal_mask(torch.arange(S), torch.ones(B, S, dtype=torch.bool))
    torch.testing.assert_close(attention(q, k, v, None), reference(causal), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention(q, k, v, causal), reference(causal), rtol=1e-5, atol=1e-6)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False  # row 1 left-padded
    padded = causal_mask(torch.arange(S), valid)
    torch.testing.assert_close(attention(q, k, v, padded), reference(padded), rtol=1e-5, atol=1e-6)
    # a decode step: one query per row against a 12-slot cache whose last 4 slots are unwritten
    key_valid = torch.ones(B, 12, dtype=torch.bool)
    key_valid[:, 8:] = False
    key_valid[1, :3] = False
    step = causal_mask(torch.tensor([7]), key_valid)
    kc, vc = (torch.randn(B, h_kv, 12, d, generator=g) for _ in range(2))
    kk, vv = (t.repeat_interleave(h // h_kv, dim=1) for t in (kc, vc))
    expected = ((q[:, :, :1] @ kk.transpose(-1, -2)) / d ** 0.5).masked_fill(~step, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(attention(q[:, :, :1], kc, vc, step), expected, rtol=1e-5, atol=1e-6)


def test_mcmoe_policy_gets_importance(oracle):
    _, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    ids = torch.tensor([image_prompt([(1, 4, 4)])])
    pv, thw = pixels([(1, 4, 4)])
    stats = {}
    for name, policy in (("naee", baselines.NAEE(0.3)),
                         ("mcmoe", baselines.MCMoE(0.3, protect_frac=0.25, drop_frac=0.0))):
        router.install(ours, policy)
        stats[name] = router.SkipStats(ours.cfg.num_hidden_layers)
        with torch.no_grad():
            ours(ids, stats=stats[name], pixel_values=pv, image_grid_thw=thw)
    # protecting a quarter of the tokens keeps strictly more slots than the bare tail rule
    assert stats["mcmoe"].summary()["prefill"]["skipped"] < stats["naee"].summary()["prefill"]["skipped"]


@pytest.mark.parametrize("impl", ["grouped", "gather", "auto"])
def test_kernel_paths_reproduce_reference(oracle, impl):
    _, saved, _ = oracle
    ours = load(saved, dtype=torch.float32)
    grids = [(1, 4, 6)]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    with torch.no_grad():
        ref_logits = ours(ids, pixel_values=pv, image_grid_thw=thw)
        ref_tokens = generate(ours, ids, max_new_tokens=6, pixel_values=pv, image_grid_thw=thw)
        set_expert_impl(ours, impl)
        torch.testing.assert_close(ours(ids, pixel_values=pv, image_grid_thw=thw), ref_logits, rtol=1e-5, atol=1e-5)
        assert generate(ours, ids, max_new_tokens=6, pixel_values=pv, image_grid_thw=thw).tolist() == \
            ref_tokens.tolist()
        router.install(ours, router.Threshold(0.3))  # and with skipping on, the same skipped slots
        fast = ours(ids, pixel_values=pv, image_grid_thw=thw)
        set_expert_impl(ours, "ref")
        torch.testing.assert_close(fast, ours(ids, pixel_values=pv, image_grid_thw=thw), rtol=1e-5, atol=1e-5)
