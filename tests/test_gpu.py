"""GPU-only checks that benchmarks/gpu.sh runs first (`pytest -m gpu`); skipped without CUDA.

- The decode step compiled and captured in a CUDA graph, or captured eagerly, gives the eager decode's logits (bf16
  tolerance) and greedy tokens, for both models at their real widths (fewer layers, to compile quickly), and makes
  no host synchronisation while replayed.
- Each expert path against model.py's fp32 loop at the real Qwen3-VL-30B-A3B and Kimi-VL-A3B expert shapes.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import moe_kernels
import router
from model import SKIP, build, config_from_dict, routed_experts, set_expert_impl
from support import tiny

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
def test_graphed_decode_equals_eager(name, compile):
    model = set_expert_impl(real_width_model(name), "auto")
    router.install(model, router.MoDES(0.0, 0.0, torch.full((len(model.layers), 2), 0.5)))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    cache = model.new_cache(2, 40 + 9)
    step = moe_kernels.DecodeStep(model, cache, compile=compile, cuda_graph=True)
    runs = {}
    with torch.no_grad():
        for kind in ("eager", "graph"):
            cache.reset()
            token = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            logits = []
            for _ in range(8):
                out = step(token) if kind == "graph" else model.decode_step(token, cache)
                logits.append(out.float().clone())
                cache.length += 1
                token = out.argmax(-1, keepdim=True)
            runs[kind] = torch.stack(logits)
        torch.cuda.set_sync_debug_mode("error")  # a replay must not wait for the host
        try:
            step(token)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    eager, graph = runs["eager"], runs["graph"]
    assert torch.equal(eager.argmax(-1), graph.argmax(-1))
    assert (graph - eager).norm() / eager.norm() < 2e-2


SHAPES = {"qwen": dict(E=128, K=8, H=2048, I=768), "kimi": dict(E=64, K=6, H=2048, I=1408)}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("path", list(moe_kernels.PATHS) + ["auto"])
def test_expert_paths_at_real_shapes(name, path):
    if path == "triton" and not moe_kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    E, K, H, I = SHAPES[name].values()
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).cuda().bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).cuda().bfloat16()
    reference = SimpleNamespace(gate_up_proj=w1.float(), down_proj=w2.float())
    for T, skip in [(1, 0.0), (1, 0.75), (1, 1.0), (4, 0.5), (512, 0.88), (2048, 0.0)]:
        x = torch.randn(T, H, generator=g).cuda().bfloat16()
        ids = torch.rand(T, E, generator=g).topk(K).indices
        ids = ids.masked_fill(torch.rand(T, K, generator=g) < skip, SKIP).cuda()
        weights = torch.rand(T, K, generator=g).cuda()
        ref = routed_experts(x.float(), reference, ids, weights, "ref")
        resolved = moe_kernels.auto_path(x, ids) if path == "auto" else path
        out = moe_kernels.run(x, w1, w2, ids, weights, resolved).float()
        if skip == 1.0:
            assert out.abs().max() == 0
            continue
        assert (out - ref).norm() / ref.norm() < 2e-2, (T, skip)
