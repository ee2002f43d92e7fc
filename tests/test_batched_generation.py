"""Batched greedy generation gives every row what it gets alone: the same tokens, stopping at its own stop token,
and the same skip counts (padding and the decode steps after a row stopped are never counted), for prompts of
different lengths with no image, one or two images, or a video, in both families, with and without a skip
policy."""
import pytest
import torch

import processor
import router
from generate import RowStats, generate, pad_prompts, until_stop
from model import family, load, read_config, set_expert_impl
from support import tiny


def shapes_image(path, size, colour):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", size, (240, 240, 235))
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    video = folder / "clip"
    video.mkdir()
    for k in range(4):
        shapes_image(video / f"{k:02d}.png", (64, 64), (40 * k, 80, 200))
    return dict(red=shapes_image(folder / "red.png", (64, 64), (220, 40, 40)),
                wide=shapes_image(folder / "wide.png", (96, 64), (40, 80, 220)), video=str(video))


def prompts(proc, media):
    """Mixed text / image / video prompts of different lengths."""
    return [proc.from_cli("What is in the image?", images=[media["red"]]),
            proc.from_cli("hi"),
            proc.from_cli("Describe the clip in a few words, please.", video=media["video"]),
            proc.from_cli("Compare these two pictures.", images=[media["red"], media["wide"]]),
            proc.from_cli("A longer question with no picture at all, so that this row is the longest text.")]


@pytest.fixture(scope="module", params=["tiny-qwen", "tiny-kimi"])
def setup(request):
    path = tiny.resolve(request.param)
    proc = processor.for_model(path, read_config(path).model_type)
    return load(path, dtype=torch.float32, special_ids=processor.special_token_ids(path)), proc


def run(model, proc, outputs, stop_ids, policy, n=6):
    """(tokens up to the stop, per-row SkipStats counts) of the prompts generated together."""
    router.install(model, policy)
    ids, mask, pixels = pad_prompts(outputs, proc.pad_token_id)
    stats = RowStats(len(outputs), len(model.layers))
    tokens = generate(model, ids, mask, max_new_tokens=n, stop_ids=stop_ids, stats=stats, **pixels)
    router.uninstall(model)
    return [until_stop(row, stop_ids) for row in tokens], [stats.row(b).counts for b in range(len(outputs))]


@pytest.mark.parametrize("skip", [False, True])
def test_batch_matches_one_by_one(setup, media, skip):
    model, proc = setup
    outputs = prompts(proc, media)
    L = len(model.layers)
    policy = router.MoDES(0.25, 0.3, torch.rand(L, 2, generator=torch.Generator().manual_seed(1))) if skip else None
    # random weights seldom emit a real stop token: stop at tokens the rows generate at different steps, so that
    # rows end at different times (and some never)
    free = [run(model, proc, [o], (), policy)[0][0] for o in outputs]
    stop_ids = (free[0][1], free[2][3])
    alone = [run(model, proc, [o], stop_ids, policy) for o in outputs]
    tokens, counts = run(model, proc, outputs, stop_ids, policy)
    assert tokens == [t[0] for t, _ in alone]
    assert len({len(t) for t in tokens}) > 1  # the rows did stop at different steps
    for b, (_, c) in enumerate(alone):
        assert torch.equal(counts[b], c[0]), f"row {b}: skip counts differ from the row alone"
    decode_slots = [int(c[0][1, :, :, 1].sum()) for _, c in alone]
    K = model.cfg.num_experts_per_tok
    # a row counts its decode steps and no more: one per generated token after the first, before any stop
    assert decode_slots == [K * len(model.moe_layers()) * (len(t) - (len(t) == 6)) for t in tokens]
    if skip:
        assert all(int(c[0][..., 0].sum()) > 0 for _, c in alone)


def test_summed_stats_are_the_rows_sum(setup, media):
    model, proc = setup
    outputs = prompts(proc, media)[:3]
    policy = router.MoDES(0.2, 0.2, torch.rand(len(model.layers), 2, generator=torch.Generator().manual_seed(2)))
    _, rows = run(model, proc, outputs, (), policy, n=3)
    router.install(model, policy)
    ids, mask, pixels = pad_prompts(outputs, proc.pad_token_id)
    stats = router.SkipStats(len(model.layers))
    generate(model, ids, mask, max_new_tokens=3, stats=stats, **pixels)
    router.uninstall(model)
    assert torch.equal(stats.counts, sum(rows))


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi"])
def test_row_stats_keep_the_decode_step_one_graph(name):
    """A decode step recording into RowStats compiles with fullgraph=True into one graph that stays valid as rows
    stop, and touches no host tensor (the check of tests/test_decode_compile.py)."""
    from test_decode_compile import NoHostTensors
    model = set_expert_impl(load(tiny.resolve(name), dtype=torch.float32), "gather")  # a static-shape path
    router.install(model, router.MoDES(0.1, 0.2, torch.full((len(model.layers), 2), 0.5)))
    ids = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(3, 12)
    stats = RowStats(3, len(model.layers))
    torch._dynamo.reset()
    backend = CountingBackend()
    step = torch.compile(model.decode_step, backend=backend, fullgraph=True)
    with torch.no_grad():
        token = model(ids, cache=cache, stats=stats)[:, -1:].argmax(-1)
        for alive in ([1, 1, 1], [1, 0, 1], [0, 0, 1]):
            stats.alive.copy_(torch.tensor(alive, dtype=torch.bool))
            token = step(token, cache, stats).argmax(-1, keepdim=True)
            cache.length += 1
    assert backend.graphs == 1
    decode = stats.counts[1, :, :, :, 1].sum((0, 2))  # total slots per row
    assert decode.tolist() == [n * len(model.moe_layers()) * model.cfg.num_experts_per_tok for n in (2, 1, 3)]
    cfg = read_config(tiny.resolve(name))
    with torch.device("meta"):
        meta = set_expert_impl(family(cfg.model_type, name).MODEL(cfg), "gather")
    router.install(meta, router.MoDES(0.1, 0.2, torch.full((len(meta.layers), 2), 0.5)))
    cache, stats = meta.new_cache(2, 16), RowStats(2, len(meta.layers), "meta")
    with torch.no_grad(), NoHostTensors():
        meta.decode_step(torch.zeros(2, 1, dtype=torch.long, device="meta"), cache, stats)
