"""
Frontier search of MoDES's two thresholds (arXiv 2511.15690 §5.2, Alg. 1).

Minimise f(tau_text, tau_vision) subject to g(tau_text, tau_vision) >= rho over two D-point threshold grids, where
one evaluation is one teacher-forced pass over the calibration set with MoDES installed:

    f = mean KL(P_unskipped || P_skipped) over the answer tokens
    g = skipped / total top-k slots of the prefill (router.SkipStats; special tokens count in the total, so g
        cannot exceed the share of non-special slots: the "ceiling" reported when a target is out of reach)

Notable features
- Frontier walk: as tau_text rises, the smallest feasible tau_vision can only fall, so one pointer walks down the
  vision grid once. At most 3D evaluations instead of D^2, memoised by threshold values; `--exhaustive` evaluates
  the whole grid.
- Grids in the paper's rectified-sigmoid spacing tau = s * 2 sigmoid(10 (x - 1)), x = linspace(0, 1, D), where s
  is just above the largest alpha of that modality: no score alpha * pi_hat exceeds it, so the grid reaches every
  skip ratio up to the ceiling whatever alpha looks like (the official grids stop at 0.1 and 0.036 and cannot
  reach high targets when alpha concentrates in one layer). `--text-range` / `--vision-range` give the official
  absolute grids instead (x over [0, 0.71] and [0, 0.6], s = 1).
- One preparation pass keeps each batch's tokens, vision features and unskipped answer logits (on the host), so an
  evaluation runs only the language model. Host memory: about N_answer_tokens * V * 4 bytes.
- Resumable: every evaluation is appended to OUT.partial; `--resume` reuses them (and continues an interrupted
  calibration of a missing --alpha from ALPHA.partial); a run without --resume refuses to overwrite either.
- Data-parallel under torchrun like calibrate.py: every rank walks the same path because f and g are all-reduced;
  or, with `--model-parallel`, one model over the ranks, which all see the same f and g.

Examples
    python search.py                                     # tiny built-in model and data; calibrates alpha first
    python search.py --model tiny-vqa --data easy-vqa-train --n 256 --alpha alpha-vqa.json --target 0.75
    python search.py --model ~/Qwen3-VL-30B-A3B-Instruct --data gqa.jsonl --n 1024 --target 0.85 \
        --alpha alpha-qwen3.json --device cuda --dtype bfloat16 --out thresholds-qwen3-0.85.json
    python search.py --grid 8 --exhaustive               # check the frontier against all D^2 points
"""
import argparse
import hashlib
import math
import os
import time

import torch
import torch.distributed as dist

from calibrate import add_model_args, calibrate, check_args, load_model
import cli
from data import add_data_args, answer_logits, kl_per_position, load_samples, make_batch
from model import build, read_config
import router
from model import SPECIAL
from support import plot, tiny

PARTIAL_FORMAT = "modes-thresholds-partial/1"
SKIP_RATIOS = ("all", "text", "vision", "text_vision")  # router.SkipStats.summary's, "all" being the search's g


# ---------------------------------------------------------------------------------------------------------------
# The two searches, on grid indices: evaluate(i, j) -> (loss, skip ratio) of tau_text[i], tau_vision[j]


def frontier_search(evaluate, n_text, n_vision, target, step=lambda q: None):
    """Alg. 1: for each tau_text index q (ascending), walk the vision pointer p down while (q, p) still reaches the
    target, then score the smallest feasible p_q = p + 1. The best (loss, q, p_q) wins; None if even the largest
    thresholds fall short. With f and g monotone in each threshold this is the exhaustive optimum (Prop. 2).
    evaluate should be memoised: the walk asks for some points twice. step(q) is called after each q."""
    if evaluate(n_text - 1, n_vision - 1)[1] < target:
        return None
    best, p = None, n_vision - 1
    for q in range(n_text):
        while p >= 0 and evaluate(q, p)[1] >= target:
            p -= 1
        if p + 1 < n_vision:
            candidate = (evaluate(q, p + 1)[0], q, p + 1)
            best = candidate if best is None else min(best, candidate)
        step(q + 1)
    return best[1:]


