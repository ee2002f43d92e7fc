"""bench.py --fidelity: every baseline is fitted to the skip ratio MoDES reached on the same calibration data."""
import json
import os
import subprocess
import sys

import pytest
import torch

from calibrate import linear_cka
from model import read_config
import router
import search as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity")
    env = dict(os.environ, MODES_CACHE=str(folder / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "search.py", "--n", "3", "--grid", "5", "--target", "0.4", "--quiet",
                        "--alpha", str(folder / "alpha.json"), "--out", str(folder / "thr.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return folder, env


def test_baselines_reach_the_modes_skip_ratio(thresholds):
    folder, env = thresholds
    r = subprocess.run([sys.executable, "bench.py", "--fidelity", "--thresholds", str(folder / "thr.json"),
                        "--baselines", "reduce-k,threshold,threshold+gmlg,naee,mc-moe,diep", "--eval-n", "2",
                        "--no-accuracy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = {row["policy"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])["fidelity"]}
    target = json.load(open(folder / "thr.json"))["skip_ratio"]["all"]
    assert rows["full"]["kl"] == 0.0 and rows["full"]["top1"] == 1.0 and rows["full"]["skip"]["all"] == 0.0
    assert rows["modes"]["calib_skip"] == pytest.approx(target)
    for name in ("threshold", "threshold+gmlg", "naee", "mc-moe", "diep", "reduce-k"):
        row = rows[name]
        if row["reached"]:  # fitted onto the target within the stated tolerance
            assert abs(row["calib_skip"] - target) <= S.TOLERANCE, name
            assert row["kl"] > 0 and row["skip"]["all"] > 0
        else:  # marked, with the reason, and the table still produced
            assert row["note"] and (row["calib_skip"] is None or row["calib_skip"] >= target), name
    assert rows["threshold"]["reached"] and rows["threshold+gmlg"]["reached"]  # continuous in tau: always reach
    K = read_config(os.path.join(env["MODES_CACHE"], "tiny-qwen3-vl-moe-v2")).num_experts_per_tok
    assert rows["reduce-k"]["calib_skip"] >= target and 0 <= rows["reduce-k"]["hyper"] < K


def test_linear_cka_hand_example():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    Y = torch.stack([a, 3 * a, a @ torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0], [1, 0], [-1, 0],
                                                                                           [-1, 0]])])
    cka = linear_cka(Y)
    # scaling and rotations leave linear CKA at 1; a rank-1 projection of a's isotropic points keeps 1/sqrt(2)
    assert torch.allclose(cka[0, :3], torch.ones(3), atol=1e-6)
    assert cka[0, 3] == pytest.approx(2 ** -0.5, abs=1e-6)
    gamma = router.diep_gamma(cka[None])
    assert gamma.shape == (1, 4, 4)


def test_generate_with_thresholds_reports_skip_ratio(thresholds):
    folder, env = thresholds
    run = lambda *a: subprocess.run([sys.executable, "model.py", *a], cwd=ROOT, env=env, capture_output=True,  # noqa
                                    text=True, timeout=300)
    r = run("--prompt", "What is in the image?", "--thresholds", str(folder / "thr.json"), "--max-new-tokens", "4",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < out["skip_ratio"]["prefill"]["all"] < 1 and out["skip_ratio"]["decode"]["all"] is not None
    assert "skipped routed-expert slots: prefill" in r.stderr
    r = run("--model", "tiny-kimi", "--prompt", "hi", "--thresholds", str(folder / "thr.json"))
    assert r.returncode == 2 and "made for another model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
