"""GPU-only checks, run by benchmarks/gpu.sh's checks command (`pytest -m gpu` over this file and two others);
skipped without CUDA.

- The decode step compiled and captured in a CUDA graph, or captured eagerly, fed the tokens of an eager decode,
  gives its logits (bf16 tolerance, top-1 where decided: bench.compare_logits), for both models at their real
  widths (fewer layers, to compile quickly); its first call (compilation, capture) takes less memory than one
  layer's stacked expert weights (a compiled graph that copied them would not), and a replay makes no host
  synchronisation.
- Each expert path against model.py's fp32 loop at the real Qwen3-VL-30B-A3B and Kimi-VL-A3B expert shapes, at the
  token counts where the path's temporary memory is bounded (the gather path copies every slot's weights).
"""
import functools
import json
import os
from types import SimpleNamespace

import pytest
import torch

import bench
import moe_kernels
import router
from model import SKIP, build, config_from_dict, routed_experts, set_expert_impl
from support import measure, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"qwen": "configs/qwen3_vl_30b_a3b.json", "kimi": "configs/kimi_vl_a3b.json"}


def real_width_model(name, layers=3):
    """The real config with fewer decoder layers (and a 2-block vision tower), random bf16 weights on the GPU."""
    with open(os.path.join(ROOT, CONFIGS[name])) as f:
        raw = json.load(f)
    raw["text_config"]["num_hidden_layers"] = layers
    vision = raw["vision_config"]
    if name == "qwen":
        vision.update(depth=2, deepstack_visual_indexes=[0, 1])
    else:
        vision["num_hidden_layers"] = 2
    model = build(config_from_dict(raw, CONFIGS[name]), "cuda", torch.bfloat16)
    return tiny.random_weights(model).eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["qwen", "kimi"])
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_matches_eager_teacher_forced(name, compile):
    model = set_expert_impl(real_width_model(name), "auto")
    router.install(model, router.MoDES(0.0, 0.0, torch.full((len(model.layers), 2), 0.5)))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    cache = model.new_cache(2, 40 + 9)
    step = moe_kernels.DecodeStep(model, cache, compile=compile, cuda_graph=True)
    experts = [model.layers[i].mlp.experts for i in model.moe_layers()]
    smallest = min(min(e.gate_up_proj.nbytes, e.down_proj.nbytes) for e in experts)
    with torch.no_grad():
        token = model(ids, cache=cache, last_only=True)[:, -1:].argmax(-1)
        peak, retained = measure.step_memory(step, token, "cuda")  # compiles and captures
        assert peak < smallest, (peak, retained, smallest)
        check = bench.teacher_forced_check(model, step, cache, ids, {}, 8, bench.CHECK_RTOL["bfloat16"])
        assert check["ok"], check
        torch.cuda.set_sync_debug_mode("error")  # a replay must not wait for the host
        try:
            step(token)
        finally:
            torch.cuda.set_sync_debug_mode("default")


SHAPES = {"qwen": dict(E=128, K=8, H=2048, I=768), "kimi": dict(E=64, K=6, H=2048, I=1408)}
CASES = [(1, 0.0), (1, 0.75), (1, 1.0), (4, 0.5), (512, 0.88), (2048, 0.0)]  # (tokens, skipped share of slots)
MAX_TEMPORARY_BYTES = 4 << 30


def temporary_bytes(path, T, K, H, I):
    """Memory a path allocates beyond its inputs and output, bf16 weights: gather copies each slot's expert
    ([T, K, 3I, H]: 96 GiB for Qwen at T = 2048); the others hold a few fp32 [T * K, H or I] activations."""
    if path == "gather":
        return T * K * 3 * I * H * 2
    return T * K * (2 * H + 3 * I) * 4


def expert_cases(name, path):
    """The CASES this path is tested at: those whose temporary memory is bounded (auto: the path it resolves to)."""
    E, K, H, I = SHAPES[name].values()
    out = []
    for T, skip in CASES:
        resolved = path
        if path == "auto":  # as on a CUDA device (meta tensors: no memory, no device needed)
            resolved = moe_kernels.auto_path(torch.empty(T, H, device="meta"), torch.empty(T, K, device="meta"))
            resolved = "triton" if resolved == "gather" and moe_kernels.HAS_TRITON else resolved
        if temporary_bytes(resolved, T, K, H, I) <= MAX_TEMPORARY_BYTES:
            out.append((T, skip))
    return out


@functools.cache
def expert_weights(name):
    """Random bf16 expert weights at the real shapes, drawn on the GPU (hundreds of millions of numbers), shared by
    every path's test, and their fp32 copies for model.py's loop."""
    E, K, H, I = SHAPES[name].values()
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, generator=g, device="cuda") / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g, device="cuda") / I ** 0.5).bfloat16()
    return w1, w2, SimpleNamespace(gate_up_proj=w1.float(), down_proj=w2.float())


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("path", list(moe_kernels.PATHS) + ["auto"])
def test_expert_paths_at_real_shapes(name, path):
    if path == "triton" and not moe_kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    E, K, H, I = SHAPES[name].values()
    w1, w2, reference = expert_weights(name)
    g = torch.Generator(device="cuda").manual_seed(1)
    for T, skip in expert_cases(name, path):
        x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
        ids = torch.rand(T, E, generator=g, device="cuda").topk(K).indices
        ids = ids.masked_fill(torch.rand(T, K, generator=g, device="cuda") < skip, SKIP)
        weights = torch.rand(T, K, generator=g, device="cuda")
        ref = routed_experts(x.float(), reference, ids, weights, "ref")
        resolved = moe_kernels.auto_path(x, ids) if path == "auto" else path
        out = moe_kernels.run(x, w1, w2, ids, weights, resolved).float()
        if skip == 1.0:
            assert out.abs().max() == 0
            continue
        assert (out - ref).norm() / ref.norm() < 2e-2, (T, skip)
