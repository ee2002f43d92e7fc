"""scenes: a harder visual question answering task, generated deterministically from data that ships offline.

A scene is a 144 x 144 picture of 2 to 6 objects on a 3 x 3 grid of 48 px slots: coloured shapes (circle, square,
triangle, drawn like easy-VQA's) and coloured handwritten digits (the 1,797 8 x 8 scans of the UCI digits set that
scikit-learn's wheel bundles), each small or large, placed with jitter inside its slot. The questions need the image
and a step of reasoning. Every answer is a short sentence with one key word, the word that is scored (a generated
answer is right when it ends with the key word and the reference's words after it: data.py's answer_is_right);
where the key word needs two facts about the image (relations, arithmetic), the sentence states them first, each
right after the name of its object, and the key word comes last:

type | question | answer (key word in capitals here)
---|---|---
count_all | How many objects are there? | There are FOUR objects.
count_colour | How many red objects are there? | There are TWO red objects. / There is ONE ... / There are NO ...
count_kind | How many circles are there? (circles, squares, triangles, digits, shapes) | There are TWO circles.
colour_of | What colour is the large triangle? | The large triangle is BLUE.
kind_of | What is the small red object? | The small red object is a CIRCLE. / ... is the digit 7.
left_of | Is the red circle left of the 3? | The red circle is on the left and the 3 in the middle, so YES.
above | Is the 3 above the square? | The 3 is at the bottom and the square at the top, so NO.
larger | Is the circle larger than the green 7? | The circle is small and the green 7 large, so NO.
digit_sum | What is the sum of the digits? (with 2 or 3 digits) | The digits are 3, 5 and 4, so the sum is 12.
digit_add | What is the red digit plus the blue digit? | The red digit is 4 and the blue digit is 5, so the answer is 9.

Answers that put the yes or no first ("Yes, the red circle is left of the 3.") were not learnt: two training runs
(2,750 steps of single questions; 1,250 steps of whole-scene chats with every visual token taught its object's
place and size) answered every left-of, above and larger question the same way, larger too, though it needs only
the first object's size, while colour_of (the same look-up with the name just before the key word) was well above
chance. The decision token then has to find the first-named object back in the question; here each look-up sits
right after its name, and the key word compares two words of the answer itself, as a model that reasons before it
answers does.

Objects are named by the shortest description that picks out exactly one of them (kind, then colour + kind, size +
kind, size + colour + kind); a question that needs a description the scene does not allow is not asked. Relations
compare grid slots (left of: an earlier column; above: an earlier row), so they are never ambiguous, and are only
asked about two objects in different columns (rows, sizes); the two objects come in random order, so yes and no are
equally likely.

Splits are by scene seed, and the digit scans are split too: test scenes are seeds 0, 1, 2, ... and draw their
digits from the scans whose index is a multiple of 5; val scenes (seeds from 100,000) and train scenes (seeds from
1,000,000) draw from the other scans. Each scene asks QUESTIONS_PER_SCENE questions of different types; the
default test split is 500 scenes, 2,500 questions.

Everything is a function of the seed: `scene(seed)` is the description (a dict, JSON-able), `render(desc)` the
image and its object-id map (what pixel belongs to which object, for training's auxiliary labels), `questions(desc)`
the questions. `samples(split)` gives data.py Samples; `python support/scenes.py --split test --out DIR` writes
DIR/questions.jsonl and DIR/images/*.png, which every script's --data reads.

Examples
    python support/scenes.py --split test --out runs/scenes-test            # 500 scenes, 2,500 questions
    python support/scenes.py --split train --scenes 2000 --out runs/scenes-train
    python support/scenes.py --show 7                                        # one scene's description and questions
"""
import argparse
import gzip
import importlib.util
import json
import os
import random
import sys
from collections import Counter
from functools import lru_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as support/scenes.py

SIZE = 144  # canvas side in px: 3 x 3 slots of 48 px; with 8 px patches and 2x2 merging, 81 visual tokens
GRID = 3
SLOT = SIZE // GRID
BOX = {"small": 24, "large": 40}  # object side in px
BACKGROUND = (245, 245, 240)
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (225, 190, 20),
           "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple(str(d) for d in range(10))
KINDS = SHAPES + DIGITS
SIZES = tuple(BOX)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_OBJECTS, MAX_OBJECTS = 2, 6
# where an object is, in the words a relation's answer states before its yes or no
PLACE = {"col": ("on the left", "in the middle", "on the right"),
         "row": ("at the top", "in the middle", "at the bottom"), "size": {"small": "small", "large": "large"}}
