"""moe_kernels.py's expert paths against model.py's readable loop in fp32 (itself checked against a dense fp64
reference), skip semantics, NaN safety, graph counts under torch.compile, path checks, gpt-oss's biased experts with
the clamped GLU on every path. CPU, tiny sizes; the triton path runs here only with triton installed and
TRITON_INTERPRET=1, where a small gpt-oss model also decodes through it. The one CUDA test is marked gpu:
benchmarks/gpu.sh runs it."""
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import model
import moe_kernels
import router
from generate import generate
from model import SKIP, routed_experts
from support import tiny


def moe_experts(x, w_gate_up, w_down, ids, weights, path):
    """The model's choke point with the weights as the stacked Experts module holds them."""
    return routed_experts(x, SimpleNamespace(gate_up_proj=w_gate_up, down_proj=w_down), ids.long(), weights, path)


def kernel(x, w_gate_up, w_down, ids, weights, path):
    """moe_kernels.py alone, as a compiled model reaches it ("auto" resolved the way the choke point does)."""
    return moe_kernels.run(x, w_gate_up, w_down, ids.long(), weights,
                           moe_kernels.auto_path(x, ids) if path == "auto" else path)


H, I = 64, 32  # hidden and expert sizes: multiples of 8, so grouped_mm's 16-byte stride rule holds in bf16 too
TRITON_ON_CPU = moe_kernels.HAS_TRITON and moe_kernels._TRITON_INTERPRET
FAST_PATHS = ["grouped", "gather", "auto"] + (["triton"] if TRITON_ON_CPU else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative L2 error against the fp32 loop
# (T, K, E, skip pattern): every T, K, E and pattern appears at least once
CASES = [(1, 8, 16, "none"), (1, 6, 64, "random"), (2, 8, 64, "all"), (7, 6, 16, "one_expert"),
         (33, 8, 64, "empty_tokens"), (33, 6, 16, "sparse88"), (257, 8, 64, "random"), (257, 6, 16, "none")]


def make_case(T, K, E, pattern, dtype=torch.float32, seed=0, h=H, i=I):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, h, generator=g).to(dtype)
    w_gate_up = (torch.randn(E, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w_down = (torch.randn(E, h, i, generator=g) / i ** 0.5).to(dtype)
    ids = torch.rand(T, E, generator=g).topk(K).indices  # distinct experts per token, as top-k routing gives
    weights = torch.rand(T, K, generator=g)
    u = torch.rand(T, K, generator=g)
    keep = {"none": u >= 0, "all": u < 0, "random": u < 0.5, "sparse88": u < 0.12,
            "empty_tokens": (u < 0.6) & (torch.arange(T)[:, None] % 3 != 0),
            "one_expert": torch.arange(K).expand(T, K) == 0}[pattern]
    if pattern == "one_expert":
        ids[:, 0] = E // 2  # every kept pair lands on one expert
    ids = ids.masked_fill(~keep, SKIP).to(torch.int32 if seed % 2 else torch.int64)
    return x, w_gate_up, w_down, ids, weights


def dense_reference(x, w_gate_up, w_down, ids, weights):
    """fp64: every expert on every token, mixed by a dense [T, E] weight matrix; shares no code with moe_kernels.py."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    T, E, i = x.shape[0], w_gate_up.shape[0], w_down.shape[2]
    h = torch.einsum("th,ejh->tej", x, w_gate_up)                           # [T, E, 2I]
    y = torch.einsum("tei,ehi->teh", F.silu(h[..., :i]) * h[..., i:], w_down)  # [T, E, H]
    keep = ids != SKIP
    mix = torch.zeros(T, E, dtype=torch.float64).scatter_add_(
        1, ids.long().clamp(min=0), torch.where(keep, weights.double(), 0.0))   # [T, E]
    return torch.einsum("te,teh->th", mix, y)


def assert_close(out, ref, tol, what=""):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.isfinite().all(), f"{what}: non-finite output"
    diff = (out - ref).abs()
    if ref.abs().max() == 0:
        assert diff.max() == 0, f"{what}: expected exact zeros, max diff {diff.max():.2e}"
        return
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= tol, f"{what}: rel err {rel:.2e} > {tol:.0e}, max diff {diff.max():.2e}, mean {diff.mean():.2e}"


@functools.cache
def loop_result(case, dtype):
    """model.py's loop on the same (possibly bf16-rounded) weights and inputs, in fp32: the oracle."""
    return moe_experts(*[a.float() if a.is_floating_point() else a for a in make_case(*case, dtype)], path="ref")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_loop_matches_dense_reference(case, dtype):
    args = make_case(*case, dtype)
    assert_close(loop_result(case, dtype), dense_reference(*args), 1e-6, "loop")
    out = moe_experts(*args, path="ref")  # in bf16 the loop itself: bf16 matmuls, fp32 accumulation
    assert out.dtype == dtype
    assert_close(out, dense_reference(*args), 1e-6 if dtype == torch.float32 else 2e-2, "loop in " + str(dtype))


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_path_matches_loop(case, dtype, path):
    if path == "triton" and case[0] * case[1] > 64:
        pytest.skip("the Triton interpreter is too slow for prefill sizes")
    out = moe_experts(*make_case(*case, dtype), path=path)
    assert out.dtype == dtype
    assert_close(out, loop_result(case, dtype), TOL[dtype], f"{path} {case}")


def test_grouped_falls_back_on_unaligned_sizes():
    # I=30 fp32 rows are 120 bytes, not a multiple of 16: grouped_mm refuses them, the path must still be right
    args = make_case(7, 6, 16, "random", h=40, i=30)
    assert not moe_kernels._grouped_mm_usable(args[0], 30)
    assert_close(moe_experts(*args, path="grouped"), dense_reference(*args), TOL[torch.float32], "fallback")


@pytest.mark.parametrize("path", ["ref"] + FAST_PATHS)
def test_skip_equals_zero_weight(path):
    x, w_gate_up, w_down, ids, weights = make_case(33 if path != "triton" else 5, 8, 64, "none", seed=3)
    skipped = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    out_skip = moe_experts(x, w_gate_up, w_down, ids.masked_fill(skipped, SKIP), weights, path=path)
    out_zero = moe_experts(x, w_gate_up, w_down, ids, weights.masked_fill(skipped, 0.0), path=path)
    assert_close(out_skip, out_zero, 1e-6, path)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("pattern", ["random", "all", "empty_tokens"])
def test_nan_in_unused_experts_and_skipped_slots_is_ignored(path, pattern):
    x, w_gate_up, w_down, ids, weights = make_case(7, 6, 64, pattern, seed=5)
    clean = moe_experts(x, w_gate_up, w_down, ids, weights, path=path)
    unused = torch.ones(64, dtype=torch.bool)
    unused[ids[ids != SKIP].long()] = False
    poisoned = (w_gate_up.clone(), w_down.clone(), weights.masked_fill(ids == SKIP, float("nan")))
    poisoned[0][unused] = float("nan")
    poisoned[1][unused] = float("nan")
    x_nan = x.masked_fill((ids == SKIP).all(1, keepdim=True), float("nan"))  # tokens that keep nothing
    assert unused.any()
    assert_close(moe_experts(x_nan, *poisoned[:2], ids, poisoned[2], path=path), clean, 1e-6, path)


def test_masked_combine_ignores_uninitialised_tail():
    # grouped_mm leaves rows past offs[-1] uninitialised; emulate the worst case, NaN there
    y = torch.randn(10, H)
    keep = torch.arange(10) < 6
    w = torch.rand(10).masked_fill(~keep, float("nan"))
    y[~keep] = float("nan")
    out = moe_kernels._masked_combine(y, keep, w)
    assert out.isfinite().all() and (out[~keep] == 0).all()
    torch.testing.assert_close(out[keep], y[keep] * w[keep, None])
    assert (y * (keep * w.nan_to_num())[:, None]).isnan().any()  # the "* 0" mask would have let the NaN through


def test_redirect_reads_only_kept_experts():
    for pattern in ["random", "empty_tokens", "sparse88"]:
        ids = make_case(33, 8, 64, pattern)[3].long()
        redirected = moe_kernels._redirect_skipped(ids, 64)
        kept_any = set(ids[ids != SKIP].tolist())
        for t in range(ids.shape[0]):
            kept = set(ids[t][ids[t] != SKIP].tolist())
            assert set(redirected[t].tolist()) <= (kept or kept_any), (pattern, t)
        assert torch.equal(redirected[ids != SKIP], ids[ids != SKIP])


@pytest.mark.parametrize("path,dtype", [("grouped", torch.float32), ("grouped", torch.bfloat16),
                                        ("gather", torch.float32), ("auto", torch.bfloat16)])
def test_one_graph_across_skip_patterns(path, dtype):
    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(functools.partial(kernel, path=path), backend=counter, fullgraph=True)
    for pattern in ["none", "random", "all", "one_expert", "sparse88"]:
        args = make_case(9, 8, 16, pattern, dtype)
        assert_close(f(*args), loop_result((9, 8, 16, pattern), dtype), TOL[dtype], pattern)
    assert counter.frame_count == 1
    for T in [3, 17, 40]:  # auto crosses DECODE_MAX_SLOTS here, which adds one graph
        f(*make_case(T, 8, 16, "random", dtype))
    assert counter.frame_count <= 3


@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float32), ("aot_eager", torch.bfloat16),
                                           ("inductor", torch.bfloat16)])  # one Inductor build: a cold one costs ~20 s
