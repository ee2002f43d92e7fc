"""support/plot.py: every plot kind from real artifacts, the folder command, and its one-line errors.

The fixtures in fixtures/artifacts were made by the scripts on the tiny built-in checkpoints (2-core CPU):
    python calibrate.py --n 8 --out alpha.json                 (and --model tiny-kimi --out alpha-kimi.json)
    python search.py --n 8 --grid 12 --target T --alpha alpha.json --out thresholds-T.json      T = 0.3, 0.5, 0.6
    python search.py --n 8 --grid 12 --target 0.5 --alpha alpha.json --exhaustive --out thresholds-0.5-exhaustive.json
    python bench.py --policy full,threshold --decode-steps 4 --repeats 2 --json bench.json
    python bench.py --fidelity --thresholds thresholds-T.json --eval-n 4 --json fidelity-T.json
(of the thresholds files only T = 0.5 is kept). bench-skip.json is bench.json with `skip_per_layer` added to each
row, from router.SkipStats.summary()'s per-layer part of the same untimed pass bench.py counts its skip ratios in;
generate-kimi.json is model.py's --json report of a tiny-kimi generation with MoDES (alpha-kimi.json, both taus
0.03) plus `skip_per_layer` (layer 0 is dense, hence null). That field is the one the scripts will write.
They predate the architecture split (model.py's command line is generate.py now, bench.py --fidelity evaluate.py)
and the tiny checkpoints' v3 weights: they are kept as they were, as inputs of the plots.
"""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from support import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "artifacts")
FIDELITY = ["fidelity-0.3.json", "fidelity-0.5.json", "fidelity-0.6.json"]
KINDS = {"alpha.json": ["alpha"], "alpha-kimi.json": ["alpha"], "bench.json": ["bench"],
         "bench-skip.json": ["bench", "skip"], "generate-kimi.json": ["skip"], "thresholds-0.5.json": ["search"],
         "thresholds-0.5-exhaustive.json": ["search"], **{f: ["fidelity"] for f in FIDELITY}}

# drawing needs matplotlib, and so does the command line, which checks for it before reading anything
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")


def load(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def expected_size(kind):
    w, h = plot.FIGSIZE[kind]
    return round(w * plot.DPI), round(h * plot.DPI)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "support", "plot.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_fixtures_are_recognised_and_small():
    assert sorted(KINDS) == sorted(f for f in os.listdir(FIXTURES) if f.endswith(".json"))
    for name, kinds in KINDS.items():
        assert plot.kinds(load(name)) == (kinds, None), name
        assert os.path.getsize(os.path.join(FIXTURES, name)) < 100_000, name


@needs_matplotlib
@pytest.mark.parametrize("kind, draw", [  # the other fixtures are drawn by the tests below
    ("alpha", lambda out: plot.plot_alpha(load("alpha-kimi.json"), out)),
    ("skip", lambda out: plot.plot_skip(load("generate-kimi.json"), out)),
    ("search", lambda out: plot.plot_search(load("thresholds-0.5-exhaustive.json"), out)),
    ("bench", lambda out: plot.plot_bench(load("bench.json"), out)),
])
def test_each_plot_is_a_png_of_its_fixed_size(tmp_path, kind, draw):
    out = str(tmp_path / f"{kind}.png")
    assert draw(out) == out
    assert png_size(out) == expected_size(kind)
    assert os.listdir(tmp_path) == [f"{kind}.png"]  # the temporary file was renamed, nothing left behind


@needs_matplotlib
def test_fidelity_without_accuracy(tmp_path):
    docs = [load(f) for f in FIDELITY]
    for row in docs[0]["fidelity"]:  # as bench.py --no-accuracy writes
        row["accuracy"] = row["retention"] = None
    docs[1]["fidelity"][3]["accuracy"] = None  # one policy unscored: drawn in the KL and top-1 panels only
    out = str(tmp_path / "fidelity.png")
    assert png_size(plot.plot_fidelity(docs, out)) == expected_size("fidelity")
    only_full = [dict(docs[0], fidelity=docs[0]["fidelity"][:1])]  # no curve at all: empty panels, no legend
    assert png_size(plot.plot_fidelity(only_full, out)) == expected_size("fidelity")


@needs_matplotlib
def test_fidelity_with_baselines_that_miss_the_target(tmp_path):
    """As bench.py writes a rule that jumps over the target (nearest setting, reached false) and one that cannot
    be fitted at all (no policy, every number null): the first is a hollow point, the second has none."""
    doc = load(FIDELITY[1])
    rows = doc["fidelity"]
    rows[2]["reached"] = False
    rows[3].update(reached=False, hyper=None, calib_skip=None, kl=None, top1=None, accuracy=None, retention=None,
                   skip=dict(all=None, text=None, vision=None))
    assert [p for p, _ in plot.fidelity_points(doc)] == [r["policy"] for i, r in enumerate(rows) if i != 3]
    assert [pt["reached"] for _, pt in plot.fidelity_points(doc)][2] is False
    out = str(tmp_path / "fidelity.png")
    assert png_size(plot.plot_fidelity([doc], out)) == expected_size("fidelity")
    rows[4]["skip"]["all"] = None  # a fitted row without its skip ratio is still refused
    with pytest.raises(plot.ArtifactError, match=r"fidelity\[4\]\.skip"):
        plot.fidelity_points(doc)


@needs_matplotlib
def test_fidelity_intervals_and_layer_shares_from_evaluate_files(tmp_path, capsys):
    """evaluate.py's files since the bootstrap intervals and per-layer skip shares (the committed tiny-vqa ones): the
    command draws the curves with error bars and the per-layer figure of MoDES against DMT without GMLG."""
    files = [os.path.join(ROOT, "benchmarks", "tiny-vqa", f"fidelity-{t}.json") for t in ("0.50", "0.75", "0.80")]
    assert plot.cli([*files, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / n}" for n in ("fidelity.png",
                                                                                      "fidelity-layers.png")]
    assert png_size(tmp_path / "fidelity-layers.png") == expected_size("layers")
    points = dict(plot.fidelity_points(json.load(open(files[1]))))
    lo, hi = points["modes"]["ci"]["accuracy"]
    assert lo <= points["modes"]["accuracy"] <= hi and len(points["modes"]["layers"]["text"]) == 4
    doc = json.load(open(files[1]))
    doc["fidelity"][1]["ci95"]["kl"] = [0.1]
    with pytest.raises(plot.ArtifactError, match=r"fidelity\[1\]\.ci95\.kl' should be \[low, high\]"):
        plot.fidelity_points(doc)
    with pytest.raises(plot.ArtifactError, match="no fidelity file has per-layer skip shares"):
        plot.plot_layers([load(f) for f in FIDELITY], str(tmp_path / "layers.png"))  # files from before them