def exhaustive_search(evaluate, n_text, n_vision, target, step=lambda q: None):
    """Every grid point; the feasible one with the smallest (loss, i, j), or None."""
    feasible = []
    for i in range(n_text):
        for j in range(n_vision):
            loss, ratio = evaluate(i, j)
            if ratio >= target:
                feasible.append((loss, i, j))
        step(i + 1)
    return min(feasible)[1:] if feasible else None


# ---------------------------------------------------------------------------------------------------------------
# One evaluation = one pass over the calibration set


class Evaluator:
    """(mean answer-token KL, top-1 agreement, prefill skip ratios) of a policy on this rank's shard of samples,
    all-reduced over ranks, against the unskipped model, with each question's share (for bootstrap intervals). Built
    once for the model's current weights: batches, vision features and the unskipped logits are kept on the host
    (they would go stale if the weights changed)."""

    def __init__(self, model, proc, samples, alpha=None, batch_size=4, quiet=False):
        rank, self.world = cli.data_parallel(model)
        self.model = model
        self.device = model.lm_head.weight.device
        mine = cli.rank_items(samples, rank, self.world)
        self.n_questions, first = len(samples), rank * math.ceil(len(samples) / self.world)  # rank_items' slice
        router.uninstall(model)
        stats = router.SkipStats(len(model.layers), self.device)
        self.batches = []
        progress = cli.Progress("prepare", len(range(0, len(mine), batch_size)), quiet)
        with torch.inference_mode():
            for start in range(0, len(mine), batch_size):
                batch = make_batch(mine[start:start + batch_size], proc, self.device,
                                     max_positions=model.cfg.max_position_embeddings)
                media = model.encode_vision(batch.input_ids, **batch.pixels) if batch.pixels else None
                h = model.layers(*model.embed(batch.input_ids, batch.attention_mask, stats=stats, media=media,
                                              **batch.pixels))
                original = answer_logits(model, h, batch)[0].cpu()  # [N, V]
                self.batches.append((batch, move(media, "cpu"), original, (first + start + batch.rows).cpu()))
                progress.update(len(self.batches))
        progress.update(len(self.batches), finished=True)
        counts = cli.all_sum(stats.counts, self.world)[0].sum(0)  # [3 modalities, (skipped, total)] of the prefill
        self.ceiling = 1 - float(counts[SPECIAL, 1]) / max(1, float(counts[:, 1].sum()))  # special slots stay
        prefill = stats.summary()["prefill"]  # the unskipped model's score, from this pass: no second pass needed
        questions = torch.cat([question for *_, question in self.batches]) if self.batches else torch.zeros(0).long()
        tokens = torch.bincount(questions, minlength=self.n_questions).double()  # answer tokens per question
        tokens = cli.all_sum(tokens.to(self.device), self.world).tolist()
        self.unskipped = dict(kl=0.0, top1=1.0, skip={k: prefill[k] for k in SKIP_RATIOS},
                              skip_per_layer=prefill["per_layer"],
                              per_question=dict(kl_sum=[0.0] * len(tokens), top1_hits=tokens, tokens=tokens))
        self.policy = router.MoDES(0.0, 0.0, alpha) if alpha is not None else None

    def __call__(self, tau_text, tau_vision):
        """MoDES with alpha at these thresholds -> (loss, skip ratios): the search's f and g."""
        self.policy.set_thresholds(tau_text, tau_vision)
        result = self.score(self.policy)
        return result["kl"], result["skip"]

    def score(self, policy, on_batch=None):
        """One pass with `policy` installed (None = plain top-k) -> mean answer-token KL against the unskipped
        model, top-1 agreement with it, the prefill skip ratios (all, text, vision; and per layer), and per question
        the KL sum, top-1 agreements and answer tokens. on_batch(n) is called after each batch of n samples."""
        model = self.model
        router.install(model, policy)
        stats = router.SkipStats(len(model.layers), self.device)

        def compare(batch, media, original):
            h = model.layers(*model.embed(batch.input_ids, batch.attention_mask, stats=stats, media=media,
                                          **batch.pixels))
            logits = answer_logits(model, h, batch)[0]
            if on_batch is not None:
                on_batch(batch.input_ids.shape[0])
            return kl_per_position(original, logits), (logits.argmax(-1) == original.argmax(-1)).double()
        try:
            kl, top1, tokens = self.per_question_sums(compare)
        finally:
            router.uninstall(model)
        cli.all_sum(stats.counts, self.world)
        prefill = stats.summary()["prefill"]
        n = max(1.0, sum(tokens))
        return dict(kl=sum(kl) / n, top1=sum(top1) / n, skip={k: prefill[k] for k in SKIP_RATIOS},
                    skip_per_layer=prefill["per_layer"], per_question=dict(kl_sum=kl, top1_hits=top1, tokens=tokens))

    def per_question_sums(self, compare):
        """Per question, all-reduced over ranks: the sums of compare(batch, media, original)'s two per-position
        values [N] over its answer tokens, and its answer tokens -> three lists of floats."""
        sums = torch.zeros(3, self.n_questions, dtype=torch.float64, device=self.device)
        with torch.inference_mode():
            for batch, media, original, question in self.batches:
                original, question = original.to(self.device), question.to(self.device)
                first, second = compare(batch, move(media, self.device), original)
                sums[0].index_add_(0, question, first.double())
                sums[1].index_add_(0, question, second.double())
                sums[2].index_add_(0, question, torch.ones(len(question), dtype=torch.float64, device=self.device))
        return cli.all_sum(sums, self.world).tolist()


