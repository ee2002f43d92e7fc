"""lmms-eval runs the project's model end to end, offline: lmms_eval_modes.py registers the model id `modes`, and a
local task of easy-VQA test questions is answered by tiny-vqa, unskipped and with a thresholds file searched here;
lmms-eval's exact-match score equals evaluate.py's accuracy on the same questions, and the results file reports the
skip ratio. `lmms_eval_modes.py export` writes the task's documents as the project's JSONL, which data.py reads back
and calibrate.py takes. Skipped when lmms-eval (an optional dependency: pip install lmms-eval==0.7.3 "filelock<4",
and no CUDA-built torchvision beside a CPU torch) or easy-vqa is missing."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
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


def prompted(doc, lmms_eval_specific_kwargs):
    return lmms_eval_specific_kwargs["pre_prompt"] + doc["question"] + lmms_eval_specific_kwargs["post_prompt"]
"""

# variants of evqa_local for the export: prompt options (the default ones are those of the model `modes`), a
# text-only task, a target that is no field, and a document without an answer (its data file written by the fixture)
EXPORT_TASKS = {
    "evqa_prompted": """include: evqa_local.yaml
task: evqa_prompted
doc_to_text: !function utils.prompted
lmms_eval_specific_kwargs:
  default: {pre_prompt: "Look. ", post_prompt: " One word."}
  qwen3_vl: {pre_prompt: "", post_prompt: " Not for modes."}
""",
    "evqa_text": "include: evqa_local.yaml\ntask: evqa_text\ndoc_to_visual: null\n",
    "evqa_answers": "include: evqa_local.yaml\ntask: evqa_answers\ndoc_to_target: answers\n",
    "evqa_no_answer": "include: evqa_local.yaml\ntask: evqa_no_answer\ndataset_kwargs: {data_files: {test: DATA}}\n",
}


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
    rows = open(folder / "test.jsonl").readlines()[:3]
    rows[2] = json.dumps(dict(json.loads(rows[2]), answer="")) + "\n"
    (folder / "no_answer.jsonl").write_text("".join(rows))
    for name, text in EXPORT_TASKS.items():
        (folder / f"{name}.yaml").write_text(text.replace("DATA", str(folder / "no_answer.jsonl")))
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
    hits = evaluate.exact_match(model, proc, read_jsonl(str(task[0] / "test.jsonl")), policy, "cpu", batch_size=4)
    return float(np.mean(hits))


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


def test_max_tiles_caps_internvl_images():
    """model_args max_tiles reaches InternVL's processor (a 4:3 photo is 13 tiles at the folder's 12); 0 is refused
    in one line, as --max-tiles is."""
    from lmms_eval_modes import Modes
    from PIL import Image
    photo = Image.new("RGB", (1600, 1200), "gray")
    message = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "what?"}]}]
    capped = Modes(pretrained="tiny-internvl", device="cpu", max_tiles="6")
    assert capped.proc.max_tiles == 6 and capped.proc(message)["pixel_values"].shape[0] == 7  # 3 x 2 + thumbnail
    assert Modes(pretrained="tiny-internvl", device="cpu").proc(message)["pixel_values"].shape[0] == 13
    with pytest.raises(ValueError, match="--max-tiles must be >= 1, got 0"):
        Modes(pretrained="tiny-internvl", device="cpu", max_tiles="0")


# ---------------------------------------------------------------------------------------------------------------
# export: the task's documents as calibration data


