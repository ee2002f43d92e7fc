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
    pretrained    checkpoint folder or built-in name (tiny-vqa, tiny-qwen, tiny-kimi)   default tiny-qwen
    thresholds    search.py's thresholds file: MoDES skips experts (none: the unskipped model)
    device        cpu, cuda or cuda:N (under torchrun each rank's LOCAL_RANK GPU)    default cuda if there is one
    dtype         float32 or bfloat16                                                 default bfloat16 on cuda
    max_frames    frames sampled from a video file (mp4, ... decoded with PyAV)      default 32
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
"""
import json
import os
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
                 max_frames=32, expert_impl="auto", compile=None, **kwargs):
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
        self.proc = processor.for_model(self.path, cfg.model_type)
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
            import av
            import numpy as np
            with av.open(path) as container:
                frames = [f.to_image() for f in container.decode(video=0)]
            cli.check(frames, f"{path}: no video frames")
            folder = os.path.join(self.tmp.name, str(len(self.frames)))
            os.makedirs(folder)
            for i, k in enumerate(np.linspace(0, len(frames) - 1, min(self.max_frames, len(frames))).round()):
                frames[int(k)].convert("RGB").save(os.path.join(folder, f"{i:05d}.png"))
            self.frames[path] = folder
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


def summary(counts):
    stats = router.SkipStats(counts.shape[1])
    stats.counts.copy_(counts)
    return stats.summary()


def manifest():
    """lmms-eval's registration record of `modes` (also usable as an entry point of group lmms_eval.models)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="modes", simple_class_path=f"{__name__}.Modes")


if __name__ == "__main__":
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    cli_evaluate()
