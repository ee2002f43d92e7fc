"""bench.py's output as a run cut short would leave it: a header line, then one JSON line per row printed the moment
the row is measured, a row that raises as an error row (the next rows still run), and the whole result last."""
import json

import pytest
import torch

import bench
from support import measure


def records(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_rows_are_printed_as_measured_and_a_failing_row_is_an_error_row(monkeypatch, capsys, tmp_path):
    printed_before = []  # stdout so far, each time a policy row starts measuring
    measure, shared_policy = bench.measure, bench.shared_policy

    def watched_measure(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return measure(*args, **kwargs)

    def failing_threshold(name, *args):
        if name == "threshold":
            raise RuntimeError("the fit exploded\nsecond line")
        return shared_policy(name, *args)

    def failing_transformers(*args):
        raise ImportError("no transformers here")
    monkeypatch.setattr(bench, "measure", watched_measure)
    monkeypatch.setattr(bench, "shared_policy", failing_threshold)
    monkeypatch.setattr(bench, "transformers_row", failing_transformers)
    args = bench.parser().parse_args(["--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--policy",
                                      "full,threshold,reduce-k", "--compare-transformers", "--check-graph",
                                      "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit) as exit:
        bench.main(args)
    assert exit.value.code == 1  # a run with an error row says so in its status, after printing everything
    out, err = capsys.readouterr()
    lines = records("".join(printed_before) + out)
    assert [d.get("record") for d in lines] == ["header", "row", "row", "row", "row", None]
    header, full, threshold, reduced, hf, result = lines
    assert header["copy_bandwidth_timer"] == "host" and header["copy_bandwidth_gb_s"] > 0
    assert [r["policy"] for r in (full, threshold, reduced, hf)] == ["full", "threshold", "reduce-k", "transformers"]
    assert threshold == dict(record="row", policy="threshold", error="RuntimeError: the fit exploded")
    assert hf == dict(record="row", policy="transformers", error="ImportError: no transformers here")
    assert full["decode_ms"] > 0 and reduced["decode_ms"] > 0 and reduced["speedup_decode"] > 0  # later rows ran
    assert full["graph_check"]["ok"] and full["graph_check"]["bitwise_equal"]  # an eager step is eager decoding
    # streamed: the full row was on stdout before reduce-k began measuring (threshold fails before measuring)
    assert len(printed_before) == 2 and '"policy": "full"' in printed_before[1]
    assert [r["policy"] for r in result["rows"]] == ["full", "threshold", "reduce-k", "transformers"]
    assert result == json.loads((tmp_path / "b.json").read_text())
    assert result["rows"][0] == {k: v for k, v in full.items() if k != "record"}
    assert "RuntimeError: the fit exploded" in err and "Traceback" in err  # the whole story on stderr
    assert err.strip().splitlines()[-1].startswith("error: 2 of 4 rows failed: threshold: RuntimeError")
    assert "threshold | error: RuntimeError: the fit exploded" in "".join(printed_before) + out  # the table too


def test_row_lines_keep_the_numbers_before_the_long_lists():
    """gpu.sh shows the first 600 characters of a long line on stdout: the per-layer lists come last."""
    args = bench.parser().parse_args(["--repeats", "1", "--warmup", "0", "--decode-steps", "1"])
    bench.check_args(args)
    row = dict(policy="full", decode_ms=2.0, ttft_ms=5.0, prefill_ms=4.0, skip_per_layer=[0.1] * 500)
    assert bench.table_line(row, args).startswith("full | - | - | - | 4.0 | 5.0 | 2.00 | 500.0")
    assert bench.table_line(dict(policy="x", error="E: boom"), args) == "x | error: E: boom"


def test_copy_bandwidth_says_how_it_was_timed():
    bandwidth, timer = measure.copy_bandwidth("cpu", 1 << 20)
    assert bandwidth > 0 and timer == "host"
    if torch.cuda.is_available():
        assert measure.copy_bandwidth("cuda", 1 << 24)[1] == "cuda events"


def test_step_memory_sees_every_allocation_on_a_cpu():
    w = torch.randn(256, 1024)
    peak, retained = measure.step_memory(lambda t: (w.clone() * 2).sum() + t, torch.ones(()), "cpu")
    assert peak >= 2 * w.nbytes and retained == 0  # the clone and its double, both released
    kept = []
    peak, retained = measure.step_memory(lambda t: kept.append(w + t), torch.ones(()), "cpu")
    assert peak == retained == w.nbytes
