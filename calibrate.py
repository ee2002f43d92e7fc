"""
Calibration of MoDES's global layer factors alpha (arXiv 2511.15690 §5.1 Eq. 4; modes.md §3).

alpha[l][m] measures how much the output distribution moves when the routed experts of MoE layer l are removed
for the tokens of modality m (text or vision):

    KL_sum[l][m] = sum over answer tokens of KL(P_original || P_removed(l, m))
    alpha[l][m]  = KL_sum[l][m] / sum_l' KL_sum[l'][m]         (each modality sums to 1 over the MoE layers)

Notable features
- Cached prefix: layers before l see exactly the original inputs, so every ablation of layer l starts from the
  original pass's layer-l input h_l; the text and vision ablations of a layer run as one doubled batch. This costs
  L + 2 * sum_l (L - l) layer passes per batch instead of (1 + 2L) * L; `--naive` runs the full passes.
- Removal by module replacement: the layer's MoE is wrapped (RemoveRouted) and given a policy that drops every
  slot of the removed tokens. `--removal zero` (the paper) makes their routed output 0; `--removal input` is the
  official code's substitution of the MoE input (modes.md §3.3). Shared experts (Kimi-VL) run in both.
- Teacher-forced answers: the loss is on the logits that predict the answer tokens and the end-of-turn marker.
- Data: a JSONL file, GQA's question JSON + image folder, or a built-in synthetic set of rendered shapes.
- Resumable (`--resume`: a sidecar partial file is replaced atomically after every batch) and data-parallel under
  torchrun (samples sharded over ranks, sums all-reduced, rank 0 writes).
- `fingerprint(model)`: the config hash + tensor shapes that alpha and threshold files are checked against.

Indexing: files key alpha by absolute decoder-layer index (Qwen3-VL-MoE 0..47, Kimi-VL 1..26; Kimi's layer 0 is a
dense MLP and has no alpha); `alpha_table` turns them into the [L, 2] table router.MoDES takes, 0 on dense rows.

Examples
    python calibrate.py                                            # tiny built-in model, synthetic data
    python calibrate.py --model ~/Qwen3-VL-30B-A3B-Instruct --data gqa.jsonl --n 1024 --batch-size 8 \
        --device cuda --dtype bfloat16 --out alpha-qwen3.json
    torchrun --nproc_per_node 8 calibrate.py --model ~/Kimi-VL-A3B-Instruct --gqa-questions \
        testdev_balanced_questions.json --gqa-images images/ --num-samples 1024 --seed 0 --device cuda --dtype bfloat16
    (under torchrun, --n and --start are taken by torchrun itself: use --num-samples / --start-index)
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import model as M
import processor
import router

# B batch rows, S sequence, H hidden, V vocabulary, N answer positions, G stacked copies, T = B * S, K top-k slots

SKIP = -1
TEXT, VISION = 0, 1  # token modality codes; SPECIAL (2) tokens are never removed
MODALITIES = ("text", "vision")  # column m of every [.., 2] table
ALPHA_FORMAT = "modes-alpha/1"
PARTIAL_FORMAT = "modes-alpha-partial/1"
PIXEL_KEYS = M.PIXEL_KEYS
END_OF_TURN = "<|im_end|>"  # the turn end of both Qwen3-VL and Kimi-VL


# ---------------------------------------------------------------------------------------------------------------
# Model identity, files, progress, distributed


def fingerprint(model) -> str:
    """sha256 of the model's config and parameter shapes: equal for the same architecture in any dtype or device,
    different for any other checkpoint layout. Weights are not read (it works on the meta device)."""
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    blob = json.dumps({"model_type": model.cfg.model_type, "config": dataclasses.asdict(model.cfg), "shapes": shapes},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json_atomic(path, doc):
    """Write doc as JSON to a temporary file in the same folder, then rename it over path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


