"""Bad input to the pipeline's command lines (generate.py, calibrate.py, search.py, bench.py, support/plot.py): one
`error:` line naming the argument or the file and what was expected, exit status 2, found before any weights load,
nothing written or left behind. Also: a failed final write, concurrent first use of a built-in checkpoint, progress
lines.

Most cases run a script's command line in this process (argparse, main, cli.run: all that `python script.py`
adds is the interpreter); a few run it for real to see the exit status and that no traceback is printed."""
import importlib
import io
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import cli
import model
from model import build, load, read_config
import router
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRIPTS = ("generate", "calibrate", "search", "bench", "evaluate")  # the command lines run in this process below


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a checkpoint's weights fails the test: bad input must be found before. The loader is
    replaced where the scripts look it up: model.load, and the `load` each script imported from model."""
    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was found")
    monkeypatch.setattr(model, "load", load)
    for name in SCRIPTS:
        module = importlib.import_module(name)
        if hasattr(module, "load"):
            monkeypatch.setattr(module, "load", load)


def one_line_error(capsys, script, *argv):
    """The `error:` line of script's command line run on argv (exit status 2), without its prefix."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit:
        cli.run(module.main, module.parser().parse_args([str(a) for a in argv]))
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder with valid alpha and thresholds files for tiny-qwen (no model run: made from its architecture),
    an image, and a regular file to put paths under."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("made")
    skeleton = build(read_config(tiny.resolve("tiny-qwen")), "meta")
    rows = [dict(layer=i, text=0.25, vision=0.25) for i in skeleton.moe_layers()]
    made_for = dict(fingerprint=router.fingerprint(skeleton))
    cli.write_json(folder / "alpha.json", dict(format=router.ALPHA_FORMAT, model=made_for, layers=rows))
    cli.write_json(folder / "thresholds.json", dict(
        format=router.THRESHOLDS_FORMAT, model=made_for, tau=dict(text=0.01, vision=0.02), layers=rows,
        skip_ratio=dict(all=0.5, text=0.4, vision=0.6),
        data=dict(source="synthetic", n=2, start=0, seed=None, batch_size=1, sha256="0" * 64)))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    (folder / "afile").write_text("not a folder\n")
    return folder


def variant(path, out, change):
    doc = json.load(open(path))
    change(doc)
    cli.write_json(out, doc)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Arguments: each named, checked before anything is loaded


