"""
Frontier search of MoDES's two thresholds (arXiv 2511.15690 §5.2, Alg. 1; modes.md §5).

Minimise f(tau_text, tau_vision) subject to g(tau_text, tau_vision) >= rho over two D-point threshold grids, where
one evaluation is one teacher-forced pass over the calibration set with MoDES installed:

    f = mean KL(P_unskipped || P_skipped) over the answer tokens
    g = skipped / total top-k slots of the prefill (router.SkipStats; special tokens count in the total)

Notable features
- Frontier walk: as tau_text rises, the smallest feasible tau_vision can only fall, so one pointer walks down the
  vision grid once. At most 3D evaluations instead of D^2, all memoised; `--exhaustive` evaluates the whole grid.
- Grids as the official code: x = linspace over [0, 0.71] (text) and [0, 0.6] (vision), D = 100, mapped by the
  rectified sigmoid tau = 2 * sigmoid(10 (x - 1)) (router.threshold_grid).
- One preparation pass keeps each batch's tokens, vision features and unskipped answer logits (on the host), so an
  evaluation runs only the language model. Host memory: about N_answer_tokens * V * 2 bytes in bf16.
- Data-parallel under torchrun like calibrate.py: every rank walks the same path because f and g are all-reduced.
- `load_thresholds(path, model)` gives the router.MoDES policy for model.py --thresholds and bench.py.

Examples
    python search.py                                     # tiny built-in model and data; calibrates alpha first
    python search.py --model ~/Qwen3-VL-30B-A3B-Instruct --data gqa.jsonl --n 1024 --target 0.85 \
        --alpha alpha-qwen3.json --device cuda --dtype bfloat16 --out thresholds-qwen3-0.85.json
    python search.py --grid 8 --exhaustive               # check the frontier against all D^2 points
"""
import argparse
import hashlib
import json
import os
import sys
import time

import torch

import calibrate as C
import router

THRESHOLDS_FORMAT = "modes-thresholds/1"


# ---------------------------------------------------------------------------------------------------------------
# The two searches, on grid indices: evaluate(i, j) -> (loss, skip ratio) of tau_text[i], tau_vision[j]


def frontier_search(evaluate, n_text, n_vision, target):
    """Alg. 1: for each tau_text index q (ascending), walk the vision pointer p down while (q, p) still reaches the
    target, then score the smallest feasible p_q = p + 1. The best (loss, q, p_q) wins; None if even the largest
    thresholds fall short. With f and g monotone in each threshold this is the exhaustive optimum (Prop. 2).
    evaluate should be memoised: the walk asks for some points twice."""
    if evaluate(n_text - 1, n_vision - 1)[1] < target:
        return None
    best, p = None, n_vision - 1
    for q in range(n_text):
        while p >= 0 and evaluate(q, p)[1] >= target:
            p -= 1
        if p + 1 < n_vision:
            candidate = (evaluate(q, p + 1)[0], q, p + 1)
            best = candidate if best is None else min(best, candidate)
    return best[1:]


def exhaustive_search(evaluate, n_text, n_vision, target):
    """Every grid point; the feasible one with the smallest (loss, i, j), or None."""
    feasible = []
    for i in range(n_text):
        for j in range(n_vision):
            loss, ratio = evaluate(i, j)
            if ratio >= target:
                feasible.append((loss, i, j))
    return min(feasible)[1:] if feasible else None


# ---------------------------------------------------------------------------------------------------------------
# One evaluation = one pass over the calibration set