def export(task, *args):
    folder, env = task
    return subprocess.run([sys.executable, "lmms_eval_modes.py", "export", "--include_path", str(folder), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def export_in_process(task, *args):
    """The export without a new interpreter (lmms-eval's import is most of a run): ValueError where the command
    line would print its one error line."""
    import lmms_eval_modes
    lmms_eval_modes.export(lmms_eval_modes.export_parser().parse_args(["--include_path", str(task[0]), *args]))


@pytest.fixture(scope="module")
def exported(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "calib" / "calib.jsonl"  # calib/ is made by the export
    r = export(task, "--tasks", "evqa_local,evqa_prompted", "--out", str(out))
    assert r.returncode == 0 and "export evqa_prompted: 12/12" in r.stderr, r.stderr[-3000:]
    return out


def test_export_reads_back_as_the_task(task, exported):
    """data.py reads the export as the task's documents: the same questions (evqa_prompted's with its default prompt
    options, the ones a run of `modes` gets), answers and pixels; nothing else is left beside it."""
    from PIL import Image

    from data import read_jsonl
    docs = [json.loads(line) for line in open(task[0] / "test.jsonl")]
    samples = read_jsonl(str(exported))
    assert len(samples) == 2 * N and sorted(os.listdir(exported.parent)) == ["calib-images", "calib.jsonl"]
    distinct = {Image.open(d["image"]).convert("RGB").tobytes() for d in docs}  # easy-VQA asks several per image
    assert len(os.listdir(exported.parent / "calib-images")) == len(distinct) < N
    assert [s.question for s in samples] == [d["question"] for d in docs] + [f"Look. {d['question']} One word."
                                                                            for d in docs]
    assert [s.answer for s in samples] == [d["answer"] for d in docs] * 2
    for s, d in zip(samples, docs * 2):
        [image] = s.images
        assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(d["image"]).convert("RGB")))
        assert s.video is None
    assert all(json.loads(line)["image"][0].startswith("calib-images/") for line in open(exported))


def test_calibrate_takes_the_export(task, exported, tmp_path):
    r = subprocess.run([sys.executable, "calibrate.py", "--model", "tiny-vqa", "--data", str(exported), "--n", "4",
                        "--batch-size", "4", "--quiet", "--out", str(tmp_path / "alpha.json")], cwd=ROOT, env=task[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "alpha.json"))["data"]["n"] == 4


def test_export_replaces_an_earlier_one_whole(task, tmp_path):
    """A failing export (a document without an answer, after a whole task staged) leaves the earlier export as it
    was and nothing beside it; a finished one replaces the file and the images folder together."""
    out = tmp_path / "calib.jsonl"
    export_in_process(task, "--tasks", "evqa_local", "--out", str(out))
    before = out.read_text(), sorted(os.listdir(tmp_path / "calib-images"))
    with pytest.raises(ValueError, match="evqa_no_answer test document 2: no reference answer"):
        export_in_process(task, "--tasks", "evqa_local,evqa_no_answer", "--out", str(out))
    assert (out.read_text(), sorted(os.listdir(tmp_path / "calib-images"))) == before
    assert sorted(os.listdir(tmp_path)) == ["calib-images", "calib.jsonl"]
    export_in_process(task, "--tasks", "evqa_prompted", "--limit", "3", "--out", str(out))
    assert len(out.read_text().splitlines()) == 3 and os.listdir(tmp_path / "calib-images") == ["000000-0.png"]
    assert sorted(os.listdir(tmp_path)) == ["calib-images", "calib.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "evqa_lokal"], "--tasks 'evqa_lokal': no such lmms-eval task"),
    (["--tasks", "evqa_text"], "--tasks evqa_text: no document has an image or a video"),
    (["--tasks", "evqa_answers"], "--tasks evqa_answers: doc_to_target 'answers' is no field"),
    (["--tasks", "evqa_local", "--split", "train"], "--split train: task evqa_local has the splits test"),
    (["--tasks", "evqa_local", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "evqa_local", "--out", os.path.join(ROOT, "README.md", "x.jsonl")], "is a file, not a folder"),
])
def test_export_refuses_bad_input(task, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        export_in_process(task, "--out", str(tmp_path / "calib.jsonl"), *args)
    assert os.listdir(tmp_path) == []


def test_export_error_is_one_line(task, tmp_path):
    """On the command line bad input is one `error:` line naming the argument and exit status 2, no traceback; an
    images folder the export did not make is not replaced."""
    (tmp_path / "calib-images").mkdir()
    r = export(task, "--tasks", "evqa_local", "--out", str(tmp_path / "calib.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("error: --out ") and len(r.stderr.splitlines()) == 1
    assert "calib-images exists but is not the images folder" in r.stderr and not r.stdout
    assert os.listdir(tmp_path) == ["calib-images"]


class StubTask:
    """What export_doc asks of an lmms-eval task, for documents no local task needs to hold."""

    def __init__(self, output_type, target, visuals, choices=None):
        self.OUTPUT_TYPE, self.target, self.visuals, self.choices = output_type, target, visuals, choices
        self.config = type("Config", (), {"num_fewshot": None})

    def fewshot_context(self, doc, num_fewshot):
        return doc["question"]

    def doc_to_target(self, doc):
        return self.target

    def doc_to_visual(self, doc):
        return self.visuals

    def doc_to_choice(self, doc):
        return self.choices


def test_export_doc_video_and_references(tmp_path):
    """A video file becomes a folder of --max-frames frames (as the model `modes` samples it) that data.py reads;
    several references give the most frequent, a multiple-choice index its choice."""
    import av

    from data import read_jsonl
    from lmms_eval_modes import export_doc
    video = str(tmp_path / "clip.mp4")
    with av.open(video, "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 25 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (tmp_path / "d-images").mkdir()
    rows = [export_doc(StubTask("generate_until", ["red", "blue", "blue", "red ", "blue"], [video]),
                       {"question": "which colour?"}, "doc 0", str(tmp_path / "d-images"), "000000", 4, {}),
            export_doc(StubTask("multiple_choice", 1, [video], ["yes", "no"]), {"question": "is it red?"}, "doc 1",
                       str(tmp_path / "d-images"), "000001", 4, {})]
    assert [(r["answer"], r["video"]) for r in rows] == [("blue", "d-images/000000-video"),
                                                         ("no", "d-images/000001-video")]
    assert len(os.listdir(tmp_path / "d-images" / "000000-video")) == 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [s.video for s in read_jsonl(str(tmp_path / "d.jsonl"))] == [str(tmp_path / "d-images" / f"00000{i}-video")
                                                                         for i in range(2)]