class Progress:
    """A status line on stderr: redrawn in place on a terminal, else printed every 10% or 30 s."""

    def __init__(self, name, total, quiet=False):
        self.name, self.total, self.quiet = name, total, quiet or not is_main()
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.last_done = 0

    def update(self, done, note="", finished=False):
        if self.quiet:
            return
        now = time.perf_counter()
        finished = finished or done >= self.total
        if self.tty and not finished and now - self.last < 0.2:
            return
        if not self.tty and not finished and done - self.last_done < self.total / 10 and now - self.last < 30:
            return
        rate = (now - self.t0) / max(done, 1)
        eta = f"ETA {rate * (self.total - done):.0f} s" if not finished else f"{now - self.t0:.1f} s"
        line = f"{self.name}: {done}/{self.total}{' ' + note if note else ''} | {rate:.2f} s each, {eta}"
        print(("\r" + line + "\033[K") if self.tty else line, end="\n" if finished or not self.tty else "",
              file=sys.stderr, flush=True)
        self.last, self.last_done = now, done


def init_distributed(device):
    """(rank, world size, device) under torchrun (nccl on CUDA, gloo on CPU), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def all_sum(t):
    """t summed over ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def shard(items, rank, world):
    """Rank's contiguous slice of items (the official code's split)."""
    size = math.ceil(len(items) / world)
    return items[rank * size:(rank + 1) * size]


# ---------------------------------------------------------------------------------------------------------------
# Calibration data: JSONL, GQA, synthetic


@dataclass
class Sample:
    """One image-question-answer example; images are paths or PIL images, video a path or None."""
    question: str
    answer: str
    images: list
    video: str = None
    where: str = ""  # "file:line" or "synthetic 3", for messages and the data hash


