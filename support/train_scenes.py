"""Train a Qwen3-VL-MoE in the real models' regime on the scenes task (support/scenes.py), on the CPU, in
resumable chunks, into a Hugging Face folder.

tiny-vqa (train_vqa.py) is 4 MoE layers of 32 experts, top-4, with 16 visual tokens and one-word answers: special
tokens are 17 % of its routed slots and the answer KL covers two positions. This model is built to be evidence about
the real ones (Qwen3-VL-30B-A3B: 48 layers, 128 experts, top-8):
- 12 MoE layers of 64 routed experts, top-8, hidden 128, expert width 32, a vision tower of 6 blocks of width 128
  (12.5M parameters, 24 MiB in bf16);
- 144 px scenes with 8 px patches: 81 visual tokens per image, so vision tokens dominate the prompt and special
  tokens are about 5 % of the routed slots (printed at start: `special tokens`);
- sentence answers of 5 to 20 tokens, reasoning first where the key word needs two facts (support/scenes.py),
  scored by exact match of the key word in its place (the test accuracy of the whole sentence is reported too).

How it trains is train_vqa.py's recipe, whose pieces it imports (weight init, router taps and Switch balance loss,
learning-rate schedule, progress line, reload check): teacher-forced answer cross-entropy on prompts made by
processor.py as at inference, plus an auxiliary head (discarded after training) on the vision tower's output. Here
the auxiliary labels are dense: every visual token (a 16 x 16 px cell) predicts the colour, kind (shape or digit),
size and grid row and column of the object covering it, read off the scene's object-id map, so the vision tower
learns to see every object and keeps where it is. Without the size and place labels (a first run, 2,750 steps) the
model learnt counting and colours but answered every left-of, above and larger question the same way: rotary
positions tell attention how far apart two tokens are, not where an attended object sits, so the place has to be
in the visual token's features. With them, after 1,200 steps the auxiliary head read colour, size, row and column
right on 98 to 99 % of the cells of digits, their kind on 50 %: the vision tower is 128 wide (64 then) for the
digits, which name objects in every question type; that costs 13 % more time per step (2.56 against 2.26 s).
A second auxiliary head (also discarded) teaches grounding: at the last token of each object name an answer states
("The large triangle is blue.", "The 3 is at the top and the square ..."), the hidden state after half the decoder
layers predicts that object's colour, kind, size, row and column. Without it, a run at step 1,300 answered "What
colour is the triangle?" with the colour of some object in the scene every time but of the named one only 45 % of
the time, one-word names included (0.61 with two objects, 0.37 with six): it saw the objects and had not learnt to
find the one a name means, the look-up every question type but counting rests on. With the head, validation at step
500 was 0.477 against 0.344 (colour_of 0.69 against 0.42, left of 0.52 against 0.18).
Training batches are scenes drawn from 50,000 train scenes rendered on the fly (scene seeds are disjoint from the val
and test scenes, the handwritten digit scans disjoint from the test ones), each scene one multi-turn chat of its five
questions in a fresh order every time it is drawn, as instruction data for real VLMs is: the image's tokens are
computed once for five answers, so a step of 16 scenes (80 questions) takes about what 32 single questions took
(2.67 against 2.85 s on 2 threads). The first run, one question per sequence, was at 0.57 validation accuracy after
2,750 steps of 32. Validation and the test accuracy ask one question per prompt, as every script does. (The step
times above were measured before model.py's expert loop stopped zero-filling a whole weight gradient per expert;
since then, with the grounding head, `--time-steps 8` measures 2.29 s per step on 2 threads, and the run's first 700
steps averaged 2.9 s, validation included: the full 8,000 steps take about 6.5 h. The shipped checkpoint's cosine
was shortened to 5,000 steps at step 3,400, when it already answered 0.906 of 500 test questions; its README lists
every chunk's command.)

Resumable: the state (model, optimiser, step, elapsed time, validation history) goes to --work-dir every
--save-every steps and when --max-minutes runs out; --resume continues from it bit for bit in data order. Only
--steps may change on resume: the cosine is then recomputed over the new total from the resumed step on (the
learning rate jumps to the new schedule's value there), and the README records each schedule. The
checkpoint folder is staged in the work dir and moved to --out by one rename only when the last step is done, with
a README recording the command, seed, steps, wall time and machine.

Examples
    python support/train_scenes.py --resume --max-minutes 60     # one hour of the full run, again until it is done
    python support/train_scenes.py --steps 8000 --stop-after 3400 && \
        python support/train_scenes.py --resume --steps 5000       # the shipped checkpoint's schedule
    python support/train_scenes.py --eval-only --model checkpoints/scenes-12x64          # greedy test accuracy
    python support/train_scenes.py --steps 3 --batch-size 4 --layers 2 --experts 8 --top-k 2 --train-scenes 20 \\
        --val-scenes 2 --val-every 2 --eval-scenes 2 --work-dir /tmp/scenes-smoke --out /tmp/scenes-smoke/ckpt
    python support/train_scenes.py --time-steps 5                 # measure s/step of the chosen settings, then stop
"""
import argparse
import collections
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as support/train_scenes.py
import cli  # noqa: E402
import qwen3_vl_moe  # noqa: E402
from data import Sample, answer_is_right, make_batch, normalised_words  # noqa: E402
from generate import generate  # noqa: E402
from model import load, read_config, save_checkpoint  # noqa: E402
from processor import QwenProcessor, special_token_ids  # noqa: E402
from support import scenes, tiny  # noqa: E402
from support.train_vqa import (Progress, balance_loss, check_numbers, check_reload, expert_loads, fmt_s,  # noqa: E402
                               init_weights, lr_at, router_logits, write_folder)