def test_compiled_grouped_matches_loop(backend, dtype):
    torch._dynamo.reset()
    f = torch.compile(functools.partial(kernel, path="grouped"), backend=backend, fullgraph=True)
    case = (33, 8, 16, "empty_tokens")
    assert_close(f(*make_case(*case, dtype)), loop_result(case, dtype), TOL[dtype], backend)


def test_paths_are_checked_once_when_chosen():
    with pytest.raises(ValueError, match="expert path must be one of"):
        moe_kernels.check_path("fast", "cpu")
    if not TRITON_ON_CPU:
        with pytest.raises(ValueError, match="triton needs a CUDA device"):
            moe_kernels.check_path("triton", "cpu")
    moe_kernels.check_path("grouped", "cpu")
    assert moe_kernels.auto_path(torch.zeros(3, 8), torch.zeros(3, 4, dtype=torch.long)) == "ref"  # eager CPU


@pytest.mark.gpu  # benchmarks/gpu.sh's checks command runs it with tests/test_gpu.py
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("path", ["grouped", "gather", "triton", "auto"])
def test_cuda_bf16_paths_match_loop(path):
    if path == "triton" and not moe_kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    cases = [(1, 8, 64, "random"), (1, 8, 64, "all"), (7, 6, 16, "empty_tokens"), (257, 8, 64, "sparse88")]
    for case in cases:
        args = [a.cuda() for a in make_case(*case, torch.bfloat16)]
        eager = moe_experts(*args, path=path).cpu()
        assert_close(eager, loop_result(case, torch.bfloat16), TOL[torch.bfloat16], f"{path} {case}")
    # compiled: one Inductor build per path (each takes seconds), on a decode case, or a prefill one for grouped
    case = cases[3] if path == "grouped" else cases[0]
    args = [a.cuda() for a in make_case(*case, torch.bfloat16)]
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(kernel, path=path), fullgraph=True)(*args).cpu()
    assert_close(compiled, moe_experts(*args, path=path).cpu(), TOL[torch.bfloat16], f"compiled {path} {case}")


