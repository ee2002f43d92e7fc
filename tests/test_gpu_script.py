"""benchmarks/gpu.sh --dry-run: the GPU command's plumbing on a CPU (tiny models and shapes, the same steps and
output), so a lent GPU's few minutes are not spent discovering a typo."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["probe", "gpu-tests", "experts", "tiles", "qwen-decode", "qwen-prefill-b8", "kimi-decode", "kimi-prefill-b8",
         "qwen-decode-compiled", "kimi-decode-compiled"]


def test_dry_run_produces_every_result(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), BUDGET="1500", MODES_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1600)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    status = {d["step"]: d["status"] for d in lines if "status" in d}
    log = (tmp_path / "log.txt").read_text()
    assert status == {s: "ok" for s in STEPS}, log[-3000:]
    data = {}
    for d in lines:
        if "data" in d:
            data.setdefault(d["step"], []).append(d["data"])
    assert any("copy_bandwidth_gb_s" in d for d in data["probe"]) and any("sdpa" in d for d in data["probe"])
    assert all(d["ok"] for d in data["experts"] if "check" in d) and any("us" in d for d in data["experts"])
    assert data["tiles"]  # measured under TRITON_INTERPRET, else one line saying why not
    for step in ("qwen-decode", "kimi-decode", "qwen-decode-compiled", "kimi-decode-compiled"):
        [bench] = data[step]
        assert [row["policy"] for row in bench["rows"]][:2] == ["full", "threshold"], step
        assert all(row["graph_check"]["tokens_equal"] for row in bench["rows"] if "graph_check" in row), step
        assert bench["rows"][1]["skip_prefill_all"] >= 0.88
    assert [row["policy"] for row in data["qwen-decode"][0]["rows"]] == ["full", "threshold", "transformers"]
    assert data["qwen-prefill-b8"][0]["batch"] == 2
