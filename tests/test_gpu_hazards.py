"""What would go wrong on the first GPU run, checked on the CPU (or the meta device):

- every scaled_dot_product_attention call gets 4-D [B, h, S, d] tensors, the only form the fused flash and
  memory-efficient kernels take (a 3-D call falls back to the math kernel and materialises [h, n, n] scores);
- a decode step at batch 1 with many special token ids does no sort, unique, nonzero or host read, any of which
  breaks CUDA-graph capture (torch.isin sorts once there are about ten ids).
"""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import processor
from model import build, config_from_dict, load, set_expert_impl
from support import tiny


def media(tmp_path):
    """Two images of odd sizes and a four-frame video folder, as files the processors read."""
    images = []
    for i, size in enumerate([(70, 50), (40, 90)]):
        path = tmp_path / f"image{i}.png"
        Image.new("RGB", size, (40 * i, 120, 200)).save(path)
        images.append(str(path))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 48), (60 * i, 30, 90)).save(frames / f"{i:03d}.png")
    return images, str(frames)


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi", "tiny-internvl"])
def test_every_attention_call_is_four_dimensional(name, tmp_path, monkeypatch):
    path = tiny.resolve(name)
    proc = processor.for_model(path, config_from_dict(tiny.RANDOM[name][1](), name).model_type)
    net = load(path, dtype=torch.float32, special_ids=processor.special_token_ids(path))
    images, video = media(tmp_path)
    batch = proc.from_cli("describe them", images=images, video=video)
    pixels = {k: batch[k] for k in processor.PIXEL_KEYS if batch.get(k) is not None}
    shapes, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.append((q.ndim, k.ndim, v.ndim))
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    cache = net.new_cache(1, batch["input_ids"].shape[0] + 2)
    with torch.no_grad():
        logits = net(batch["input_ids"][None], cache=cache, **pixels)
        net.decode_step(logits[:, -1:].argmax(-1), cache)
    vision_calls = len(shapes) - 2 * net.cfg.num_hidden_layers  # prefill and decode of every decoder layer
    # one per image and per video group (Qwen) or frame (Kimi) in each vision block; InternVL batches its tiles,
    # one call per block
    assert vision_calls >= (net.cfg.vision.num_hidden_layers if name == "tiny-internvl" else 3)
    assert set(shapes) == {(4, 4, 4)}


class HostReads(TorchDispatchMode):
    """Records the aten ops that sort, deduplicate, find indices or read a value back to the host."""
    FORBIDDEN = ("sort", "unique", "nonzero", "_local_scalar_dense", "masked_select", "argsort", "isin")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(bad in name for bad in self.FORBIDDEN):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi", "tiny-internvl"])
def test_decode_step_at_batch_one_with_many_special_ids_is_host_free(name):
    cfg = config_from_dict(tiny.RANDOM[name][1](), name)
    net = set_expert_impl(build(cfg, "meta", torch.float32), "gather")  # the decode path on a GPU without Triton
    net.special_ids = torch.arange(100, 140, device="meta")  # 40 special ids, as a real chat template has
    cache = net.new_cache(1, 32)
    with HostReads() as ops, torch.no_grad():
        logits = net.decode_step(torch.zeros(1, 1, dtype=torch.long, device="meta"), cache)
    assert logits.shape == (1, cfg.vocab_size)
    assert ops.seen == []
