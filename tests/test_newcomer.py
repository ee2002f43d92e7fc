"""What a newcomer meets first: every script answers --help, one list of expert paths, outputs with the user's
umask that git ignores, and generated text that says when the model has random weights."""
import importlib.util
import os
import subprocess
import sys

import pytest

import bench
import cli
import generate
import moe_kernels
from model import EXPERT_IMPLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["generate.py", "calibrate.py", "search.py", "bench.py", "support/plot.py", "support/train_vqa.py"]
LIBRARIES = ["baselines.py", "cli.py", "data.py", "internvl.py", "kimi_tokenizer.py", "kimi_vl.py", "model.py",
             "moe_kernels.py", "parallel.py", "processor.py", "qwen3_vl_moe.py", "router.py"]
NEW_SCRIPTS = ["evaluate.py", "lmms_eval_modes.py"]  # being written: a script once it is there


def test_every_script_answers_help():
    scripts = SCRIPTS + [f for f in NEW_SCRIPTS if os.path.isfile(os.path.join(ROOT, f))]
    top_level = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert top_level == sorted([f for f in scripts if "/" not in f] + LIBRARIES)
    for f in LIBRARIES:  # a library is imported, never run: it has no command line
        assert '__name__ == "__main__"' not in open(os.path.join(ROOT, f), encoding="utf-8").read(), f
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {f: subprocess.Popen([sys.executable, f, "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for f in scripts}
    for f, p in runs.items():
        out, err = p.communicate(timeout=300)
        if f == "lmms_eval_modes.py" and importlib.util.find_spec("lmms_eval") is None:  # optional: say how to get it
            assert p.returncode == 2 and err.startswith("error:") and "pip install lmms-eval" in err, err
            assert len(err.strip().splitlines()) == 1 and not out
            continue
        assert p.returncode == 0 and not err.strip(), (f, err)
        assert out.startswith("usage:") and "--" in out, f


def test_one_list_of_expert_paths():
    assert EXPERT_IMPLS == ("auto", "ref") + moe_kernels.PATHS
    for parser in (generate.parser(), bench.parser()):
        [action] = [a for a in parser._actions if a.dest == "expert_impl"]
        assert tuple(action.choices) == EXPERT_IMPLS


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        cli.write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left


def test_default_outputs_land_in_the_ignored_runs_folder():
    import calibrate
    import search
    assert calibrate.parser().parse_args([]).out == "runs/alpha.json"
    assert search.parser().parse_args([]).out == "runs/thresholds.json"
    r = subprocess.run(["git", "check-ignore", "-q", "runs/alpha.json"], cwd=ROOT)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, "runs/ must be in .gitignore"


def test_default_output_folder_is_made_by_the_write(tmp_path):
    """A run with the default --out in a folder without runs/ makes runs/ and writes there (a refused run makes
    nothing: tests/test_bad_input.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "calibrate.py"), "--n", "2", "--batch-size", "1",
                        "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == ["alpha.json"]


def test_control_characters_are_shown_not_sent_to_the_terminal():
    assert cli.printable("a\x1bb\x03\n\tc\ufffd") == "a\\x1bb\\x03\n\tc\ufffd"


@pytest.mark.parametrize("name, random_weights", [("tiny-qwen", True), ("tiny-vqa", False)])
def test_generated_text_says_when_weights_are_random(tmp_path, name, random_weights):
    env = dict(os.environ, MODES_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "generate.py", "--model", name, "--prompt", "what color is the shape?",
                        "--max-new-tokens", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("random weights" in r.stderr) == random_weights
    if random_weights:
        assert "tiny-vqa" in r.stderr  # and where the trained one is
