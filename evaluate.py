"""
The evaluation of MoDES against the unskipped model and every baseline at equal skip ratio: skip ratios, answer KL,
top-1 agreement and exact-match accuracy with retention, one row per policy, on an evaluation set.

Every baseline (baselines.py) is fitted on the calibration samples that search.py chose the thresholds on (named by
the thresholds file's data section and checked by their hash) to the skip ratio MoDES reached there, within
baselines.TOLERANCE; a rule whose ratio jumps over the target is reported at its nearest setting and marked. Then
each policy is scored on the evaluation set (--data, else built-in synthetic samples unseen in calibration):

    skip       skipped / total top-k slots of the prefill, all tokens, text and vision, and per layer
               (router.SkipStats)
    KL         mean KL(P_unskipped || P_policy) over the teacher-forced answer tokens (search.Evaluator)
    top-1      share of those answer tokens whose argmax agrees with the unskipped model
    accuracy   share of greedy answers equal to the reference, case and punctuation ignored, or where a sample has
               a key word (the scenes task; a JSONL "key"), ending with it as the reference does (--no-accuracy:
               skipped, it is one generation per sample and policy); retention = accuracy / unskipped accuracy, in %

Each of KL, top-1, accuracy and retention comes with a 95% bootstrap interval over the evaluation questions
(`ci95`; the same resamples for every policy, so retention is resampled paired with the unskipped accuracy).

Fast where it can be: questions go --batch-size at a time through the scoring passes and the greedy generation
(generate.py's batched generate, every row as alone); the unskipped answer logits are computed once per data set, in
the pass that prepares its batches, and every policy is scored against them (the unskipped row needs no pass of
its own); --fits FILE keeps the fitted settings, so a second run (a new --eval-n or --data) fits nothing. The
progress lines count calibration passes while fitting and questions while evaluating.

Every argument and file is checked before the weights load. The last stdout line is one JSON object (support/plot.py
draws the fidelity curves from these files, one per --target of the search). Under torchrun the ranks run one model
together (parallel.py's Shard) and rank 0 reports.

Examples
    python evaluate.py --thresholds runs/thresholds.json                  # tiny-qwen, built-in synthetic samples
    python evaluate.py --model tiny-vqa --thresholds runs/thresholds.json --data easy-vqa-test --eval-n 200 \
        --fits runs/fits.json                                             # fits once, kept for the next run
    python evaluate.py --model tiny-vqa --thresholds runs/thresholds.json --data easy-vqa-test --eval-n 200 \
        --baselines threshold,naee --no-accuracy --json runs/fid.json --plot runs/plots
    python evaluate.py --model ~/Qwen3-VL-30B-A3B-Instruct --thresholds thresholds-qwen3-0.85.json \
        --data gqa-test.jsonl --eval-n 1000 --device cuda --dtype bfloat16 --json fidelity-qwen3-0.85.json
"""
import argparse
import contextlib
import hashlib
import json
import os

import torch

import baselines
import cli
import processor
import router
import search
from calibrate import calibrate
from data import BUILT_IN, answer_is_right, make_batch, read_samples, same_data, select, synthetic_samples
from generate import generate, until_stop
from model import EXPERT_IMPLS, build, load, read_config, set_expert_impl
from parallel import Shard
from support import plot, tiny


# ---------------------------------------------------------------------------------------------------------------
# Exact-match accuracy


def exact_match(model, proc, samples, policy, device, batch_size=64, on_batch=None):
    """Per sample, whether its greedy answer is right (data.py's answer_is_right: the whole answer, or its key word),
    generated in left-padded batches (generate.py's generate: every row as alone). The policy stays installed: every
    later pass installs its own. on_batch(n) is called after each batch of n samples."""
    router.install(model, policy)
    hits = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = make_batch(chunk, proc, device, answers=False)
        tokens = generate(model, batch.input_ids, batch.attention_mask, stop_ids=proc.stop_token_ids,
                          max_new_tokens=max(len(proc.encode(s.answer)) for s in chunk) + 4, **batch.pixels)
        for s, row in zip(chunk, tokens):
            hits.append(answer_is_right(proc.decode(until_stop(row, proc.stop_token_ids)), s))
        if on_batch is not None:
            on_batch(len(chunk))
    return hits


