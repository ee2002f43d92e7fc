"""The decode step is one static graph that touches no host tensor: no graph break, no recompilation as positions
and skip thresholds change, and tau = 0 reproduces the unskipped model exactly."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import router
from generate import generate
from model import family, load, read_config, set_expert_impl
from qwen_oracle import image_prompt, make_oracle, pixels
from support import tiny


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