@needs_matplotlib
def test_folder_command_makes_every_plot(tmp_path, capsys, monkeypatch):
    import matplotlib
    art, out = tmp_path / "artifacts", tmp_path / "plots"
    art.mkdir()
    chosen = ["alpha.json", "bench-skip.json", "thresholds-0.5.json", *FIDELITY]  # every kind once
    for name in chosen:
        shutil.copy(os.path.join(FIXTURES, name), art)
    (art / "notes.json").write_text('{"hello": 1}')
    (art / "alpha.partial.json").write_text('{"format": "modes-alpha-partial/1", "steps_done": 1}')
    for key, value in (("savefig.bbox", "tight"), ("savefig.dpi", 37), ("figure.dpi", 37)):
        monkeypatch.setitem(matplotlib.rcParams, key, value)  # a user's matplotlibrc must not change the size
    assert plot.cli([str(art), "--out", str(out)]) == 0
    result = capsys.readouterr()
    # files in name order, then the one plot the fidelity files make together
    expected = ["alpha.alpha.png", "bench-skip.bench.png", "bench-skip.skip.png", "thresholds-0.5.search.png",
                "fidelity.png"]
    assert result.out.splitlines() == [f"wrote {out / name}" for name in expected]
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, kind in zip(expected, ["alpha", "bench", "skip", "search", "fidelity"]):
        assert png_size(out / name) == expected_size(kind)
    assert result.err.splitlines() == [
        f"note: skipped {art / 'alpha.partial.json'}: not a MoDES artifact (format 'modes-alpha-partial/1' has no "
        "plot)",
        f"note: skipped {art / 'notes.json'}: not a MoDES artifact (no format, rows, fidelity or skip_per_layer field)"]


@needs_matplotlib
def test_plot_artifact_returns_what_it_wrote(tmp_path):
    written = plot.plot_artifact(os.path.join(FIXTURES, "bench-skip.json"), str(tmp_path))
    assert written == [str(tmp_path / "bench-skip.bench.png"), str(tmp_path / "bench-skip.skip.png")]
    assert [png_size(p) for p in written] == [expected_size("bench"), expected_size("skip")]


def test_import_does_not_load_matplotlib():
    code = "import sys; from support import plot; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    result = run_cli(FIXTURES, "--out", str(tmp_path / "plots"), env=env)
    assert result.returncode == 2
    assert result.stderr == "error: plotting needs matplotlib (pip install matplotlib)\n"
    assert result.stdout == "" and not (tmp_path / "plots").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the library raises the same message
    for call in (plot.require_matplotlib, lambda: plot.plot_alpha(load("alpha.json"), str(tmp_path / "a.png"))):
        # a ValueError too: the scripts' command lines print it as their one `error:` line
        with pytest.raises(ValueError, match=r"^plotting needs matplotlib \(pip install matplotlib\)$") as e:
            call()
        assert isinstance(e.value, plot.MissingMatplotlib)
    assert not (tmp_path / "a.png").exists()