MAX_SUMMED = 3  # digit_sum adds 2 or 3 digits: in a first training run, sums of 2 to 6 were at chance after 2,750 steps
QUESTIONS_PER_SCENE = 5
QUESTION_TYPES = ("count_all", "count_colour", "count_kind", "colour_of", "kind_of", "left_of", "above", "larger",
                  "digit_sum", "digit_add")
SPLITS = {"test": 0, "val": 100_000, "train": 1_000_000}  # the first scene seed of each split
SPLIT_SIZE = {"test": 500, "val": 500, "train": 50_000}  # default number of scenes
SAMPLE_SCENES = {"test": 500, "val": 500, "train": 2_000}  # scenes that samples() renders into memory by default


# ---------------------------------------------------------------------------------------------------------------
# Handwritten digits


@lru_cache(maxsize=1)
def digit_scans():
    """(pixels, label) of the 1,797 8 x 8 UCI handwritten digits, intensities 0..16, read from the CSV inside the
    scikit-learn package without importing it (importing sklearn would pull in scipy)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError("the scenes' handwritten digits come from the scikit-learn package: "
                                  "pip install scikit-learn", name="sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = [[int(float(v)) for v in line.split(",")] for line in f if line.strip()]
    return tuple((tuple(r[:64]), r[64]) for r in rows)


@lru_cache(maxsize=2)
def digit_pool(split):
    """{digit: [scan indices]} a split draws from: the scans whose index is a multiple of 5 for test, the rest
    for train and val, so no test scene shows a handwritten sample that training saw."""
    pool = {d: [] for d in range(10)}
    for i, (_, label) in enumerate(digit_scans()):
        if (i % 5 == 0) == (split == "test"):
            pool[label].append(i)
    return pool


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def split_of(seed):
    return "train" if seed >= SPLITS["train"] else "val" if seed >= SPLITS["val"] else "test"


def scene_seeds(split, n=None):
    """The scene seeds of a split: n (default SPLIT_SIZE[split]) consecutive seeds from the split's first."""
    n = SPLIT_SIZE[split] if n is None else n
    room = {"test": SPLITS["val"], "val": SPLITS["train"] - SPLITS["val"], "train": 2**31 - SPLITS["train"]}[split]
    if not 0 < n <= room:
        raise ValueError(f"{n} scenes do not fit in the {split} split's seed range (1 to {room:,})")
    return range(SPLITS[split], SPLITS[split] + n)


def scene(seed):
    """The description of scene `seed`: {"seed", "split", "objects": [{kind, colour, size, row, col, x, y,
    scan}]}, x, y the top-left corner of the object's box, scan the digit's scan index (None for a shape)."""
    rng = random.Random(seed)
    split = split_of(seed)
    pool = digit_pool(split)
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    objects = []
    for slot in sorted(rng.sample(range(GRID * GRID), n)):
        row, col = divmod(slot, GRID)
        kind = rng.choice(DIGITS) if rng.random() < 0.5 else rng.choice(SHAPES)
        size = rng.choice(SIZES)
        free = SLOT - BOX[size] - 4  # 2 px margin on each side of the slot
        objects.append(dict(kind=kind, colour=rng.choice(list(COLOURS)), size=size, row=row, col=col,
                            x=col * SLOT + 2 + rng.randint(0, free), y=row * SLOT + 2 + rng.randint(0, free),
                            scan=rng.choice(pool[int(kind)]) if kind in DIGITS else None))
    return dict(seed=seed, split=split, objects=objects)


