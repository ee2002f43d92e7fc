"""The decode step is one static graph that touches no host tensor: no graph break, no recompilation as positions
and skip thresholds change, and tau = 0 reproduces the unskipped model exactly. Compiled by Inductor it gives the
eager logits when fed the eager tokens, and neither it nor the Triton path's functional graph copies an expert
weight."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bench
import moe_kernels
import router
from generate import generate
from model import family, load, read_config, set_expert_impl
from qwen_oracle import image_prompt, make_oracle, pixels
from support import measure, tiny


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_decode_step_one_graph_matches_eager(tmp_path):
    _, saved, _ = make_oracle(str(tmp_path))
    model = set_expert_impl(load(saved, dtype=torch.float32), "gather")
    grids = [(1, 4, 4)]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model.decode_step, backend=backend, fullgraph=True)
    policy = router.MoDES(0.0, 0.0, torch.rand(len(model.layers), 2, generator=torch.Generator().manual_seed(0)))
    logits = {}
    for name, fn in (("eager", model.decode_step), ("compiled", compiled)):
        cache = model.new_cache(1, ids.shape[1] + 8)
        stats = router.SkipStats(model.cfg.num_hidden_layers)
        with torch.no_grad():
            router.install(model, None)
            token = model(ids, cache=cache, pixel_values=pv, image_grid_thw=thw)[:, -1:].argmax(-1)
            router.install(model, policy)
            steps = []
            for j, tau in enumerate([0.0, 0.3, 0.6, 0.0, 0.45]):  # a different skip pattern at every step
                policy.tau.fill_(tau)
                policy.alpha.mul_(1.5)  # and other factors: only buffers change
                out = fn(token, cache, stats)
                cache.length += 1
                steps.append(out)
                token = out.argmax(-1, keepdim=True)
        policy.alpha.div_(1.5 ** 5)
        logits[name] = torch.stack(steps)
        summary = stats.summary()["decode"]
        assert summary["slots"] == 5 * model.cfg.num_hidden_layers * model.cfg.num_experts_per_tok
        assert summary["skipped"] > 0
    router.uninstall(model)
    assert backend.graphs == 1
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi"])
def test_zero_thresholds_reproduce_the_unskipped_model_exactly(name):
    """The bench's full row is the shared policy at tau = 0: scores are >= 0 and the comparison is strict."""
    model = load(tiny.resolve(name), dtype=torch.float32)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = generate(model, ids, max_new_tokens=4)
        cache = model.new_cache(2, 16)
        plain_logits = model(ids, cache=cache)
        router.install(model, router.MoDES(0.0, 0.0, torch.full((len(model.layers), 2), 0.25)))
        stats = router.SkipStats(len(model.layers))
        assert torch.equal(generate(model, ids, max_new_tokens=4, stats=stats), plain)
        assert torch.equal(model(ids, cache=model.new_cache(2, 16)), plain_logits)
        assert stats.summary()["total"]["skipped"] == 0
    router.uninstall(model)