@needs_matplotlib
@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ('{"format": "modes-thresholds/9"}', "not a MoDES artifact (format 'modes-thresholds/9' has no plot)"),
    ("[1, 2]", "not a MoDES artifact (a JSON list, not an object)"),
    ('{"format": "modes-alpha/1", "layers": [{"layer": 0, "text": 0.5}]}', "missing field 'layers[0].vision'"),
    ('{"rows": [{"policy": "full", "prefill_ms": "fast", "decode_ms": 1}]}',
     "field 'rows[0].prefill_ms' is 'fast', expected a finite number"),
    ('{"skip_per_layer": {"prefill": {"text": [0.5], "vision": [null], "all": [0.5]}}}',
     "missing field 'skip_per_layer.decode'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert plot.cli([str(path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"
    assert list(tmp_path.iterdir()) == [path]


@needs_matplotlib
def test_bad_input_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    result = run_cli(str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {path}: not JSON (Expecting property name enclosed in double quotes at line 1 " \
                            "column 2)\n"
    assert plot.cli([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such file or folder\n"
    (tmp_path / "empty").mkdir()
    assert plot.cli([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty'}: no .json files in it or its sub-folders\n"


# ---------------------------------------------------------------------------------------------------------------
# Several inputs, sub-folders, degenerate numbers (issue 21)


@needs_matplotlib
def test_inputs_with_one_output_name_get_distinct_pngs(tmp_path, capsys):
    """Two alpha.json of different runs into one --out: two PNGs, each named after its run, and a note."""
    for run in ("a", "b", "c/deep"):
        os.makedirs(tmp_path / "runs" / run)
        shutil.copy(os.path.join(FIXTURES, "alpha.json"), tmp_path / "runs" / run / "alpha.json")
    assert plot.cli([str(tmp_path / "runs"), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr()
    written = [line.split(" ", 1)[1] for line in out.out.splitlines() if line.startswith("wrote ")]
    assert len(written) == len(set(written)) == 3 and sorted(os.listdir(tmp_path / "png")) == [
        "a_alpha.alpha.png", "b_alpha.alpha.png", "c_deep_alpha.alpha.png"]
    assert out.err.count("would write") == 3


@needs_matplotlib
def test_the_same_file_twice_is_drawn_once(tmp_path, capsys):
    shutil.copy(os.path.join(FIXTURES, "alpha.json"), tmp_path / "alpha.json")
    assert plot.cli([str(tmp_path / "alpha.json"), str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    assert capsys.readouterr().out.count("wrote ") == 1


@needs_matplotlib
def test_folder_command_descends_into_sub_folders(tmp_path, capsys):
    os.makedirs(tmp_path / "runs" / "vqa" / "t0.5")
    os.makedirs(tmp_path / "runs" / ".hidden")
    shutil.copy(os.path.join(FIXTURES, "alpha.json"), tmp_path / "runs" / "vqa" / "alpha.json")
    shutil.copy(os.path.join(FIXTURES, "bench.json"), tmp_path / "runs" / "vqa" / "t0.5" / "bench.json")
    shutil.copy(os.path.join(FIXTURES, "alpha.json"), tmp_path / "runs" / ".hidden" / "alpha.json")
    assert plot.cli([str(tmp_path / "runs")]) == 0  # PNGs next to each JSON file
    assert os.path.isfile(tmp_path / "runs" / "vqa" / "alpha.alpha.png")
    assert os.path.isfile(tmp_path / "runs" / "vqa" / "t0.5" / "bench.bench.png")
    assert not os.path.exists(tmp_path / "runs" / ".hidden" / "alpha.alpha.png")
    os.makedirs(tmp_path / "empty" / "sub")
    assert plot.cli([str(tmp_path / "empty")]) == 2
    assert "no .json files in it or its sub-folders" in capsys.readouterr().err
    assert plot.cli([""]) == 2


def mapped(x, f):
    """x with every number replaced by f(number)."""
    if isinstance(x, dict):
        return {k: mapped(v, f) for k, v in x.items()}
    if isinstance(x, list):
        return [mapped(v, f) for v in x]
    return f(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def emptied(x):
    if isinstance(x, dict):
        return {k: emptied(v) for k, v in x.items()}
    return [] if isinstance(x, list) else x


DEGENERATE = {"zero": lambda d: mapped(d, lambda v: 0), "negative": lambda d: mapped(d, lambda v: -1),
              "null": lambda d: mapped(d, lambda v: None), "huge": lambda d: mapped(d, lambda v: 1e308),
              "empty tables": emptied}


@needs_matplotlib
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["alpha.json", "bench.json", "generate-kimi.json", "thresholds-0.5.json",
                                  "fidelity-0.5.json"])
@pytest.mark.parametrize("how", DEGENERATE)
def test_degenerate_numbers_are_drawn_or_one_line(tmp_path, capsys, name, how):
    """A zero time, a negative or null value, a number past every axis, a table without rows: a plot, or one
    `error:` line naming the file, never a traceback."""
    (tmp_path / name).write_text(json.dumps(DEGENERATE[how](load(name))))
    status = plot.cli([str(tmp_path / name), "--out", str(tmp_path / "png")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (status, errors) == (0, []) or (status == 2 and len(errors) == 1 and str(tmp_path / name) in errors[0])


@needs_matplotlib
def test_bench_error_rows_are_named_not_drawn(tmp_path):
    """bench.py writes a failed policy as {"policy", "error"}: the plot still draws the other rows."""
    doc = load("bench-skip.json")
    doc["rows"].insert(1, {"policy": "broken", "error": "RuntimeError: out of memory"})
    out = str(tmp_path / "bench.png")
    assert png_size(plot.plot_bench(doc, out)) == expected_size("bench")
    assert png_size(plot.plot_skip(doc, str(tmp_path / "skip.png"))) == expected_size("skip")


# ---------------------------------------------------------------------------------------------------------------
# --table: the README's fidelity tables are the command's output


def readme_table(section, heading_line):
    """The markdown table rows from the first README line that starts with heading_line in the section headed
    section."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    first = lines.index(section)
    start = next(i for i, line in enumerate(lines) if i > first and line.startswith(heading_line))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_tiny_vqa_table_is_the_committed_files(capsys):
    """Every number of README's tiny-vqa table comes from benchmarks/tiny-vqa/fidelity-*.json, as printed by
    `support/plot.py --table` (no matplotlib needed)."""
    files = [os.path.join(ROOT, "benchmarks", "tiny-vqa", f"fidelity-{t}.json") for t in ("0.50", "0.75", "0.80")]
    assert plot.cli([*files, "--table"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == readme_table("## MoDES on the trained tiny model", "| target | policy | skip: all")
    assert len(printed) == 2 + 1 + 3 * 8
    assert printed[2].startswith("| – | no skipping | 0.000 (0.000 / 0.000) | 0.000 | 0 (0–0) | 1.000 "
                                 "(1.000–1.000)")


def test_readme_scenes_table_is_the_committed_files(capsys):
    """README's deep-model table is benchmarks/scenes-12x64/fidelity-*.json as printed, each file scored on at least
    2,000 held-out questions with every policy in it."""
    import baselines
    files = [os.path.join(ROOT, "benchmarks", "scenes-12x64", f"fidelity-{t}.json") for t in ("0.50", "0.75", "0.88")]
    for f in files:
        doc = load(f)
        assert doc["eval_n"] >= 2000 and doc["eval_data"] == "scenes-test", f
        assert {row["policy"] for row in doc["fidelity"]} == {"full", "modes", *baselines.BASELINES}, f
    assert plot.cli([*files, "--table"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == readme_table("## MoDES on a deep model: scenes-12x64", "| target | policy | skip: all")


def test_table_formats_missing_numbers_and_refuses_other_files(tmp_path, capsys):
    doc = dict(load(FIDELITY[1]), target=0.5)  # a file from before the intervals (no brackets) and the target field
    doc["fidelity"][3].update(reached=False, hyper=None, calib_skip=None, kl=None, top1=None, accuracy=None,
                              retention=None, skip=dict(all=None, text=None, vision=None))
    doc["fidelity"][2]["reached"] = False
    lines = plot.fidelity_table([doc, doc]).splitlines()
    assert len(lines) == 2 + 1 + 2 * (len(doc["fidelity"]) - 1), "the unskipped row once"
    assert lines[5].endswith(" ⚠ | – (– / –) | – | – | – | – | – |")
    assert " ⚠ | " in lines[4] and "(" not in lines[4].split(" | ", 4)[4]
    for name, content, message in [("alpha.json", load("alpha.json"),
                                     "not an evaluate.py fidelity file (--table reads only those)"),
                                    ("notarget.json", {k: v for k, v in doc.items() if k != "target"},
                                     "missing field 'target'")]:
        path = tmp_path / name
        path.write_text(json.dumps(content))
        assert plot.cli([str(path), "--table"]) == 2
        assert capsys.readouterr().err == f"error: {path}: {message}\n"
