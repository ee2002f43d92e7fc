"""Kimi-VL model math against transformers (test-only oracle), on tiny random models with the real topology.

Oracles (kimi_vl.md §9): DeepseekV3ForCausalLM for the text decoder, Kimi_K25ForConditionalGeneration (same
MoonViT and projector for single-frame images) for the whole model, loaded from our checkpoint-named tensors.
Weights are variance-preserving with peaked routers and a random non-zero correction bias: transformers' default
init (std 0.02, zero bias) gives near-constant outputs that would hide mistakes (§10).
"""
import json
import os

import pytest
import torch

import baselines
import router
from generate import generate
from kimi_vl import KimiVL, KimiVLConfig
from model import SKIP, build, checkpoint_names, fill_from_checkpoint, load, routed_experts, set_expert_impl
from router import Threshold, install, uninstall
from support import tiny

transformers = pytest.importorskip("transformers")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "kimi_vl")
MEDIA = 250  # small-vocabulary stand-in for <|media_pad|> 163605


def tiny_raw_config(**text):
    text_config = dict(
        model_type="deepseek_v3", vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
        routed_scaling_factor=2.446, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, topk_method="noaux_tc", n_group=1, topk_group=1, num_experts_per_tok=3,
        moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=800000.0, rope_scaling=None, max_position_embeddings=512,
        attention_bias=False, tie_word_embeddings=False)
    text_config.update(text)
    vision_config = dict(model_type="moonvit", patch_size=14, num_attention_heads=2, num_hidden_layers=2,
                         hidden_size=32, intermediate_size=48, init_pos_emb_height=8, init_pos_emb_width=8,
                         merge_kernel_size=[2, 2])
    return dict(model_type="kimi_vl", text_config=text_config, vision_config=vision_config,
                media_placeholder_token_id=MEDIA, pad_token_id=0, tie_word_embeddings=False)


def variance_preserving_(name, t, g):
    """Norm weights around 1, biases around 0, matrices with unit-variance outputs, routers peaked, a correction
    bias large enough to change which experts win and mostly negative (biased sigmoid scores below 0 are where
    filling dropped groups with 0.0 instead of -inf goes wrong)."""
    if name.endswith("e_score_correction_bias"):
        return t.copy_(-0.7 + 0.3 * torch.randn(t.shape, generator=g))
    if t.ndim == 1:
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        return t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))
    if name.endswith("pos_emb.weight") or name.endswith("embed_tokens.weight"):
        return t.copy_(torch.randn(t.shape, generator=g))
    scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
    fan_in = t[0].numel() if t.ndim == 2 or t.ndim == 4 else t.shape[-1]
    return t.copy_(scale * torch.randn(t.shape, generator=g) / fan_in ** 0.5)


def random_checkpoint(cfg, seed=0):
    """Checkpoint-named tensors (per-expert names, as the real shards) for every tensor our model reads."""
    with torch.device("meta"):
        meta = KimiVL(cfg)
    params = dict(meta.named_parameters())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (pname, index) in checkpoint_names(meta).items():
        shape = params[pname].shape if index is None else params[pname][index].shape
        out[name] = variance_preserving_(name, torch.empty(shape), g)
    return out


def load_ours(model, tensors):
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    assert set(names) == set(tensors)
    with torch.no_grad():
        for name, (pname, index) in names.items():
            (params[pname] if index is None else params[pname][index]).copy_(tensors[name])
    return model.eval()


