"""Train a tiny Qwen3-VL-MoE of this project's architecture on easy-VQA, on the CPU, into a Hugging Face folder.

The result is an ordinary checkpoint folder (config.json in the hub qwen3_vl_moe dialect, model.safetensors in bf16,
tokenizer.json + tokenizer_config.json, preprocessor_config.json) that model.py's `load()`, processor.py and
transformers read like any other, small enough to ship (6.5 MB), and trained, so that expert skipping can be measured
against answers that are actually right. easy-VQA: 64x64 images of one coloured shape, one-word answers (yes/no,
8 colours, 3 shapes); the data ships inside the `easy-vqa` package, a training/test dependency only.

What makes it learn
- Prompts are made by processor.py exactly as at inference (chat template, one image then the question, the
  generation prompt); the answer is teacher-forced and followed by <|im_end|>, and only those tokens are scored.
- Plain cross-entropy on the answer stayed at the answer prior in a trial run: the language model never learned to
  look. A small auxiliary head on the vision tower's output (discarded after training) predicts the image's colour
  and shape from every visual token; the labels are read off the training questions and answers (images whose
  questions do not determine them get none).
- 8 px patches on the native 64 px images (16 visual tokens): with Qwen's 16 px patches the vision tower learned
  colours at once but shapes barely (vision-only probe, 600 steps of 32 images: shape accuracy 0.44 at 64 px,
  0.59 upscaled to 128 px, 0.79 with 8 px patches).
- A small Switch-style load-balancing loss on every MoE router keeps the experts in use (so that skipping them is a
  meaningful experiment); the final per-layer expert loads are printed.
- A compact byte-level BPE vocabulary in the Qwen tokenizer.json format (trained on the easy-VQA text, the Qwen
  added tokens right after it at small ids): the real 151,936-row embeddings alone would be 78 MB.
- One torch thread by default: these ops are tiny, and two threads stall badly when another job shares 2 cores.

Touches of model.py internals are marked `# model.py API:` (building from a config dict, encode_vision, forward
with media, the MoE routers' gate modules, save_checkpoint, load; and generate.py's generate).

Examples
    python support/train_vqa.py --overwrite                          # full run -> checkpoints/tiny-vqa (~26 min, 2 cores)
    python support/train_vqa.py --resume                             # continue an interrupted run from its last state
    python support/train_vqa.py --eval-only                          # held-out accuracy of checkpoints/tiny-vqa (all 9,673)
    python support/train_vqa.py --eval-only --model DIR --eval-n 2000 --eval-seed 0      # a random sample instead
    python support/train_vqa.py --steps 20 --train-images 32 --val-images 0 --out /tmp/vqa-smoke --eval-n 32  # smoke
"""
import argparse
import collections
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as support/train_vqa.py
import cli  # noqa: E402
import qwen3_vl_moe  # noqa: E402
from data import Sample, make_batch  # noqa: E402
from generate import generate  # noqa: E402
from model import Wrapper, load, read_config, save_checkpoint  # noqa: E402
from processor import QwenProcessor, special_token_ids  # noqa: E402
from support import tiny  # noqa: E402

ROOT = tiny.ROOT
DEFAULT_OUT = os.path.join(ROOT, "checkpoints", "tiny-vqa")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files: config, preprocessor, generation config (the tokenizer: tiny.write_qwen_tokenizer)


def vqa_config(ids, vocab_size, args):
    """config.json in the hub's qwen3_vl_moe dialect. H = 128 and I = 48 keep Qwen3-VL-30B-A3B's expert width ratio
    (768 / 2048)."""
    H = args.hidden
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
            "model_type": "qwen3_vl_moe", "depth": 4, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": args.patch_size,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": H, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1, 2], "initializer_range": 0.02},
        "dtype": "bfloat16",
    }


