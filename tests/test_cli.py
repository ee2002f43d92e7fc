"""The command lines other issues and checks rely on: model.py generation and bench.py on the tiny default."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, MODES_CACHE=str(tmp_path_factory.mktemp("cache")), OMP_NUM_THREADS="1")


def run(env, *args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_generate_json_on_tiny_default(env, tmp_path):
    from PIL import Image
    Image.new("RGB", (50, 37), (200, 30, 30)).save(tmp_path / "red.png")
    r = run(env, "model.py", "--prompt", "What colour is it?", "--image", str(tmp_path / "red.png"),
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
    assert out["prompt_tokens"] > 64  # at least the minimum of 64 visual tokens
    again = json.loads(run(env, "model.py", "--prompt", "What colour is it?", "--image", str(tmp_path / "red.png"),
                           "--max-new-tokens", "5", "--json").stdout.strip().splitlines()[-1])
    assert again["token_ids"] == out["token_ids"]  # the built-in checkpoint and greedy decoding are deterministic


@pytest.mark.parametrize("bad", ["missing", "empty", "garbage"])
def test_bad_image_is_one_line_error(env, tmp_path, bad):
    path = tmp_path / "img.png"
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "garbage":
        path.write_bytes(b"not an image at all")
    r = run(env, "model.py", "--prompt", "hi", "--image", str(path), "--max-new-tokens", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "img.png" in lines[0], r.stderr


def test_missing_model_folder_is_one_line_error(env, tmp_path):
    r = run(env, "model.py", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_bench_reports_json(env):
    r = run(env, "bench.py", "--repeats", "1", "--warmup", "0", "--decode-steps", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("load_s", "vision_ms", "prefill_lm_ms", "decode_ms_per_token", "peak_memory_bytes"):
        assert out[key] > 0
    assert out["visual_tokens"] == 64