def text_oracle(cfg_raw, seed=0):
    """DeepseekV3ForCausalLM re-initialised variance-preserving, and ours loaded from its state_dict."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    text = {k: v for k, v in cfg_raw["text_config"].items() if k not in ("model_type", "rope_scaling")}
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**text, rope_interleave=True, attn_implementation="eager")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if "rotary" not in name:
                variance_preserving_(name, t, g)
    ours = KimiVL(KimiVLConfig.from_hf(cfg_raw, "tiny"))
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if "rotary" in name:
                continue
            params[name.removeprefix("model.")].copy_(t)  # our names lack "model."; experts are stacked alike
    return hf, ours.eval()


def left_padded_batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    ids[1, :4] = 0
    return ids, mask


def assert_close_logits(ours, ref, what):
    scale = ref.abs().max()
    diff = (ours - ref).abs().max()
    assert diff <= 1e-4 * scale, f"{what}: max |diff| {diff:.3g} vs logit scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Whole model (images included) against Kimi-K2.5


def make_images(cfg, grids, seed=2):
    g = torch.Generator().manual_seed(seed)
    L = sum(h * w for h, w in grids)
    return torch.randn(L, 3, cfg.patch_size, cfg.patch_size, generator=g), torch.tensor(grids)


def image_prompt(grids, seed=3):
    """[1, S]: 5 text tokens, then per image its h*w/4 placeholders and 3 text tokens."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(1, 240, (5,), generator=g)]
    for h, w in grids:
        parts += [torch.full((h * w // 4,), MEDIA), torch.randint(1, 240, (3,), generator=g)]
    return torch.cat(parts)[None]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(our model, the K2.5 oracle, inputs): one 8x8 image (the table's size) and one 6x10 image (bicubic
    resampling, and a non-square grid, which exposes a swapped 2-D rotary axis order)."""
    from safetensors.torch import save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration
    raw = tiny_raw_config()
    cfg = KimiVLConfig.from_hf(raw, "tiny")
    tensors = random_checkpoint(cfg)
    folder = tmp_path_factory.mktemp("kimi")
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    ours = build(cfg, "cpu", torch.float32).eval()  # as model.load does: meta, one allocation, filled from the file
    fill_from_checkpoint(ours, str(folder))

    renames = {"multi_modal_projector.pre_norm": "mm_projector.pre_norm",
               "multi_modal_projector.linear_1": "mm_projector.proj.0",
               "multi_modal_projector.linear_2": "mm_projector.proj.2"}
    hf_dir = tmp_path_factory.mktemp("k25")
    renamed = {}
    for n, t in tensors.items():
        for a, b in renames.items():
            n = n.replace(a, b)
        renamed[n] = t
    save_file(renamed, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    v = raw["vision_config"]
    k25 = Kimi_K25Config(
        text_config=raw["text_config"],
        vision_config=dict(patch_size=14, pos_emb_height=v["init_pos_emb_height"],
                           pos_emb_width=v["init_pos_emb_width"], pos_emb_time=4, hidden_size=v["hidden_size"],
                           num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                           intermediate_size=v["intermediate_size"],
                           hidden_act="gelu_pytorch_tanh", merge_kernel_size=[2, 2],
                           rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}),
        projection_hidden_size=v["hidden_size"], projection_layer_norm_eps=1e-5, image_token_id=MEDIA,
        tie_word_embeddings=False)
    k25.save_pretrained(hf_dir)
    hf = Kimi_K25ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    grids = [(8, 8), (6, 10)]
    pixel_values, grid_hws = make_images(cfg, grids)
    return ours, hf, tensors, image_prompt(grids), pixel_values, grid_hws


def test_whole_model_matches_kimi_k25(whole):
    ours, hf, _, ids, pixel_values, grid_hws = whole
    thw = torch.cat([torch.ones(len(grid_hws), 1, dtype=torch.long), grid_hws], 1)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, image_grid_thw=thw).logits
        got = ours(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
    assert_close_logits(got, ref, "whole model")
    # the images matter: with the placeholders embedded as plain tokens the logits change
    with torch.no_grad():
        blind = ours(ids)
    assert (blind - ref).abs().max() > 0.1 * ref.abs().max()


def test_whole_model_batch_with_left_padding_matches_kimi_k25(whole):
    """Two rows, three images: the features fill the placeholders row by row; row 1 is left-padded."""
    ours, hf, _, _, _, _ = whole
    grids = [(8, 8), (6, 10), (6, 10)]
    pixel_values, grid_hws = make_images(ours.cfg, grids, seed=7)
    row0, row1 = image_prompt(grids[:2], seed=8)[0], image_prompt(grids[2:], seed=9)[0]
    ids = torch.zeros(2, len(row0), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = row0, 1
    ids[1, -len(row1):], mask[1, -len(row1):] = row1, 1
    thw = torch.cat([torch.ones(len(grids), 1, dtype=torch.long), grid_hws], 1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 pixel_values=pixel_values, image_grid_thw=thw).logits
        got = ours(ids, mask, pixel_values=pixel_values, image_grid_hws=grid_hws)
    assert_close_logits(got[mask.bool()], ref[mask.bool()], "padded image batch")


def test_absorbed_attention_equals_naive_with_images(whole):
    ours, _, tensors, ids, pixel_values, grid_hws = whole
    absorbed = load_ours(KimiVL(ours.cfg, attn_impl="absorbed"), tensors)
    with torch.no_grad():
        a = absorbed(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
        n = ours(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
    assert_close_logits(a, n, "absorbed vs naive")


def test_greedy_with_images_matches_kimi_k25_generate(whole):
    ours, hf, _, ids, pixel_values, grid_hws = whole
    thw = torch.cat([torch.ones(len(grid_hws), 1, dtype=torch.long), grid_hws], 1)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=thw, max_new_tokens=6,
                          do_sample=False)[:, ids.shape[1]:]
        got = generate(ours, ids, max_new_tokens=6, pixel_values=pixel_values, image_grid_hws=grid_hws)
    assert got.tolist() == ref.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Text decoder against DeepseekV3ForCausalLM


@pytest.fixture(scope="module")
def text_pair():
    # two groups of four experts, one kept: group-limited routing and a negative-bias group both matter
    return text_oracle(tiny_raw_config(n_group=2, topk_group=1, num_experts_per_tok=2))


def test_text_decoder_matches_deepseek_v3_with_left_padding(text_pair):
    hf, ours = text_pair
    ids, mask = left_padded_batch(300)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask)
    valid = mask.bool()
    assert_close_logits(got[valid], ref[valid], "text decoder")
    # padding must not change a row: row 1 alone, unpadded, gives the same logits
    with torch.no_grad():
        alone = ours(ids[1:, 4:])
    assert_close_logits(got[1, 4:], alone[0], "left padding")


def test_bf16_routes_in_fp32():
    """In a bf16 model the router still scores in fp32 (as HF does), and the policy contract's tensors are fp32."""
    cfg = KimiVLConfig.from_hf(tiny_raw_config(), "tiny")
    gate = load_ours(KimiVL(cfg), random_checkpoint(cfg)).layers[1].mlp.gate
    x = torch.randn(5, cfg.hidden_size).bfloat16()
    expected = torch.sigmoid(x.float() @ gate.weight.bfloat16().float().T)
    r = gate.bfloat16()(x)
    assert r.probs.dtype == r.weights.dtype == r.pi_hat.dtype == torch.float32
    torch.testing.assert_close(r.probs, expected)


def test_kv_a_layernorm_uses_eps_1e6():
    """HF builds kv_a_layernorm with its class default 1e-6, not rms_norm_eps; a tiny latent makes eps visible."""
    hf, ours = text_oracle(tiny_raw_config(), seed=4)
    c = ours.cfg.kv_lora_rank
    with torch.no_grad():
        for model, prefix in ((hf, "model."), (ours, "")):
            for i in range(ours.cfg.num_hidden_layers):
                dict(model.named_parameters())[f"{prefix}layers.{i}.self_attn.kv_a_proj_with_mqa.weight"][:c] *= 3e-3
        ids, _ = left_padded_batch(300)
        assert_close_logits(ours(ids), hf(input_ids=ids).logits, "tiny latent")


def test_correction_bias_and_groups_change_the_routing(text_pair):
    """The oracle comparison can only catch a bias or group bug if both really change the result."""
    hf, ours = text_pair
    ids, _ = left_padded_batch(300)
    with torch.no_grad():
        base = ours(ids)
        gate = ours.layers[1].mlp.gate
        saved = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        no_bias = ours(ids)
        gate.e_score_correction_bias.copy_(saved)
        gate.cfg.n_group, gate.cfg.topk_group = 1, 1
        no_groups = ours(ids)
        gate.cfg.n_group, gate.cfg.topk_group = 2, 1
    assert (no_bias - base).abs().max() > 1e-2
    assert (no_groups - base).abs().max() > 1e-2


def test_router_outputs():
    cfg = KimiVLConfig.from_hf(tiny_raw_config(n_group=2, topk_group=1), "tiny")
    model = load_ours(KimiVL(cfg), random_checkpoint(cfg))
    gate = model.layers[2].mlp.gate
    x = torch.randn(7, cfg.hidden_size)
    r = gate(x)
    probs = torch.sigmoid(x @ gate.weight.T)
    torch.testing.assert_close(r.probs, probs)
    choice = probs + gate.e_score_correction_bias
    # hand rule: the best group by its top-2 sum, then the best K inside it, by biased score
    for t in range(7):
        groups = choice[t].view(2, 4)
        g = int(groups.topk(2, -1).values.sum(-1).argmax())
        expect = (groups[g].topk(cfg.num_experts_per_tok).indices + 4 * g).tolist()
        assert r.ids[t].tolist() == expect
    torch.testing.assert_close(r.pi_hat, probs.gather(1, r.ids) / probs.gather(1, r.ids).sum(-1, keepdim=True))
    torch.testing.assert_close(r.weights, r.pi_hat * 2.446)


# ---------------------------------------------------------------------------------------------------------------
# Caches, absorbed attention, greedy decoding


@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_cached_decode_equals_full_recompute(text_pair, attn_impl):
    hf, ref_model = text_pair
    model = KimiVL(ref_model.cfg, attn_impl=attn_impl).eval()
    model.load_state_dict(ref_model.state_dict())
    ids, mask = left_padded_batch(300)
    new = torch.randint(1, 300, (2, 4), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, ids.shape[1] + new.shape[1])
    steps = []
    with torch.no_grad():
        prefill = model(ids, mask, cache=cache)
        for j in range(new.shape[1]):
            steps.append(model(new[:, j:j + 1], cache=cache)[:, -1])
        full = ref_model(torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1))
    assert_close_logits(prefill[mask.bool()], full[:, :ids.shape[1]][mask.bool()], f"{attn_impl} prefill")
    assert_close_logits(torch.stack(steps, 1), full[:, ids.shape[1]:], f"{attn_impl} decode")


@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_decode_step_compiles_to_one_graph(text_pair, attn_impl):
    """The decode step traces with fullgraph=True (no graph break, no host sync) into a single graph reused at
    every position; with the sync-free "gather" expert path it decodes the same tokens as the eager model."""
    _, ref_model = text_pair
    model = set_expert_impl(KimiVL(ref_model.cfg, attn_impl=attn_impl).eval(), "gather")
    model.load_state_dict(ref_model.state_dict())
    ids, mask = left_padded_batch(300)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache = model.new_cache(2, ids.shape[1] + 6)
    step = torch.compile(lambda t: model.decode_step(t, cache), fullgraph=True, dynamic=False, backend=backend)
    out = []
    with torch.no_grad():
        logits = model(ids, mask, cache=cache)[:, -1]
        for _ in range(6):
            out.append(logits.argmax(-1))
            logits = step(out[-1][:, None])
            cache.length += 1
        expected = generate(ref_model, ids, mask, max_new_tokens=6)
    assert len(graphs) == 1
    assert torch.stack(out, 1).tolist() == expected.tolist()


def test_greedy_tokens_match_deepseek_v3_generate(text_pair):
    hf, ours = text_pair
    ids, mask = left_padded_batch(300)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
        got = generate(ours, ids, mask, max_new_tokens=8)
    assert got.tolist() == ref.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Skip policy hook and statistics


class SkipAll(torch.nn.Module):
    def forward(self, routing, modality, layer):
        return torch.zeros_like(routing.weights), torch.full_like(routing.ids, SKIP)


class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, layer, ids, modality, valid, phase):
        self.calls.append((layer, ids.clone(), modality.clone(), valid.clone(), phase))


def test_policy_and_stats_hooks(whole):
    ours, _, tensors, ids, pixel_values, grid_hws = whole
    model = load_ours(KimiVL(ours.cfg), tensors)
    no_routed = load_ours(KimiVL(ours.cfg), tensors)
    for layer in (1, 2):
        model.layers[layer].mlp.set_policy(SkipAll())
        no_routed.layers[layer].mlp.experts.down_proj.data.zero_()
    stats = Recorder()
    with torch.no_grad():
        skipped = model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws, stats=stats)
        reference = no_routed(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
    # skipping every routed slot leaves exactly the shared experts
    torch.testing.assert_close(skipped, reference)
    with torch.no_grad():
        plain = ours(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
        install(model, Threshold(0.0))  # tau 0 skips nothing; router.py finds the MoE layers from the config
        assert [isinstance(getattr(m.mlp, "policy", None), Threshold) for m in model.layers] == [False, True, True]
        full = model(ids, pixel_values=pixel_values, image_grid_hws=grid_hws)
        uninstall(model)
    torch.testing.assert_close(full, plain)
    assert [c[0] for c in stats.calls] == [1, 2]
    layer, got_ids, modality, valid, phase = stats.calls[0]
    assert phase == "prefill" and bool((got_ids == SKIP).all()) and bool(valid.all())
    assert modality.tolist() == [1 if i == MEDIA else 0 for i in ids[0].tolist()]
    # through generate: one prefill record per MoE layer, then decode records whose tokens are all TEXT
    stats = Recorder()
    generate(model, ids, max_new_tokens=3, stats=stats, pixel_values=pixel_values, image_grid_hws=grid_hws)
    assert [(c[0], c[4]) for c in stats.calls] == [(1, "prefill"), (2, "prefill")] + [(1, "decode"), (2, "decode")] * 2
    assert all(c[2].tolist() == [0] and c[1].shape == (1, ours.cfg.num_experts_per_tok) for c in stats.calls[2:])


def test_expert_slots_cover_stacked_parameters():
    cfg = KimiVLConfig.from_hf(tiny_raw_config(), "tiny")
    tensors = random_checkpoint(cfg)
    model = load_ours(KimiVL(cfg), tensors)
    experts = model.layers[2].mlp.experts
    I = cfg.moe_intermediate_size
    p = "language_model.model.layers.2.mlp.experts"
    torch.testing.assert_close(experts.gate_up_proj[3, :I], tensors[f"{p}.3.gate_proj.weight"])
    torch.testing.assert_close(experts.gate_up_proj[3, I:], tensors[f"{p}.3.up_proj.weight"])
    torch.testing.assert_close(experts.down_proj[5], tensors[f"{p}.5.down_proj.weight"])
    # the stacked layout feeds the shared expert kernel: one token through expert 3 alone
    x = torch.randn(1, cfg.hidden_size)
    ref = tensors[f"{p}.3.down_proj.weight"] @ (torch.nn.functional.silu(tensors[f"{p}.3.gate_proj.weight"] @ x[0])
                                                 * (tensors[f"{p}.3.up_proj.weight"] @ x[0]))
    got = routed_experts(x, experts, torch.tensor([[3]]), torch.ones(1, 1))
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The real checkpoint's names and shapes


def test_real_config_builds_on_meta_with_checkpoint_names_and_shapes():
    with open(os.path.join(FIXTURES, "config.reconstructed.json")) as f:
        cfg = KimiVLConfig.from_hf(json.load(f), "config.reconstructed.json")
    with open(os.path.join(FIXTURES, "tensor_list_derived.json")) as f:
        expected = {t["name"]: tuple(t["shape"]) for t in json.load(f)["tensors"]}
    with torch.device("meta"):
        model = KimiVL(cfg)
    params = dict(model.named_parameters())
    names = checkpoint_names(model)
    got = {n: tuple((params[p] if i is None else params[p][i]).shape) for n, (p, i) in names.items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {n for n in got if got[n] != expected[n]} == set()
    assert len(got) == 5652
    # every stacked expert row is claimed by exactly one checkpoint tensor
    claimed = {}
    for p, index in names.values():
        if index is not None:
            claimed[p] = claimed.get(p, 0) + params[p][index].numel()
    assert all(claimed[p] == params[p].numel() for p in claimed)
    assert sum(p.numel() for p in params.values()) == 16_407_656_048


def test_tied_embeddings_survive_meta_build_and_loading(tmp_path):
    """tie_word_embeddings: no lm_head tensor is read, and after to_empty + fill + tie_weights the head is the
    embedding (to_empty alone unties them)."""
    from safetensors.torch import save_file
    raw = tiny_raw_config()
    raw["tie_word_embeddings"] = True
    cfg = KimiVLConfig.from_hf(raw, "tiny")
    tensors = random_checkpoint(cfg)
    assert "language_model.lm_head.weight" not in tensors
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    model = build(cfg, "cpu", torch.float32)  # to_empty alone would untie them
    fill_from_checkpoint(model, str(tmp_path))
    assert model.lm_head.weight is model.embed_tokens.weight
    reference = load_ours(KimiVL(cfg), tensors)
    ids = torch.randint(1, 240, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), reference(ids))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("change, culprit", [
    (lambda r: r.update(model_type="kimi_k25"), "model_type"),
    (lambda r: r["text_config"].update(model_type="qwen3_moe"), "text_config.model_type"),
    (lambda r: r["vision_config"].update(model_type="siglip"), "vision_config.model_type"),
    (lambda r: r["text_config"].update(q_lora_rank=16), "q_lora_rank"),
    (lambda r: r["text_config"].update(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (lambda r: r["text_config"].update(scoring_func="softmax"), "scoring_func"),
    (lambda r: r["text_config"].update(topk_method="group_limited_greedy"), "topk_method"),
    (lambda r: r["text_config"].update(n_group=3), "n_group"),
    (lambda r: r["text_config"].update(n_shared_experts=None), "n_shared_experts"),
])
def test_bad_config(change, culprit):
    raw = tiny_raw_config()
    change(raw)
    with pytest.raises(ValueError, match=culprit):
        KimiVLConfig.from_hf(raw, "config.json")


def test_bad_inputs(whole):
    ours, _, _, ids, pixel_values, grid_hws = whole
    with pytest.raises(ValueError, match="media placeholder"):
        ours(ids[:, :-8], pixel_values=pixel_values, image_grid_hws=grid_hws)
    with pytest.raises(ValueError, match="pixel_values"):
        ours(ids, pixel_values=pixel_values[:-1], image_grid_hws=grid_hws)
    with pytest.raises(ValueError, match="image_grid_hws"):
        ours(ids, pixel_values=pixel_values, image_grid_hws=torch.tensor([[8, 8], [5, 12]]))
    with pytest.raises(ValueError, match="image_grid_hws"):
        ours(ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="attn_impl"):
        KimiVL(ours.cfg, attn_impl="flash")


@pytest.mark.parametrize("impl", ["grouped", "gather", "auto"])
def test_kernel_paths_reproduce_reference(whole, impl):
    ours, _, _, ids, pixel_values, grid_hws = whole
    pixels = dict(pixel_values=pixel_values, image_grid_hws=grid_hws)
    try:
        with torch.no_grad():
            set_expert_impl(ours, "ref")
            ref = ours(ids, **pixels)
            ref_tokens = generate(ours, ids, max_new_tokens=5, **pixels)
            set_expert_impl(ours, impl)
            assert_close_logits(ours(ids, **pixels), ref, impl)
            assert generate(ours, ids, max_new_tokens=5, **pixels).tolist() == ref_tokens.tolist()
            install(ours, router.Threshold(0.2))  # the same skipped slots through both paths
            fast = ours(ids, **pixels)
            set_expert_impl(ours, "ref")
            assert_close_logits(fast, ours(ids, **pixels), f"{impl} with skipping")
    finally:
        uninstall(ours)
        set_expert_impl(ours, "ref")


def test_mcmoe_gets_attention_importance(whole):
    ours, _, _, ids, pixel_values, grid_hws = whole
    skipped = {}
    try:
        for name, policy in (("naee", baselines.NAEE(0.3)), ("mcmoe", baselines.MCMoE(0.3, protect_frac=0.25,
                                                                                       drop_frac=0.0))):
            install(ours, policy)
            stats = router.SkipStats(len(ours.layers))
            with torch.no_grad():
                ours(ids, stats=stats, pixel_values=pixel_values, image_grid_hws=grid_hws)
            skipped[name] = stats.summary()["prefill"]["skipped"]
    finally:
        uninstall(ours)
    assert skipped["mcmoe"] < skipped["naee"]  # a quarter of the tokens protected


def test_loader_names_missing_and_misshapen_expert_tensors(tmp_path, monkeypatch):
    import shutil
    from safetensors.torch import load_file, save_file
    monkeypatch.setenv("MODES_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "kimi"
    shutil.copytree(tiny.resolve("tiny-kimi"), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["language_model.model.layers.2.mlp.experts.0.down_proj.weight"] = torch.zeros(5, 5)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and "2 checkpoint problem(s)" in msg
    assert "missing tensor language_model.model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "layers.2.mlp.experts.0.down_proj.weight: expected shape (128, 64), found (5, 5)" in msg


def test_correction_bias_stays_fp32_in_a_bf16_model(tmp_path, monkeypatch):
    """transformers keeps e_score_correction_bias in fp32 whatever the model dtype; bf16 would round a bias that
    decides near-tie expert choices. The tiny checkpoint stores it in fp32, so a bf16 load keeps it exactly."""
    monkeypatch.setenv("MODES_CACHE", str(tmp_path / "cache"))
    path = tiny.resolve("tiny-kimi")
    full, half = load(path, dtype=torch.float32), load(path, dtype=torch.bfloat16)
    for i in range(1, len(full.layers)):
        bias = half.layers[i].mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and half.layers[i].mlp.gate.weight.dtype == torch.bfloat16
        assert torch.equal(bias, full.layers[i].mlp.gate.e_score_correction_bias)
        assert not torch.equal(bias.bfloat16().float(), bias)  # a bf16 cast would have changed it
