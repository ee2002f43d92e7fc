"""
The project's models inside lmms-eval (0.7), the harness the paper's numbers come from: model id `modes`, with real
expert skipping. Optional: only this file imports lmms-eval, and nothing in the project imports this file.

    python lmms_eval_modes.py --model modes --model_args pretrained=~/Qwen3-VL-30B-A3B-Instruct,\\
thresholds=thresholds-qwen3-0.85.json,device=cuda,dtype=bfloat16 --tasks mme,textvqa_val --batch_size 8 \\
        --output_path runs/lmms

Run as a script, this file registers `modes` in lmms-eval's model registry (a ModelManifest, lmms-eval's own
mechanism: nothing of lmms-eval is edited) and hands its command line to lmms-eval's CLI, so every lmms-eval option
works as with `python -m lmms_eval` (also under `torchrun --nproc_per_node N`: lmms-eval shards the documents, one
model per process).

--model_args (comma separated key=value):
    pretrained    checkpoint folder or built-in name (tiny-vqa, tiny-qwen, ...)       default tiny-qwen
    thresholds    search.py's thresholds file: MoDES skips experts (none: the unskipped model)
    device        cpu, cuda or cuda:N (under torchrun each rank's LOCAL_RANK GPU)    default cuda if there is one
    dtype         float32 or bfloat16                                                 default bfloat16 on cuda
    max_frames    frames sampled from a video file (mp4, ... decoded with PyAV)      default 32
    max_tiles     InternVL-3.5: at most this many 448 px tiles per image             default the folder's (12)
    expert_impl   as generate.py --expert-impl; compile as generate.py --compile (default: on for cuda)

What the class does: generate_until (images, videos, greedy, cut at the task's `until` strings, its
max_new_tokens), batched --batch_size prompts at a time through generate.py's generate (every row as alone), and
loglikelihood (multiple-choice tasks). The skip ratios it reaches are counted per task (router.SkipStats through
generate.RowStats, padding and finished rows never counted) and reported through lmms-eval's log_metrics: the
results file's `throughput` block gets avg_skip_ratio (all routed slots of prefill and decode), avg_skip_ratio_prefill,
avg_skip_ratio_decode and avg_skip_ratio/<task> per task; the log prints them next to the metrics.

A video file becomes a folder of max_frames frames sampled uniformly (PyAV, an lmms-eval dependency), which the
processors read as a video taken at 2 frames per second: the frames are right, the timestamps Qwen3-VL writes into
the prompt are only right for a video of max_frames / 2 seconds.

`export` writes tasks' documents as the project's JSONL, so that calibrate.py, search.py and evaluate.py --data run
on lmms-eval's questions, the paper's calibration set GQA testdev among them (lmms-eval's task gqa: its short
answers and lmms-eval's prompt, where --gqa-questions takes GQA's fullAnswer sentences):

    python lmms_eval_modes.py export --tasks gqa --out runs/gqa.jsonl         # + runs/gqa-images/
    python calibrate.py --model ~/Qwen3-VL-30B-A3B-Instruct --data runs/gqa.jsonl --n 1024 --seed 0 --device cuda
    python lmms_eval_modes.py export --tasks my_vqa --include_path ~/lmms-tasks --limit 100 --out runs/my.jsonl

A line per document: the question is the context lmms-eval sends the model `modes` (the task's description,
few-shot examples and doc_to_text with the default lmms_eval_specific_kwargs: its pre_prompt and post_prompt), the
answer the reference (the most frequent of several, as VQA's ten; for a multiple-choice or loglikelihood task the
right continuation, which the teacher-forced calibration then scores), the images doc_to_visual's PIL images as PNG
files in runs/gqa-images/ (one file per different image), a video file as a folder of --max-frames frames there (a
frame folder or GIF by its path). --split picks another split than the scored one (the test split, else
validation): calibrating on the questions a benchmark then scores tunes the thresholds to them. Multi-round tasks,
text-only tasks, audio and documents without an answer are refused in one line. Everything is written beside --out
first and moved into place at the end: an interrupted or failing export leaves an earlier one as it was.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

try:
    from lmms_eval.api.model import lmms
except ImportError:  # the optional dependency: one line saying how to get it, not a traceback
    print('error: lmms_eval_modes.py needs the optional lmms-eval package: pip install lmms-eval==0.7.3 "filelock<4" '
          "(README, \"The paper's benchmarks through lmms-eval\")", file=sys.stderr)
    sys.exit(2)

import cli
import model as modelling
import processor
import router
from generate import RowStats, generate, pad_prompts, until_stop
from parallel import Shard
from support import tiny


class Modes(lmms):
    """lmms-eval's simple-model interface around model.py's models, with an optional MoDES policy."""
    is_simple = True

    def __init__(self, pretrained="tiny-qwen", thresholds=None, device=None, dtype=None, batch_size=1,
                 max_frames=32, max_tiles=None, expert_impl="auto", compile=None, **kwargs):
        super().__init__()
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and self._world_size > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        self._device = torch.device(cli.check_device(device))
        dtype = dtype or ("bfloat16" if self._device.type == "cuda" else "float32")
        cli.check(dtype in cli.DTYPES, f"dtype={dtype}: choose {' or '.join(cli.DTYPES)}")
        self.batch_size = int(batch_size)  # a str when --batch_size is given
        cli.check(self.batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        self.max_frames = int(max_frames)
        self.compile = self._device.type == "cuda" if compile is None else bool(compile)
        self.path = tiny.resolve(os.path.expanduser(str(pretrained)))
        cfg = modelling.read_config(self.path)
        max_tiles = cli.check_max_tiles(None if max_tiles is None else int(max_tiles))
        self.proc = processor.for_model(self.path, cfg.model_type, max_tiles)
        # the thresholds are checked against the architecture before the weights load
        policy = router.load_thresholds(thresholds, modelling.build(cfg, "meta")) if thresholds else None
        net = modelling.load(self.path, str(self._device), cli.DTYPES[dtype], Shard(),
                             processor.special_token_ids(self.path))
        self.model = modelling.set_expert_impl(net, expert_impl)
        router.install(self.model, policy)
        self.counts = {}  # task -> skip counts [2, L, 3, 2] (router.SkipStats layout), this rank's
        self.frames = {}  # video file -> folder of sampled frames
        self.tmp = tempfile.TemporaryDirectory(prefix="modes-lmms-")
        self.generated_tokens, self.seconds = 0, 0.0

    @property
    def device(self):
        return self._device

    # -----------------------------------------------------------------------------------------------------------
    # prompts

    def messages(self, context, visuals):
        """One user turn: the task's images, then its videos (paths), then its text."""
        content = []
        for v in visuals or []:
            if isinstance(v, str):
                content.append({"type": "video", "video": self.video(v)})
            else:  # a PIL image
                content.append({"type": "image", "image": v})
        return [{"role": "user", "content": content + [{"type": "text", "text": context}]}]

    def video(self, path):
        """A video as the processors read it: a folder of frames or a GIF as it is; a video file -> a folder of
        max_frames frames sampled uniformly, decoded once per run."""
        if os.path.isdir(path) or path.lower().endswith(".gif"):
            return path
        if path not in self.frames:
            self.frames[path] = sample_frames(path, os.path.join(self.tmp.name, str(len(self.frames))),
                                              self.max_frames)
        return self.frames[path]

    def doc_visuals(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        return [visuals] if visuals is not None and not isinstance(visuals, list) else visuals

    # -----------------------------------------------------------------------------------------------------------
    # lmms-eval's interface

    def generate_until(self, requests):
        """Greedy answers, one str per request in request order, batch_size prompts at a time (grouped by task
        and generation settings, which a batch shares)."""
        groups = {}
        for i, r in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            groups.setdefault((task, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        out = [None] * len(requests)
        for (task, _), indices in groups.items():
            gen_kwargs = requests[indices[0]].args[1]
            until = gen_kwargs.get("until") or ["\n\n"]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or 128)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.proc(self.messages(requests[i].args[0], self.doc_visuals(*requests[i].args[2:])))
                           for i in chunk]
                tokens = self.generate(prompts, max_new, task)
                for i, row in zip(chunk, tokens):
                    text = self.proc.decode(row)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
        self.report()
        return out

    def generate(self, prompts, max_new_tokens, task):
        """Token ids (up to each row's stop) of the prompts generated together; their skip counts go to `task`."""
        input_ids, attention_mask, pixels = pad_prompts(prompts, self.proc.pad_token_id, self._device)
        stats = RowStats(len(prompts), len(self.model.layers), self._device)
        t0 = time.perf_counter()
        tokens = generate(self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                          stop_ids=self.proc.stop_token_ids, stats=stats, compile=self.compile, **pixels)
        self.seconds += time.perf_counter() - t0
        rows = [until_stop(row, self.proc.stop_token_ids) for row in tokens]
        self.generated_tokens += sum(map(len, rows))
        counts = stats.counts.sum(2).cpu()  # [2, L, 3, 2], the rows summed
        self.counts[task] = self.counts.get(task, 0) + counts
        return rows

    def loglikelihood(self, requests):
        """(log P(continuation | prompt), whether greedy decoding would give it) per request: the task's context
        as the user turn (with its images and videos), the continuation as the start of the answer. (lmms-eval
        0.7.3 itself turns these pairs into strings before its multiple_choice metrics read them, which then fail
        for every model: api/instance.py, unwrap_generation_output.)"""
        out = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            seqs, spans = [], []
            for r in chunk:
                context, continuation, doc_to_visual, doc_id, task, split = r.args
                doc = self.task_dict[task][split][doc_id]
                continuation = continuation(doc) if callable(continuation) else continuation
                continuation = continuation.lstrip()  # the task's " " delimiter: the answer starts the turn
                prompt = self.proc(self.messages(context, self.doc_visuals(doc_to_visual, doc_id, task, split)))
                answer = self.proc.encode(continuation)
                cli.check(answer, f"{task} document {doc_id}: empty continuation")
                seqs.append(dict(prompt, input_ids=torch.cat([prompt["input_ids"], torch.tensor(answer)])))
                spans.append(len(answer))
            input_ids, attention_mask, pixels = pad_prompts(seqs, self.proc.pad_token_id, self._device)
            with torch.no_grad():  # the head on the answer positions only: [B, S, V] would dwarf the rest
                h = self.model.layers(*self.model.embed(input_ids, attention_mask, **pixels))
                logits = self.model.head(h[:, -max(spans) - 1:]).float()  # [B, n + 1, V]
            for b, n in enumerate(spans):
                target = input_ids[b, -n:]
                logp = logits[b, -n - 1:-1].log_softmax(-1)  # the logits at p predict token p + 1
                out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("modes: multi-round generation is not supported")

    # -----------------------------------------------------------------------------------------------------------
    # the skip ratios, per task, through lmms-eval's throughput metrics

    def report(self):
        """Log the skip ratios reached so far (summed over ranks) with lmms-eval's log_metrics; the results file
        averages each key into its throughput block."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        tasks = sorted(self.task_dict or self.counts)  # every rank the same list, whatever its documents
        if not tasks:
            return
        zero = torch.zeros(len(router.PHASES), len(self.model.layers), 3, 2, dtype=torch.int64)
        counts = torch.stack([self.counts.get(t, zero) for t in tasks]).to(self._device)  # [tasks, 2, L, 3, 2]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        counts = counts.cpu()
        ratios = {"skip_ratio": summary(counts.sum(0))["total"]["all"],
                  "skip_ratio_prefill": summary(counts.sum(0))["prefill"]["all"],
                  "skip_ratio_decode": summary(counts.sum(0))["decode"]["all"]}
        ratios.update({f"skip_ratio/{t}": summary(c)["total"]["all"] for t, c in zip(tasks, counts)})
        ratios = {k: v for k, v in ratios.items() if v is not None}  # a task with no generation has no ratio
        if self._rank == 0:
            log_metrics(total_elapsed_time=self.seconds, total_gen_tokens=self.generated_tokens,
                        avg_speed=self.generated_tokens / max(self.seconds, 1e-9), additional_metrics=ratios)
            print("modes: skipped routed-expert slots " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()),
                  file=sys.stderr)


def sample_frames(path, folder, max_frames):
    """folder, made and filled with max_frames frames of the video file sampled uniformly (PyAV, an lmms-eval
    dependency), as PNG files in order: the video form the processors and data.py read."""
    import av
    import numpy as np
    with av.open(path) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    cli.check(frames, f"{path}: no video frames")
    os.makedirs(folder)
    for i, k in enumerate(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round()):
        frames[int(k)].convert("RGB").save(os.path.join(folder, f"{i:05d}.png"))
    return folder


def summary(counts):
    stats = router.SkipStats(counts.shape[1])
    stats.counts.copy_(counts)
    return stats.summary()


def manifest():
    """lmms-eval's registration record of `modes` (also usable as an entry point of group lmms_eval.models)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="modes", simple_class_path=f"{__name__}.Modes")


# ---------------------------------------------------------------------------------------------------------------
# export: lmms-eval tasks' documents as the project's JSONL, for calibrate.py, search.py and evaluate.py --data

SINGLE_TURN = ("generate_until", "multiple_choice", "loglikelihood")  # the output types whose prompt is one turn
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def export_parser():
    p = argparse.ArgumentParser(
        prog="lmms_eval_modes.py export", formatter_class=cli.HelpFormatter,
        description="Write lmms-eval tasks' documents as the project's JSONL (calibrate.py, search.py, evaluate.py "
        "--data): per document the prompt lmms-eval gives the model `modes`, the reference answer, and its images "
        "as PNG files in a folder beside the file (calib.jsonl: calib-images/).")
    p.add_argument("--tasks", required=True, help="lmms-eval task, group or tag names or task YAML files, comma "
                   "separated (wildcards as lmms-eval's --tasks)")
    p.add_argument("--out", required=True, help="JSONL file to write (an earlier export there is replaced)")
    p.add_argument("--include-path", "--include_path", dest="include_path",
                   help="folder of local task YAMLs, as lmms-eval's --include_path")
    p.add_argument("--split", help="the dataset split to export (default: the one lmms-eval scores, the task's "
                   "test_split, else its validation_split)")
    p.add_argument("--limit", type=int, help="at most this many documents per task, the first ones (default: all)")
    p.add_argument("--max-frames", type=int, default=32, help="frames sampled from a video file into a folder of "
                   "PNGs, as --model_args max_frames")
    return p


def export(args):
    """Load the tasks, write every chosen document into a temporary folder beside --out, then move the JSONL and
    its images folder into place: an interrupted or refused export leaves an earlier one as it was."""
    cli.check(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    cli.check(args.max_frames >= 1, f"--max-frames must be >= 1, got {args.max_frames}")
    cli.check_output(args.out)
    images = os.path.splitext(args.out)[0] + "-images"
    cli.check(not os.path.lexists(images) or (os.path.isdir(images) and os.path.isfile(args.out)),
              f"--out {args.out}: {images} exists but is not the images folder of an export to {args.out}; move it "
              f"or choose another --out")
    include_path = cli.check_input_path(args.include_path, "--include_path")
    cli.check(include_path is None or os.path.isdir(include_path), f"--include_path {include_path}: not a folder")
    tasks = load_tasks(args.tasks, include_path, args.split, args.limit)

    try:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder, prefix=f".{os.path.basename(args.out)}.", suffix=".tmp")
    except OSError as e:  # what check_output cannot see: a file system that refuses files (/proc), a full disk
        raise OSError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    try:
        staged = os.path.join(tmp, os.path.basename(images))
        os.makedirs(staged)
        lines, n_images, n_videos, saved = [], 0, 0, {}
        for name, task, split, n in tasks:
            progress = cli.Progress(f"export {name}", n)
            visuals_before = n_images + n_videos
            for doc_id in range(n):
                row = export_doc(task, task.dataset[split][doc_id], f"{name} {split} document {doc_id}", staged,
                                 f"{len(lines):06d}", args.max_frames, saved)
                n_images, n_videos = n_images + len(row.get("image", [])), n_videos + ("video" in row)
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                progress.update(doc_id + 1, finished=doc_id + 1 == n)
            cli.check(n_images + n_videos > visuals_before, f"--tasks {name}: no document has an image or a video "
                      f"(a text-only task); the project's data are image and video questions")
        with open(os.path.join(tmp, os.path.basename(args.out)), "w", encoding="utf-8") as f:
            f.writelines(lines)
        cli.follow_umask(tmp)
        # each rename is atomic: a reader sees the earlier export or this one, never a half-written file or folder
        if os.path.isdir(images):
            os.rename(images, os.path.join(tmp, "earlier"))
        os.rename(staged, images)
        os.replace(os.path.join(tmp, os.path.basename(args.out)), args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.out}: {len(lines)} questions with {n_images} images ({len(saved)} files) and {n_videos} videos in "
          f"{images}/")


