"""Calibration and evaluation data: image-question-answer samples, teacher-forced batches, answer logits and KL.

- Samples from a JSONL file, GQA's question JSON + image folder, the easy-vqa package's test or train split, the
  generated scenes task (support/scenes.py: scenes-train / scenes-val / scenes-test), or a
  built-in synthetic set of rendered shapes; every file is checked when it is read, so a bad line or image is
  found before any model work and named by file and line.
- A batch is each sample's prompt (the chat template with its images and question, as at inference) followed by
  its answer and the end-of-turn marker, left padded; the loss positions are the logits that predict the answer
  tokens and the end marker.
- `kl_per_position` (and its sum `kl_sum`) computes KL(P || Q) from logits accurately in fp32 over a 150k vocabulary.

calibrate.py, search.py and evaluate.py read their data through it (see their --help).
"""
import hashlib
import json
import os
import random
from dataclasses import dataclass

import torch

from cli import check, read_json
from processor import IMAGE_SUFFIXES, PIXEL_KEYS
END_OF_TURN = "<|im_end|>"  # the turn end of ChatML (Qwen3-VL, Kimi-VL, InternVL-Qwen3); a processor may say otherwise

# B batch rows, S sequence, V vocabulary, N answer positions


@dataclass
class Sample:
    """One image-question-answer example; images are paths or PIL images, video a path or None."""
    question: str
    answer: str
    images: list
    video: str = None
    where: str = ""  # "file:line" or "synthetic 3", for messages and the data hash
    key: str = None  # the answer's key word, if only it is scored (evaluate.py: answer_is_right)


def normalised_words(text):
    """The words of an answer as they are compared: lower case, punctuation dropped."""
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


def answer_is_right(generated, sample):
    """Exact match, case and punctuation ignored: of the whole answer, or where the sample has a key word, of that
    word in its place, i.e. the generated answer ends with the key and the words the reference has after it, whatever
    comes before ("..., so the sum is 12." is right with a wrong digit listed: the key word is what is scored)."""
    got, ref = normalised_words(generated), normalised_words(sample.answer)
    if sample.key is None:
        return got == ref
    tail = ref[len(ref) - 1 - ref[::-1].index(normalised_words(sample.key)[0]):]  # from the key's last occurrence
    return len(got) >= len(tail) and got[len(got) - len(tail):] == tail


def check_image(path, where):
    """Refuse a path that is not a readable image, naming the sample it came from. The image is decoded, so a
    truncated file is found here, before any model work, and not when its batch is reached."""
    from PIL import Image
    check(os.path.exists(path), f"{where}: file not found: {path}")
    check(os.path.isfile(path), f"{where}: {path} is a folder, expected an image file")
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: {path} is not a readable image ({e})") from None


def check_video(path, where):
    """Refuse a video that is not a folder of readable frame images or a readable animated image file."""
    check(os.path.exists(path), f"{where}: file not found: {path}")
    if os.path.isdir(path):
        frames = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        check(frames, f"{where}: video folder {path} has no image files ({', '.join(IMAGE_SUFFIXES)})")
        for name in frames:
            check_image(os.path.join(path, name), where)
    else:
        check_image(path, where)


def read_jsonl(path):
    """Samples of a JSONL file: {"image": path or [paths], "video": path, "question": str, "answer": str, "key": str}
    per line (image, video and key optional), paths relative to the file; key is one word of the answer, the word
    that is scored. Blank lines are skipped; any other problem names its line."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path}: is a folder, expected a JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    samples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            check(isinstance(row, dict), f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("question", "answer"):
                check(isinstance(row.get(key), str) and row[key].strip(),
                      f"{where}: '{key}' must be a non-empty string")
            key = row.get("key")
            check(key is None or isinstance(key, str) and len(normalised_words(key)) == 1 and
                  normalised_words(key)[0] in normalised_words(row["answer"]),
                  f"{where}: 'key' must be one word of the answer, got {key!r}")
            images = row.get("image") or []
            images = [images] if isinstance(images, str) else images
            check(isinstance(images, list) and all(isinstance(p, str) for p in images),
                  f"{where}: 'image' must be a path or a list of paths")
            video = row.get("video")
            check(video is None or isinstance(video, str), f"{where}: 'video' must be a path")
            images = [os.path.join(folder, p) for p in images]
            for p in images:
                check_image(p, where)
            if video is not None:
                video = os.path.join(folder, video)
                check_video(video, where)
            samples.append(Sample(row["question"], row["answer"], images, video, where, key))
    check(samples, f"{path}: no samples")
    return samples


def read_gqa(questions_path, image_dir):
    """Samples of a GQA question file ({question id: {imageId, question, fullAnswer, ...}}) in file order, with the
    fullAnswer sentence as the answer and images at image_dir/<imageId>.jpg, as the official calibration does."""
    questions = read_json(questions_path, "GQA questions")
    check(isinstance(questions, dict), f"{questions_path}: expected an object of question id -> question")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"GQA image folder not found: {image_dir}")
    samples = []
    for qid, q in questions.items():
        where = f"{questions_path}: question {qid}"
        check(isinstance(q, dict) and all(isinstance(q.get(k), str) for k in ("imageId", "question")),
              f"{where}: needs string fields imageId and question")
        answer = q.get("fullAnswer") or q.get("answer")
        check(isinstance(answer, str) and answer.strip(), f"{where}: needs a fullAnswer or answer string")
        image = os.path.join(image_dir, q["imageId"] + ".jpg")
        check(os.path.isfile(image), f"{where}: image not found: {image}")
        samples.append(Sample(q["question"], answer, [image], None, where))
    check(samples, f"{questions_path}: no questions")
    return samples


def read_easy_vqa(split):
    """The easy-vqa data set's "train" or "test" split (the PyPI package easy-vqa ships its 64x64 images and
    one-word answers): one sample per question, in the package's order."""
    try:
        import easy_vqa
    except ImportError:
        raise ValueError("--data easy-vqa-...: needs the easy-vqa package (pip install easy-vqa)") from None
    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return [Sample(q, a, [paths[i]], None, f"easy-vqa {split} {k}")
            for k, (q, a, i) in enumerate(zip(questions, answers, image_ids))]


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


