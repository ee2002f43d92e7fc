"""The command lines other issues and checks rely on: generate.py generation and bench.py on the tiny default."""
import json
import os
import subprocess
import sys

import pytest

from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, MODES_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")


def run(env, *args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_generate_json_on_tiny_default(env, tmp_path):
    from PIL import Image
    Image.new("RGB", (50, 37), (200, 30, 30)).save(tmp_path / "red.png")
    r = run(env, "generate.py", "--prompt", "What colour is it?", "--image", str(tmp_path / "red.png"),
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
    assert out["prompt_tokens"] > 64  # at least the minimum of 64 visual tokens
    again = json.loads(run(env, "generate.py", "--prompt", "What colour is it?", "--image", str(tmp_path / "red.png"),
                           "--max-new-tokens", "5", "--json").stdout.strip().splitlines()[-1])
    assert again["token_ids"] == out["token_ids"]  # the built-in checkpoint and greedy decoding are deterministic


def test_tiny_kimi_generates_and_benches(env, tmp_path):
    from PIL import Image
    Image.new("RGB", (100, 60), (20, 200, 30)).save(tmp_path / "green.png")
    import processor
    r = run(env, "generate.py", "--model", "tiny-kimi", "--prompt", "What colour?", "--image",
            str(tmp_path / "green.png"), "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == "tiny-kimi"  # as given: a result file names no machine's absolute path
    # generation ends at --max-new-tokens or at a stop id: with tiny-kimi's v3 random weights the greedy answer is
    # 2 tokens, the second Kimi's <|im_end|> (163586)
    stop_ids = processor.for_model(tiny.resolve(out["model"]), "kimi_vl").stop_token_ids
    ids = out["token_ids"]
    assert 1 <= len(ids) <= 4 and (len(ids) == 4 or ids[-1] in stop_ids) and not set(ids[:-1]) & set(stop_ids)
    assert len(ids) == 2 and ids[-1] == 163586
    r = run(env, "bench.py", "--model", "tiny-kimi", "--repeats", "1", "--warmup", "0", "--decode-steps", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model_type"] == "kimi_vl" and out["rows"][0]["decode_ms"] > 0


@pytest.mark.parametrize("name", ["tiny-qwen", "tiny-kimi"])
def test_compiled_decode_generates_the_eager_tokens(env, name):
    """Inductor on the whole decode step (Kimi: absorbed latent attention) gives the eager greedy tokens."""
    outs = []
    for flag in ("--no-compile", "--compile"):
        r = run(env, "generate.py", "--model", name, "--prompt", "hello there", "--max-new-tokens", "6", "--json", flag)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 6


@pytest.mark.parametrize("bad", ["missing", "empty", "garbage"])
def test_bad_image_is_one_line_error(env, tmp_path, bad):
    path = tmp_path / "img.png"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "garbage":
        path.write_bytes(b"not an image at all")
    r = run(env, "generate.py", "--prompt", "hi", "--image", str(path), "--max-new-tokens", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "img.png" in lines[0], r.stderr


def test_missing_model_folder_is_one_line_error(env, tmp_path):
    r = run(env, "generate.py", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_bench_reports_json(env, tmp_path):
    r = run(env, "bench.py", "--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--policy",
            "full,reduce-k,threshold,", "--target", "0.6", "--json", str(tmp_path / "b.json"))  # empty entry: no row
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "b.json").read_text())
    assert out["visual_tokens"] == 64 and out["load_s"] > 0
    full, reduced, fitted = out["rows"]
    assert 0.6 <= fitted["skip_prefill_all"] <= 0.62  # the single threshold bisected onto --target
    for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_gb_per_s", "prefill_tflops"):
        assert full[key] > 0 and reduced[key] > 0
    assert full["skip_prefill_all"] == 0.0 and full["speedup_decode"] == 1.0
    # reduce-k keeps 1 of the tiny model's 4 slots, except at the 2 special tokens (vision start and end)
    assert reduced["skip_prefill_all"] == pytest.approx((out["prompt_tokens"] - 2) * 3 / (out["prompt_tokens"] * 4))


@pytest.mark.parametrize("args, culprit", [
    (["--policy", "full,nope"], "--policy 'full,nope': a comma list of full, modes"),
    (["--policy", "modes"], "--policy modes needs --thresholds"),
    (["--config", "configs/qwen3_vl_moe_cpu_bench.json"], "--config FILE and --random-weights go together"),
    (["--model", "no/such/folder"], "--model no/such/folder: no such folder"),
])
def test_bench_bad_arguments_are_one_line_errors(env, args, culprit):
    r = run(env, "bench.py", "--repeats", "1", "--warmup", "0", "--decode-steps", "1", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], r.stderr
