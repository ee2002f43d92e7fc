"""lmms-eval runs the project's model end to end, offline: lmms_eval_modes.py registers the model id `modes`, and a
local task of easy-VQA test questions is answered by tiny-vqa, unskipped and with a thresholds file searched here;
lmms-eval's exact-match score equals evaluate.py's accuracy on the same questions, and the results file reports the
skip ratio. Skipped when lmms-eval (an optional dependency: pip install lmms-eval==0.7.3 "filelock<4", and no
CUDA-built torchvision beside a CPU torch) or easy-vqa is missing."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional: pip install lmms-eval==0.7.3)")
easy_vqa = pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install easy-vqa)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 12

TASK = """task: evqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
"""

UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A local lmms-eval task of the first N easy-VQA test questions (the project's JSONL fields)."""
    folder = tmp_path_factory.mktemp("lmms")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    with open(folder / "test.jsonl", "w") as f:
        for q, a, i in list(zip(questions, answers, image_ids))[:N]:
            f.write(json.dumps(dict(question=q, answer=a, image=paths[i])) + "\n")
    (folder / "evqa_local.yaml").write_text(TASK.format(data=folder / "test.jsonl"))
    (folder / "utils.py").write_text(UTILS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(folder / "hf"),
               OMP_NUM_THREADS="1")
    return folder, env


def run_lmms(task, name, model_args, tasks="evqa_local"):
    folder, env = task
    out = folder / name
    r = subprocess.run([sys.executable, "lmms_eval_modes.py", "--model", "modes", "--model_args", model_args,
                        "--tasks", tasks, "--include_path", str(folder), "--batch_size", "5",
                        "--output_path", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    # lmms-eval exits 0 even when the evaluation failed: the results file is the proof
    assert r.returncode == 0 and len(files) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    return json.load(open(files[0])), r.stderr


def accuracy(task, thresholds=None):
    """evaluate.py's exact-match accuracy on the task's questions: what lmms-eval must report."""
    import evaluate
    import processor
    import router
    from data import read_jsonl
    from model import load
    path = os.path.join(ROOT, "checkpoints", "tiny-vqa")
    proc = processor.for_model(path, "qwen3_vl_moe")
    model = load(path, dtype=torch.float32, special_ids=proc.special_ids)
    policy = router.load_thresholds(thresholds, model) if thresholds else None
    return evaluate.exact_match(model, proc, read_jsonl(str(task[0] / "test.jsonl")), policy, "cpu", batch_size=4)


def test_unskipped(task):
    doc, err = run_lmms(task, "full", "pretrained=tiny-vqa")
    score = doc["results"]["evqa_local"]["exact_match,none"]
    assert score == pytest.approx(accuracy(task)) and score >= 0.9
    assert doc["throughput"]["avg_skip_ratio"] == 0.0 and "modes: skipped routed-expert slots" in err


def test_with_thresholds(task):
    folder, env = task
    thr = folder / "thr.json"
    r = subprocess.run([sys.executable, "search.py", "--model", "tiny-vqa", "--data", "easy-vqa-train", "--n", "16",
                        "--batch-size", "16", "--grid", "12", "--target", "0.6", "--quiet", "--alpha",
                        str(folder / "alpha.json"), "--out", str(thr)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc, _ = run_lmms(task, "modes", f"pretrained=tiny-vqa,thresholds={thr}")
    score = doc["results"]["evqa_local"]["exact_match,none"]
    assert score == pytest.approx(accuracy(task, str(thr)))
    skip = doc["throughput"]
    assert 0.3 < skip["avg_skip_ratio"] < 1 and skip["avg_skip_ratio/evqa_local"] == skip["avg_skip_ratio"]
    assert 0.3 < skip["avg_skip_ratio_prefill"] < 1


def test_loglikelihood_prefers_the_answer(task):
    """loglikelihood (multiple-choice tasks), called as lmms-eval calls it: of the 13 easy-VQA answers, tiny-vqa's
    most likely one is the reference. (lmms-eval 0.7.3 cannot score a multiple_choice task end to end: it turns
    every model's (loglikelihood, greedy) pairs into strings before its metrics read them.)"""
    from lmms_eval.api.instance import Instance
    from lmms_eval_modes import Modes
    from PIL import Image
    folder, _ = task
    docs = [json.loads(line) for line in open(folder / "test.jsonl")][:6]
    lm = Modes(pretrained="tiny-vqa", device="cpu", batch_size=7)
    lm.task_dict = {"evqa": {"test": docs}}
    choices = sorted(set(easy_vqa.get_test_questions()[1]))
    visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]  # noqa: E731
    requests = [Instance("loglikelihood", (doc["question"], " " + c, visual, i, "evqa", "test"), idx=k,
                         metadata=dict(task="evqa", doc_id=i, repeats=1))
                for i, doc in enumerate(docs) for k, c in enumerate(choices)]
    out = lm.loglikelihood(requests)
    assert len(out) == len(requests) and all(isinstance(ll, float) and isinstance(g, bool) for ll, g in out)
    for i, doc in enumerate(docs):
        lls = [ll for ll, _ in out[i * len(choices):(i + 1) * len(choices)]]
        assert choices[lls.index(max(lls))] == doc["answer"]
        assert out[i * len(choices) + choices.index(doc["answer"])][1]  # greedy decoding gives it too