BUILT_IN = ("easy-vqa-train", "easy-vqa-test", "scenes-train", "scenes-val", "scenes-test")  # --data names


def read_samples(source):
    """All samples of --data: a JSONL file, "easy-vqa-train" / "easy-vqa-test", "scenes-train" / "scenes-val" /
    "scenes-test" (support/scenes.py, rendered in memory: 2,500 questions on 500 scenes each for val and test,
    the first 2,000 training scenes for train), or None for the synthetic set."""
    if source is None or source == "synthetic":
        return synthetic_samples()
    if source in ("easy-vqa-train", "easy-vqa-test"):
        return read_easy_vqa(source.rsplit("-", 1)[1])
    if source in ("scenes-train", "scenes-val", "scenes-test"):
        from support import scenes
        try:
            return scenes.samples(source.split("-", 1)[1])
        except ModuleNotFoundError as e:
            raise ValueError(f"--data {source}: the scenes' handwritten digits come from the scikit-learn "
                             f"package (pip install scikit-learn)") from e
    return read_jsonl(source)


def select(samples, n=None, start=0, seed=None):
    """n samples from index start on: the first n (the official code), or a random n with a seed (the paper).
    n=None takes up to 1024, the paper's calibration size."""
    check(start >= 0 and samples[start:], f"--start {start} leaves no samples (there are {len(samples)})")
    pool = samples[start:]
    n = min(1024, len(pool)) if n is None else n
    check(1 <= n <= len(pool), f"--n {n} must be between 1 and the {len(pool)} samples from --start {start}")
    if seed is None:
        return pool[:n]
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


def _file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _image_sha256(image):
    """An image file's bytes, or a PIL image's mode, size and pixels."""
    if isinstance(image, str):
        return _file_sha256(image)
    return hashlib.sha256(json.dumps([image.mode, image.size]).encode() + image.tobytes()).hexdigest()


def _video_sha256(path):
    if path is None or not os.path.isdir(path):
        return path and _file_sha256(path)
    return [_file_sha256(os.path.join(path, n)) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_SUFFIXES)]


def data_hash(samples):
    """Identity of a sample list by content (question, answer, the bytes of its images and video frames, in
    order), not by where the files are: a result made on one machine is checked on another."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.question, s.answer, [_image_sha256(p) for p in s.images], _video_sha256(s.video)])
                 .encode())
    return h.hexdigest()


def path_data_hash(samples):
    """The identity files made before 2026-12-07 hold: names and paths (where the files were on that machine)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.where, s.question, s.answer, [p if isinstance(p, str) else "" for p in s.images],
                             s.video]).encode())
    return h.hexdigest()


def same_data(samples, sha256):
    """Whether samples are the data a file recorded as sha256: by content, or by the path identity of earlier
    files (which only matches on the machine that made them, with the files where they were)."""
    return sha256 in (data_hash(samples), path_data_hash(samples))