def move(obj, device):
    """Tensors in nested tuples / lists moved to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    return obj


def search(evaluate, grid_text, grid_vision, target, exhaustive=False, quiet=False, known=None, on_new=None):
    """The best grid point and every evaluated one: (best (i, j) or None, {(i, j): (loss, ratios)} in call order).
    evaluate(tau_text, tau_vision) -> (loss, {"all": g, "text": ..., "vision": ...}); results are memoised by the
    threshold values (known: {(tau_text, tau_vision): result} from an earlier run), and on_new(taus, result) is
    called after each new evaluation."""
    by_value = dict(known or {})
    points = {}
    progress = cli.Progress("search (text thresholds)", len(grid_text), quiet)
    new = [0]

    def at(i, j):
        if (i, j) not in points:
            taus = (float(grid_text[i]), float(grid_vision[j]))
            if taus not in by_value:
                by_value[taus] = evaluate(*taus)
                new[0] += 1
                if on_new:
                    on_new(taus, by_value[taus])
            points[(i, j)] = by_value[taus]
        return points[(i, j)][0], points[(i, j)][1]["all"]

    def step(q):
        progress.update(q, f"{new[0]} evaluations")
    best = (exhaustive_search if exhaustive else frontier_search)(at, len(grid_text), len(grid_vision), target, step)
    progress.update(len(grid_text), f"{new[0]} evaluations", finished=True)
    return best, points


def grids(args, alpha):
    """The text and vision threshold grids [D] and their description for the output file. A score
    alpha[l, m] * pi_hat never exceeds max_l alpha[l, m] (pi_hat <= 1, whatever skipping did to the hidden
    states), so a grid ending just above it reaches every skip ratio up to the ceiling."""
    def one(x_range, column):
        if x_range is not None:  # the official absolute grid
            return router.threshold_grid(args.grid, x_min=x_range[0], x_max=x_range[1]), dict(x=list(x_range))
        scale = float(alpha[:, column].max()) * (1 + 1e-6)  # strict <: just above, so the last point skips all
        return scale * router.threshold_grid(args.grid), dict(x=[0.0, 1.0], scale=scale)
    (text, t_info), (vision, v_info) = one(args.text_range, 0), one(args.vision_range, 1)
    return text, vision, dict(n=args.grid, map="exp", coeff=10.0, text=t_info, vision=v_info)




# ---------------------------------------------------------------------------------------------------------------
# Command line


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def calibrate_alpha(args, model, proc, samples, info, alpha_out):
    """The alpha document calibrated on the search's samples and written to --alpha (by rank 0); an interrupted
    calibration continues from ALPHA.partial with --resume."""
    if cli.is_main():
        print(f"{args.alpha} not found: calibrating alpha first", flush=True)
    doc = calibrate(model, proc, samples, batch_size=args.batch_size, removal=args.removal, partial=alpha_out.partial,
                    resume=args.resume, data_info=info, quiet=args.quiet)
    alpha_out.finish(doc)
    if dist.is_initialized():
        dist.barrier()  # every rank hashes --alpha next: not before rank 0 has written it
    return doc


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_partial(out, settings):
    """{(tau_text, tau_vision): (loss, ratios)} evaluated by an earlier run with the same settings."""
    state, path = out.read(PARTIAL_FORMAT, settings, "partial search") or dict(evaluated=[]), out.partial
    known = {}
    try:
        for k, e in enumerate(state["evaluated"]):
            skip = {m: e["skip"][m] for m in ("all", "text", "vision")}  # text / vision are None without such tokens
            cli.check(all(finite(e[x]) for x in ("tau_text", "tau_vision", "kl")) and finite(skip["all"])
                      and all(r is None or finite(r) for r in skip.values()), f"evaluated[{k}] is not finite")
            known[(float(e["tau_text"]), float(e["tau_vision"]))] = (float(e["kl"]), skip)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged ({e.__class__.__name__}: {e}); delete it to start over") from None
    return known


def main(args):
    check_args(args)
    cli.check(0.0 < args.target <= 1.0, f"--target must be in (0, 1], got {args.target}")
    cli.check(args.grid >= 1, f"--grid must be >= 1, got {args.grid}")
    for name in ("text_range", "vision_range"):
        r = getattr(args, name)
        cli.check(r is None or (finite(r[0]) and finite(r[1]) and 0.0 <= r[0] <= r[1]),
                  f"--{name.replace('_', '-')} must be finite, 0 <= MIN <= MAX, got {r}")
    inputs = [(args.data, "--data"), (args.gqa_questions, "--gqa-questions")]
    out = cli.ResumableOutput(args.out, args.resume, inputs + [(args.alpha, "--alpha")])
    alpha_out = None if os.path.exists(args.alpha) else cli.ResumableOutput(args.alpha, args.resume, inputs, "--alpha")
    samples, info = load_samples(args)
    # an existing alpha file is checked against the architecture (no weights on the meta device) before loading
    skeleton = build(read_config(tiny.resolve(args.model)), "meta")
    alpha = router.load_alpha(args.alpha, skeleton) if os.path.exists(args.alpha) else None
    model, proc, path = load_model(args)
    alpha = alpha or calibrate_alpha(args, model, proc, samples, info, alpha_out)
    t0 = time.perf_counter()
    table = router.alpha_table(alpha, model, args.alpha)
    grid_text, grid_vision, grid_info = grids(args, table)
    settings = dict(fingerprint=router.fingerprint(model), data=info["sha256"], alpha=file_sha256(args.alpha),
                    grid_text=grid_text.tolist(), grid_vision=grid_vision.tolist())
    known = read_partial(out, settings)
    evaluator = Evaluator(model, proc, samples, table, args.batch_size, args.quiet)
    evaluated = [dict(tau_text=t, tau_vision=v, kl=r[0], skip=r[1]) for (t, v), r in known.items()]

    def keep(taus, result):
        evaluated.append(dict(tau_text=taus[0], tau_vision=taus[1], kl=result[0], skip=result[1]))
        out.save(dict(format=PARTIAL_FORMAT, settings=settings, evaluated=evaluated))
    best, points = search(evaluator, grid_text, grid_vision, args.target, args.exhaustive, args.quiet, known, keep)
    seconds = time.perf_counter() - t0
    if best is None:
        (i, j), (loss, ratios) = max(points.items(), key=lambda kv: kv[1][1]["all"])
        ceiling = (f"; special tokens are never skipped, so this data's ceiling is {evaluator.ceiling:.4f}"
                   if args.target > evaluator.ceiling else "")
        raise ValueError(f"--target {args.target} is not reachable on this grid: the highest prefill skip ratio is "
                         f"{ratios['all']:.4f} (tau_text {grid_text[i]:.4g}, tau_vision {grid_vision[j]:.4g})"
                         f"{ceiling}; lower --target or widen the grids")
    loss, ratios = points[best]
    doc = dict(
        format=router.THRESHOLDS_FORMAT,
        model=dict(fingerprint=router.fingerprint(model), model_type=model.cfg.model_type,
                   path=args.model or tiny.DEFAULT),  # paths as given, never a machine's absolute path
        tau=dict(text=float(grid_text[best[0]]), vision=float(grid_vision[best[1]])),
        target_skip=args.target, loss=loss, skip_ratio=ratios, skip_ceiling=evaluator.ceiling,
        alpha_file=dict(path=args.alpha, sha256=settings["alpha"]),
        layers=alpha["layers"],
        search=dict(method="exhaustive" if args.exhaustive else "frontier", evaluations=len(points),
                    max_frontier_evaluations=3 * args.grid, seconds=round(seconds, 3), grid=grid_info),
        data=info,
        evaluated=[dict(i_text=i, i_vision=j, tau_text=float(grid_text[i]), tau_vision=float(grid_vision[j]),
                        kl=l, skip=r["all"], skip_text=r["text"], skip_vision=r["vision"])
                   for (i, j), (l, r) in points.items()],
    )
    out.finish(doc)
    if not cli.is_main():
        return
    text, vision = (("-" if r is None else f"{r:.4f}") for r in (ratios["text"], ratios["vision"]))
    print(f"tau_text {doc['tau']['text']:.6g}  tau_vision {doc['tau']['vision']:.6g}  KL {loss:.6g}  "
          f"skip {ratios['all']:.4f} (text {text}, vision {vision})  target {args.target}")
    print(f"{len(points)} grid points ({doc['search']['method']}, D = {args.grid}), {seconds:.1f} s -> {args.out}")
    if args.plot:
        print("plots:", ", ".join(plot.plot_artifact(args.out, args.plot)))


def parser():
    p = argparse.ArgumentParser(description="Search MoDES's text and vision thresholds for a target skip ratio.",
                                formatter_class=cli.HelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--alpha", default=f"{cli.RUNS}/alpha.json",
                   help=f"alpha file; calibrated first if missing (default: {cli.RUNS}/alpha.json)")
    p.add_argument("--removal", default="zero", choices=["zero", "input"], help="removal mode when calibrating")
    p.add_argument("--target", type=float, default=0.5, help="target prefill skip ratio rho, in (0, 1]")
    p.add_argument("--grid", type=int, default=100, help="grid points D per threshold")
    p.add_argument("--text-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="absolute text grid: x range before the rectified sigmoid (official: 0 0.71); default: from "
                   "the model's scores")
    p.add_argument("--vision-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="absolute vision grid (official: 0 0.6); default: from the model's scores")
    p.add_argument("--exhaustive", action="store_true", help="evaluate all D^2 points (for checking)")
    p.add_argument("--resume", action="store_true", help="reuse the evaluations an interrupted run left in OUT.partial "
                   "(and its alpha calibration's ALPHA.partial)")
    p.add_argument("--out", default=f"{cli.RUNS}/thresholds.json",
                   help=f"output JSON (default: {cli.RUNS}/thresholds.json)")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