def render(desc):
    """(RGB image, object-id map): the scene drawn on a SIZE x SIZE canvas, and an "L" image whose pixel is 1 + the
    index of the object drawn there (0 for background)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    ids = Image.new("L", (SIZE, SIZE), 0)
    draw, id_draw = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    for i, o in enumerate(desc["objects"]):
        b, x, y, colour = BOX[o["size"]], o["x"], o["y"], COLOURS[o["colour"]]
        if o["kind"] in DIGITS:
            pixels, _ = digit_scans()[o["scan"]]
            scan = Image.frombytes("L", (8, 8), bytes(min(255, v * 16) for v in pixels))
            alpha = scan.resize((b, b), Image.BILINEAR)  # the upscaled stroke intensity, 0..255
            solid = alpha.point(lambda v: min(255, 2 * v))  # full colour from half intensity on
            image.paste(Image.new("RGB", (b, b), colour), (x, y), solid)
            ids.paste(i + 1, (x, y), alpha.point(lambda v: 255 if v >= 128 else 0))
            continue
        box, triangle = (x, y, x + b - 1, y + b - 1), [(x + b // 2, y), (x, y + b - 1), (x + b - 1, y + b - 1)]
        for d, fill in ((draw, colour), (id_draw, i + 1)):
            if o["kind"] == "circle":
                d.ellipse(box, fill=fill)
            elif o["kind"] == "square":
                d.rectangle((x + b // 8, y + b // 8, x + b - 1 - b // 8, y + b - 1 - b // 8), fill=fill)
            else:
                d.polygon(triangle, fill=fill)
    return image, ids


# ---------------------------------------------------------------------------------------------------------------
# Questions


def describe(objects, i, use=("kind", "colour", "size")):
    """The shortest description of objects[i] by the attributes in `use` that fits no other object, as words
    ("large red circle", "green 7", "small red object"), or None if there is none."""
    o = objects[i]
    orders = [(), ("colour",), ("size",), ("size", "colour")]
    if "kind" not in use:
        orders = orders[1:]
    for extra in orders:
        if not set(extra) <= set(use):
            continue
        keys = extra + (("kind",) if "kind" in use else ())
        if sum(all(p[k] == o[k] for k in keys) for p in objects) == 1:
            words = [o[k] for k in ("size", "colour") if k in extra]
            return " ".join(words + [o["kind"] if "kind" in use else "object"])
    return None


def there_are(n, words):
    """"There are two red objects." / "There is one red object." / "There are no red objects." """
    singular, plural = words
    return f"There is one {singular}." if n == 1 else f"There are {NUMBER_WORDS[n]} {plural}."


def ask(kind, objects, rng):
    """One question of type `kind` about the objects as (question, answer, key word, refs), or None if the scene
    cannot ask it: refs [[name, object index]] are the objects the answer names, in the order it names them (what
    training's grounding labels need). Random choices are drawn from rng."""
    n = len(objects)
    digits = [o for o in objects if o["kind"] in DIGITS]
    if kind == "count_all":
        return "How many objects are there?", there_are(n, ("object", "objects")), NUMBER_WORDS[n], []
    if kind == "count_colour":
        c = rng.choice(list(COLOURS))
        k = sum(o["colour"] == c for o in objects)
        return (f"How many {c} objects are there?", there_are(k, (f"{c} object", f"{c} objects")), NUMBER_WORDS[k],
                [])
    if kind == "count_kind":
        group = rng.choice(SHAPES + ("digit", "shape"))
        k = (len(digits) if group == "digit" else n - len(digits) if group == "shape"
             else sum(o["kind"] == group for o in objects))
        return f"How many {group}s are there?", there_are(k, (group, group + "s")), NUMBER_WORDS[k], []
    if kind in ("colour_of", "kind_of"):
        use = ("kind", "size") if kind == "colour_of" else ("colour", "size")
        named = [(i, d) for i in range(n) if (d := describe(objects, i, use))]
        if not named:
            return None
        i, d = rng.choice(named)
        o = objects[i]
        if kind == "colour_of":
            return f"What colour is the {d}?", f"The {d} is {o['colour']}.", o["colour"], [[d, i]]
        what = f"the digit {o['kind']}" if o["kind"] in DIGITS else f"a {o['kind']}"
        return f"What is the {d}?", f"The {d} is {what}.", o["kind"], [[d, i]]
    if kind in ("left_of", "above", "larger"):
        key = {"left_of": "col", "above": "row", "larger": "size"}[kind]
        use = ("kind", "colour") if kind == "larger" else ("kind", "colour", "size")
        names = [describe(objects, i, use) for i in range(n)]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
                 if names[i] and names[j] and objects[i][key] != objects[j][key]]
        if not pairs:
            return None
        i, j = rng.choice(pairs)
        if rng.random() < 0.5:
            i, j = j, i
        (a, b), (p, q) = (names[i], names[j]), (objects[i], objects[j])
        yes = "yes" if (p["size"] == "large" if kind == "larger" else p[key] < q[key]) else "no"
        place = PLACE[key]
        question = (f"Is the {a} larger than the {b}?" if kind == "larger"
                    else f"Is the {a} {'left of' if kind == 'left_of' else 'above'} the {b}?")
        return question, f"The {a} is {place[p[key]]} and the {b} {place[q[key]]}, so {yes}.", yes, [[a, i], [b, j]]
    if kind == "digit_sum":
        if not 2 <= len(digits) <= MAX_SUMMED:
            return None
        s = str(sum(int(o["kind"]) for o in digits))
        listed = ", ".join(o["kind"] for o in digits[:-1]) + " and " + digits[-1]["kind"]
        return "What is the sum of the digits?", f"The digits are {listed}, so the sum is {s}.", s, []
    if kind == "digit_add":
        by_colour = Counter(o["colour"] for o in digits)
        unique = [o for o in digits if by_colour[o["colour"]] == 1]
        if len(unique) < 2:
            return None
        a, b = rng.sample(unique, 2)
        s = str(int(a["kind"]) + int(b["kind"]))
        return (f"What is the {a['colour']} digit plus the {b['colour']} digit?",
                f"The {a['colour']} digit is {a['kind']} and the {b['colour']} digit is {b['kind']}, so the answer "
                f"is {s}.", s, [[f"{o['colour']} digit", objects.index(o)] for o in (a, b)])
    raise ValueError(f"unknown question type {kind!r}")