NAME = "scenes-12x64"
DEFAULT_OUT = os.path.join(tiny.ROOT, "checkpoints", NAME)
DEFAULT_WORK = os.path.join(os.environ.get("MODES_CACHE", os.path.expanduser("~/.cache/modes")), "train-scenes")
# aux label groups, each 0 = background then the attribute's values: colour, kind, size, grid row, grid column
AUX_GROUPS = (tuple(scenes.COLOURS), scenes.KINDS, scenes.SIZES, range(scenes.GRID), range(scenes.GRID))
AUX_CLASSES = tuple(1 + len(g) for g in AUX_GROUPS)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files


def scenes_config(ids, vocab_size, args):
    """config.json in the hub's qwen3_vl_moe dialect: every decoder layer MoE; vision positions for the image
    size's patch grid; DeepStack from three vision blocks spread over the tower (Qwen3-VL-30B: 8, 16, 24 of 27),
    fewer in a decoder of fewer layers (each feature joins after its own decoder layer)."""
    H, side = args.hidden, args.image_size // args.patch_size
    d = args.vision_depth
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "vocab_size": vocab_size, "hidden_size": H,
            "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 2 * H, "moe_intermediate_size": args.expert_width, "num_experts": args.experts,
            "num_experts_per_tok": args.top_k, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 5000000,
            "attention_bias": False, "attention_dropout": 0.0, "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "dtype": "bfloat16"},
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": d, "hidden_size": args.vision_width, "num_heads": 4,
            "intermediate_size": 2 * args.vision_width, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
            "patch_size": args.patch_size, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "out_hidden_size": H, "num_position_embeddings": side * side,
            "deepstack_visual_indexes": sorted({d // 4, d // 2, 3 * d // 4})[:args.layers],
            "initializer_range": 0.02},
        "dtype": "bfloat16",
    }


def tokenizer_texts(n_train_scenes):
    """The text the compact BPE learns: every training question and answer, the chat roles, tiny.py's corpus."""
    qa = [t for _, q in scenes.split_questions("train", n_train_scenes) for t in (q["question"], q["answer"])]
    return qa + ["user", "assistant", "system"] * 100 + [tiny.TINY_CORPUS]


# ---------------------------------------------------------------------------------------------------------------
# Data