@pytest.mark.parametrize("script, argv, message", [
    ("generate", ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "40000"],
     "with --max-new-tokens 40000 that exceeds the model's max_position_embeddings 32768"),
    ("calibrate", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("calibrate", ["--n", "0"], "--n must be >= 1, got 0"),
    ("calibrate", ["--n", "99"], "--n 99 must be between 1 and the 32 samples"),
    ("calibrate", ["--start", "-1"], "--start must be >= 0, got -1"),
    ("calibrate", ["--max-batches", "0"], "--max-batches must be >= 1, got 0"),
    ("calibrate", ["--gqa-questions", "q.json"], "--gqa-questions needs --gqa-images"),
    ("search", ["--target", "0"], "--target must be in (0, 1], got 0.0"),
    ("search", ["--target", "nan"], "--target must be in (0, 1], got nan"),
    ("search", ["--grid", "0"], "--grid must be >= 1, got 0"),
    ("search", ["--text-range", "1", "0"], "--text-range must be finite, 0 <= MIN <= MAX, got [1.0, 0.0]"),
    ("search", ["--vision-range", "0", "inf"], "--vision-range must be finite, 0 <= MIN <= MAX, got [0.0, inf]"),
    ("bench", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("bench", ["--text-tokens", "-1"], "--text-tokens must be >= 0, got -1"),
    ("bench", ["--decode-steps", "0"], "--decode-steps must be >= 1, got 0"),
    ("bench", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("evaluate", ["--thresholds", "t.json", "--eval-n", "0"], "--eval-n must be >= 1, got 0"),
    ("evaluate", [], "--thresholds FILE is needed"),
    ("bench", ["--keep", "9"], "--keep 9: the model routes each token to 4 experts"),
    ("bench", ["--target", "nan"], "--target must be in (0, 1], got nan"),
    ("bench", ["--policy", "full,modes"], "--policy modes needs --thresholds"),
    ("bench", ["--plot", "plots"], "--plot DIR draws from the --json FILE"),
] + [(script, [*(["--prompt", "hi"] if script == "generate" else []), "--device", device], message)
     for script in ("generate", "calibrate", "search", "bench")
     for device, message in [("cuda:99", "--device cuda:99: "), ("tpu", "--device 'tpu': not a device"),
                             ("meta", "--device meta: only cpu and cuda are supported")]])
def test_bad_argument_is_one_line_naming_it(capsys, no_loading, tmp_path, monkeypatch, script, argv, message):
    monkeypatch.chdir(tmp_path)  # the default outputs (alpha.json, ...) would land here
    assert message in one_line_error(capsys, script, *argv)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Output paths: checked before any work; an input is never overwritten, nor an interrupted run's state


@pytest.mark.parametrize("script, argv, message", [
    ("calibrate", "--out {made}", "--out {made}: is a folder, expected a file path"),
    ("calibrate", "--out {made}/afile/x/a.json", "--out {made}/afile/x/a.json: {made}/afile is a file, not a folder"),
    ("calibrate", "--out {made}/afile/a.json", "--out {made}/afile/a.json: {made}/afile is a file, not a folder"),
    ("calibrate", "--out=", "--out: empty path, expected a file path"),
    ("calibrate", "--out {made}/d.jsonl --data {made}/d.jsonl",
     "--out {made}/d.jsonl: is also --data, an input of this run; write the output elsewhere"),
    ("calibrate", "--plot {made}/afile", "--plot {made}/afile: is a file, expected a folder"),
    ("search", "--out {made}/afile/t.json", "--out {made}/afile/t.json: {made}/afile is a file, not a folder"),
    ("search", "--out {made}/alpha.json --alpha {made}/alpha.json",
     "--out {made}/alpha.json: is also --alpha, an input of this run; write the output elsewhere"),
    ("search", "--alpha {made}/afile/x/a.json", "--alpha {made}/afile/x/a.json: {made}/afile is a file, not a "
     "folder"),
    ("bench", "--json {made}", "--json {made}: is a folder, expected a file path"),
    ("bench", "--json {made}/afile/b.json", "--json {made}/afile/b.json: {made}/afile is a file, not a folder"),
    ("bench", "--json {made}/thresholds.json --policy modes --thresholds {made}/thresholds.json",
     "--json {made}/thresholds.json: is also --thresholds, an input of this run; write the output elsewhere"),
    ("bench", "--json {tmp}/b.json --plot {made}/afile/plots", "--plot {made}/afile/plots: {made}/afile is a file, "
     "expected a folder"),
])
def test_unwritable_output_is_one_line_before_any_work(capsys, no_loading, made, tmp_path, monkeypatch, script, argv,
                                                        message):
    monkeypatch.chdir(tmp_path)  # where the default outputs would go
    before = {p: open(made / p, "rb").read() for p in files(made)}
    argv = [a.format(made=made, tmp=tmp_path) for a in argv.split()]
    assert one_line_error(capsys, script, *argv) == message.format(made=made)
    assert {p: open(made / p, "rb").read() for p in files(made)} == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["calibrate", "search"])
def test_partial_state_is_never_overwritten_unasked(capsys, no_loading, tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    (tmp_path / "out.json.partial").write_text("{}")
    assert one_line_error(capsys, script, "--out", out) == (f"{out}.partial holds an interrupted run's state: add "
                                                            f"--resume to continue it, or delete it to start over")
    os.remove(tmp_path / "out.json.partial")
    os.mkdir(tmp_path / "out.json.partial")
    assert one_line_error(capsys, script, "--out", out, "--resume") == \
        f"--out's partial state {out}.partial: is a folder, expected a file path"


# ---------------------------------------------------------------------------------------------------------------
# Files handed in: checked when read, one line naming the file and the line or field


@pytest.mark.parametrize("script", ["generate", "bench"])
@pytest.mark.parametrize("change, message", [
    (lambda d: d["layers"].pop(), r"no alpha for MoE layer(s) 3; every MoE layer needs one"),
    (lambda d: d["tau"].update(text=-0.5), "tau.text must be a number >= 0, finite in fp32, got -0.5"),
    (lambda d: d["tau"].update(vision=float("nan")), "tau.vision must be a number >= 0, finite in fp32, got nan"),
    (lambda d: d.pop("tau"), "'tau' must be an object {text, vision}"),
    (lambda d: d["layers"][2].pop("vision"), "layers[2].vision must be a number >= 0, finite in fp32, got None"),
    (lambda d: d["model"].update(fingerprint="f" * 64), "made for another model"),
])
def test_bad_thresholds_file_is_one_line_before_loading(capsys, no_loading, made, tmp_path, script, change, message):
    path = variant(made / "thresholds.json", tmp_path / "t.json", change)
    argv = ["--prompt", "hi"] if script == "generate" else ["--policy", "full,modes"]
    assert one_line_error(capsys, script, *argv, "--thresholds", path).startswith(f"{path}: {message}")


def test_thresholds_file_that_is_a_list_or_a_folder(capsys, no_loading, made, tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    assert one_line_error(capsys, "generate", "--prompt", "hi", "--thresholds", tmp_path / "list.json") == \
        f"{tmp_path}/list.json: expected a JSON object (thresholds file), got a list"
    assert one_line_error(capsys, "generate", "--prompt", "hi", "--thresholds", tmp_path) == \
        f"thresholds file {tmp_path}: is a folder"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("data"), "no 'data' section naming its calibration samples"),
    (lambda d: d["data"].update(n="2"), "data needs a source string, n >= 1, start >= 0"),
    (lambda d: d["data"].update(source=None), "data needs a source string"),
    (lambda d: d.pop("skip_ratio"), "skip_ratio.all must be the search's skip ratio in [0, 1], got None"),
    (lambda d: d["skip_ratio"].update(all=float("nan")), "skip_ratio.all must be the search's skip ratio in [0, 1]"),
    (lambda d: None, "the calibration data synthetic changed since the search"),  # the fixture's sha256 is made up
])
def test_fidelity_thresholds_without_usable_data_section(capsys, no_loading, made, tmp_path, change, message):
    path = variant(made / "thresholds.json", tmp_path / "t.json", change)
    assert one_line_error(capsys, "evaluate", "--thresholds", path).startswith(f"{path}: {message}")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["layers"][0].update(text=float("nan")), "layers[0].text must be a number >= 0, finite in fp32"),
    (lambda d: d["layers"][0].update(layer=7), "layers[0].layer 7 is not an MoE layer of this model (0..3)"),
    (lambda d: d["layers"].pop(0), "no alpha for MoE layer(s) 0"),
    (lambda d: d.pop("layers"), "'layers' must be a list of {layer, text, vision} rows"),
])
def test_bad_alpha_file_is_one_line_before_loading(capsys, no_loading, made, tmp_path, change, message):
    path = variant(made / "alpha.json", tmp_path / "a.json", change)
    line = one_line_error(capsys, "search", "--n", "2", "--alpha", path, "--out", tmp_path / "t.json")
    assert line.startswith(f"{path}: {message}") and not (tmp_path / "t.json").exists()


