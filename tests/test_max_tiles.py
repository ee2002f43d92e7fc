"""--max-tiles: InternVL's cap on the 448 px tiles of one image, on every script that reads images; refused in one
line where it cannot apply."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_max_tiles_caps_the_vision_tokens(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(wide)  # 4:3: 12 tiles + a thumbnail by default
    tokens = {}
    for cap in (None, 2):
        r = run("generate.py", "--model", "tiny-internvl", "--prompt", "hi", "--image", str(wide), "--max-new-tokens",
                "1", "--json", *(["--max-tiles", str(cap)] if cap else []))
        assert r.returncode == 0, r.stderr
        tokens[cap] = json.loads(r.stdout.strip().splitlines()[-1])["prompt_tokens"]
    # 256 context tokens per tile. At most 2 tiles, 4:3 is nearer 1:1 than 2:1, so one tile and no thumbnail
    # (a thumbnail is added only to a tiled image), against the default's 12 + 1
    assert tokens[None] - tokens[2] == (13 - 1) * 256


@pytest.mark.parametrize("argv, message", [
    (["generate.py", "--prompt", "hi", "--max-tiles", "0"], "--max-tiles must be >= 1, got 0"),
    (["generate.py", "--model", "tiny-vqa", "--prompt", "hi", "--max-tiles", "2"], "max_tiles applies to InternVL"),
    (["calibrate.py", "--max-tiles", "-1"], "--max-tiles must be >= 1, got -1"),
    (["evaluate.py", "--thresholds", "x.json", "--max-tiles", "0"], "--max-tiles must be >= 1, got 0"),
])
def test_bad_max_tiles_is_one_line(argv, message):
    r = run(*argv)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