class ScenesData:
    """One split's questions, tokenised by the checkpoint's processor; scenes are rendered when a batch needs them.
    Prompt ids per distinct question (the pads depend only on the image size, which is fixed), answer ids +
    <|im_end|> per distinct answer, aux labels per visual token."""

    def __init__(self, proc, split, n_scenes):
        t0 = time.perf_counter()
        self.proc, self.split = proc, split
        self.items = scenes.split_questions(split, n_scenes)  # [(scene description, question)]
        by_seed = {}
        for j, (d, _) in enumerate(self.items):
            by_seed.setdefault(d["seed"], []).append(j)
        self.scenes = list(by_seed.values())  # per scene, its questions' indices in items, in the generator's order
        self.im_end = proc.tokenizer.token_to_id("<|im_end|>")
        self.prompts, self.answers, self.turns, self.name_cache = {}, {}, {}, {}
        probe = proc.from_cli("", images=[scenes.render(self.items[0][0])[0]])
        self.grid = probe["image_grid_thw"][0].tolist()  # [1, gh, gw] in patches
        self.cell = proc.image_cfg.patch_size * proc.image_cfg.merge_size  # px per side of one visual token
        assert self.grid[1] * self.cell // proc.image_cfg.merge_size == scenes.SIZE, "images must not be resized"
        print(f"{split}: {len(self.items)} questions on {len(set(d['seed'] for d, _ in self.items))} scenes, "
              f"grid {self.grid}, prepared in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    def __len__(self):
        return len(self.items)

    def prompt(self, question):
        if question not in self.prompts:
            image = blank_image()
            self.prompts[question] = self.proc.from_cli(question, images=[image])["input_ids"].tolist()
        return self.prompts[question]

    def answer(self, answer):
        if answer not in self.answers:
            self.answers[answer] = self.proc.encode(answer) + [self.im_end]
        return self.answers[answer]

    def next_turn(self, question):
        """The tokens between an answer's <|im_end|> and the next answer: the template's newline, a user turn with
        the question, the assistant header (what the chat template renders there)."""
        if question not in self.turns:
            self.turns[question] = self.proc.encode(f"\n<|im_start|>user\n{question}<|im_end|>\n"
                                                    f"<|im_start|>assistant\n")
        return self.turns[question]

    def conversation(self, order):
        """(tokens, targets, names) of one scene's questions as a multi-turn chat about its image, the questions in
        the given order: the first turn is exactly the single-question prompt, each answer is a target; names
        [(position, object index)] as `names` gives them, in the whole sequence."""
        tokens, targets, names = [], [], []
        for t, j in enumerate(order):
            q = self.items[j][1]
            ask = self.prompt(q["question"]) if t == 0 else self.next_turn(q["question"])
            a = self.answer(q["answer"])
            names += [(len(tokens) + len(ask) + p, i) for p, i in self.names(q["answer"], q["refs"])]
            tokens += ask + a
            targets += [-100] * len(ask) + a
        return tokens, targets, names

    def aux_labels(self, desc, ids):
        """[visual tokens, 5] (colour, kind, size, row, column) class per 16 x 16 px cell in raster order (the merged
        tokens' order): the object covering most of the cell if it covers at least a tenth of it, else 0
        (background)."""
        c, n = self.cell, len(desc["objects"])
        idmap = torch.frombuffer(bytearray(ids.tobytes()), dtype=torch.uint8).long().view(scenes.SIZE, scenes.SIZE)
        g = scenes.SIZE // c
        counts = F.one_hot(idmap, n + 1).view(g, c, g, c, n + 1).sum((1, 3))[..., 1:].reshape(g * g, n)
        cover, best = counts.max(-1)
        return object_labels(desc)[torch.where(cover >= c * c // 10, best + 1, 0)]

    def names(self, answer, refs):
        """[(position in the answer's tokens, object index)]: the last token of each object name the answer states
        ("the large red circle"), where the grounding head reads what the model knows of that object. The same
        answer in another scene can name other objects: only the positions are cached."""
        key = (answer, tuple(name for name, _ in refs))
        if key not in self.name_cache:
            ids, found, start = self.answer(answer), [], 0
            for name, _ in refs:
                start = answer.lower().index(f"the {name}", start) + len(f"the {name}")
                prefix = self.proc.encode(answer[:start])
                if ids[:len(prefix)] != prefix:  # a word-level BPE never merges across the space that follows
                    raise ValueError(f"{answer!r}: the tokens of {answer[:start]!r} are not a prefix of the answer's")
                found.append(len(prefix) - 1)
            self.name_cache[key] = found
        return [(p, i) for p, (_, i) in zip(self.name_cache[key], refs)]

    def batch(self, idx):
        """Right-padded teacher-forcing batch of single questions (items idx): input_ids, attention_mask, targets
        (-100 except the answer and <|im_end|>), pixels (pixel_values, image_grid_thw), aux labels [visual tokens
        of the batch, 5], question types."""
        rows = []
        for j in idx:
            desc, q = self.items[j]
            p, a = self.prompt(q["question"]), self.answer(q["answer"])
            names = [(len(p) + t, i) for t, i in self.names(q["answer"], q["refs"])]
            rows.append((desc, p + a, [-100] * len(p) + a, names))
        return self.collate(rows, types=[self.items[j][1]["type"] for j in idx])

    def conversations(self, idx, step):
        """The same for scenes idx (indices into self.scenes), each one conversation of all its questions in an
        order drawn from (scene seed, step), so each question is the first turn, as at inference, in some epochs."""
        rows = []
        for i in idx:
            order = list(self.scenes[i])
            desc = self.items[order[0]][0]
            random.Random(f"{desc['seed']} {step}").shuffle(order)
            rows.append((desc, *self.conversation(order)))
        return self.collate(rows)

    def collate(self, rows, types=None):
        """rows of (scene description, tokens, targets aligned with tokens, names) -> the batch dict; targets shift
        by one (position t predicts token t + 1); name_at [m, 2] (row, position) and name_labels [m, 5]."""
        seqs, targets, pixels, aux, name_at, name_labels = [], [], [], [], [], []
        for r, (desc, tokens, labels, names) in enumerate(rows):
            seqs.append(torch.tensor(tokens))
            targets.append(torch.tensor(labels[1:] + [-100]))
            image, ids = scenes.render(desc)
            pixels.append(self.proc.from_cli("", images=[image])["pixel_values"])
            aux.append(self.aux_labels(desc, ids))
            name_at += [(r, p) for p, _ in names]
            name_labels.append(object_labels(desc)[[1 + i for _, i in names]])
        return dict(input_ids=pad_sequence(seqs, batch_first=True, padding_value=self.proc.pad_token_id),
                    attention_mask=pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True),
                    targets=pad_sequence(targets, batch_first=True, padding_value=-100),
                    pixels=dict(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor([self.grid] * len(rows))),
                    aux=torch.cat(aux), name_at=torch.tensor(name_at, dtype=torch.long).view(-1, 2),
                    name_labels=torch.cat(name_labels), types=types)

    def special_share(self, n=256):
        """(share of special tokens among the prompt's routed tokens, among prompt + answer + <|im_end|>), over n
        questions: the chat template's tokens that the skip ratio counts but never skips."""
        special = set(self.proc.special_ids) - {self.proc.image_token_id, self.proc.video_token_id}
        counts = torch.zeros(4)
        for j in range(0, len(self), max(1, len(self) // n)):
            _, q = self.items[j]
            p, a = self.prompt(q["question"]), self.answer(q["answer"])
            counts += torch.tensor([sum(t in special for t in p), len(p), sum(t in special for t in a), len(a)])
        return (counts[0] / counts[1]).item(), ((counts[0] + counts[2]) / (counts[1] + counts[3])).item()


def object_labels(desc):
    """[1 + objects, 5]: row 0 background (all 0), then each object's colour, kind, size, grid row and column as
    1 + the value's index in AUX_GROUPS: the classes of both auxiliary heads."""
    keys = ("colour", "kind", "size", "row", "col")
    return torch.tensor([[0] * len(AUX_GROUPS)] + [[1 + list(group).index(o[key]) for group, key in
                                                    zip(AUX_GROUPS, keys)] for o in desc["objects"]])


def blank_image():
    from PIL import Image
    return Image.new("RGB", (scenes.SIZE, scenes.SIZE), scenes.BACKGROUND)


# ---------------------------------------------------------------------------------------------------------------
# Losses, validation


def forward_losses(net, aux_head, name_head, name_layer, b):
    """(answer loss, aux loss, grounding loss, balance loss, answer-token accuracy) of one batch."""
    # model.py API: encode_vision -> (visual mask, main features [n, H], deepstack list); embed, the layer loop in
    # two parts (the grounding head reads between them), head
    media = net.encode_vision(b["input_ids"], **b["pixels"])
    with router_logits(net) as gates:
        h, ctx = net.embed(b["input_ids"], b["attention_mask"], media=media,
                           image_grid_thw=b["pixels"]["image_grid_thw"])
        mid = net.layers(h, ctx, 0, name_layer)  # [B, S, H]
        logits = net.head(net.layers(mid, ctx, name_layer))
    named = mid[b["name_at"][:, 0], b["name_at"][:, 1]]  # [m, H], the last token of each object name
    zn = name_head(named).split(AUX_CLASSES, dim=-1)
    name = sum(F.cross_entropy(zg, b["name_labels"][:, g]) for g, zg in enumerate(zn)) if len(named) else \
        torch.zeros(())  # a batch of counting questions only names nothing (an empty mean would be nan)
    tgt = b["targets"]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
    scored = tgt != -100
    acc = (logits.argmax(-1)[scored] == tgt[scored]).float().mean()
    main = media[1]  # [n, H], visual tokens in sequence order, each image's in raster order of its cells
    assert main.shape[0] == b["aux"].shape[0]
    z = aux_head(main).split(AUX_CLASSES, dim=-1)  # per group [n, 1 + values]
    aux = sum(F.cross_entropy(zg, b["aux"][:, g]) for g, zg in enumerate(z))
    bal = balance_loss(gates, b["attention_mask"].bool().flatten(), net.cfg.num_experts_per_tok)
    return ce, aux, name, bal, acc


@torch.no_grad()
def val_accuracy(net, val, n=1000, batch_size=100):
    """Teacher-forced: (share of n held-out questions whose answer tokens and <|im_end|> are all argmax-right,
    {question type: share})."""
    net.eval()
    right, asked = collections.Counter(), collections.Counter()
    idx = list(range(0, len(val), max(1, len(val) // n)))[:n]
    for s in range(0, len(idx), batch_size):
        b = val.batch(idx[s:s + batch_size])
        logits = net(b["input_ids"], b["attention_mask"], **b["pixels"])
        tgt = b["targets"]
        ok = ~((logits.argmax(-1) != tgt) & (tgt != -100)).any(1)
        for kind, good in zip(b["types"], ok.tolist()):
            asked[kind] += 1
            right[kind] += good
    net.train()
    return sum(right.values()) / len(idx), {k: round(right[k] / asked[k], 3) for k in scenes.QUESTION_TYPES
                                            if asked[k]}


# ---------------------------------------------------------------------------------------------------------------
# Training


def settings(args):
    """What a resumed run must share with the state it continues."""
    keep = ("seed", "hidden", "layers", "experts", "expert_width", "top_k", "vision_width", "vision_depth",
            "image_size", "patch_size", "steps", "batch_size", "lr", "warmup", "weight_decay", "aux_weight",
            "balance_weight", "name_weight", "name_layer", "train_scenes", "val_scenes")
    return {k: getattr(args, k) for k in keep} | {"batch": "scene conversations"}  # what a batch is, since it changed


def train(args):
    t_process = time.perf_counter()
    torch.manual_seed(args.seed)
    state_path = os.path.join(args.work_dir, "train_state.pt")
    stage = os.path.join(args.work_dir, "checkpoint")  # the folder being built; moved to --out when complete
    cli.check(args.resume or not os.path.exists(state_path),
              f"{state_path} exists: continue it with --resume, or delete it to start over")

    # the tokenizer and config first: the processor used for training is the one users will get
    ids = tiny.write_qwen_tokenizer(stage, vocab_size=args.vocab, texts=tokenizer_texts(args.train_scenes),
                                    first_added_id=None, model_max_length=4096)
    vocab_size = -(-(max(ids.values()) + 1) // 64) * 64  # rows past the tokenizer are padding
    with open(os.path.join(stage, "tokenizer.json"), "rb") as f:  # learnt from the task's text: changes with it
        tokenizer_sha = hashlib.sha256(f.read()).hexdigest()
    raw = scenes_config(ids, vocab_size, args)
    write_folder(stage, raw, ids, args)
    proc = QwenProcessor.from_dir(stage)
    data = ScenesData(proc, "train", args.train_scenes)
    val = ScenesData(proc, "val", args.val_scenes) if args.val_scenes else None
    share_prompt, share_all = data.special_share()
    print(f"special tokens: {100 * share_prompt:.2f}% of the prompt's routed tokens, {100 * share_all:.2f}% with the "
          f"answer and <|im_end|> (tiny-vqa: 17%)", file=sys.stderr)

    cfg = read_config(os.path.join(stage, "config.json"))  # model.py API: the config reader and the model class
    net = qwen3_vl_moe.Qwen3VLMoe(cfg)
    init_weights(net, cfg.num_hidden_layers, args.seed)
    aux_head = nn.Linear(cfg.hidden_size, sum(AUX_CLASSES))
    name_head = nn.Linear(cfg.hidden_size, sum(AUX_CLASSES))
    params = list(net.parameters()) + list(aux_head.parameters()) + list(name_head.parameters())
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({2 * n_params / 2**20:.2f} MiB in bf16), vocab {vocab_size}, "
          f"{cfg.num_hidden_layers} MoE layers x {cfg.num_experts} experts of width {cfg.moe_intermediate_size}, "
          f"top-{cfg.num_experts_per_tok}; vision {args.vision_depth} blocks of width {args.vision_width}, "
          f"{args.image_size} px, {args.patch_size} px patches", file=sys.stderr)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    step, elapsed_before, history, chunks, schedule = 0, 0.0, [], [], [[0, args.steps]]
    if args.resume and os.path.isfile(state_path):
        st = torch.load(state_path, weights_only=False)
        cli.check(st.get("tokenizer") == tokenizer_sha, f"{state_path}: made for other questions or answers (its "
                  f"tokenizer differs); delete it or drop --resume")
        diff = {k: (v, settings(args).get(k)) for k, v in st["settings"].items()
                if settings(args).get(k) != v and k != "steps"}  # the schedule's length may change, below
        if diff or st["raw_config"] != raw:
            raise ValueError(f"{state_path}: made with other settings {diff or '(config)'}; delete it or drop "
                             f"--resume")
        cli.check(args.steps >= st["step"], f"--steps {args.steps}: {state_path} is already at step {st['step']}")
        net.load_state_dict(st["model"])
        aux_head.load_state_dict(st["aux_head"])
        name_head.load_state_dict(st["name_head"])
        opt.load_state_dict(st["opt"])
        step, elapsed_before, history, chunks = st["step"], st["elapsed_s"], st["history"], st["chunks"]
        schedule = st.get("schedule", [[0, st["settings"]["steps"]]])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {state_path} at step {step} ({fmt_s(elapsed_before)} trained so far)", file=sys.stderr)
        if args.steps != schedule[-1][1]:  # the cosine is recomputed over the new total from here on
            before = lr_at(step, argparse.Namespace(**{**vars(args), "steps": schedule[-1][1]}))
            schedule.append([step, args.steps])
            print(f"--steps {schedule[-2][1]} -> {args.steps}: the learning rate at step {step} goes from "
                  f"{before:.3g} to {lr_at(step, args):.3g}", file=sys.stderr)
    cli.check(args.stop_after is None or step < args.stop_after < args.steps,
              f"--stop-after {args.stop_after}: must lie after the step the run starts at ({step}) and before --steps "
              f"({args.steps})")
    chunks.append(dict(start_step=step, command=" ".join(["python"] + sys.argv), machine=machine(),
                       started=now_iso()))

    def save_state():
        os.makedirs(args.work_dir, exist_ok=True)
        chunks[-1].update(end_step=step, seconds=round(time.perf_counter() - t_loop, 1))
        tmp = state_path + ".tmp"
        torch.save(dict(model=net.state_dict(), aux_head=aux_head.state_dict(), name_head=name_head.state_dict(),
                        opt=opt.state_dict(), step=step,
                        elapsed_s=elapsed_before + time.perf_counter() - t_loop, torch_rng=torch.get_rng_state(),
                        settings=settings(args), raw_config=raw, tokenizer=tokenizer_sha, history=history,
                        chunks=chunks, schedule=schedule), tmp)
        os.replace(tmp, state_path)

    def order(epoch):  # the data order is a function of (seed, epoch), so a resumed run sees the same batches
        return torch.randperm(len(data.scenes), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))

    net.train()
    progress = Progress(args.steps, start=step, every=args.log_every)
    t_loop = time.perf_counter()
    smooth = None
    stop_at = None if args.max_minutes is None else t_process + 60 * args.max_minutes
    first = step
    while step < args.steps:
        epoch, offset = divmod(step * args.batch_size, len(data.scenes))
        idx = torch.cat([order(epoch), order(epoch + 1)])[offset:offset + args.batch_size].tolist()
        b = data.conversations(idx, step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ce, aux, name, bal, acc = forward_losses(net, aux_head, name_head, args.name_layer, b)
        loss = ce + args.aux_weight * aux + args.name_weight * name + args.balance_weight * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = torch.tensor([ce.item(), aux.item(), name.item(), bal.item(), acc.item()])
        smooth = now if smooth is None else 0.98 * smooth + 0.02 * now
        progress(step, f"| ce {smooth[0]:.3f} aux {smooth[1]:.3f} name {smooth[2]:.3f} bal {smooth[3]:.3f} "
                       f"tok-acc {smooth[4]:.3f}")
        if args.time_steps and step - first >= args.time_steps:
            s = (time.perf_counter() - t_loop) / (step - first)
            print(f"timing: {s:.2f} s/step over {step - first} steps (batch {args.batch_size}, "
                  f"{torch.get_num_threads()} thread(s)); {args.steps} steps would take {fmt_s(s * args.steps)}",
                  file=sys.stderr)
            return
        if val is not None and (step % args.val_every == 0 or step == args.steps):
            acc_val, per_type = val_accuracy(net, val)
            history.append(dict(step=step, val=round(acc_val, 4), per_type=per_type))
            print(f"step {step}: val answer accuracy {acc_val:.4f} (teacher-forced, every answer token right; "
                  f"{min(len(val), 1000)} questions on held-out val scenes) {per_type}", file=sys.stderr, flush=True)
        out_of_time = stop_at is not None and time.perf_counter() > stop_at
        if step < args.steps and (step % args.save_every == 0 or out_of_time or step == args.stop_after):
            save_state()
            if out_of_time or step == args.stop_after:
                print(f"stopped {f'after {args.max_minutes} min' if out_of_time else 'as asked'} at step "
                      f"{step}/{args.steps}; state in {state_path}; continue with --resume", file=sys.stderr)
                return
    train_s = elapsed_before + time.perf_counter() - t_loop
    save_state()  # the finished state, so the folder can be rebuilt from it
    finish(net, raw, args, stage, data, history, chunks, schedule, train_s, n_params, share_all)


def finish(net, raw, args, stage, data, history, chunks, schedule, train_s, n_params, special_share):
    """Expert loads, the bf16 folder with its reload check and README, the test accuracy; then the folder is moved
    to --out by one rename."""
    net.eval()
    loads = expert_loads(net, data)
    E = net.cfg.num_experts
    for layer, share in enumerate(loads):
        print(f"layer {layer} expert load x E: min {share.min() * E:.2f} max {share.max() * E:.2f} "
              f"(1 = uniform), unused experts {int((share == 0).sum())}", file=sys.stderr)
    save_checkpoint(net, raw, stage)  # model.py API: model.safetensors (bf16, hub expert layout) and config.json
    check_reload(net, stage, data)
    result = evaluate(stage, n_scenes=args.eval_scenes) if args.eval_scenes else None
    if result:
        result["model"] = os.path.basename(os.path.abspath(args.out))
    summary = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, train_s=round(train_s, 1),
                   parameters=n_params, safetensors_bytes=os.path.getsize(os.path.join(stage, "model.safetensors")),
                   special_share=round(special_share, 4), history=history, chunks=chunks, schedule=schedule,
                   test=result,
                   expert_load_max_x_E=[round(float(x.max() * E), 2) for x in loads],
                   expert_load_min_x_E=[round(float(x.min() * E), 2) for x in loads])
    cli.write_json(os.path.join(stage, "training.json"), summary)
    name = os.path.basename(os.path.abspath(args.out))
    cli.write_atomic(os.path.join(stage, "README.md"), readme(summary, raw, name).encode())
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".{os.path.basename(args.out)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(stage, tmp)
    os.rename(tmp, args.out)  # the whole folder appears at once
    print(f"wrote {args.out}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "chunks")}))


def readme(s, raw, name):
    t, v = raw["text_config"], raw["vision_config"]
    acc = s["test"]
    lines = [
        f"# {name}: a Qwen3-VL-MoE of {t['num_hidden_layers']} MoE layers x {t['num_experts']} experts, top-"
        f"{t['num_experts_per_tok']}, trained on the scenes task",
        "",
        "Written by `support/train_scenes.py` (its docstring has the design; `support/scenes.py` the task).",
        "",
        f"- decoder: {t['num_hidden_layers']} layers, all MoE, hidden {t['hidden_size']}, {t['num_experts']} routed "
        f"experts of width {t['moe_intermediate_size']}, top-{t['num_experts_per_tok']}; vision: {v['depth']} blocks "
        f"of width {v['hidden_size']}, {v['patch_size']} px patches, DeepStack after {v['deepstack_visual_indexes']}",
        f"- {s['parameters']:,} parameters, model.safetensors {s['safetensors_bytes']:,} bytes (bf16)",
        f"- special tokens: {100 * s['special_share']:.2f}% of the routed tokens of prompt + answer",
        f"- seed {s['seed']}, {s['steps']} steps of {s['batch_size']} scenes (a conversation of their questions each), "
        f"training wall time "
        f"{fmt_s(s['train_s'])} ({s['train_s']:.0f} s) in {len(s['chunks'])} chunk(s)",
        "- learning rate: warm-up, then a cosine to a tenth over the steps --steps gave "
        + ", then ".join(f"from step {start:,}: {total:,}" for start, total in s["schedule"])
        + (" (changed on resume: the cosine recomputed over the new total)" if len(s["schedule"]) > 1 else ""),
        "",
        "## Commands and machines, chunk by chunk",
        "",
    ]
    groups = []  # consecutive chunks of the same command on the same machine, as one line
    for c in s["chunks"]:
        if groups and (groups[-1]["command"], groups[-1]["machine"]) == (c["command"], c["machine"]):
            g = groups[-1]
            g.update(end_step=c.get("end_step"), seconds=g["seconds"] + c.get("seconds", 0), n=g["n"] + 1)
        else:
            groups.append(dict(c, seconds=c.get("seconds", 0), n=1))
    lines += [f"- steps {g['start_step']}-{g['end_step']} in {g['n']} chunk(s), {g['seconds']:.0f} s, from "
              f"{g['started']}: `{g['command']}` on {g['machine']}" for g in groups]
    lines += ["", "## Validation (teacher-forced, every answer token right)", ""]
    lines += [f"- step {h['step']}: {h['val']:.4f} {h['per_type']}" for h in s["history"]]
    if acc:
        lines += ["", f"## Test accuracy (greedy generate on {acc['questions']:,} test questions)", "",
                  f"- the key word in its place, as evaluate.py scores: {acc['accuracy']:.4f} ({acc['correct']}/"
                  f"{acc['questions']}), per type {acc['per_type']}",
                  f"- the whole sentence, the reasoning too: {acc['sentence_accuracy']:.4f}, per type "
                  f"{acc['sentence_per_type']}"]
    return "\n".join(lines) + "\n"


def machine():
    return (f"{platform.machine()} CPU ({platform.processor() or 'unknown model'}), {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.system()}")


def now_iso():
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the path users run (load(), the processor's prompt, greedy generate with the stop ids)


@torch.no_grad()
def evaluate(path, split="test", n_scenes=None, batch_size=50, dtype="float32"):
    """Accuracy of greedy answers on a split, as evaluate.py scores them (the key word in its place), and of the
    whole sentences (the reasoning too)."""
    model = load(path, dtype=getattr(torch, dtype), special_ids=special_token_ids(path))  # model.py API: load
    proc = QwenProcessor.from_dir(path)
    items = scenes.split_questions(split, n_scenes)
    asked, correct, whole, wrong = collections.Counter(), collections.Counter(), collections.Counter(), []
    progress = Progress(len(items), every=10 * batch_size, unit="question")
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        samples = [Sample(q["question"], q["answer"], [scenes.render(d)[0]], key=q["key"]) for d, q in chunk]
        batch = make_batch(samples, proc, "cpu", answers=False)  # the prompts, left padded as generate expects
        out = generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=24,  # model.py API
                       stop_ids=proc.stop_token_ids, **batch.pixels)
        for (d, q), sample, tokens in zip(chunk, samples, out.tolist()):
            end = next((t for t, tok in enumerate(tokens) if tok in proc.stop_token_ids), len(tokens))
            text = proc.decode(tokens[:end]).strip()
            asked[q["type"]] += 1
            good = answer_is_right(text, sample)
            correct[q["type"]] += good
            whole[q["type"]] += normalised_words(text) == normalised_words(q["answer"])
            if not good and len(wrong) < 10:
                wrong.append((d["seed"], q["question"], q["answer"], text))
        progress(s + len(chunk), f"| accuracy so far {sum(correct.values()) / (s + len(chunk)):.4f}")
    for seed, q, a, got in wrong:
        print(f"wrong: scene {seed} {q!r}: expected {a!r}, got {got!r}", file=sys.stderr)
    right, n = sum(correct.values()), len(items)
    share = lambda hits: {k: round(hits[k] / asked[k], 4) for k in scenes.QUESTION_TYPES if asked[k]}  # noqa: E731
    return dict(model=path, split=split, questions=n, correct=right, accuracy=round(right / n, 5), dtype=dtype,
                per_type=share(correct), sentence_accuracy=round(sum(whole.values()) / n, 5),
                sentence_per_type=share(whole))


def check_args(args):
    """Every argument, before anything is read or written."""
    cli.check(1 <= args.name_layer <= args.layers, f"--name-layer {args.name_layer}: the grounding head reads after 1 "
              f"to --layers ({args.layers}) layers")
    cli.check(math.isfinite(args.name_weight) and args.name_weight >= 0,
              f"--name-weight must be finite and >= 0, got {args.name_weight}")
    check_numbers(args, ("steps", "batch_size", "hidden", "layers", "experts", "expert_width", "top_k", "vision_width",
                         "vision_depth", "vocab", "image_size", "patch_size", "save_every", "val_every", "log_every",
                         "train_scenes"), ("warmup", "val_scenes", "eval_scenes", "time_steps"))
    cli.check(args.vision_width % 16 == 0, f"--vision-width {args.vision_width} must be a multiple of 16: 4 heads, "
              f"each rotating its dimensions in pairs over rows and columns")
    cli.check(args.image_size == scenes.SIZE and scenes.SLOT % (2 * args.patch_size) == 0,
              f"--image-size {args.image_size} --patch-size {args.patch_size}: the {scenes.SIZE} px scenes are not "
              f"resized and each {scenes.SLOT} px slot must be whole visual tokens of 2 x 2 patches")
    cli.check(args.max_minutes is None or (math.isfinite(args.max_minutes) and args.max_minutes >= 0),
              f"--max-minutes must be finite and >= 0, got {args.max_minutes}")
    for name, split in (("train_scenes", "train"), ("val_scenes", "val"), ("eval_scenes", "test")):
        try:
            if getattr(args, name):
                scenes.scene_seeds(split, getattr(args, name))
        except ValueError as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
    for name in ("out", "work_dir", "model"):
        cli.check_input_path(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.eval_only:
        path = args.model or args.out
        cli.check(os.path.isfile(os.path.join(path, "config.json")), f"--eval-only: {path} is not a checkpoint folder")
        return
    cli.check(args.model is None, "--model is the folder --eval-only evaluates; training writes --out")
    cli.check(not os.path.exists(args.out), f"--out {args.out} exists; the finished checkpoint is moved there, so "
              f"delete it or name another folder")
    cli.check_output(os.path.join(args.work_dir, "train_state.pt"), "--work-dir")


def main(args):
    check_args(args)
    cli.set_threads(args.threads)
    if args.eval_only:
        result = evaluate(args.model or args.out, n_scenes=args.eval_scenes, dtype=args.dtype)
        print(f"test accuracy {result['accuracy']:.4f} ({result['correct']}/{result['questions']})", file=sys.stderr)
        print(json.dumps(result))
        return
    train(args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a Qwen3-VL-MoE of 12 MoE layers x 64 experts, top-8, on the "
                                "scenes task (CPU, resumable) and/or measure its greedy test accuracy.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"checkpoint folder to create when done (default "
                   f"checkpoints/{NAME}); it must not exist")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="where the resumable state and the staged folder go "
                   "(default $MODES_CACHE/train-scenes, else ~/.cache/modes/train-scenes)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt if present")
    p.add_argument("--max-minutes", type=float, help="save the state and stop after the step that passes this many "
                   "minutes (counted from the start of the process); continue with --resume")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="save the state and stop after this step (a "
                   "chunk counted in steps; the next --resume may change --steps there)")
    p.add_argument("--save-every", type=int, default=100, help="steps between saved states")
    p.add_argument("--seed", type=int, default=0)
    cli.add_threads_arg(p)
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=12, help="decoder layers, all MoE")
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--expert-width", type=int, default=32, help="moe_intermediate_size, the routed experts' width")
    g.add_argument("--top-k", type=int, default=8)
    g.add_argument("--vision-width", type=int, default=128)
    g.add_argument("--vision-depth", type=int, default=6)
    g.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size before the added tokens")
    g.add_argument("--image-size", type=int, default=scenes.SIZE, help="pixel budget side (the scenes' size: no "
                   "resize)")
    g.add_argument("--patch-size", type=int, default=8, help="vision patch side in px (Qwen3-VL: 16)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=8000)
    g.add_argument("--batch-size", type=int, default=16, help="scenes per step, each one conversation of its "
                   f"{scenes.QUESTIONS_PER_SCENE} questions")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the per-visual-token colour, kind, size and place loss")
    g.add_argument("--balance-weight", type=float, default=0.01, help="weight of the router load-balancing loss")
    g.add_argument("--name-weight", type=float, default=1.0, help="weight of the grounding loss: the named "
                   "object's colour, kind, size and place read at the last token of its name in the answer")
    g.add_argument("--name-layer", type=int, help="decoder layers before the grounding head reads (default half)")
    g.add_argument("--train-scenes", type=int, default=scenes.SPLIT_SIZE["train"])
    g.add_argument("--val-scenes", type=int, default=scenes.SPLIT_SIZE["val"], help="0 = no validation")
    g.add_argument("--val-every", type=int, default=250)
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines when not on a terminal")
    g.add_argument("--time-steps", type=int, default=0, help="measure the s/step over this many steps, then stop "
                   "(nothing is saved)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-only", action="store_true", help="skip training; evaluate --model (default --out)")
    g.add_argument("--model", help="checkpoint folder to evaluate (default --out)")
    g.add_argument("--eval-scenes", type=int, default=scenes.SPLIT_SIZE["test"],
                   help="test scenes for the greedy accuracy (5 questions each; 0 = none)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="evaluation compute dtype")
    args = p.parse_args(argv)
    args.name_layer = max(1, args.layers // 2) if args.name_layer is None else args.name_layer
    return args


if __name__ == "__main__":
    cli.run(main, parse_args())
