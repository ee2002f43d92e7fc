"""The decode step is one static graph: no graph breaks, no recompilation as positions and skip patterns change."""
import torch

import model as M
import router
from qwen_oracle import image_prompt, make_oracle, pixels


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_decode_step_one_graph_matches_eager(tmp_path):
    _, saved, _ = make_oracle(str(tmp_path))
    model = M.set_expert_impl(M.load(saved, dtype=torch.float32), "auto")
    grids = [(1, 4, 4)]
    ids = torch.tensor([image_prompt(grids)])
    pv, thw = pixels(grids)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model.decode_step, backend=backend, fullgraph=True)
    policy = router.DMT(tau_text=0.0, tau_vision=0.0)
    router.install(model, policy)
    logits = {}
    for name, fn in (("eager", model.decode_step), ("compiled", compiled)):
        cache = model.new_cache(1, ids.shape[1] + 8)
        stats = router.SkipStats(model.cfg.num_hidden_layers)
        policy.tau.fill_(0.0)
        with torch.no_grad():
            token = model(ids, cache=cache, pixel_values=pv, image_grid_thw=thw)[:, -1:].argmax(-1)
            steps = []
            for j, tau in enumerate([0.0, 0.3, 0.6, 0.0, 0.45]):  # a different skip pattern at every step
                policy.tau.fill_(tau)
                out = fn(token, cache, torch.tensor([cache.length]), stats)
                cache.length += 1
                steps.append(out)
                token = out.argmax(-1, keepdim=True)
        logits[name] = torch.stack(steps)
        summary = stats.summary()["decode"]
        assert summary["slots"] == 5 * model.cfg.num_hidden_layers * model.cfg.num_experts_per_tok
        assert summary["skipped"] > 0
    assert backend.graphs == 1
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)