# ---------------------------------------------------------------------------------------------------------------
# The baselines fitted to the skip ratio MoDES reaches on its calibration data, and the file that keeps the fits

FITS_FORMAT = "modes-fits/1"
# calibration passes a fit takes, for the progress line's estimate: a bisection over a threshold grid 1 + 7 + 1,
# over a scalar 1 + 16 + 1 (more if its range doubles), reduce-k one per k' (K + 1), DMT's frontier walk over
# 100 x 100 points about 150 (at most 300)
FIT_PASSES = {"threshold": 9, "threshold+gmlg": 9, "dmt": 150, "naee": 18, "mc-moe": 18, "diep": 18}


FIT_RULES = 2  # 2: threshold rules on MoDES's grid, threshold+gmlg with the per-layer alpha, per-sequence MC-MoE


def fits_key(doc):
    """What a fit depends on: the thresholds document (MoDES's taus, alpha and skip ratio, the calibration data
    and the model), the tolerance and the fitting rules."""
    blob = json.dumps(doc, sort_keys=True).encode()
    return dict(thresholds_sha256=hashlib.sha256(blob).hexdigest(), tolerance=baselines.TOLERANCE, rules=FIT_RULES)


def read_fits(path, key):
    """The fits kept in path ({} when it does not exist yet), refused when they were made for other thresholds
    (or calibration data, or model) or another tolerance."""
    if not path or not os.path.exists(path):
        return {}
    doc = cli.read_json(path, "fits")
    cli.check(isinstance(doc, dict) and doc.get("format") == FITS_FORMAT and isinstance(doc.get("fits"), dict),
              f"--fits {path}: not a fits file (format {FITS_FORMAT}, made by evaluate.py --fits)")
    differ = [k for k in key if doc.get("key", {}).get(k) != key[k]]
    cli.check(not differ, f"--fits {path}: fitted for another thresholds file or tolerance ({', '.join(differ)} "
              f"differ); give another --fits file, or delete this one to refit")
    for name, fit in doc["fits"].items():
        cli.check(name in baselines.BASELINES and isinstance(fit, dict)
                  and {"hyper", "calib_skip", "reached", "note"} <= set(fit),
                  f"--fits {path}: entry {name!r} is not a fitted baseline")
    return doc["fits"]


def make_policy(name, fit, gamma):
    """The policy of a fitted baseline from its saved setting, as baselines.fit_baseline builds it."""
    hyper = fit["hyper"]
    if hyper is None:
        return None
    rules = {"reduce-k": baselines.ReduceK, "threshold": baselines.Threshold,
             "threshold+gmlg": lambda t: baselines.Threshold(t, torch.tensor(fit["alpha"])),
             "dmt": lambda tau: baselines.DMT(*tau),
             "naee": baselines.NAEE, "mc-moe": baselines.MCMoE, "diep": lambda b: baselines.DiEP(b, gamma)}
    return rules[name](hyper)


class CountedPasses:
    """The calibration Evaluator as fit_baseline sees it (score only), counting its passes on a progress line."""

    def __init__(self, evaluator, progress):
        self.evaluator, self.progress, self.passes = evaluator, progress, 0

    def score(self, policy):
        result = self.evaluator.score(policy)
        self.passes += 1
        self.progress.update(self.passes, f"calibration passes ({type(policy).__name__})")
        return result


def per_layer_alpha(model, proc, calib, args):
    """The paper's per-layer alpha [L] (Eq. 4: a layer's experts removed for every token) on the calibration
    samples, which Threshold + GMLG uses in the paper's ablation (MoDES's own alpha is per layer and modality)."""
    doc = calibrate(model, proc, calib, batch_size=args.batch_size, per_layer=True, quiet=args.quiet)
    return router.alpha_table(doc, model, "per-layer alpha")[:, 0]