def write_folder(out_dir, raw_config, ids, args):
    """config.json, generation_config.json and preprocessor_config.json (the tokenizer files come first: the config
    names their ids). The preprocessor is Qwen3-VL's with the pixel budget pinned to image_size^2, so easy-VQA's
    64x64 images are resized to image_size x image_size (the real min_pixels, 256^2, would upscale them 4 times in
    area)."""
    n = args.image_size * args.image_size
    files = {"config.json": raw_config,
             "preprocessor_config.json": {**tiny.QWEN_PREPROCESSOR, "size": {"longest_edge": n, "shortest_edge": n},
                                          "patch_size": args.patch_size},
             "generation_config.json": {"bos_token_id": ids["<|endoftext|>"],
                                        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                        "pad_token_id": ids["<|endoftext|>"], "do_sample": False}}
    for name, doc in files.items():
        cli.write_atomic(os.path.join(out_dir, name), json.dumps(doc, indent=2).encode())


# ---------------------------------------------------------------------------------------------------------------
# Data


def easy_vqa_split(split):
    """(questions, answers, image ids, {image id: png path}) of easy-VQA's "train" or "test" split."""
    try:
        import easy_vqa
    except ModuleNotFoundError as e:
        cli.check(e.name != "easy_vqa", "the easy-VQA data comes from the easy-vqa package: pip install easy-vqa")
        raise
    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())


def image_labels(questions, answers, image_ids):
    """{image id: (colour index or -100, shape index or -100)} read off the questions: a "what ..." answer names
    the colour or shape, a yes/no answer says whether the named one is there ("not"/"no" flip it), and the last
    candidate left after the others were ruled out counts too; -100 where the questions leave it open."""
    pos, neg = collections.defaultdict(set), collections.defaultdict(set)
    for q, a, i in zip(questions, answers, image_ids):
        words = set(re.findall(r"[a-z]+", q)) & set(COLORS + SHAPES)
        if a in ("yes", "no"):
            present = (a == "yes") != bool({"not", "no"} & set(re.findall(r"[a-z]+", q)))
            (pos if present else neg)[i].update(words)
        else:
            pos[i].update(words | {a})

    def label(i, names):
        known, left = pos[i] & set(names), set(names) - neg[i]
        name = next(iter(known)) if len(known) == 1 else (next(iter(left)) if len(left) == 1 else None)
        return -100 if name is None else names.index(name)
    return {i: (label(i, COLORS), label(i, SHAPES)) for i in set(image_ids)}


class VQAData:
    """One split, tokenised by the checkpoint's processor: prompt ids per distinct question (the pads depend only on
    the image size, which is fixed), pixel rows per image, answer ids + <|im_end|> per question."""

    def __init__(self, proc, split, images):
        """The questions on `images` (image ids) only; the aux labels are read off all the split's questions."""
        questions, answers, image_ids, paths = easy_vqa_split(split)
        rows = [(q, a, i) for q, a, i in zip(questions, answers, image_ids) if i in images]
        self.questions, self.answers, self.image_ids = zip(*rows)
        self.labels = image_labels(questions, answers, image_ids)
        self.pad_id = proc.pad_token_id
        t0 = time.perf_counter()
        any_image = paths[self.image_ids[0]]
        im_end = proc.tokenizer.token_to_id("<|im_end|>")
        self.prompt = {q: proc.from_cli(q, images=[any_image])["input_ids"].tolist()
                       for q in dict.fromkeys(self.questions)}
        self.answer_ids = {a: proc.encode(a) + [im_end] for a in dict.fromkeys(self.answers)}
        encoded = {i: proc.from_cli("", images=[paths[i]]) for i in dict.fromkeys(self.image_ids)}
        self.pixels = {i: b["pixel_values"] for i, b in encoded.items()}
        grids = {tuple(b["image_grid_thw"][0].tolist()) for b in encoded.values()}
        assert len(grids) == 1  # every image is resized to image_size x image_size
        self.grid = list(grids.pop())
        print(f"{split}: {len(self.questions)} questions, {len(self.pixels)} images, {len(self.prompt)} distinct "
              f"questions, grid {self.grid}, prepared in {time.perf_counter() - t0:.1f}s")

    def __len__(self):
        return len(self.questions)

    def batch(self, idx):
        """Right-padded teacher-forcing batch: input_ids, attention_mask, targets (-100 except the answer and
        <|im_end|>), pixels (pixel_values, image_grid_thw), aux labels (colour, shape) per example."""
        seqs, targets = [], []
        for j in idx:
            p, a = self.prompt[self.questions[j]], self.answer_ids[self.answers[j]]
            seqs.append(torch.tensor(p + a))
            targets.append(torch.tensor([-100] * (len(p) - 1) + a + [-100]))  # position t predicts token t + 1
        imgs = [self.image_ids[j] for j in idx]
        return dict(input_ids=pad_sequence(seqs, batch_first=True, padding_value=self.pad_id),
                    attention_mask=pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True),
                    targets=pad_sequence(targets, batch_first=True, padding_value=-100),
                    pixels=dict(pixel_values=torch.cat([self.pixels[i] for i in imgs]),
                                image_grid_thw=torch.tensor([self.grid] * len(idx))),
                    aux=torch.tensor([self.labels[i] for i in imgs]))