# gpt-oss's experts: biases inside each expert and the clamped GLU (alpha 1.702, limit 7), a small limit here so
# that the clamps bind on these inputs
CLAMP = (1.702, 0.7)
BIASED_PATHS = ["grouped", "gather", "auto"] + (["triton"] if TRITON_ON_CPU else [])


def biased_case(T, K, E, pattern, dtype=torch.float32, seed=0, h=H, i=I, bias=True, clamp=CLAMP):
    x, w_gate_up, w_down, ids, weights = make_case(T, K, E, pattern, dtype, seed, h, i)
    g = torch.Generator().manual_seed(seed + 100)
    b_gate_up = torch.randn(E, 2 * i, generator=g).to(dtype) if bias else None
    b_down = torch.randn(E, h, generator=g).to(dtype) if bias else None
    return x, SimpleNamespace(gate_up_proj=w_gate_up, down_proj=w_down, gate_up_proj_bias=b_gate_up,
                              down_proj_bias=b_down, clamp=clamp), ids, weights


def dense_biased_reference(x, experts, ids, weights):
    """fp64, every expert on every token, written from transformers' GptOssExperts (gate = gate.clamp(max=limit),
    up = up.clamp(-limit, limit), (up + 1) * gate * sigmoid(alpha * gate)); shares no code with moe_kernels.py."""
    alpha, limit = experts.clamp
    x = x.double()
    T, E, i = x.shape[0], experts.gate_up_proj.shape[0], experts.down_proj.shape[2]
    h = torch.einsum("th,ejh->tej", x, experts.gate_up_proj.double()) + experts.gate_up_proj_bias.double()
    gate, up = h[..., :i].clamp(max=limit), h[..., i:].clamp(-limit, limit)
    act = (up + 1) * gate * torch.sigmoid(alpha * gate)
    y = torch.einsum("tei,ehi->teh", act, experts.down_proj.double()) + experts.down_proj_bias.double()
    keep = ids != SKIP
    mix = torch.zeros(T, E, dtype=torch.float64).scatter_add_(
        1, ids.long().clamp(min=0), torch.where(keep, weights.double(), 0.0))
    return torch.einsum("te,teh->th", mix, y)