def fit_baselines(model, proc, args, doc, target, calib, fits, gamma):
    """Every baseline of --baselines not in fits, fitted on the calibration samples (one Evaluator: their
    unskipped logits computed once) on MoDES's grid size -> fits with them added."""
    todo = [name for name in args.baselines if name not in fits]
    if not todo:
        return fits
    layer_alpha = per_layer_alpha(model, proc, calib, args) if "threshold+gmlg" in todo else None
    grid_n = doc.get("search", {}).get("grid", {}).get("n", 100)
    calib_eval = search.Evaluator(model, proc, calib, batch_size=args.batch_size, quiet=args.quiet)
    estimate = {name: FIT_PASSES.get(name, model.cfg.num_experts_per_tok + 1) for name in todo}
    progress = cli.Progress(f"fit {len(todo)} baselines on {len(calib)} questions", sum(estimate.values()),
                            args.quiet)
    counted = CountedPasses(calib_eval, progress)
    for i, name in enumerate(todo):
        fit = baselines.fit_baseline(name, model, counted, layer_alpha, gamma, target, grid_n)
        fits[name] = {k: v for k, v in fit.items() if k != "policy"}
        if name == "threshold+gmlg":
            fits[name]["alpha"] = layer_alpha.tolist()
        progress.total = counted.passes + sum(estimate[n] for n in todo[i + 1:])  # the estimate, corrected
    progress.update(counted.passes, "calibration passes", finished=True)
    return fits


# ---------------------------------------------------------------------------------------------------------------
# MoDES and the baselines on the evaluation set


def fidelity_inputs(args):
    """(thresholds document, calibration samples, evaluation samples, fits kept in --fits), read and checked before
    the model loads: the calibration samples are those the thresholds file was searched on, re-read and checked by
    their hash."""
    path = args.thresholds
    doc = cli.read_json(path, "thresholds")
    ratio = doc["skip_ratio"].get("all") if isinstance(doc.get("skip_ratio"), dict) else None
    cli.check(search.finite(ratio) and 0 <= ratio <= 1,
              f"{path}: skip_ratio.all must be the search's skip ratio in [0, 1], got {ratio!r}")
    info = doc.get("data")
    cli.check(isinstance(info, dict) and {"source", "n", "start", "seed", "sha256"} <= set(info),
              f"{path}: no 'data' section naming its calibration samples (made by search.py?)")
    source, n, start, seed = info["source"], info["n"], info["start"], info["seed"]
    cli.check(isinstance(source, str) and isinstance(n, int) and n >= 1 and isinstance(start, int) and start >= 0
              and (seed is None or isinstance(seed, int)), f"{path}: data needs a source string, n >= 1, start >= 0 "
              f"and a seed that is an integer or null, got {dict(source=source, n=n, start=start, seed=seed)}")
    cli.check(source == "synthetic" or source in BUILT_IN or source.endswith(".jsonl"),
              f"{path}: calibration data {source} cannot be re-read here (only JSONL, easy-vqa, scenes or synthetic)")
    calib = select(read_samples(source), n, start, seed)
    cli.check(same_data(calib, info["sha256"]), f"{path}: the calibration data {source} changed since the "
              f"search (its sha256 differs)")
    evals = read_samples(args.data)[:args.eval_n] if args.data else synthetic_samples(args.eval_n, seed=1)
    fits = read_fits(args.fits, fits_key(doc))
    return doc, calib, evals, fits