def read_jsonl(path):
    """Samples of a JSONL file: {"image": path or [paths], "video": path, "question": str, "answer": str} per line,
    paths relative to the file. Blank lines are skipped; any other problem names its line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{where}: '{key}' must be a non-empty string")
            images = row.get("image") or []
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ValueError(f"{where}: 'image' must be a path or a list of paths")
            video = row.get("video")
            if video is not None and not isinstance(video, str):
                raise ValueError(f"{where}: 'video' must be a path")
            images = [os.path.join(folder, p) for p in images]
            video = None if video is None else os.path.join(folder, video)
            for p in images + ([video] if video else []):
                if not os.path.exists(p):
                    raise FileNotFoundError(f"{where}: file not found: {p}")
            samples.append(Sample(row["question"], row["answer"], images, video, where))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def read_gqa(questions_path, image_dir):
    """Samples of a GQA question file ({question id: {imageId, question, fullAnswer, ...}}) in file order, with the
    fullAnswer sentence as the answer and images at image_dir/<imageId>.jpg, as the official calibration does."""
    questions = read_json(questions_path, "GQA questions")
    if not isinstance(questions, dict):
        raise ValueError(f"{questions_path}: expected an object of question id -> question")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"GQA image folder not found: {image_dir}")
    samples = []
    for qid, q in questions.items():
        where = f"{questions_path}: question {qid}"
        if not isinstance(q, dict) or not all(isinstance(q.get(k), str) for k in ("imageId", "question")):
            raise ValueError(f"{where}: needs string fields imageId and question")
        answer = q.get("fullAnswer") or q.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: needs a fullAnswer or answer string")
        image = os.path.join(image_dir, q["imageId"] + ".jpg")
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image not found: {image}")
        samples.append(Sample(q["question"], answer, [image], None, where))
    if not samples:
        raise ValueError(f"{questions_path}: no questions")
    return samples


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")


def synthetic_samples(n=32, size=256, seed=0):
    """n rendered images of 1 to 4 shapes of one kind and colour on a light background, each with a question about
    the colour, the shape or the count and a full-sentence answer. Deterministic for a given seed."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 4)
        image = Image.new("RGB", (size, size), (245, 245, 240))
        draw = ImageDraw.Draw(image)
        cell = size // 2
        for j in rng.sample(range(4), count):  # one shape per quadrant, jittered
            r = rng.randint(cell // 5, cell // 3)
            cx = (j % 2) * cell + cell // 2 + rng.randint(-cell // 8, cell // 8)
            cy = (j // 2) * cell + cell // 2 + rng.randint(-cell // 8, cell // 8)
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        plural = shape + ("s" if count > 1 else "")
        question, answer = rng.choice([
            ("What color are the shapes?", f"The {plural} are {colour}." if count > 1 else f"The {shape} is {colour}."),
            ("What shape is in the image?", f"The image shows {NUMBERS[count - 1]} {colour} {plural}."),
            ("How many shapes are there?", f"There {'are' if count > 1 else 'is'} {NUMBERS[count - 1]} {plural}."),
        ])
        samples.append(Sample(question, answer, [image], None, f"synthetic {i}"))
    return samples


def select(samples, n=None, start=0, seed=None):
    """n samples from index start on: the first n (the official code), or a random n with a seed (the paper).
    n=None takes up to 1024, the paper's calibration size."""
    pool = samples[start:]
    if start < 0 or not pool:
        raise ValueError(f"--start {start} leaves no samples (there are {len(samples)})")
    if n is None:
        n = min(1024, len(pool))
    if not 1 <= n <= len(pool):
        raise ValueError(f"--n {n} must be between 1 and the {len(pool)} samples from --start {start}")
    if seed is None:
        return pool[:n]
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


def data_hash(samples):
    """Identity of a sample list, for checking that a resumed run sees the same data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.where, s.question, s.answer, [p if isinstance(p, str) else "" for p in s.images],
                             s.video]).encode())
    return h.hexdigest()


def load_samples(args):
    """The calibration samples chosen by the data arguments, and a description of them for output files."""
    if args.data and args.gqa_questions:
        raise ValueError("give either --data or --gqa-questions, not both")
    if args.gqa_questions:
        if not args.gqa_images:
            raise ValueError("--gqa-questions needs --gqa-images (the folder of <imageId>.jpg files)")
        samples, source = read_gqa(args.gqa_questions, args.gqa_images), os.path.abspath(args.gqa_questions)
    elif args.data:
        samples, source = read_jsonl(args.data), os.path.abspath(args.data)
    else:
        samples, source = synthetic_samples(), "synthetic"
    chosen = select(samples, args.n, args.start, args.seed)
    info = dict(source=source, n=len(chosen), start=args.start, seed=args.seed, batch_size=args.batch_size,
                sha256=data_hash(chosen))
    return chosen, info


def add_data_args(p):
    g = p.add_argument_group("calibration data (default: the built-in synthetic set)")
    g.add_argument("--data", help="JSONL: {\"image\": path or [paths], \"video\": path, \"question\", \"answer\"}")
    g.add_argument("--gqa-questions", help="GQA question JSON (e.g. testdev_balanced_questions.json)")
    g.add_argument("--gqa-images", help="folder of GQA <imageId>.jpg images")
    # torchrun's own parser claims any prefix of its options (--nnodes, --start-method) anywhere on the line, so
    # under torchrun write --num-samples / --start-index, or put `--` after the script name
    g.add_argument("--n", "--num-samples", dest="n", type=int, help="number of samples (default: all, at most 1024)")
    g.add_argument("--start", "--start-index", dest="start", type=int, default=0, help="index of the first sample")
    g.add_argument("--seed", type=int, help="random subset with this seed (default: the first --n, as the code)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per forward (left padded)")


def add_model_args(p):
    p.add_argument("--model", help="checkpoint folder, or tiny-qwen (default) / tiny-kimi (built-in tiny checkpoints)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")


# ---------------------------------------------------------------------------------------------------------------
# Batches: teacher-forced prompt + answer, left padded


def load_processor(path, model):
    return processor.for_model(path, model.cfg.model_type)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] left padded
    attention_mask: torch.Tensor  # [B, S]
    pixels: dict  # processor pixel tensors and grids, samples concatenated in row order
    rows: torch.Tensor  # [N] with cols: the positions whose logits predict an answer or end-of-turn token
    cols: torch.Tensor  # [N]
    media: object = None  # vision-tower output, filled in by encode()
    original: torch.Tensor = None  # [N, V] unskipped answer logits, kept by search.py


def make_batch(samples, proc, device):
    """Prompt (user turn + generation prompt) followed by the answer and the end-of-turn marker, per sample."""
    end = proc.tokenizer.token_to_id(END_OF_TURN)
    if end is None:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token to end the answer with")
    seqs, n_answer, pixels = [], [], {}
    for s in samples:
        content = [{"type": "image", "image": im} for im in s.images]
        content += [{"type": "video", "video": s.video}] if s.video else []
        out = proc([{"role": "user", "content": content + [{"type": "text", "text": s.question}]}],
                   add_generation_prompt=True)
        answer = proc.encode(s.answer) + [end]
        seqs.append(out["input_ids"].tolist() + answer)
        n_answer.append(len(answer))
        for k in PIXEL_KEYS:
            if out.get(k) is not None:
                pixels.setdefault(k, []).append(out[k])
    B, S = len(seqs), max(map(len, seqs))
    input_ids = torch.full((B, S), proc.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    rows, cols = [], []
    for b, (seq, n) in enumerate(zip(seqs, n_answer)):
        input_ids[b, S - len(seq):] = torch.tensor(seq)
        attention_mask[b, S - len(seq):] = 1
        rows += [b] * n
        cols += range(S - 1 - n, S - 1)  # the logit at position p predicts token p + 1
    return Batch(input_ids.to(device), attention_mask.to(device),
                 {k: torch.cat(v).to(device) for k, v in pixels.items()},
                 torch.tensor(rows, device=device), torch.tensor(cols, device=device))


def encode(model, batch):
    """The vision tower's output for the batch, computed once and reused by every pass over it."""
    if batch.media is None and any(k.startswith("pixel") for k in batch.pixels) and hasattr(model, "encode_vision"):
        batch.media = model.encode_vision(batch.input_ids, **batch.pixels)
    return batch.media


def embed(model, batch, stats=None):
    media = encode(model, batch)
    extra = {} if media is None else {"media": media}
    return model.embed(batch.input_ids, batch.attention_mask, stats=stats, **extra, **batch.pixels)


def answer_logits(model, h, batch, copies=1):
    """Logits [copies, N, V] at the answer positions of h [copies * B, S, H]. The head runs on those positions only:
    the full [B, S, V] logits of a 150k vocabulary would dwarf everything else."""
    B = batch.input_ids.shape[0]
    rows = torch.cat([batch.rows + c * B for c in range(copies)])  # [copies * N]
    cols = batch.cols.repeat(copies)
    return model.head(h[rows, cols]).view(copies, len(batch.rows), -1)


def _kl(z_p, z_q):
    p = z_p.softmax(-1)
    d = z_p - z_q  # [N, V]
    return ((p * d).sum(-1) + torch.log1p((p * torch.expm1(-d)).sum(-1))).double().sum()


def kl_sum(logits_p, logits_q):
    """Sum over positions of KL(P || Q) from logits [N, V], as E_p[d] + log E_p[exp(-d)] with d = z_p - z_q.

    This touches only the small differences d, so fp32 is accurate; the textbook sum p * (log p - log q) in fp32
    rounds log-probabilities near -12 (a 150k vocabulary) and is off by more than a small KL itself. A difference
    too large for fp32's exp falls back to fp64."""
    kl = _kl(logits_p.float(), logits_q.float())
    return kl if torch.isfinite(kl) else _kl(logits_p.double(), logits_q.double())


# ---------------------------------------------------------------------------------------------------------------
# Removing one layer's routed experts for one modality


class DropTokens(nn.Module):
    """A skip policy that drops every slot of the tokens where drop [T] holds."""

    def __init__(self, drop):
        super().__init__()
        self.drop = drop

    def forward(self, routing, modality, layer):
        if self.drop.shape != modality.shape:
            raise ValueError(f"DropTokens has {tuple(self.drop.shape)} tokens, the layer {tuple(modality.shape)}")
        skip = self.drop[:, None].expand_as(routing.ids)  # [T, K]
        return routing.weights.masked_fill(skip, 0.0), routing.ids.masked_fill(skip, SKIP)


class RemoveRouted(nn.Module):
    """An MoE layer (carrying a DropTokens policy) whose removed tokens, remove [B, S], get a routed output of 0, or
    with substitute_input the MoE input itself as the official calibration does (modes.md §3.3)."""

    def __init__(self, moe, remove, substitute_input):
        super().__init__()
        self.moe, self.remove, self.substitute_input = moe, remove, substitute_input

    def forward(self, x, step, *rest):  # rest: whatever else the decoder layer hands its MLP
        y = self.moe(x, step, *rest)
        return y + x * self.remove[..., None] if self.substitute_input else y


@contextlib.contextmanager
def removed(model, layer, remove, removal):
    """Within the block, decoder layer `layer` has its routed experts removed for the tokens where remove [B, S]."""
    decoder = model.layers[layer]
    moe = decoder.mlp
    policy = moe.policy
    moe.policy = DropTokens(remove.reshape(-1))
    decoder.mlp = RemoveRouted(moe, remove, removal == "input")
    try:
        yield
    finally:
        decoder.mlp = moe
        moe.policy = policy


class CaptureInput(nn.Module):
    """An MLP wrapper that keeps up to n non-padding rows of its input, for expert_similarity."""

    def __init__(self, mlp, n):
        super().__init__()
        self.mlp, self.n, self.rows = mlp, n, []

    def forward(self, x, step, *rest):
        if sum(len(r) for r in self.rows) < self.n:
            self.rows.append(x[step.valid].float())
        return self.mlp(x, step, *rest)


def linear_cka(Y):
    """Linear CKA between every pair of E output matrices Y [E, n, H] -> [E, E] (Kornblith et al. 2019)."""
    Y = Y - Y.mean(1, keepdim=True)
    gram = (Y @ Y.transpose(1, 2)).flatten(1)  # [E, n*n]
    hsic = gram @ gram.T  # [E, E]
    norm = hsic.diagonal().sqrt()
    return hsic / (norm[:, None] * norm[None, :]).clamp(min=1e-30)


@torch.no_grad()
def expert_similarity(model, proc, samples, batch_size=4, tokens=256):
    """DiEP's expert-output similarity on calibration data: [L, E, E] linear CKA of the outputs of every pair of
    routed experts of each MoE layer on its first `tokens` input rows; zeros for dense layers."""
    layers = moe_layers(model)
    E = model.layers[layers[0]].mlp.experts.gate_up_proj.shape[0]
    device = next(model.parameters()).device
    wrappers = {i: CaptureInput(model.layers[i].mlp, tokens) for i in layers}
    for i, w in wrappers.items():
        model.layers[i].mlp = w
    try:
        for start in range(0, len(samples), batch_size):
            run_batch(model, make_batch(samples[start:start + batch_size], proc, device))
            if all(sum(len(r) for r in w.rows) >= tokens for w in wrappers.values()):
                break
    finally:
        for i, w in wrappers.items():
            model.layers[i].mlp = w.mlp
    cka = torch.zeros(len(model.layers), E, E)
    for i, w in wrappers.items():
        x = torch.cat(w.rows)[:tokens].to(w.mlp.experts.gate_up_proj.dtype)  # [n, H]
        gate, up = torch.einsum("nh,eih->eni", x, w.mlp.experts.gate_up_proj).chunk(2, dim=-1)  # [E, n, I] each
        y = torch.einsum("eni,ehi->enh", torch.nn.functional.silu(gate) * up, w.mlp.experts.down_proj)  # [E, n, H]
        cka[i] = linear_cka(y.float()).cpu()
    return cka


def run_batch(model, batch):
    h, state = embed(model, batch)
    for i in range(len(model.layers)):
        h = model.layer(i, h, state)


def moe_layers(model):
    """Decoder-layer indices of the MoE layers (Kimi-VL's dense layer 0 has no policy slot)."""
    return [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "policy")]


ROW_FIELDS = ("cos", "sin", "mask", "visual")  # per-row tensors of a layer state, dim 0 = batch
SHARED_FIELDS = ("step", "deepstack", "cache", "cache_pos")


def repeat_state(state, copies):
    """A layer state for `copies` stacked copies of the batch (rows b + c * B)."""
    names = {f.name for f in dataclasses.fields(state)}
    unknown = names - set(ROW_FIELDS) - set(SHARED_FIELDS)
    if unknown or state.cache is not None:
        raise ValueError(f"cannot stack layer state fields {sorted(unknown)}; use --separate-modalities")
    rep = {n: getattr(state, n).repeat(copies, *[1] * (getattr(state, n).ndim - 1))
           for n in ROW_FIELDS if n in names and getattr(state, n) is not None}
    step = state.step
    rep["step"] = dataclasses.replace(step, modality=step.modality.repeat(copies, 1),
                                      valid=step.valid.repeat(copies, 1))
    if "deepstack" in names:  # features of the visual positions in row order, so the copies follow each other
        rep["deepstack"] = [f.repeat(copies, 1) for f in state.deepstack]
    return dataclasses.replace(state, **rep)


@torch.inference_mode()
def ablate_batch(model, batch, layers, removal="zero", naive=False, pair=True):
    """KL sums [len(layers), 2] (float64) of one batch, its answer-token count and the layer passes it took."""
    n_layers = len(model.layers)
    h, state = embed(model, batch)
    cached = {}  # MoE layer -> its input in the original pass
    for i in range(n_layers):
        if i in layers:
            cached[i] = h
        h = model.layer(i, h, state)
    logits = answer_logits(model, h, batch)[0]  # [N, V]
    passes = n_layers
    modality, valid = state.step.modality, state.step.valid.bool()
    present = [m for m in (TEXT, VISION) if bool(((modality == m) & valid).any())]  # an absent one has KL 0
    groups = [present] if pair and not naive and present else [[m] for m in present]
    kl = torch.zeros(len(layers), 2, dtype=torch.float64)
    for j, layer in enumerate(layers):
        for group in groups:
            remove = torch.cat([modality == m for m in group])  # [G * B, S]
            with removed(model, layer, remove, removal):
                if naive:
                    h, st = embed(model, batch)
                    start = 0
                else:
                    h, st = cached[layer].repeat(len(group), 1, 1), repeat_state(state, len(group))
                    start = layer
                for i in range(start, n_layers):
                    h = model.layer(i, h, st)
            passes += (n_layers - start) * len(group)
            ablated = answer_logits(model, h, batch, copies=len(group))  # [G, N, V]
            for g, m in enumerate(group):
                kl[j, m] = kl_sum(logits, ablated[g])
    return kl, len(batch.rows), passes


def normalise(kl):
    """alpha [L_moe, 2] from KL sums: each modality's column divided by its sum over the MoE layers. Rounding can
    leave a KL a hair below 0; it is clamped like the official relu. A modality the data never removed anything
    for (no vision tokens, say) gets the uniform 1 / L_moe."""
    kl = kl.clamp(min=0)
    total = kl.sum(0, keepdim=True)
    uniform = torch.full_like(kl, 1.0 / kl.shape[0])
    return torch.where(total > 0, kl / total.clamp(min=1e-300), uniform)


def calibrate(model, proc, samples, *, batch_size=4, removal="zero", naive=False, pair=True, partial=None,
              resume=False, max_batches=None, data_info=None, quiet=False):
    """The alpha document (a dict, the same on every rank) of `model` on `samples`; None if max_batches stopped it.

    Samples are sharded over the torch.distributed ranks; one step = one batch on every rank, all-reduced. With
    `partial` (a path), the running sums are written there atomically after each step, and resume=True continues
    from them. max_batches stops after that many steps of this call, leaving the partial file.
    """
    if removal not in ("zero", "input"):
        raise ValueError(f"removal must be 'zero' or 'input', got {removal!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    router.uninstall(model)  # the original model is plain top-k
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    layers = moe_layers(model)
    mine = shard(samples, rank, world)
    steps = math.ceil(math.ceil(len(samples) / world) / batch_size)
    settings = dict(fingerprint=fingerprint(model), data=data_info or dict(n=len(samples), sha256=data_hash(samples)),
                    batch_size=batch_size, world_size=world, removal=removal, naive=naive, layers=layers)
    kl = torch.zeros(len(layers), 2, dtype=torch.float64)
    tokens, passes, naive_passes, done = 0, 0, 0, 0
    if resume and partial and os.path.isfile(partial):
        state = read_json(partial, "partial calibration")
        if state.get("format") != PARTIAL_FORMAT or state.get("settings") != settings:
            raise ValueError(f"{partial}: made with other settings (model, data, batch size, world size or "
                             f"removal); delete it or rerun without --resume")
        kl, tokens = torch.tensor(state["kl_sum"], dtype=torch.float64), state["answer_tokens"]
        passes, naive_passes, done = state["layer_passes"], state["naive_layer_passes"], state["steps_done"]
    progress = Progress("calibrate", steps, quiet)
    dev = next(model.parameters()).device
    for step in range(done, steps if max_batches is None else min(steps, done + max_batches)):
        delta = torch.zeros(len(layers) * 2 + 3, dtype=torch.float64, device=dev)  # KL sums, counts
        chunk = mine[step * batch_size:(step + 1) * batch_size]
        if chunk:
            batch_kl, n, p = ablate_batch(model, make_batch(chunk, proc, dev), layers, removal, naive, pair)
            delta[:-3] = batch_kl.flatten().to(dev)
            delta[-3:] = torch.tensor([n, p, (1 + 2 * len(layers)) * len(model.layers)], dtype=torch.float64)
        all_sum(delta)
        kl += delta[:-3].cpu().view(len(layers), 2)
        n, p, q = (int(d) for d in delta[-3:].tolist())
        tokens, passes, naive_passes = tokens + n, passes + p, naive_passes + q
        done = step + 1
        if partial and is_main():
            write_json_atomic(partial, dict(format=PARTIAL_FORMAT, settings=settings, steps_done=done,
                                            kl_sum=kl.tolist(), answer_tokens=tokens, layer_passes=passes,
                                            naive_layer_passes=naive_passes))
        progress.update(done, f"batches, {tokens} answer tokens")
    if done < steps:
        return None
    alpha = normalise(kl)
    doc = dict(
        format=ALPHA_FORMAT,
        model=dict(fingerprint=settings["fingerprint"], model_type=model.cfg.model_type,
                   num_layers=len(model.layers), moe_layers=layers),
        data=settings["data"],
        calibration=dict(loss="kl", temperature=1.0, removal=removal, naive=naive, world_size=world,
                         answer_tokens=tokens, layer_passes=passes, naive_layer_passes=naive_passes),
        layers=[dict(layer=l, text=a[0], vision=a[1]) for l, a in zip(layers, alpha.tolist())],
        kl_sum=[dict(layer=l, text=s[0], vision=s[1]) for l, s in zip(layers, kl.tolist())],
    )
    return doc


def alpha_table(doc, n_layers):
    """[n_layers, 2] fp32 alpha (text, vision) by decoder layer from an alpha document; dense layers stay 0."""
    table = torch.zeros(n_layers, 2)
    for row in doc["layers"]:
        if not 0 <= row["layer"] < n_layers:
            raise ValueError(f"alpha for layer {row['layer']} but the model has {n_layers} layers")
        table[row["layer"]] = torch.tensor([row["text"], row["vision"]])
    return table


def load_alpha(path, model):
    """The alpha document at path, refused unless it was made for this model."""
    doc = read_json(path, "alpha")
    if doc.get("format") != ALPHA_FORMAT:
        raise ValueError(f"{path}: not an alpha file (format {doc.get('format')!r}, expected {ALPHA_FORMAT!r})")
    check_fingerprint(doc, model, path)
    return doc


def check_fingerprint(doc, model, path):
    made_for = (doc.get("model") or {}).get("fingerprint")
    if made_for != fingerprint(model):
        raise ValueError(f"{path}: made for another model (fingerprint {str(made_for)[:12]}..., this model "
                         f"{fingerprint(model)[:12]}...); recalibrate for this checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def load_model(args):
    rank, world, device = init_distributed(args.device)
    path = M.resolve_model(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = M.set_expert_impl(M.load(path, device=device, dtype=dtype), "auto")  # kernels.py's fastest eager path
    return model, load_processor(path, model), path


def main(args):
    model, proc, path = load_model(args)
    samples, info = load_samples(args)
    partial = args.out + ".partial"
    t0 = time.perf_counter()
    doc = calibrate(model, proc, samples, batch_size=args.batch_size, removal=args.removal, naive=args.naive,
                    pair=not args.separate_modalities, partial=partial, resume=args.resume,
                    max_batches=args.max_batches, data_info=info, quiet=args.quiet)
    if not is_main():
        return
    if doc is None:
        print(f"stopped after --max-batches {args.max_batches}; continue with --resume (state in {partial})",
              file=sys.stderr)
        return
    doc["model"]["path"] = os.path.abspath(path)
    doc["calibration"]["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(args.out, doc)
    if os.path.exists(partial):
        os.remove(partial)
    c = doc["calibration"]
    print(f"{'layer':>5} {'alpha text':>11} {'alpha vision':>13}")
    for row in doc["layers"]:
        print(f"{row['layer']:>5} {row['text']:>11.4f} {row['vision']:>13.4f}")
    print(f"{info['n']} samples, {c['answer_tokens']} answer tokens, {c['layer_passes']} layer passes "
          f"(naive: {c['naive_layer_passes']}), {c['seconds']:.1f} s -> {args.out}")
    print(json.dumps(dict(out=os.path.abspath(args.out), samples=info["n"], answer_tokens=c["answer_tokens"],
                          layer_passes=c["layer_passes"], naive_layer_passes=c["naive_layer_passes"],
                          seconds=c["seconds"])))


def run_cli(main_fn, parser):
    """main_fn(parsed args); bad input ends as one `error: ...` line on stderr and exit status 2."""
    args = parser.parse_args()
    try:
        main_fn(args)
    except (OSError, ValueError) as e:
        if is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parser():
    p = argparse.ArgumentParser(description="Calibrate MoDES's per-layer, per-modality factors alpha.")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", default="alpha.json", help="output JSON (default: alpha.json)")
    p.add_argument("--removal", default="zero", choices=["zero", "input"],
                   help="removed tokens' routed output: zero (the paper) or the MoE input (the official code)")
    p.add_argument("--naive", action="store_true", help="full forward passes per ablation (for checking)")
    p.add_argument("--separate-modalities", action="store_true",
                   help="ablate text and vision in separate passes (half the activation memory)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial after an interruption")
    p.add_argument("--max-batches", type=int, help="stop after this many batches, keeping OUT.partial")
    return p


if __name__ == "__main__":
    run_cli(main, parser())
