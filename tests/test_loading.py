"""Loader: strict accounting, both checkpoint dialects, one-line errors for bad folders, memory during load."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load
from qwen_oracle import make_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    _, saved, hub = make_oracle(str(tmp_path_factory.mktemp("load")))
    return saved, hub


def copy(src, tmp_path, name="ckpt"):
    dst = os.path.join(tmp_path, name)
    shutil.copytree(src, dst)
    return dst


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load(str(tmp_path))
    assert "no config.json" in one_line(e) and str(tmp_path) in one_line(e)


def test_unknown_model_type(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "llava"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError) as e:
        load(d)
    assert "unknown model_type 'llava'" in one_line(e) and "config.json" in one_line(e)


def test_malformed_config_names_line(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{\n  "model_type": "qwen3_vl_moe",\n  oops\n}')
    with pytest.raises(ValueError) as e:
        load(d)
    assert "line 3" in one_line(e)


def test_missing_shards_all_named(folders, tmp_path):
    d = copy(folders[1], tmp_path)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    names = sorted(index["weight_map"])
    index["weight_map"][names[0]] = "model-00003-of-00004.safetensors"
    index["weight_map"][names[1]] = "model-00004-of-00004.safetensors"
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError) as e:
        load(d)
    msg = one_line(e)
    for f in ("model-00002-of-00002", "model-00003-of-00004", "model-00004-of-00004"):
        assert f in msg
    assert "3 shard(s)" in msg


def test_truncated_safetensors(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ValueError) as e:
        load(d)
    assert "model.safetensors" in one_line(e)


def test_lfs_pointer(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    with open(os.path.join(d, "model.safetensors"), "w") as fh:
        fh.write("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError) as e:
        load(d)
    assert "git-lfs pointer" in one_line(e) and "model.safetensors" in one_line(e)


def test_wrong_shapes_missing_and_unexpected_all_listed(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    t["model.language_model.layers.0.self_attn.q_proj.weight"] = torch.zeros(7, 64)
    del t["model.language_model.norm.weight"]
    t["model.language_model.layers.0.mlp.shared_expert.weight"] = torch.zeros(3)
    save_file(t, f)
    with pytest.raises(ValueError) as e:
        load(d)
    msg = one_line(e)
    assert "3 checkpoint problem(s)" in msg
    assert "layers.0.self_attn.q_proj.weight: expected shape (128, 64), found (7, 64)" in msg
    assert "missing tensor model.language_model.norm.weight" in msg
    assert "unexpected tensor model.language_model.layers.0.mlp.shared_expert.weight" in msg


def test_both_layouts_load_the_same_weights(folders):
    a, b = (load(d, dtype=torch.float32) for d in folders)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.layers[0].mlp.experts.gate_up_proj.shape == (8, 32, 64)  # [E, 2I, H]


def test_expert_layout_when_hidden_is_twice_the_expert_width(tmp_path):
    """H == 2I: both dialects store gate_up_proj with the same shape, so only down_proj can tell them apart. Both
    must load the oracle's weights and give its logits (a shape-guessing loader transposed gate_up here)."""
    from qwen_oracle import image_prompt, mm_token_type_ids, pixels
    hf, saved, hub = make_oracle(str(tmp_path), moe_intermediate_size=32)  # hidden 64 = 2 * 32
    ids = torch.tensor([image_prompt([(1, 4, 4)])])
    pv, thw = pixels([(1, 4, 4)])
    with torch.no_grad():
        ref = hf(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), pixel_values=pv, image_grid_thw=thw).logits
    for folder in (saved, hub):
        ours = load(folder, dtype=torch.float32)
        w = ours.layers[1].mlp.experts.gate_up_proj
        assert w.shape == (8, 64, 64)
        torch.testing.assert_close(w, hf.model.language_model.layers[1].mlp.experts.gate_up_proj)
        with torch.no_grad():
            out = ours(ids, pixel_values=pv, image_grid_thw=thw)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), folder


def test_mixed_expert_layouts_are_refused(folders, tmp_path):
    d = copy(folders[0], tmp_path)
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    name = "model.language_model.layers.2.mlp.experts.down_proj"
    t[name] = t[name].transpose(1, 2).contiguous()  # this one layer in the hub's x @ W layout
    save_file(t, f)
    with pytest.raises(ValueError) as e:
        load(d)
    assert "mixes both expert layouts" in one_line(e)


def test_peak_host_memory_near_weight_size(tmp_path):
    """Loading must not hold two copies: peak RSS grows by the parameters plus the file pages that safetensors
    maps (reclaimable page cache), plus small pieces; a loader that materialises the checkpoint first fails."""
    env = dict(os.environ, MODES_CACHE=str(tmp_path))
    code = f"""
import os, resource, sys, torch
sys.path.insert(0, {ROOT!r})
import qwen3_vl_moe
from model import load, read_config
from support import tiny
path = tiny.resolve(None)
with torch.device("meta"):  # the first meta build imports torch's meta kernels: not part of loading
    qwen3_vl_moe.Qwen3VLMoe(read_config(path))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = load(path, dtype=torch.float32)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in m.parameters())
print(base * 1024, peak * 1024, size, os.path.getsize(os.path.join(path, "model.safetensors")))
"""
    # the built-in checkpoint is written first, in its own process: writing it is not part of loading
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from support import tiny; "
                    "tiny.resolve(None)"], env=env, check=True)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    base, peak, size, file_size = map(int, out.stdout.split())
    grew = peak - base
    assert grew < size + file_size + 0.1 * size, f"load grew RSS by {grew / 1e6:.0f} MB for {size / 1e6:.0f} MB " \
        f"of weights read from a {file_size / 1e6:.0f} MB file"