def fidelity(model, source, args, modes, doc, calib, evals, fits):
    """Rows of skip ratios, mean answer-token KL and top-1 agreement against the unskipped model, and exact-match
    accuracy with retention, on the evaluation set (--data, or built-in synthetic samples unseen in calibration).
    The baselines' fits come from --fits where it has them; the new ones are written back to it."""
    target = doc["skip_ratio"]["all"]
    proc = processor.for_model(source, model.cfg.model_type, args.max_tiles)
    gamma = baselines.diep_gamma(baselines.expert_similarity(model, proc, calib)) if "diep" in args.baselines else None
    known = set(fits)
    fits = fit_baselines(model, proc, args, doc, target, calib, dict(fits), gamma)
    if args.fits and set(fits) != known and cli.is_main():
        cli.write_json(args.fits, dict(format=FITS_FORMAT, key=fits_key(doc), fits=fits))
    rows = [dict(policy="full", hyper=None, calib_skip=0.0, reached=True, note=""),
            dict(policy="modes", hyper=[doc["tau"]["text"], doc["tau"]["vision"]], calib_skip=target, reached=True,
                 note="")]
    rows += [dict(policy=name, **{k: v for k, v in fits[name].items() if k != "alpha"}) for name in args.baselines]
    policies = [None, modes] + [make_policy(name, fits[name], gamma) for name in args.baselines]
    # the unskipped answer logits: computed once, in the evaluation set's preparation pass, and reused by every row
    test_eval = search.Evaluator(model, proc, evals, batch_size=args.batch_size, quiet=True)
    fitted = [r["policy"] == "full" or p is not None for r, p in zip(rows, policies)]
    progress = cli.Progress(f"evaluate {sum(fitted)} policies on {len(evals)} questions",
                            sum(fitted) * len(evals) * (2 if args.accuracy else 1), args.quiet)
    done = [0]

    def advance(n):
        done[0] += n
        progress.update(done[0], f"questions ({r['policy']})")
    for r, policy, ok in zip(rows, policies, fitted):
        if not ok:  # not fitted: the row says why
            r.update(kl=None, top1=None, skip=dict(all=None, text=None, vision=None, text_vision=None),
                     skip_per_layer=None, accuracy=None, ci95=None)
            continue
        if r["policy"] == "full":
            r.update(test_eval.unskipped)
            advance(len(evals))
        else:
            r.update(test_eval.score(policy, on_batch=advance))
        if args.accuracy:
            r["per_question"]["correct"] = exact_match(model, proc, evals, policy, args.device, args.batch_size,
                                                       advance)
            r["accuracy"] = sum(r["per_question"]["correct"]) / len(evals)
        else:
            r["accuracy"] = None
    progress.update(progress.total, finished=True)
    bootstrap_intervals([r for r in rows if r["kl"] is not None])
    full_acc = rows[0]["accuracy"]
    print(f"# fidelity on {args.data or 'built-in synthetic samples (seed 1)'} ({len(evals)} samples); every policy "
          f"fitted to MoDES's calibration skip ratio {target:.3f} (+- {baselines.TOLERANCE})")
    print("policy | hyperparameter | calib skip | matched | skip all | text | vision | KL | top-1 | accuracy | "
          "accuracy 95% CI | retention")
    for r in rows:
        r["retention"] = None if not full_acc or r["accuracy"] is None else 100 * r["accuracy"] / full_acc
        hyper = r["hyper"] if isinstance(r["hyper"], (list, tuple)) else [r["hyper"]]  # none, one or two numbers
        print(" | ".join([r["policy"], "/".join(fmt(h, ".4g") for h in hyper), fmt(r["calib_skip"], ".3f"),
                          "yes" if r["reached"] else "NO", fmt(r["skip"]["all"], ".3f"), fmt(r["skip"]["text"], ".3f"),
                          fmt(r["skip"]["vision"], ".3f"), fmt(r["kl"], ".4g"), fmt(r["top1"], ".3f"),
                          fmt(r["accuracy"], ".3f"), fmt_interval(r["ci95"] and r["ci95"]["accuracy"], ".3f"),
                          fmt(r["retention"], ".1f")]))
    for r in rows:
        if r["note"]:
            print(f"# {r['policy']}: {r['note']}")
    return dict(source=args.model or tiny.DEFAULT, thresholds=args.thresholds, target=target, tolerance=baselines.TOLERANCE,
                eval_data=args.data or "synthetic", eval_n=len(evals), fidelity=rows)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def fmt_interval(interval, spec):
    return "-" if interval is None else f"{format(interval[0], spec)}-{format(interval[1], spec)}"


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_intervals(rows, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """Each row's 95% percentile bootstrap intervals over questions, in row["ci95"] (its per-question values leave
    the row): every row sees the same resamples, so retention, a ratio to the unskipped row's accuracy, is resampled
    paired. KL and top-1 are token means, resampled as ratios of sums (a question weighs its answer tokens)."""
    n = len(rows[0]["per_question"]["tokens"])
    pick = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))  # [R, Q] question indices

    def resampled(values):
        return torch.tensor(values, dtype=torch.float64)[pick].sum(1)  # [R]

    def interval(statistic):
        lo, hi = torch.quantile(statistic, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return [lo, hi]
    tokens = resampled(rows[0]["per_question"]["tokens"])
    full_correct = rows[0]["per_question"].get("correct")
    full_acc = None if full_correct is None else resampled(full_correct) / n
    for r in rows:
        per_question = r.pop("per_question")
        r["ci95"] = dict(kl=interval(resampled(per_question["kl_sum"]) / tokens),
                         top1=interval(resampled(per_question["top1_hits"]) / tokens), accuracy=None, retention=None)
        if "correct" in per_question:
            accuracy = resampled(per_question["correct"]) / n
            r["ci95"]["accuracy"] = interval(accuracy)
            if bool((full_acc > 0).all()):  # a resample where the unskipped model answers nothing has no ratio
                r["ci95"]["retention"] = interval(100 * accuracy / full_acc)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def check_args(args):
    """Every argument, before anything is read or loaded."""
    cli.check(args.thresholds, "--thresholds FILE is needed: MoDES's thresholds (made by search.py)")
    cli.check(args.eval_n >= 1, f"--eval-n must be >= 1, got {args.eval_n}")
    args.baselines = [b for b in args.baselines.split(",") if b]
    unknown = [b for b in args.baselines if b not in baselines.BASELINES]
    cli.check(not unknown, f"--baselines: unknown {', '.join(unknown)} (choose from {', '.join(baselines.BASELINES)})")
    cli.check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    cli.check_max_tiles(args.max_tiles)
    cli.set_threads(args.threads)
    args.device = cli.check_device(args.device)
    cli.check(not args.plot or args.json, "--plot DIR draws from the --json FILE: give both")
    for path, what in ((args.json, "--json"), (args.fits, "--fits")):
        if path:
            cli.check_output(path, what, inputs=[(args.thresholds, "--thresholds"), (args.data, "--data")])
    cli.check(not args.json or not args.fits or os.path.realpath(args.json) != os.path.realpath(args.fits),
              "--json and --fits name the same file; give two files")
    if args.plot:  # now, not after a long run
        plot.require_matplotlib()
        plot.check_out_dir(args.plot, "--plot")


def main(args):
    check_args(args)
    rank, world, args.device = cli.init_distributed(args.device)  # torchrun: the ranks run one model together
    # every file is read and checked before the weights load: the thresholds against the architecture alone (a
    # model on the meta device holds no weights), then the calibration samples they name and the evaluation samples
    source = tiny.resolve(args.model)
    modes = router.load_thresholds(args.thresholds, build(read_config(source), "meta"))
    inputs = fidelity_inputs(args)
    model = load(source, args.device, cli.DTYPES[args.dtype], Shard(rank, world), processor.special_token_ids(source))
    model = set_expert_impl(model.requires_grad_(False), args.expert_impl)
    # every rank runs the evaluation, rank 0 reports it
    with contextlib.redirect_stdout(open(os.devnull, "w")) if rank > 0 else contextlib.nullcontext():
        result = fidelity(model, source, args, modes, *inputs)
    if rank > 0:
        return
    if args.json:
        cli.write_json(args.json, result)
        if args.plot:
            print("plots:", ", ".join(plot.plot_artifact(args.json, args.plot)))
    print(json.dumps(result))


def parser():
    p = argparse.ArgumentParser(description="Compare MoDES (--thresholds) with the unskipped model and the "
                                "baselines at equal skip ratio: skip ratios, answer KL, top-1 agreement and "
                                "exact-match accuracy on an evaluation set.", formatter_class=cli.HelpFormatter)
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   "(default tiny-qwen)")
    p.add_argument("--thresholds", help="thresholds file from search.py (needed): MoDES's policy, and the "
                   "calibration samples and skip ratio the baselines are fitted to")
    p.add_argument("--data", help="evaluation data: JSONL or easy-vqa-test (default: built-in synthetic samples)")
    p.add_argument("--eval-n", type=int, default=16, help="evaluation samples: the first N of --data")
    p.add_argument("--baselines", default=",".join(baselines.BASELINES),
                   help="comma list of: " + ", ".join(baselines.BASELINES) + " (default: all)")
    p.add_argument("--fits", metavar="FILE", help="the baselines' fitted settings: read from FILE when it has them "
                   "(fitted for the same thresholds file), else fitted and written to it, so a new --eval-n or "
                   "--data does not refit (default: fitted, not kept)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per forward in the scoring passes and the "
                   "greedy generation (left padded; >= 1)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy exact-match accuracy per policy (one generation per sample and policy)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(cli.DTYPES))
    p.add_argument("--expert-impl", default="auto", choices=EXPERT_IMPLS,
                   help="routed-expert compute: ref (the readable loop) or a moe_kernels.py path (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    cli.add_max_tiles_arg(p)
    cli.add_threads_arg(p)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--plot", metavar="DIR", help="with --json: also draw the result's plots into DIR (matplotlib)")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