class NoHostTensors(TorchDispatchMode):
    """Fails on any op that reads or creates a non-scalar CPU tensor: under a CUDA graph such an op is a
    host-to-device copy (or an error), and Inductor will not move such constructors to the device by itself."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for where, leaves in (("reads", tree_leaves((args, kwargs))), ("creates", tree_leaves(out))):
            for t in leaves:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.ndim > 0:
                    raise AssertionError(f"{func} {where} a host tensor of shape {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi"])
@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_decode_step_touches_no_host_tensor(name, impl):
    """One decode step with parameters, cache, policy and statistics on the meta device, through a static-shape
    expert path: every op it runs must stay off the host."""
    cfg = read_config(tiny.resolve(name))
    with torch.device("meta"):
        model = family(cfg.model_type, name).MODEL(cfg)
    set_expert_impl(model, impl)
    router.install(model, router.MoDES(0.1, 0.2, torch.full((len(model.layers), 2), 0.5)))
    cache = model.new_cache(2, 16)
    stats = router.SkipStats(len(model.layers), "meta")
    token = torch.zeros(2, 1, dtype=torch.long, device="meta")
    mode = NoHostTensors()
    with torch.no_grad(), mode:
        logits = model.decode_step(token, cache, stats)
    assert logits.shape == (2, cfg.vocab_size) and mode.ops > 50


# ---------------------------------------------------------------------------------------------------------------
# The Inductor-compiled decode step on a CPU: the same logits as eager decoding fed the same tokens, and no copy of
# the expert weights (a compiler that thinks an op may write its inputs clones them; per layer and step, that is
# the whole model's experts again, and compiled timings collapse)


@pytest.fixture(scope="module")
def compiled_qwen():
    """tiny-qwen's decode step through Inductor (the gather path, as "auto" picks when compiling), MoDES skipping
    some slots, compiled once for the tests below."""
    model = set_expert_impl(load(tiny.resolve("tiny-qwen"), dtype=torch.float32), "auto").requires_grad_(False)
    router.install(model, router.MoDES(0.3, 0.3, torch.ones(len(model.layers), 2)))
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, 12 + 8)
    torch._dynamo.reset()
    step = moe_kernels.DecodeStep(model, cache, compile=True, cuda_graph=False)
    yield model, cache, step, ids
    router.uninstall(model)


def test_compiled_step_teacher_forced_matches_eager(compiled_qwen):
    model, cache, step, ids = compiled_qwen
    stats = router.SkipStats(len(model.layers))
    check = bench.teacher_forced_check(model, step, cache, ids, {}, 6, bench.CHECK_RTOL["float32"], stats=stats)
    assert check["ok"] and check["steps"] == 6 and check["top1_decided"] > 0, check
    assert stats.summary()["decode"]["skipped"] > 0  # the steps skipped experts


def test_compiled_step_copies_no_expert_weights(compiled_qwen):
    model, cache, step, ids = compiled_qwen
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        cache.reset()
        step(token)  # compiled by now (or here)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step(token)
    experts = [model.layers[i].mlp.experts for i in model.moe_layers()]
    smallest = min(min(e.gate_up_proj.nbytes, e.down_proj.nbytes) for e in experts)
    sizes = measure.allocation_sizes(prof)
    assert sizes and max(sizes) < smallest, (max(sizes), smallest)  # not one layer's stacked experts, let alone all
    # the same detector sees a compiled copy of one weight
    clone = torch.compile(lambda w: w.clone(), fullgraph=True)
    clone(experts[0].down_proj)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        clone(experts[0].down_proj)
    assert max(measure.allocation_sizes(prof)) >= experts[0].down_proj.nbytes


class H100Target:
    """Triton asks its active driver for the target to make TTIR for; a CPU has no driver, so this names an H100."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class NoTarget:
    def get_current_target(self):
        raise RuntimeError("no target")


@pytest.mark.gpu  # runs on a CPU too; benchmarks/gpu.sh also runs it under the GPU machine's torch and triton
@pytest.mark.skipif(not moe_kernels.HAS_TRITON or moe_kernels._TRITON_INTERPRET,
                    reason="needs triton, with real (not interpreted) kernels")
def test_triton_path_clones_no_weights_when_compiled():
    """torch.compile turns the triton_op into its two kernels and asks Triton's TTIR which tensors each writes;
    if that analysis fails it assumes every input is written and clones them all, weights included, per layer and
    step. The functional graph the compiler builds must clone only the kernels' own outputs."""
    import triton
    from functorch.compile import aot_function

    class Captured(Exception):
        pass

    def clones(target):
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm)
            raise Captured  # the graph is all this test needs; the kernels are not run
        driver = triton.runtime.driver
        saved = dict(vars(driver))
        if target is not None:
            driver.set_active(target)
        try:
            with pytest.raises(Captured):
                aot_function(lambda *a: moe_kernels.run(*a, "triton"), fw_compiler=capture)(
                    x, w_gate_up, w_down, ids, weights)
        finally:
            vars(driver).clear()
            vars(driver).update(saved)
        return [n.kwargs["tensors_to_clone"] for n in graphs[0].graph.nodes
                if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]

    g = torch.Generator().manual_seed(0)
    E, K, H, I = 16, 4, 128, 64
    x, w_gate_up, w_down = torch.randn(1, H, generator=g), torch.randn(E, 2 * I, H, generator=g), \
        torch.randn(E, H, I, generator=g)
    ids, weights = torch.tensor([[3, 5, -1, 9]]), torch.rand(1, K, generator=g)
    real = None if torch.cuda.is_available() else H100Target()
    assert clones(real) == [["act_ptr"], ["y_ptr"]]  # gate_up writes act, down writes y: nothing else is cloned
    assert "w_ptr" in clones(NoTarget())[0]  # what the fallback looks like, so the assertion above can fail