def test_bad_data_line_is_one_line_before_loading(capsys, no_loading, made, tmp_path):
    lines = [f'{{"image": "{made}/red.png", "question": "q", "answer": "a"}}',
             '{"image": ".", "question": "q", "answer": "a"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    line = one_line_error(capsys, "calibrate", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "a.json")
    assert line == f"{tmp_path}/d.jsonl:2: {tmp_path}/. is a folder, expected an image file"
    assert os.listdir(tmp_path) == ["d.jsonl"]


# ---------------------------------------------------------------------------------------------------------------
# The real command lines: exit status 2, one line, no traceback; a failed write; concurrent first use


def run(*argv, env=None, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["generate.py", "--prompt", "hi", "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),
    (["calibrate.py", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["search.py", "--grid", "0"], "error: --grid must be >= 1, got 0"),
    (["bench.py", "--device", "tpu"], "error: --device 'tpu': not a device (cpu, cuda, cuda:N)"),
    (["support/plot.py", "no-such.json"], "error: no-such.json: no such file or folder"),
])
def test_command_line_exits_2_with_one_line(tmp_path, argv, message):
    r = run(*argv)
    assert (r.returncode, r.stderr, r.stdout) == (2, message + "\n", "")


def test_failed_final_write_names_the_destination_and_keeps_the_earlier_file(made, tmp_path):
    """bench.py's --json write fails as on a full disk (a file-size limit: write() fails with EFBIG): one line
    naming the file, the earlier file intact, no temporary file left."""
    out = tmp_path / "bench.json"
    out.write_text('{"earlier": true}\n')
    tiny.resolve("tiny-qwen")  # the built-in checkpoint exists, so the limit hits only the result's write
    limit = 1000  # bytes: the result is several kB

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = run("bench.py", "--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--json", out, preexec_fn=limited)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"error: cannot write {out}: File too large", r.stderr
    assert "Traceback" not in r.stderr
    assert out.read_text() == '{"earlier": true}\n' and os.listdir(tmp_path) == ["bench.json"]


def test_concurrent_first_use_of_a_built_in_checkpoint(tmp_path):
    """Three processes (torchrun ranks on a fresh machine) write tiny-qwen into an empty cache at once: all get the
    same complete folder, and no temporary folder is left."""
    cache = tmp_path / "cache"
    code = "from support import tiny; print(tiny.resolve('tiny-qwen'))"
    env = dict(os.environ, OMP_NUM_THREADS="1", MODES_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / "tiny-qwen3-vl-moe-v3")}
    assert os.listdir(cache) == ["tiny-qwen3-vl-moe-v3"]
    assert sorted(os.listdir(cache / "tiny-qwen3-vl-moe-v3")) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    load(str(cache / "tiny-qwen3-vl-moe-v3"), dtype=torch.float32)  # complete: every tensor present


# ---------------------------------------------------------------------------------------------------------------
# Progress lines


def test_progress_lines_and_quiet(tmp_path):
    """Without --quiet a log gets one progress line per step (10% of 2 steps), the last one once; --quiet none;
    the run's result is the same."""
    argv = ["calibrate.py", "--n", "2", "--batch-size", "1"]
    loud, quiet = run(*argv, "--out", tmp_path / "a.json"), run(*argv, "--quiet", "--out", tmp_path / "b.json")
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert [line.split(" batches, ")[0] for line in loud.stderr.splitlines()] == [
        "calibrate: 1/2", "calibrate: 2/2"]
    assert quiet.stderr == ""
    assert json.load(open(tmp_path / "a.json"))["kl_sum"] == json.load(open(tmp_path / "b.json"))["kl_sum"]


def test_error_after_an_open_progress_line_starts_on_a_clean_line(monkeypatch):
    """On a terminal the progress line is redrawn in place and left open; the error line erases it first."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = cli.Progress("work", 4)
    progress.update(1, finished=False)

    def fail(args):
        raise ValueError("--x is bad")
    with pytest.raises(SystemExit):
        cli.run(fail, None)
    assert sys.stderr.getvalue().endswith("\r\033[Kerror: --x is bad\n")