def load_samples(args):
    """The samples chosen by the data arguments, and a description of them for output files."""
    check(not (args.data and args.gqa_questions), "give either --data or --gqa-questions, not both")
    if args.gqa_questions:
        check(args.gqa_images, "--gqa-questions needs --gqa-images (the folder of <imageId>.jpg files)")
        samples, source = read_gqa(args.gqa_questions, args.gqa_images), args.gqa_questions
    else:  # a file as the user named it: result files hold no machine's absolute paths that were not given
        samples, source = read_samples(args.data), args.data
    chosen = select(samples, args.n, args.start, args.seed)
    if args.gqa_questions:  # decoded only now: a GQA file asks about many more images than are chosen
        for s in chosen:
            check_image(s.images[0], s.where)
    info = dict(source=source or "synthetic", n=len(chosen), start=args.start, seed=args.seed,
                batch_size=args.batch_size, sha256=data_hash(chosen))
    return chosen, info


def add_data_args(p):
    g = p.add_argument_group("calibration data (default: the built-in synthetic set)")
    g.add_argument("--data", help="JSONL file ({\"image\": path or [paths], \"video\": path, \"question\", "
                   "\"answer\"} per line), easy-vqa-train / easy-vqa-test (needs pip install easy-vqa), or "
                   "scenes-train / scenes-val / scenes-test (support/scenes.py; needs pip install scikit-learn)")
    g.add_argument("--gqa-questions", help="GQA question JSON (e.g. testdev_balanced_questions.json)")
    g.add_argument("--gqa-images", help="folder of GQA <imageId>.jpg images")
    # torchrun's own parser claims any prefix of its options (--nnodes, --start-method) anywhere on the line, so
    # under torchrun write --num-samples / --start-index, or put `--` after the script name
    g.add_argument("--n", "--num-samples", dest="n", type=int, help="number of samples (default: all, at most 1024)")
    g.add_argument("--start", "--start-index", dest="start", type=int, default=0, help="index of the first sample")
    g.add_argument("--seed", type=int, help="random subset with this seed (default: the first --n, as the code)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per forward (left padded, >= 1)")


# ---------------------------------------------------------------------------------------------------------------
# Batches: teacher-forced prompt + answer, left padded


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] left padded
    attention_mask: torch.Tensor  # [B, S]
    pixels: dict  # processor pixel tensors and grids, samples concatenated in row order
    rows: torch.Tensor  # [N] with cols: the positions whose logits predict an answer or end-of-turn token
    cols: torch.Tensor  # [N]


def prompt(sample, proc):
    """The processor's output for the sample's user turn (its images, its video, then the question)."""
    content = [{"type": "image", "image": im} for im in sample.images]
    content += [{"type": "video", "video": sample.video}] if sample.video else []
    return proc([{"role": "user", "content": content + [{"type": "text", "text": sample.question}]}],
                add_generation_prompt=True)


def make_batch(samples, proc, device, answers=True, max_positions=None):
    """Prompt (user turn + generation prompt) followed by the answer and the end-of-turn marker, per sample (only
    the prompts with answers=False, for generation); a sample longer than max_positions (the model's
    max_position_embeddings) is refused by name. A processor with an answer_prefix (GPT-OSS's final-channel
    header) and its own end_of_turn gets them: the prefix joins the prompt, so only the answer and its end are
    scored."""
    end_of_turn, prefix = getattr(proc, "end_of_turn", END_OF_TURN), getattr(proc, "answer_prefix", "")
    end = proc.tokenizer.token_to_id(end_of_turn)
    check(end is not None, f"the tokenizer has no {end_of_turn} token to end the answer with")
    seqs, n_answer, pixels = [], [], {}
    for s in samples:
        try:
            out = prompt(s, proc)
        except (OSError, ValueError) as e:  # what only the model's processor refuses (an image's aspect ratio)
            raise ValueError(f"{s.where}: {e}") from None
        answer = proc.encode(s.answer) + [end] if answers else []
        seqs.append(out["input_ids"].tolist() + (proc.encode(prefix) if answers and prefix else []) + answer)
        check(max_positions is None or len(seqs[-1]) <= max_positions,
              f"{s.where}: {len(seqs[-1])} tokens, more than the model's max_position_embeddings {max_positions}")
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
    return ((p * d).sum(-1) + torch.log1p((p * torch.expm1(-d)).sum(-1))).double()  # [N]


def kl_per_position(logits_p, logits_q):
    """KL(P || Q) [N] (float64) per position from logits [N, V], as E_p[d] + log E_p[exp(-d)] with d = z_p - z_q.

    This touches only the small differences d, so fp32 is accurate; the textbook sum p * (log p - log q) in fp32
    rounds log-probabilities near -12 (a 150k vocabulary) and is off by more than a small KL itself. A difference
    too large for fp32's exp falls back to fp64."""
    kl = _kl(logits_p.float(), logits_q.float())
    return kl if torch.isfinite(kl).all() else _kl(logits_p.double(), logits_q.double())


def kl_sum(logits_p, logits_q):
    """Sum over positions of KL(P || Q) from logits [N, V] (kl_per_position)."""
    return kl_per_position(logits_p, logits_q).sum()