def load_tasks(names, include_path, split, limit):
    """[(name, task, split, number of documents)] of --tasks, loaded by lmms-eval's TaskManager as a run of the
    model `modes` loads them (so a task's lmms_eval_specific_kwargs give their default prompt options)."""
    from lmms_eval.tasks import TaskManager, get_task_dict
    from lmms_eval.utils import eval_logger, load_yaml_config
    eval_logger.remove()  # as lmms-eval's command line does at --verbosity WARNING: no debug lines of its indexing
    eval_logger.add(sys.stderr, level="WARNING")
    manager = TaskManager("ERROR", include_path=include_path, model_name="modes")
    chosen = []
    for name in names.split(","):
        matched = manager.match_tasks([name]) or ([load_yaml_config(name)] if os.path.isfile(name) else [])
        cli.check(matched, f"--tasks {name!r}: no such lmms-eval task (python lmms_eval_modes.py --tasks list names "
                  f"them; a local task needs --include_path FOLDER)")
        try:
            loaded = get_task_dict(matched, manager)
        except Exception as e:  # lmms-eval's or the datasets library's, from building the task or fetching its data
            raise ValueError(f"--tasks {name}: lmms-eval cannot load it ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
        for task_name, task in sorted(leaf_tasks(loaded)):
            cli.check(task.OUTPUT_TYPE in SINGLE_TURN, f"--tasks {task_name}: output_type {task.OUTPUT_TYPE}; only "
                      f"tasks of one question and one answer ({', '.join(SINGLE_TURN)}) export")
            target = task.config.doc_to_target
            # a name that is no field renders as itself: every answer would be that word (a task that scores its
            # documents' own fields in process_results, as textvqa's "answer" with documents of "answers")
            cli.check(not isinstance(target, str) or target in task.features or "{{" in target,
                      f"--tasks {task_name}: doc_to_target {target!r} is no field of its documents "
                      f"({', '.join(task.features)}), so they have no reference answer to export")
            task_split = split or task.config.test_split or task.config.validation_split
            cli.check(task_split, f"--tasks {task_name}: no test or validation split; name one with --split")
            cli.check(task_split in task.dataset, f"--split {task_split}: task {task_name} has the splits "
                      f"{', '.join(task.dataset)}")
            n = len(task.dataset[task_split]) if limit is None else min(limit, len(task.dataset[task_split]))
            cli.check(n, f"--tasks {task_name}: split {task_split} has no documents")
            chosen.append((task_name, task, task_split, n))
    return chosen


def leaf_tasks(task_dict):
    """(name, task) of get_task_dict's answer, groups opened."""
    for name, value in task_dict.items():
        if isinstance(value, dict):
            yield from leaf_tasks(value)
        else:
            yield name, value


def export_doc(task, doc, where, staged, stem, max_frames, saved):
    """One document as a line of the project's JSONL: the question as lmms-eval builds the context it sends the
    model (the task's description, few-shot examples and doc_to_text with its prompt options), the reference answer
    (reference_answer), and the visuals of doc_to_visual: PIL images as PNG files, a video as a folder of frames,
    written into staged and named relative to the JSONL. saved maps the pixels of the images written so far to their
    files: many questions share an image (GQA's 12,578 testdev questions ask about 398)."""
    from PIL import Image
    question = task.fewshot_context(doc=doc, num_fewshot=task.config.num_fewshot or 0)
    cli.check(isinstance(question, str) and question.strip(), f"{where}: no question (the context is {question!r})")
    answer = reference_answer(task, doc)
    cli.check(answer, f"{where}: no reference answer (doc_to_target); a split without answers (a test split scored "
              f"by a server) cannot be exported: choose another --split")
    visuals = task.doc_to_visual(doc) or []
    visuals = visuals if isinstance(visuals, list) else [visuals]
    odd = [type(v).__name__ for v in visuals if not isinstance(v, (Image.Image, str))]
    cli.check(not odd, f"{where}: doc_to_visual gave {', '.join(odd)}; only images and videos export (audio "
              f"does not)")
    videos = [v for v in visuals if isinstance(v, str)]
    cli.check(len(videos) <= 1, f"{where}: {len(videos)} videos; the project's JSONL holds one per question")
    row, relative = {"question": question, "answer": answer}, os.path.basename(staged)
    for k, im in enumerate(v for v in visuals if isinstance(v, Image.Image)):
        # PNG keeps the pixels lmms-eval hands the model; a mode it cannot hold (CMYK) becomes RGB, which the
        # processors convert every image to anyway
        im = im if im.mode in PNG_MODES else im.convert("RGB")
        pixels = hashlib.sha256(json.dumps([im.mode, im.size]).encode() + im.tobytes()).hexdigest()
        if pixels not in saved:
            im.save(os.path.join(staged, f"{stem}-{k}.png"))
            saved[pixels] = f"{relative}/{stem}-{k}.png"
        row.setdefault("image", []).append(saved[pixels])
    for video in videos:  # as Modes.video reads it: a folder of frames or a GIF as it is, a video file sampled
        cli.check(os.path.exists(video), f"{where}: video not found: {video}")
        if os.path.isdir(video) or video.lower().endswith(".gif"):
            row["video"] = os.path.abspath(video)
        else:
            sample_frames(video, os.path.join(staged, f"{stem}-video"), max_frames)
            row["video"] = f"{relative}/{stem}-video"
    return row


def reference_answer(task, doc):
    """The answer lmms-eval scores as right, as text: of several references (VQA's ten annotators, COCO's five
    captions) the most frequent, the first on a tie; of a multiple-choice task the right choice, the continuation
    whose likelihood the task compares. "" where the document has none."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = max(target, key=target.count) if target else ""
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    return str(target).strip() if isinstance(target, (str, int, float)) else ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:  # ours: lmms-eval's command line has no positional argument to clash with
        cli.run(export, export_parser().parse_args(sys.argv[2:]))
    else:
        from lmms_eval.__main__ import cli_evaluate
        from lmms_eval.models import MODEL_REGISTRY_V2
        MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
        cli_evaluate()