@pytest.mark.parametrize("case", CASES)
def test_biased_clamped_loop_matches_dense_reference(case):
    x, experts, ids, weights = biased_case(*case)
    out = routed_experts(x, experts, ids.long(), weights, "ref")
    assert_close(out, dense_biased_reference(x, experts, ids, weights), 1e-6, "biased loop")


@pytest.mark.parametrize("path", BIASED_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_biased_clamped_path_matches_loop(case, dtype, path):
    if path == "triton" and case[0] * case[1] > 64:
        pytest.skip("the Triton interpreter is too slow for prefill sizes")
    x, experts, ids, weights = biased_case(*case, dtype)
    ref = routed_experts(x.float(), SimpleNamespace(**{k: v.float() if torch.is_tensor(v) else v
                                                       for k, v in vars(experts).items()}), ids.long(), weights, "ref")
    out = routed_experts(x, experts, ids.long(), weights, path)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], f"biased {path} {case}")


@pytest.mark.parametrize("path", ["ref"] + BIASED_PATHS)
def test_biased_skip_adds_no_bias(path):
    # a skipped slot contributes nothing, its expert's biases included: all skipped -> exact zeros
    x, experts, ids, weights = biased_case(7, 6, 16, "all")
    assert routed_experts(x, experts, ids.long(), weights, path).abs().max() == 0
    x, experts, ids, weights = biased_case(33 if path != "triton" else 5, 8, 64, "none", seed=3)
    skipped = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    out_skip = routed_experts(x, experts, ids.long().masked_fill(skipped, SKIP), weights, path)
    out_zero = routed_experts(x, experts, ids.long(), weights.masked_fill(skipped, 0.0), path)
    assert_close(out_skip, out_zero, 1e-6, path)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the triton path runs on a CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("bias,clamp", [(True, CLAMP), (True, None), (False, CLAMP)], ids=["both", "bias", "clamp"])
@pytest.mark.parametrize("T,K,pattern", [(1, 4, "random"), (3, 2, "empty_tokens"), (4, 1, "random"),
                                         (5, 8, "sparse88"), (2, 6, "all")])