def questions(desc, n=QUESTIONS_PER_SCENE):
    """Up to n questions of different types about the scene: [{type, question, answer, key, refs}], the types tried in
    an order drawn from the scene's seed, the inapplicable ones passed over."""
    rng = random.Random(f"questions {desc['seed']}")
    out = []
    for kind in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES)):
        qa = ask(kind, desc["objects"], rng)
        if qa is not None:
            out.append(dict(type=kind, question=qa[0], answer=qa[1], key=qa[2], refs=qa[3]))
        if len(out) == n:
            break
    return out


def split_questions(split, n_scenes=None):
    """[(scene description, question dict)] of a split, scene by scene (nothing rendered)."""
    return [(d, q) for seed in scene_seeds(split, n_scenes) for d in [scene(seed)] for q in questions(d)]


def samples(split, n_scenes=None):
    """data.py Samples of a split's first n_scenes scenes (default SAMPLE_SCENES[split]: all of test and val, the
    first 2,000 train scenes, 124 MB of images), one per question with its key word, with the rendered scene as a PIL
    image (one image object per scene); `where` names the scene and question type."""
    from data import Sample
    out, image, seed = [], None, None
    for d, q in split_questions(split, SAMPLE_SCENES[split] if n_scenes is None else n_scenes):
        if d["seed"] != seed:
            image, seed = render(d)[0], d["seed"]
        out.append(Sample(q["question"], q["answer"], [image], None, f"scenes {split} {seed} {q['type']}", q["key"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Export


def export(split, out_dir, n_scenes=None):
    """out_dir/questions.jsonl ({"image", "question", "answer", "type", "key", "scene"} per line, image paths
    relative to the file) and out_dir/images/scene-SEED.png. Returns the number of questions."""
    from cli import write_atomic
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines, done = [], set()
    for d, q in split_questions(split, n_scenes):
        name = f"images/scene-{d['seed']:07d}.png"
        if d["seed"] not in done:
            render(d)[0].save(os.path.join(out_dir, name), format="PNG")
            done.add(d["seed"])
        lines.append(json.dumps(dict(image=name, question=q["question"], answer=q["answer"], type=q["type"],
                                     key=q["key"], scene=d["seed"])))
    write_atomic(os.path.join(out_dir, "questions.jsonl"), ("\n".join(lines) + "\n").encode())
    return len(lines)


def main(args):
    if args.show is not None:
        if not 0 <= args.show < 2**31:
            raise ValueError(f"--show {args.show}: a scene seed is 0 to 2**31 - 1 (test from 0, val from "
                             f"{SPLITS['val']:,}, train from {SPLITS['train']:,})")
        d = scene(args.show)
        print(json.dumps(d))
        for q in questions(d):
            print(f"{q['type']:13s} {q['question']}  ->  {q['answer']}")
        return
    if args.out is None:
        raise ValueError("give --out DIR (or --show SEED)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; name a folder")
    scene_seeds(args.split, args.scenes)  # the count checked before anything is written
    n = export(args.split, args.out, args.scenes)
    types = Counter(q["type"] for _, q in split_questions(args.split, args.scenes))
    print(f"{args.out}/questions.jsonl: {n} questions on {len(scene_seeds(args.split, args.scenes))} {args.split} "
          f"scenes; " + ", ".join(f"{k} {types[k]}" for k in QUESTION_TYPES), file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write a split of the scenes task as JSONL + PNG images.")
    p.add_argument("--split", choices=list(SPLITS), default="test")
    p.add_argument("--scenes", type=int, help="number of scenes (default: test 500, val 500, train 50,000)")
    p.add_argument("--out", help="folder to write questions.jsonl and images/ into")
    p.add_argument("--show", type=int, metavar="SEED", help="print one scene's description and questions instead")
    return p.parse_args(argv)


if __name__ == "__main__":
    import cli
    cli.run(main, parse_args())
