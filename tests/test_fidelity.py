"""evaluate.py: every baseline is fitted to the skip ratio MoDES reached on the same calibration data, the result is
the document support/plot.py draws, and bad input is one line before any weights load."""
import json
import os
import subprocess
import sys

import pytest
import torch

import baselines
import cli
import evaluate
from data import Sample, answer_is_right
from model import read_config
from support import tiny

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
    r = subprocess.run([sys.executable, "evaluate.py", "--thresholds", str(folder / "thr.json"),
                        "--baselines", "reduce-k,threshold,threshold+gmlg,naee,mc-moe,diep", "--eval-n", "2",
                        "--no-accuracy", "--json", str(folder / "fid.json"), "--fits", str(folder / "fits.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.load(open(folder / "fid.json")) == doc
    rows = {row["policy"]: row for row in doc["fidelity"]}
    target = json.load(open(folder / "thr.json"))["skip_ratio"]["all"]
    assert rows["full"]["kl"] == 0.0 and rows["full"]["top1"] == 1.0 and rows["full"]["skip"]["all"] == 0.0
    assert rows["modes"]["calib_skip"] == pytest.approx(target)
    for name in ("threshold", "threshold+gmlg", "naee", "mc-moe", "diep", "reduce-k"):
        row = rows[name]
        if row["reached"]:  # fitted onto the target within the stated tolerance
            assert abs(row["calib_skip"] - target) <= baselines.TOLERANCE, name
            assert row["kl"] > 0 and row["skip"]["all"] > 0
        else:  # marked, with the reason, and the table still produced
            assert row["note"] and (row["calib_skip"] is None or row["calib_skip"] >= target), name
    # searched on MoDES's grid, as MoDES is: the first grid point at or above the target
    assert rows["threshold"]["calib_skip"] >= target and rows["threshold+gmlg"]["calib_skip"] >= target
    K = read_config(tiny.resolve(doc["source"])).num_experts_per_tok
    assert rows["reduce-k"]["calib_skip"] >= target and 0 <= rows["reduce-k"]["hyper"] < K
    # --no-accuracy: no accuracy and no retention, and the document has the fields of the committed fidelity files
    # (what support/plot.py reads)
    assert all(row["accuracy"] is None and row["retention"] is None for row in rows.values())
    committed = json.load(open(os.path.join(ROOT, "benchmarks", "tiny-vqa", "fidelity-0.75.json")))
    assert sorted(doc) == sorted(committed) and doc["eval_data"] == "synthetic" and doc["eval_n"] == 2
    assert {frozenset(row) for row in doc["fidelity"]} == {frozenset(row) for row in committed["fidelity"]}


def test_fits_file_is_reused_without_refitting(thresholds, monkeypatch, capsys):
    """A second run at a new --eval-n with the first run's --fits fits nothing and scores the same settings; a fit
    is reused only for the thresholds file it was made for."""
    folder, env = thresholds
    assert os.path.exists(folder / "fid.json"), "needs test_baselines_reach_the_modes_skip_ratio's run first"
    monkeypatch.setenv("MODES_CACHE", env["MODES_CACHE"])

    def no_fit(*args, **kwargs):
        raise AssertionError("a baseline was fitted again")
    monkeypatch.setattr(baselines, "fit_baseline", no_fit)
    args = ["--thresholds", str(folder / "thr.json"), "--baselines", "threshold,naee,mc-moe", "--eval-n", "3",
            "--fits", str(folder / "fits.json"), "--batch-size", "2", "--quiet"]
    cli.run(evaluate.main, evaluate.parser().parse_args(args))
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    first = {row["policy"]: row for row in json.load(open(folder / "fid.json"))["fidelity"]}
    assert doc["eval_n"] == 3 and [row["policy"] for row in doc["fidelity"]] == ["full", "modes", "threshold", "naee",
                                                                                "mc-moe"]
    for row in doc["fidelity"][2:]:
        assert {k: row[k] for k in ("hyper", "calib_skip", "reached")} == \
            {k: first[row["policy"]][k] for k in ("hyper", "calib_skip", "reached")}
    assert doc["fidelity"][0]["accuracy"] is not None and doc["fidelity"][0]["kl"] == 0.0
    other = variant(folder / "thr.json", folder / "thr-other.json", lambda d: d["tau"].update(text=0.5))
    with pytest.raises(SystemExit) as exit:
        cli.run(evaluate.main, evaluate.parser().parse_args(["--thresholds", str(other), "--fits",
                                                             str(folder / "fits.json")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and "fitted for another thresholds file" in err[0], err


def test_exact_match_is_the_same_at_any_batch_size(monkeypatch):
    """The accuracy pass generates in batches (generate.py's generate): the same answers as one by one."""
    pytest.importorskip("easy_vqa")
    import processor
    import router
    from data import read_samples
    from model import load
    path = os.path.join(ROOT, "checkpoints", "tiny-vqa")
    proc = processor.for_model(path, "qwen3_vl_moe")
    model = load(path, dtype=torch.float32, special_ids=proc.special_ids)
    samples = read_samples("easy-vqa-test")[:7]
    policy = router.MoDES(0.02, 0.5, torch.rand(len(model.layers), 2, generator=torch.Generator().manual_seed(0)))
    seen = []
    is_right = evaluate.answer_is_right
    monkeypatch.setattr(evaluate, "answer_is_right", lambda text, sample: seen.append(text) or is_right(text, sample))
    runs = []
    for b in (1, 3, 7):
        seen.clear()
        runs.append((evaluate.exact_match(model, proc, samples, policy, "cpu", batch_size=b), list(seen)))
    assert runs[0] == runs[1] == runs[2] and sum(runs[0][0]) > len(samples) / 2  # hits and generated answers


def test_bootstrap_intervals_are_paired_and_the_binomial_width():
    """400 questions: an unskipped row right on 300, a copy of it, and a policy right on every other question with
    a KL of 0.1 per answer token. The copy's retention interval is a point (paired resamples); accuracy 0.75's
    interval is the binomial one, 0.75 +- 1.96 sqrt(0.75 * 0.25 / 400) = +- 0.042; a constant per-token KL stays
    constant whatever the questions' lengths."""
    n = 400
    tokens = [1.0 + 2 * (q % 2) for q in range(n)]
    unskipped = dict(kl_sum=[0.0] * n, top1_hits=tokens, tokens=tokens, correct=[q < 300 for q in range(n)])
    rows = [dict(per_question=unskipped), dict(per_question={**unskipped}),
            dict(per_question=dict(kl_sum=[0.1 * t for t in tokens], top1_hits=[0.0] * n, tokens=tokens,
                                   correct=[q % 2 == 0 for q in range(n)]))]
    evaluate.bootstrap_intervals(rows)
    assert all("per_question" not in r for r in rows)
    full_ci, copy_ci, half_ci = (r["ci95"] for r in rows)
    assert copy_ci["retention"] == pytest.approx([100.0, 100.0]) and copy_ci["accuracy"] == full_ci["accuracy"]
    lo, hi = full_ci["accuracy"]
    assert lo < 0.75 < hi and (hi - lo) / 2 == pytest.approx(0.042, rel=0.15)
    assert half_ci["kl"] == pytest.approx([0.1, 0.1]) and half_ci["top1"] == [0.0, 0.0]
    assert half_ci["retention"][0] < 100 * 0.5 / 0.75 < half_ci["retention"][1]
    again = [dict(per_question={**unskipped})]
    evaluate.bootstrap_intervals(again)
    assert again[0]["ci95"] == full_ci  # seeded: the same resamples every run


def test_linear_cka_hand_example():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    Y = torch.stack([a, 3 * a, a @ torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0], [1, 0], [-1, 0],
                                                                                           [-1, 0]])])
    cka = baselines.linear_cka(Y)
    # scaling and rotations leave linear CKA at 1; a rank-1 projection of a's isotropic points keeps 1/sqrt(2)
    assert torch.allclose(cka[0, :3], torch.ones(3), atol=1e-6)
    assert cka[0, 3] == pytest.approx(2 ** -0.5, abs=1e-6)
    gamma = baselines.diep_gamma(cka[None])
    assert gamma.shape == (1, 4, 4)


def test_answer_is_right_whole_answer_or_key_word_in_its_place():
    plain = Sample("q", "The shape is RED.", [])
    assert answer_is_right("  the shape is red ", plain) and answer_is_right("The shape, is red!", plain)
    assert not answer_is_right("red", plain) and not answer_is_right("The shape is reds.", plain)
    total = Sample("q", "The digits are 3, 5 and 4, so the sum is 12.", [], key="12")
    assert answer_is_right("The digits are 3, 6 and 3, so the sum is 12.", total)  # the key scored, not the reasoning
    assert answer_is_right("so the sum is 12", total) and answer_is_right("12.", total)
    assert not answer_is_right("The digits are 3, 5 and 4, so the sum is 11.", total)
    assert not answer_is_right("The sum is 12, the digits are 3, 5 and 4.", total) and not answer_is_right("", total)
    count = Sample("q", "There are two red objects.", [], key="two")
    assert answer_is_right("There are TWO red objects", count) and not answer_is_right("There are three red objects",
                                                                                        count)
    assert not answer_is_right("There are two blue objects.", count)  # the words after the key are the reference's
    twice = Sample("q", "one two one three", [], key="One")  # the key's last occurrence is its place
    assert answer_is_right("x one three", twice) and not answer_is_right("one two one four", twice)


def test_generate_with_thresholds_reports_skip_ratio(thresholds):
    folder, env = thresholds
    run = lambda *a: subprocess.run([sys.executable, "generate.py", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    # with an image: on tiny-qwen's random weights (re-seeded since) the search at grid 5 takes the lowest text
    # threshold, which skips no text slot, and reaches its target on the vision tokens alone (skip_ratio.text 0.0
    # in thr.json), so a text-only prompt would skip nothing
    from PIL import Image
    Image.new("RGB", (128, 128), (200, 30, 30)).save(folder / "red.png")
    r = run("--prompt", "What is in the image?", "--image", str(folder / "red.png"), "--thresholds",
            str(folder / "thr.json"), "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < out["skip_ratio"]["prefill"]["all"] < 1 and out["skip_ratio"]["decode"]["all"] is not None
    assert "skipped routed-expert slots: prefill" in r.stderr
    r = run("--model", "tiny-kimi", "--prompt", "hi", "--thresholds", str(folder / "thr.json"))
    assert r.returncode == 2 and "made for another model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def variant(path, out, change):
    doc = json.load(open(path))
    change(doc)
    with open(out, "w") as f:
        json.dump(doc, f)
    return out


@pytest.mark.parametrize("argv, message", [
    ([], "--thresholds FILE is needed: MoDES's thresholds (made by search.py)"),
    (["--thresholds", "{thr}", "--eval-n", "0"], "--eval-n must be >= 1, got 0"),
    (["--thresholds", "{thr}", "--baselines", "naee,nope"], "--baselines: unknown nope (choose from reduce-k, "),
    (["--thresholds", "{thr}", "--plot", "{tmp}/plots"], "--plot DIR draws from the --json FILE: give both"),
    (["--thresholds", "{thr}", "--json", "{thr}"], "--json {thr}: is also --thresholds, an input of this run"),
    (["--thresholds", "{thr}", "--json", "{thr}/f.json"], "--json {thr}/f.json: {thr} is a file, not a folder"),
    (["--thresholds", "{thr}", "--fits", "{thr}"], "--fits {thr}: is also --thresholds, an input of this run"),
    (["--thresholds", "{thr}", "--json", "{tmp}/a.json", "--fits", "{tmp}/a.json"], "--json and --fits name the same"),
    (["--thresholds", "{thr}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--thresholds", "{tmp}/missing.json"], "thresholds file not found: {tmp}/missing.json"),
    (["--thresholds", "{thr}", "--model", "tiny-kimi"], "{thr}: made for another model"),
    (["--thresholds", "{no_data}"], "{no_data}: no 'data' section naming its calibration samples"),
    (["--thresholds", "{changed}"], "{changed}: the calibration data synthetic changed since the search"),
    (["--thresholds", "{thr}", "--data", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl"),
])
def test_bad_input_is_one_line_before_loading(thresholds, tmp_path, monkeypatch, capsys, argv, message):
    folder, env = thresholds
    monkeypatch.setenv("MODES_CACHE", env["MODES_CACHE"])  # the fixture's built-in checkpoints, not the user's

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was found")
    monkeypatch.setattr(evaluate, "load", no_load)
    names = dict(thr=folder / "thr.json", tmp=tmp_path,
                 no_data=variant(folder / "thr.json", tmp_path / "no-data.json", lambda d: d.pop("data")),
                 changed=variant(folder / "thr.json", tmp_path / "changed.json",
                                 lambda d: d["data"].update(sha256="0" * 64)))
    with pytest.raises(SystemExit) as exit:
        cli.run(evaluate.main, evaluate.parser().parse_args([a.format(**names) for a in argv]))
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(**names) in err[0]
    assert sorted(os.listdir(tmp_path)) == ["changed.json", "no-data.json"]  # nothing written