@pytest.mark.parametrize("h,i", [(37, 45), (130, 33)])
def test_triton_biased_clamped_odd_sizes(h, i, T, K, pattern, bias, clamp):
    """H and I off TRITON_TILES' multiples (partial output tiles; H = 130 takes two reduction chunks), each flag
    alone and both, in fp32 against the loop and the gather path. Unused experts' weights and biases, and skipped
    slots' routing weights, are NaN for the kernel: none of them may reach the output."""
    x, experts, ids, weights = biased_case(T, K, 16, pattern, seed=T + K, h=h, i=i, bias=bias, clamp=clamp)
    ref = routed_experts(x, experts, ids.long(), weights, "ref")
    assert_close(routed_experts(x, experts, ids.long(), weights, "gather"), ref, TOL[torch.float32], "gather")
    unused = torch.ones(16, dtype=torch.bool)
    unused[ids[ids != SKIP].long()] = False
    poisoned = SimpleNamespace(**{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(experts).items()})
    for t in vars(poisoned).values():
        if torch.is_tensor(t):
            t[unused] = float("nan")
    out = routed_experts(x, poisoned, ids.long(), weights.masked_fill(ids == SKIP, float("nan")), "triton")
    assert_close(out, ref, TOL[torch.float32], f"triton {h}x{i} {T}x{K} {pattern}")


@pytest.mark.gpu  # benchmarks/gpu.sh's checks command runs it with tests/test_gpu.py
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("path", ["grouped", "gather", "triton", "auto"])
def test_cuda_bf16_biased_paths_match_loop(path):
    """gpt-oss's experts (biases, clamped GLU) in bf16 on the GPU against the fp32 loop. Skipped slots' routing
    weights are NaN (run's contract lets them be); for the Triton kernel unused experts' weights and biases are NaN
    too: on a GPU, unlike under the interpreter, a load the kernel fails to mask reads them."""
    if path == "triton" and not moe_kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    for T, K, pattern, h, i in [(1, 4, "random", H, I), (5, 8, "sparse88", 130, 33), (3, 2, "all", 37, 45),
                                (257, 8, "sparse88", H, I)]:
        x, experts, ids, weights = biased_case(T, K, 16, pattern, seed=T + K, h=h, i=i)
        ref = routed_experts(x, experts, ids.long(), weights, "ref")
        unused = torch.ones(16, dtype=torch.bool)
        unused[ids[ids != SKIP].long()] = False
        cuda = SimpleNamespace(**{k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) else v
                                  for k, v in vars(experts).items()})
        for t in vars(cuda).values():
            if torch.is_tensor(t) and path == "triton":
                t[unused.cuda()] = float("nan")
        out = routed_experts(x.to("cuda", torch.bfloat16), cuda, ids.long().cuda(),
                             weights.masked_fill(ids == SKIP, float("nan")).cuda(), path).float().cpu()
        assert_close(out, ref, TOL[torch.bfloat16], f"{path} {h}x{i} {T}x{K} {pattern}")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the triton path runs on a CPU only under TRITON_INTERPRET=1")
def test_gpt_oss_model_decodes_the_same_tokens_on_the_triton_path():
    """tiny-internvl-gpt-oss's decoder, made smaller (2 layers, 8 experts top-4, widths off the tiles, a clamp limit
    that binds), with MoDES-style skipping on: greedy decoding through the triton path (prefill and every decode
    step) gives the reference loop's tokens, and the prompt's logits agree in fp32."""
    raw = tiny.internvl_gpt_oss_config()
    raw["text_config"].update(vocab_size=512, hidden_size=72, intermediate_size=40, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"], num_local_experts=8,
                              swiglu_limit=1.0)
    net = tiny.random_weights(model.build(model.config_from_dict(raw, "tiny"), "cpu", torch.float32))
    router.install(net, router.Threshold(0.3))
    prompt = torch.tensor([[5, 17, 33, 2, 250, 9, 41, 7]])
    runs = {}
    for impl in ["ref", "triton"]:
        stats = router.SkipStats(len(net.layers))
        with torch.no_grad():
            tokens = generate(model.set_expert_impl(net, impl), prompt, max_new_tokens=6, stats=stats)[0].tolist()
            runs[impl] = tokens, net(prompt), stats.summary()["total"]["all"]
    assert runs["triton"][0] == runs["ref"][0]
    assert len(set(runs["ref"][0])) > 1, "degenerate generation cannot catch mistakes"
    assert_close(runs["triton"][1], runs["ref"][1], TOL[torch.float32], "prompt logits")
    assert 0 < runs["triton"][2] < 1 and runs["triton"][2] == runs["ref"][2]  # slots were skipped, the same ones