def move(obj, device):
    """Tensors in nested tuples / lists moved to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    return obj


class Evaluator:
    """(mean answer-token KL, prefill skip ratios) of MoDES at given thresholds, on this rank's shard of samples,
    all-reduced over ranks. Built once: batches, vision features and the unskipped logits are kept on the host."""

    def __init__(self, model, proc, samples, alpha, batch_size=4, quiet=False):
        rank, world = (C.dist.get_rank(), C.dist.get_world_size()) if C.dist.is_initialized() else (0, 1)
        self.model = model
        self.device = next(model.parameters()).device
        mine = C.shard(samples, rank, world)
        router.uninstall(model)
        self.batches = []
        progress = C.Progress("prepare", len(range(0, len(mine), batch_size)), quiet)
        with torch.inference_mode():
            for start in range(0, len(mine), batch_size):
                batch = C.make_batch(mine[start:start + batch_size], proc, self.device)
                h, state = C.embed(model, batch)
                for i in range(len(model.layers)):
                    h = model.layer(i, h, state)
                batch.original = C.answer_logits(model, h, batch)[0].cpu()  # [N, V]
                if batch.media is not None:  # the grids stay: positions are computed from them
                    batch.pixels = {k: v for k, v in batch.pixels.items() if not k.startswith("pixel")}
                batch.media = move(batch.media, "cpu")
                self.batches.append(batch)
                progress.update(len(self.batches))
        self.policy = router.MoDES(0.0, 0.0, C.alpha_table(alpha, len(model.layers)))

    def __call__(self, tau_text, tau_vision):
        self.policy.tau.copy_(torch.tensor([tau_text, tau_vision]))
        result = self.score(self.policy)
        return result["kl"], result["skip"]

    def score(self, policy):
        """One pass with `policy` installed (None = plain top-k) -> mean answer-token KL against the unskipped
        model, top-1 agreement with it, and the prefill skip ratios (all, text, vision)."""
        model = self.model
        router.install(model, lambda i: policy)
        stats = router.SkipStats(len(model.layers), self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # KL sum, top-1 agreements, answer tokens
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    h, state = C.embed(model, C.Batch(batch.input_ids, batch.attention_mask, batch.pixels, batch.rows,
                                                      batch.cols, move(batch.media, self.device)), stats)
                    for i in range(len(model.layers)):
                        h = model.layer(i, h, state)
                    logits, original = C.answer_logits(model, h, batch)[0], batch.original.to(self.device)
                    sums[0] += C.kl_sum(original, logits)
                    sums[1] += (logits.argmax(-1) == original.argmax(-1)).sum()
                    sums[2] += len(batch.rows)
        finally:
            router.uninstall(model)
        C.all_sum(sums)
        C.all_sum(stats.counts)
        prefill = stats.summary()["prefill"]
        return dict(kl=float(sums[0] / sums[2]), top1=float(sums[1] / sums[2]),
                    skip={k: prefill[k] for k in ("all", "text", "vision")})


def search(evaluate, grid_text, grid_vision, target, exhaustive=False, quiet=False):
    """The best grid point and every evaluated one: (best (i, j) or None, {(i, j): (loss, ratios)} in call order).
    evaluate(tau_text, tau_vision) -> (loss, {"all": g, "text": ..., "vision": ...})."""
    points = {}
    # the frontier walk's bound 3D stands in for its unknown total
    progress = C.Progress("search", len(grid_text) * len(grid_vision) if exhaustive else 3 * len(grid_text), quiet)

    def at(i, j):
        if (i, j) not in points:
            points[(i, j)] = evaluate(float(grid_text[i]), float(grid_vision[j]))
            loss, ratios = points[(i, j)]
            progress.update(len(points), f"evaluations, last KL {loss:.4g} at skip {ratios['all']:.3f}")
        return points[(i, j)][0], points[(i, j)][1]["all"]

    best = (exhaustive_search if exhaustive else frontier_search)(at, len(grid_text), len(grid_vision), target)
    progress.update(len(points), "evaluations", finished=True)
    return best, points


# ---------------------------------------------------------------------------------------------------------------
# Threshold files


def load_thresholds(path, model):
    """The router.MoDES policy stored at path (alpha and both taus), refused unless made for this model."""
    doc = C.read_json(path, "thresholds")
    if doc.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{path}: not a thresholds file (format {doc.get('format')!r}, "
                         f"expected {THRESHOLDS_FORMAT!r})")
    C.check_fingerprint(doc, model, path)
    return router.MoDES(doc["tau"]["text"], doc["tau"]["vision"], C.alpha_table(doc, len(model.layers)))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def get_alpha(args, model, proc, samples, info):
    """The alpha document of --alpha, made first (and written by rank 0) when the file does not exist."""
    if os.path.exists(args.alpha):
        return C.load_alpha(args.alpha, model)
    if C.is_main():
        print(f"{args.alpha} not found: calibrating alpha first", file=sys.stderr)
    doc = C.calibrate(model, proc, samples, batch_size=args.batch_size, removal=args.removal, data_info=info,
                      quiet=args.quiet)
    if C.is_main():
        C.write_json_atomic(args.alpha, doc)
    return doc


def main(args):
    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    if args.grid < 1:
        raise ValueError(f"--grid must be >= 1, got {args.grid}")
    model, proc, path = C.load_model(args)
    samples, info = C.load_samples(args)
    alpha = get_alpha(args, model, proc, samples, info)
    grid_text = router.threshold_grid(args.grid, x_min=args.text_range[0], x_max=args.text_range[1])
    grid_vision = router.threshold_grid(args.grid, x_min=args.vision_range[0], x_max=args.vision_range[1])
    t0 = time.perf_counter()
    evaluator = Evaluator(model, proc, samples, alpha, args.batch_size, args.quiet)
    best, points = search(evaluator, grid_text, grid_vision, args.target, args.exhaustive, args.quiet)
    seconds = time.perf_counter() - t0
    if best is None:
        (i, j), (loss, ratios) = max(points.items(), key=lambda kv: kv[1][1]["all"])
        raise ValueError(f"--target {args.target} is not reachable on this grid: the highest prefill skip ratio is "
                         f"{ratios['all']:.4f} (tau_text {grid_text[i]:.4g}, tau_vision {grid_vision[j]:.4g}); "
                         f"lower --target or widen --text-range/--vision-range")
    loss, ratios = points[best]
    doc = dict(
        format=THRESHOLDS_FORMAT,
        model=dict(fingerprint=C.fingerprint(model), model_type=model.cfg.model_type, path=os.path.abspath(path)),
        tau=dict(text=float(grid_text[best[0]]), vision=float(grid_vision[best[1]])),
        target_skip=args.target, loss=loss, skip_ratio=ratios,
        alpha_file=dict(path=os.path.abspath(args.alpha), sha256=file_sha256(args.alpha) if C.is_main() else None),
        layers=alpha["layers"],
        search=dict(method="exhaustive" if args.exhaustive else "frontier", evaluations=len(points),
                    max_frontier_evaluations=3 * args.grid, seconds=round(seconds, 3),
                    grid=dict(n=args.grid, map="exp", coeff=10.0, text=list(args.text_range),
                              vision=list(args.vision_range))),
        data=info,
        evaluated=[dict(i_text=i, i_vision=j, tau_text=float(grid_text[i]), tau_vision=float(grid_vision[j]),
                        kl=l, skip=r["all"], skip_text=r["text"], skip_vision=r["vision"])
                   for (i, j), (l, r) in points.items()],
    )
    if not C.is_main():
        return
    C.write_json_atomic(args.out, doc)
    text, vision = (("-" if r is None else f"{r:.4f}") for r in (ratios["text"], ratios["vision"]))
    print(f"tau_text {doc['tau']['text']:.6g}  tau_vision {doc['tau']['vision']:.6g}  KL {loss:.6g}  "
          f"skip {ratios['all']:.4f} (text {text}, vision {vision})  target {args.target}")
    print(f"{len(points)} evaluations ({doc['search']['method']}, D = {args.grid}), {seconds:.1f} s -> {args.out}")
    print(json.dumps(dict(out=os.path.abspath(args.out), tau_text=doc["tau"]["text"], tau_vision=doc["tau"]["vision"],
                          kl=loss, skip=ratios["all"], evaluations=len(points), seconds=round(seconds, 3))))


def parser():
    p = argparse.ArgumentParser(description="Search MoDES's text and vision thresholds for a target skip ratio.")
    C.add_model_args(p)
    C.add_data_args(p)
    p.add_argument("--alpha", default="alpha.json", help="alpha file; calibrated first if missing (alpha.json)")
    p.add_argument("--removal", default="zero", choices=["zero", "input"], help="removal mode when calibrating")
    p.add_argument("--target", type=float, default=0.5, help="target prefill skip ratio rho")
    p.add_argument("--grid", type=int, default=100, help="grid points D per threshold")
    p.add_argument("--text-range", type=float, nargs=2, default=(0.0, 0.71), metavar=("MIN", "MAX"),
                   help="x range of the text grid before the rectified sigmoid")
    p.add_argument("--vision-range", type=float, nargs=2, default=(0.0, 0.6), metavar=("MIN", "MAX"),
                   help="x range of the vision grid before the rectified sigmoid")
    p.add_argument("--exhaustive", action="store_true", help="evaluate all D^2 points (for checking)")
    p.add_argument("--out", default="thresholds.json", help="output JSON (default: thresholds.json)")
    return p


if __name__ == "__main__":
    C.run_cli(main, parser())