# ---------------------------------------------------------------------------------------------------------------
# Model, losses


def init_weights(model, layers, seed):
    """Fan-in normal init (model.py allocates the stacked experts with torch.empty); residual output projections
    scaled by 1/sqrt(2L), routers small so that routing starts near uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # model.py API: parameter names, matched by their leaf (suffix) only; the stacked experts are 3-D
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)  # norms 1, biases 0
                continue
            fan_in = p[0].numel() if p.ndim == 5 else p.shape[-1]  # Conv3d patch embedding: C*T*P*P
            std = fan_in ** -0.5
            if name.endswith("embed_tokens.weight"):
                std = 1.0  # RMSNorm reads it; unit scale like the residual stream
            elif name.endswith("pos_embed.weight"):
                std = 0.02  # learned positions start small beside the patch embedding (ViT)
            elif name.endswith("mlp.gate.weight"):
                std = 0.1 * fan_in ** -0.5
            elif name.endswith(("o_proj.weight", "experts.down_proj", "attn.proj.weight", "linear_fc2.weight")):
                std /= math.sqrt(2 * layers)
            p.copy_(torch.randn(p.shape, generator=g) * std)


class GateTap(Wrapper):
    """An MoE layer that also hands its router logits to `sink` (the training loop's balance loss needs the
    un-skipped logits with their gradient). Put around every MoE layer by `router_logits`."""

    def __init__(self, moe, sink):
        super().__init__(moe)
        self.sink = sink

    def forward(self, x, ctx):
        self.sink.append(self.inner.gate(x.reshape(-1, x.shape[-1])))  # model.py API: the MoE's router nn.Linear
        return self.inner(x, ctx)


@contextlib.contextmanager
def router_logits(net):
    """Within the block, every MoE layer appends its router logits [T, E] to the yielded list, in layer order. The
    taps come off afterwards, so state dicts and saved checkpoints never see them."""
    logits = []
    for i in net.moe_layers():
        net.layers.wrap(i, "mlp", lambda moe: GateTap(moe, logits))
    try:
        yield logits
    finally:
        for i in net.moe_layers():
            net.layers.unwrap(i, "mlp")


def balance_loss(logits, valid, k):
    """Switch-transformer load balancing per layer: E * sum_e f_e * P_e, where f_e is the share of routed slots that
    go to expert e and P_e its mean router probability over the real (non-padding) tokens; 1 when uniform."""
    losses = []
    for z in logits:  # [T, E]
        probs = z[valid].float().softmax(-1)
        losses.append(probs.shape[-1] * (slot_shares(probs, k) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def slot_shares(probs, k):
    """[E]: the share of the routed slots (every token's top-k experts) that go to each expert; probs [T, E]."""
    return F.one_hot(probs.topk(k, -1).indices, probs.shape[-1]).sum(1).float().mean(0) / k


def forward_losses(net, aux_head, b):
    """(answer loss, aux loss, balance loss, answer-token accuracy) of one batch."""
    # model.py API: encode_vision -> (visual mask, main features [n, H], deepstack list), then forward with media
    media = net.encode_vision(b["input_ids"], **b["pixels"])
    with router_logits(net) as gates:
        logits = net(b["input_ids"], b["attention_mask"], media=media, image_grid_thw=b["pixels"]["image_grid_thw"])
    tgt = b["targets"]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
    scored = tgt != -100
    acc = (logits.argmax(-1)[scored] == tgt[scored]).float().mean()
    # every visual token predicts its image's colour and shape (rows of `main` are in sequence order)
    visual, main = media[0], media[1]
    aux_logits = aux_head(main)  # [n, 8 + 3]
    lab = b["aux"].repeat_interleave(visual.sum(1), dim=0)  # [n, 2]
    aux = (F.cross_entropy(aux_logits[:, :len(COLORS)], lab[:, 0], ignore_index=-100)
           + F.cross_entropy(aux_logits[:, len(COLORS):], lab[:, 1], ignore_index=-100))
    bal = balance_loss(gates, b["attention_mask"].bool().flatten(), net.cfg.num_experts_per_tok)
    return ce, aux, bal, acc


@torch.no_grad()
def expert_loads(net, data, n=256):
    """Per MoE layer: the share of routed slots each expert gets on n training examples (real tokens only)."""
    b = data.batch(list(range(min(n, len(data)))))
    with router_logits(net) as gates:
        net(b["input_ids"], b["attention_mask"], **b["pixels"])
    valid = b["attention_mask"].bool().flatten()
    k = net.cfg.num_experts_per_tok
    return torch.stack([slot_shares(z[valid].float().softmax(-1), k) for z in gates])  # [L, E]


# ---------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One updating line on a terminal (count, rate, ETA, losses); on a pipe or log file a line every `every`."""

    def __init__(self, total, start=0, every=100, unit="step"):
        self.total, self.start, self.every, self.unit = total, start, every, unit
        self.t0 = time.perf_counter()

    def __call__(self, done, extra=""):
        dt = time.perf_counter() - self.t0
        rate = (done - self.start) / dt if dt > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        line = (f"{self.unit} {done}/{self.total} {rate:.2f} {self.unit}/s elapsed {fmt_s(dt)} "
                f"eta {fmt_s(eta)} {extra}")
        if sys.stderr.isatty():
            print("\r" + line + "\033[K", end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif done % self.every == 0 or done == self.total:
            print(line, file=sys.stderr, flush=True)


def fmt_s(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------------------------
# Training


def lr_at(step, args):
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(args):
    """Train into a temporary folder beside --out, moved into place only once the checkpoint is complete and reads
    back: a refused, failed or interrupted run leaves --out as it was."""
    questions, answers, image_ids, _ = easy_vqa_split("train")
    all_images = sorted(set(image_ids))
    cli.check(args.val_images < len(all_images), f"--val-images {args.val_images}: the training split has "
              f"{len(all_images)} images, and at least one must be left to train on")
    state = read_train_state(args)
    build = new_folder_beside(args.out)
    try:
        train_into(build, args, questions, answers, all_images, state)
        publish(build, args.out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(f"wrote {args.out}", file=sys.stderr)


def new_folder_beside(out):
    """An empty folder next to `out`, so the final rename stays on one file system."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.building-")


def publish(build, out):
    """Put the finished folder `build` at `out`, replacing an earlier checkpoint there (--overwrite) only now."""
    cli.follow_umask(build)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".replaced-")
        os.rename(out, os.path.join(old, "checkpoint"))
    os.rename(build, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_train_state(args):
    """The state an interrupted run left in --work-dir (with --resume), checked to be one before anything is made;
    whether it was made with these settings is checked once the config is known."""
    path = os.path.join(args.work_dir, "train_state.pt")
    if not (args.resume and os.path.exists(path)):
        if args.resume:
            print(f"note: --resume: no {path} yet, starting from step 0", file=sys.stderr)
        return None
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # torch raises pickle, zip and runtime errors for a file that is not a state
        raise ValueError(f"{path}: not a training state ({type(e).__name__}); delete it or drop --resume") from None
    keys = ("model", "aux_head", "opt", "step", "elapsed_s", "torch_rng", "args", "raw_config")
    cli.check(isinstance(state, dict) and all(k in state for k in keys) and isinstance(state["step"], int)
              and isinstance(state["args"], dict),
              f"{path}: not a training state of this script; delete it or drop --resume")
    cli.check(0 <= state["step"] <= args.steps and state["args"].get("steps") == args.steps,
              f"{path}: made for --steps {state['args'].get('steps')} (at step {state['step']}), not {args.steps}; "
              f"delete it or drop --resume")
    return state


def train_into(out, args, questions, answers, all_images, st):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    val_images = set(rng.sample(all_images, args.val_images)) if args.val_images else set()
    train_images = [i for i in all_images if i not in val_images]
    if args.train_images:
        train_images = sorted(rng.sample(train_images, min(args.train_images, len(train_images))))

    # the output folder's files first: the processor used for training is the one users will get. The BPE learns
    # every training question and answer (answers also stand alone, as the model emits them after "assistant\n"),
    # the chat roles and tiny.py's small general corpus; the added tokens follow it at small ids (the real
    # 151,936-row embeddings alone would be 78 MB)
    texts = list(questions) + list(answers) + ["user", "assistant", "system"] * 100 + [tiny.TINY_CORPUS]
    ids = tiny.write_qwen_tokenizer(out, vocab_size=384, texts=texts, first_added_id=None, model_max_length=4096)
    n_tokens = max(ids.values()) + 1
    vocab_size = -(-n_tokens // 64) * 64  # rows past the tokenizer are padding, as in the real checkpoint
    raw = vqa_config(ids, vocab_size, args)
    write_folder(out, raw, ids, args)
    state_path = os.path.join(args.work_dir, "train_state.pt")
    cli.check(st is None or st["raw_config"] == raw, f"{state_path}: made with other model settings; delete it or "
              f"drop --resume")
    proc = QwenProcessor.from_dir(out)
    data = VQAData(proc, "train", set(train_images))
    val = VQAData(proc, "train", val_images) if val_images else None

    # model.py API: the config dict parsed by model.py's reader, the model built from it
    cfg = read_config(os.path.join(out, "config.json"))
    net = qwen3_vl_moe.Qwen3VLMoe(cfg)
    init_weights(net, cfg.num_hidden_layers, args.seed)
    aux_head = nn.Linear(cfg.hidden_size, len(COLORS) + len(SHAPES))
    params = list(net.parameters()) + list(aux_head.parameters())
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({2 * n_params / 2**20:.2f} MiB in bf16), vocab {vocab_size} "
          f"({n_tokens} tokens), {cfg.num_hidden_layers} MoE layers x {cfg.num_experts} experts of width "
          f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}; {len(data)} training questions on "
          f"{len(set(data.image_ids))} images, image {args.image_size} px", file=sys.stderr)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    step, elapsed_before = 0, 0.0
    if st is not None:
        try:
            net.load_state_dict(st["model"])
            aux_head.load_state_dict(st["aux_head"])
            opt.load_state_dict(st["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{state_path}: does not fit this model ({str(e).splitlines()[0][:160]}); delete it "
                             f"or drop --resume") from None
        step, elapsed_before = st["step"], st["elapsed_s"]
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {state_path} at step {step}", file=sys.stderr)

    def save_state():
        os.makedirs(args.work_dir, exist_ok=True)
        tmp = state_path + ".tmp"
        torch.save(dict(model=net.state_dict(), aux_head=aux_head.state_dict(), opt=opt.state_dict(), step=step,
                        elapsed_s=elapsed_before + time.perf_counter() - t_loop, torch_rng=torch.get_rng_state(),
                        args=vars(args), raw_config=raw), tmp)
        os.replace(tmp, state_path)

    def order(epoch):  # the data order is a function of (seed, epoch), so a resumed run sees the same batches
        return torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))

    net.train()
    progress = Progress(args.steps, start=step, every=args.log_every)
    t_loop = time.perf_counter()
    smooth = None
    while step < args.steps:
        epoch, offset = divmod(step * args.batch_size, len(data))
        # a batch that runs past the end of an epoch continues with the next epoch's order
        idx = torch.cat([order(epoch), order(epoch + 1)])[offset:offset + args.batch_size].tolist()
        b = data.batch(idx)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ce, aux, bal, acc = forward_losses(net, aux_head, b)
        loss = ce + args.aux_weight * aux + args.balance_weight * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = torch.tensor([ce.item(), aux.item(), bal.item(), acc.item()])
        smooth = now if smooth is None else 0.98 * smooth + 0.02 * now
        progress(step, f"| ce {smooth[0]:.3f} aux {smooth[1]:.3f} bal {smooth[2]:.3f} tok-acc {smooth[3]:.3f}")
        if val is not None and (step % args.val_every == 0 or step == args.steps):
            print(f"step {step}: val answer-token accuracy {val_accuracy(net, val):.4f} "
                  f"({len(val)} questions on {len(val_images)} held-out training images)", file=sys.stderr)
            net.train()
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save_state()
    train_s = elapsed_before + time.perf_counter() - t_loop
    net.eval()
    loads = expert_loads(net, data)
    E = cfg.num_experts
    for layer, share in enumerate(loads):
        print(f"layer {layer} expert load x E: min {share.min() * E:.2f} max {share.max() * E:.2f} "
              f"(1 = uniform), unused experts {int((share == 0).sum())}", file=sys.stderr)

    # model.py API: save_checkpoint writes model.safetensors (bf16, hub expert layout) and config.json
    save_checkpoint(net, raw, out)
    check_reload(net, out, data)
    summary = dict(steps=args.steps, batch_size=args.batch_size, train_s=round(train_s, 1),
                   total_s=round(time.perf_counter() - t_start, 1), parameters=n_params,
                   safetensors_bytes=os.path.getsize(os.path.join(out, "model.safetensors")),
                   expert_load_max_x_E=[round(float(l.max() * E), 2) for l in loads],
                   expert_load_min_x_E=[round(float(l.min() * E), 2) for l in loads])
    print(json.dumps(summary))


@torch.no_grad()
def val_accuracy(net, val, n=1024, batch_size=128):
    """Teacher-forced: the share of held-out questions whose answer tokens and <|im_end|> are all argmax-right."""
    net.eval()
    right = 0
    idx = list(range(0, len(val), max(1, len(val) // n)))[:n]
    for s in range(0, len(idx), batch_size):
        b = val.batch(idx[s:s + batch_size])
        logits = net(b["input_ids"], b["attention_mask"], **b["pixels"])
        tgt = b["targets"]
        wrong = ((logits.argmax(-1) != tgt) & (tgt != -100)).any(1)
        right += int((~wrong).sum())
    return right / len(idx)


@torch.no_grad()
def check_reload(net, path, data, tol=1e-4):
    """The saved folder, read back by model.py's load(), must give the in-memory model's logits (with the weights
    rounded to bf16 as stored): catches any layout mix-up of the stacked experts."""
    ref = qwen3_vl_moe.Qwen3VLMoe(net.cfg)  # model.py API: the model class and its state_dict
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()})
    ref.eval()
    loaded = load(path, dtype=torch.float32, special_ids=special_token_ids(path))  # model.py API: load
    b = data.batch(list(range(min(8, len(data)))))
    a = ref(b["input_ids"], b["attention_mask"], **b["pixels"])
    c = loaded(b["input_ids"], b["attention_mask"], **b["pixels"])
    diff = (a - c).abs().max().item()
    if not diff <= tol:
        raise RuntimeError(f"{path}: the reloaded checkpoint's logits differ from the trained model's by {diff:.3g}")
    print(f"reload check: max |logit difference| {diff:.2e} after save + load()", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the path users run (load(), the processor's prompt, greedy generate with the stop ids)


@torch.no_grad()
def evaluate(path, n=None, seed=0, batch_size=64, dtype="float32"):
    """Exact-match accuracy of greedy answers on easy-VQA's test split (all questions, or a random sample of n)."""
    model = load(path, dtype=getattr(torch, dtype), special_ids=special_token_ids(path))  # model.py API: load
    proc = QwenProcessor.from_dir(path)
    questions, answers, image_ids, paths = easy_vqa_split("test")
    order = list(range(len(questions)))
    if n is not None and n < len(order):
        order = sorted(random.Random(seed).sample(order, n))
    asked, correct = collections.Counter(), collections.Counter()  # per answer
    wrong_examples = []
    progress = Progress(len(order), every=20 * batch_size, unit="question")
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        samples = [Sample(questions[j], answers[j], [paths[image_ids[j]]]) for j in chunk]
        batch = make_batch(samples, proc, "cpu", answers=False)  # the prompts, left padded as generate expects
        out = generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=4,  # model.py API
                         stop_ids=proc.stop_token_ids, **batch.pixels)
        for j, tokens in zip(chunk, out.tolist()):
            end = next((t for t, tok in enumerate(tokens) if tok in proc.stop_token_ids), len(tokens))
            text = proc.decode(tokens[:end]).strip()
            asked[answers[j]] += 1
            correct[answers[j]] += text == answers[j]
            if text != answers[j] and len(wrong_examples) < 10:
                wrong_examples.append((questions[j], answers[j], text, image_ids[j]))
        right = sum(correct.values())
        progress(s + len(chunk), f"| accuracy so far {right / (s + len(chunk)):.4f}")
    result = dict(model=path, split="test", questions=len(order), sample=None if n is None else dict(n=n, seed=seed),
                  correct=right, accuracy=round(right / len(order), 5), dtype=dtype,
                  eval_s=round(time.perf_counter() - t0, 1),
                  per_answer={a: round(correct[a] / asked[a], 4) for a in sorted(asked)})
    for q, a, got, i in wrong_examples:
        print(f"wrong: image {i} {q!r}: expected {a!r}, got {got!r}", file=sys.stderr)
    return result


def check_numbers(args, positive, non_negative):
    """The numeric arguments both training scripts share, and theirs: counts >= 1 or >= 0, finite rates."""
    for name in positive:
        cli.check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in non_negative:
        cli.check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "weight_decay", "aux_weight", "balance_weight"):
        v = getattr(args, name)
        cli.check(math.isfinite(v) and v >= 0 and (v > 0 or name != "lr"),
                  f"--{name.replace('_', '-')} must be finite and {'> 0' if name == 'lr' else '>= 0'}, got {v}")
    cli.check(args.top_k <= args.experts, f"--top-k {args.top_k} exceeds --experts {args.experts}")
    cli.check(args.image_size % (2 * args.patch_size) == 0, f"--image-size {args.image_size} must be a multiple of "
              f"2 x --patch-size ({2 * args.patch_size}): the vision tower merges 2 x 2 patches")


def check_args(args):
    """Every argument, before anything is read or written: a refused run leaves no trace."""
    check_numbers(args, ("steps", "batch_size", "hidden", "layers", "experts", "expert_width", "top_k", "image_size",
                         "patch_size", "val_every", "log_every", "eval_batch_size"),
                  ("save_every", "warmup", "train_images", "val_images"))
    cli.check(args.eval_n is None or args.eval_n >= 1 or (args.eval_n == 0 and not args.eval_only),
              f"--eval-n {args.eval_n}: must be >= 1{'' if args.eval_only else ' (0: no evaluation after training)'}")
    cli.set_threads(args.threads)
    for name in ("out", "work_dir", "model"):
        cli.check_input_path(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.eval_only:
        path = args.model or args.out
        cli.check(os.path.isdir(path), f"--eval-only: {path} is not a checkpoint folder")
        return
    cli.check(args.model is None, "--model is the folder --eval-only evaluates; training writes --out")
    cli.check(not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out}: is a file, not a folder")
    cli.check(args.overwrite or not os.path.exists(args.out) or not os.listdir(args.out),
              f"--out {args.out}: holds a checkpoint already{' (the shipped tiny-vqa)' if os.path.abspath(args.out) == DEFAULT_OUT else ''}; "
              f"add --overwrite to replace it when the new one is complete, or give another --out")
    cli.check_output(os.path.join(args.out, "config.json"), "--out")
    cli.check_output(os.path.join(args.work_dir, "train_state.pt"), "--work-dir")


def main(args):
    check_args(args)
    if not args.eval_only:
        train(args)
        if args.eval_n == 0:
            return
    result = evaluate(args.model or args.out, n=args.eval_n, seed=args.eval_seed, batch_size=args.eval_batch_size,
                      dtype=args.dtype)
    print(f"held-out accuracy {result['accuracy']:.4f} ({result['correct']}/{result['questions']} easy-VQA test "
          f"questions, greedy generate, exact match)", file=sys.stderr)
    print(json.dumps(result))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a tiny Qwen3-VL-MoE on easy-VQA (CPU) and/or measure its held-out "
                                "accuracy through load() + generate.", formatter_class=cli.HelpFormatter)
    p.add_argument("--out", default=os.path.relpath(DEFAULT_OUT), help="checkpoint folder to write; an existing "
                   "checkpoint is replaced only with --overwrite, once the new one is complete")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out (the shipped tiny-vqa by "
                   "default) when training has finished")
    p.add_argument("--work-dir", default=os.path.relpath(os.path.join(ROOT, "out", "tiny-vqa-train")),
                   help="where the resumable training state goes")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt if present")
    p.add_argument("--save-every", type=int, default=500, help="steps between training states (0 = never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default); these ops are "
                   "tiny, so one thread is about as fast as two and does not stall when another job shares the cores")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=4, help="decoder layers, all MoE")
    g.add_argument("--experts", type=int, default=32)
    g.add_argument("--expert-width", type=int, default=48, help="moe_intermediate_size, the routed experts' width")
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--image-size", type=int, default=64, help="pixels per side the images are resized to")
    g.add_argument("--patch-size", type=int, default=8, help="vision patch side in pixels (Qwen3-VL: 16); 8 px "
                   "patches of the native 64 px images learn shapes much sooner than 16 px ones")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1600)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--aux-weight", type=float, default=1.0, help="weight of the colour/shape loss on visual tokens")
    g.add_argument("--balance-weight", type=float, default=0.01, help="weight of the router load-balancing loss")
    g.add_argument("--train-images", type=int, default=0, help="train on this many images only (0 = all)")
    g.add_argument("--val-images", type=int, default=200,
                   help="hold out this many training images for a teacher-forced validation accuracy")
    g.add_argument("--val-every", type=int, default=250)
    g.add_argument("--log-every", type=int, default=100, help="steps between progress lines when not on a terminal")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-only", action="store_true", help="skip training; evaluate --model (default --out)")
    g.add_argument("--model", help="checkpoint folder to evaluate (default --out)")
    g.add_argument("--eval-n", type=int, default=None,
                   help="evaluate a random sample of this many test questions (default all; 0 = no evaluation)")
    g.add_argument("--eval-seed", type=int, default=0, help="seed of the --eval-n sample")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="evaluation compute dtype")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args())
