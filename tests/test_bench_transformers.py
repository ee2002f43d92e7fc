"""bench.py --compare-transformers times the same computation as ours: transformers' model that
compare.transformers_model builds gives our prefill logits on bench's own inputs (fp32), holds our tensors (only
gpt-oss's interleaved gate/up is a copy), and loads strictly at the real InternVL sizes; the transformers row runs
for both InternVL decoders; Kimi-VL is refused in one line."""
import json
import os

import pytest
import torch

import bench
from model import build, load, read_config
from support import compare, tiny
from test_internvl_model import assert_logits_close

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def bench_args(*extra):
    """Parsed, not yet checked (bench.main checks them)."""
    return bench.parser().parse_args(["--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--text-tokens", "8",
                                      *extra])


def copied(hf, ours):
    """transformers' parameters that hold none of our parameters' memory."""
    storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    return sorted(n for n, p in hf.named_parameters() if p.untyped_storage().data_ptr() not in storages)


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-internvl", "tiny-internvl-gpt-oss"])
def test_transformers_model_is_our_model(name):
    source = tiny.resolve(name)
    ours = load(source, dtype=torch.float32)
    args = bench_args("--model", name)
    bench.check_args(args)
    ids, pixels = bench.synthetic_inputs(ours, args, 1)
    hf = compare.transformers_model(ours, source, "cpu")
    with torch.no_grad():
        assert_logits_close(ours(ids, **pixels), hf(**compare.transformers_prompt(ours, ids, pixels)).logits)
    gate_up = [f"model.language_model.layers.{i}.mlp.experts.gate_up_proj{b}" for i in range(len(ours.layers))
               for b in ("", "_bias")]
    assert copied(hf, ours) == (sorted(gate_up) if name == "tiny-internvl-gpt-oss" else [])


@pytest.mark.parametrize("config", ["internvl3_5_30b_a3b", "internvl3_5_gpt_oss_20b_a4b"])
def test_real_size_names_and_shapes_load_strictly(config):
    """On the meta device. The tiny models' experts have 2I = H, so there only the logits, not the shapes, would
    catch a gate_up_proj in the wrong orientation."""
    path = os.path.join(CONFIGS, f"{config}.json")
    hf = compare.transformers_model(build(read_config(path), "meta"), path, "meta")
    assert hf.config.text_config.model_type == read_config(path).decoder


@pytest.mark.parametrize("name", ["tiny-internvl", "tiny-internvl-gpt-oss"])
def test_transformers_row_runs(name, capsys):
    bench.main(bench_args("--model", name, "--policy", "full", "--compare-transformers"))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    full, hf = result["rows"]
    assert hf["policy"] == "transformers" and "error" not in hf, hf
    assert hf["ttft_ms"] > 0 and hf["decode_ms"] > 0 and hf["speedup_decode"] > 0
    assert hf["transformers"]["attention"] == ("eager" if name == "tiny-internvl-gpt-oss" else "sdpa")


def test_kimi_is_refused_in_one_line():
    path = os.path.join(CONFIGS, "kimi_vl_a3b.json")
    with pytest.raises(ValueError, match="^--compare-transformers: transformers has no Kimi-VL class [^\n]*$"):
        compare.transformers_model(build(read_config(path), "meta"), path, "meta")
