"""
PNG plots of the pipeline's JSON artifacts, remade from the files alone (nothing is rerun).

Each JSON file is recognised by its content, and gives one or more plot kinds:

    alpha     calibrate.py's alpha file (format modes-alpha/1): alpha per MoE layer, text and vision
    search    search.py's thresholds file (format modes-thresholds/1): every evaluated (tau_text, tau_vision),
              coloured by skip ratio and by KL, the feasible set, the walk, the chosen point, and the walk's
              evaluations drawn on the full D x D grid
    skip      any file carrying `skip_per_layer` (generate.py --json, bench.py rows): skip ratio per decoder layer x
              modality, prefill and decode
    bench     bench.py --json speed rows: vision + LM prefill and decode ms per policy, against the decode floor
    fidelity  evaluate.py --json: accuracy, retention, answer KL and top-1 agreement against skip ratio per
              policy, with 95% bootstrap intervals where the files have them; the files of several --target values
              make the curves (the paper's Figure 1)
    layers    the same fidelity files, where they carry per-layer skip shares: MoDES's and DMT-without-GMLG's skipped
              share per MoE layer, text and vision, at each target (`fidelity-layers.png`)

`--table` prints the fidelity files as one markdown table instead (the README's tables are this output): per policy
and target, the skip ratio over all routed slots (text / vision) and over text + vision slots, answer KL, top-1
agreement, accuracy and retention with their 95% intervals; ⚠ marks a baseline that missed the target.

A PNG is named after its source file and kind (`alpha.json` -> `alpha.alpha.png`); the fidelity files given together
make one plot, `fidelity.png` when there are several. Figures have fixed sizes at 100 dpi (FIGSIZE), so a PNG's
pixel size is known in advance. matplotlib is needed only to draw and is imported there, never at import time.

Examples
    python support/plot.py runs/                                     # every artifact in runs/, PNGs written next to them
    python support/plot.py runs/ --out plots/
    python support/plot.py fid-0.3.json fid-0.5.json fid-0.7.json --out plots/     # fidelity curves over three targets
    python support/plot.py alpha.json --alpha-scale log
    python support/plot.py runs/vqa/fidelity-0.50.json runs/vqa/fidelity-0.75.json --table    # markdown, no drawing
    python -c "import json; from support import plot; plot.plot_alpha(json.load(open('alpha.json')), 'alpha.png')"
"""
import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np

# the plot kind of each format field; copied from router.py, not imported: router.py imports torch, which drawing
# does not need
FORMAT_KINDS = {"modes-alpha/1": "alpha", "modes-thresholds/1": "search"}

DPI = 100
FIGSIZE = {"alpha": (10, 5), "skip": (12, 6), "search": (18, 6), "bench": (12, 5), "fidelity": (12, 9),
           "layers": (12, 8)}
# fixed rc settings: a user's matplotlibrc (savefig.bbox: tight, another dpi or style) must not change the PNGs
STYLE = {"savefig.bbox": "standard", "savefig.dpi": DPI, "font.size": 10, "axes.titlesize": 11,
         "figure.titlesize": 13, "axes.grid": False, "legend.fontsize": 9}

# fidelity legend names of evaluate.py's policies, where they differ from the policy's name
POLICY_LABELS = {"modes": "MoDES (GMLG + DMT)", "threshold+gmlg": "threshold + GMLG", "dmt": "DMT without GMLG",
                 "naee": "NAEE", "mc-moe": "MC-MoE", "diep": "DiEP"}
MODALITY_COLORS = {"text": "tab:blue", "vision": "tab:orange"}
# the table's policy names (markdown)
TABLE_LABELS = {"full": "no skipping", "modes": "**MoDES** (GMLG + DMT)", "threshold+gmlg":
                "threshold + GMLG (per-layer α)", "dmt": "DMT without GMLG", "naee": "NAEE", "mc-moe": "MC-MoE",
                "diep": "DiEP"}


class ArtifactError(ValueError):
    """A JSON artifact that cannot be drawn; the message is one line saying what is wrong."""


class MissingMatplotlib(ImportError, ValueError):
    """Also a ValueError: the scripts' command lines turn ValueError into one `error:` line, and --plot should too."""


def require_matplotlib():
    """Fail now with the one-line message, e.g. before a long run whose result is to be plotted."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingMatplotlib("plotting needs matplotlib (pip install matplotlib)") from e


def check_out_dir(path, what="--out"):
    """Refuse a folder for PNGs that cannot be made (a file, or under one) or written, before anything is drawn;
    a missing folder is fine, drawing makes it."""
    if not path:
        raise ArtifactError(f"{what}: empty path, expected a folder")
    above = os.path.abspath(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ArtifactError(f"{what} {path}: {'' if above == os.path.abspath(path) else above + ' '}is a file, "
                            f"expected a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ArtifactError(f"{what} {path}: {above} is not writable")


# ---------------------------------------------------------------------------------------------------------------
# Reading fields: every problem becomes one ArtifactError naming the field by its JSON path


def field(obj, key, where=""):
    """obj[key] and its JSON path, where being obj's."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise ArtifactError(f"missing field {name!r}")
    return obj[key], name


def finite(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(f"field {name!r} is {value!r}, expected a finite number")
    return float(value)


def number(obj, key, where="", optional=False):
    """A finite number; optional ones may be absent or null, as the scripts write where nothing was measured."""
    if optional and obj.get(key) is None:  # the callers have read a required field of obj, so obj is a dict
        return None
    return finite(*field(obj, key, where))


def entries(obj, key, where=""):
    """(element, its JSON path) of each element of the non-empty list obj[key]."""
    value, name = field(obj, key, where)
    if not isinstance(value, list) or not value:
        raise ArtifactError(f"field {name!r} should be a non-empty list")
    return [(element, f"{name}[{i}]") for i, element in enumerate(value)]


def read_artifact(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not JSON (not UTF-8 text)") from None


def runs_with_skip(doc):
    """(label, skip_per_layer, its JSON path) of every run in the JSON object doc: generate.py --json has one, bench.py
    files one per row."""
    if "skip_per_layer" in doc:
        return [("generation", doc["skip_per_layer"], "skip_per_layer")]
    rows = doc.get("rows")
    if not isinstance(rows, list):
        return []
    return [(str(r.get("policy", f"row {i}")), r["skip_per_layer"], f"rows[{i}].skip_per_layer")
            for i, r in enumerate(rows) if isinstance(r, dict) and "skip_per_layer" in r]


def kinds(doc):
    """(plot kinds in doc, why none) by content: the format field, else the keys bench.py and generate.py write."""
    if not isinstance(doc, dict):
        return [], f"a JSON {type(doc).__name__}, not an object"
    fmt = doc.get("format")
    if fmt in FORMAT_KINDS:
        return [FORMAT_KINDS[fmt]], None
    # bench.py and generate.py write no format field yet: known by their keys, which also covers one added later
    found = ["fidelity"] if "fidelity" in doc else ["bench"] if "rows" in doc else []
    found += ["skip"] if runs_with_skip(doc) else []
    if found:
        return found, None
    return [], f"format {fmt!r} has no plot" if fmt is not None else "no format, rows, fidelity or skip_per_layer field"


# ---------------------------------------------------------------------------------------------------------------
# Drawing


@contextlib.contextmanager
def drawing(kind, path):
    """A pyplot-free Figure of the kind's fixed size (no GUI backend, no global figure list; savefig renders the PNG
    with Agg), saved on exit to a temporary file in path's folder and renamed over path, so a reader never sees half
    a PNG."""
    require_matplotlib()
    import matplotlib
    from matplotlib.figure import Figure
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=FIGSIZE[kind], dpi=DPI, layout="constrained")
        yield fig
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        try:
            fig.savefig(tmp, format="png", dpi=DPI)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def plain_log_labels(*axes):
    """Log axes (ax.xaxis, a colorbar's long axis) labelled 1e-03, 2e-03 ... rather than with mathtext powers of ten:
    as readable, and mathtext took most of a figure's drawing time."""
    from matplotlib.ticker import LogFormatter
    for axis in axes:
        axis.set_major_formatter(LogFormatter())
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def plot_alpha(doc, path, scale="auto"):
    """Grouped bars of alpha per MoE layer, text and vision, against the uniform share 1/L. scale "auto" turns to a
    log axis when the non-negligible values span more than two decades."""
    rows = entries(doc, "layers")
    layers = [int(number(r, "layer", where)) for r, where in rows]
    alpha = {m: [number(r, m, where) for r, where in rows] for m in ("text", "vision")}
    peak = max(max(v) for v in alpha.values())
    # below 1e-6 of the peak is numerical zero, e.g. the last layer's vision alpha: removing those experts cannot
    # reach the answer tokens, so its KL is rounding noise and should not decide the axis
    visible = [a for v in alpha.values() for a in v if a > 1e-6 * peak]
    log = bool(visible) and (scale == "log" or (scale == "auto" and max(visible) / min(visible) > 100))
    half = len(layers) // 2 or 1
    shallow = {m: sum(v[:half]) / (sum(v) or 1) for m, v in alpha.items()}
    model = doc.get("model") or {}
    calib = doc.get("calibration") or {}
    data = doc.get("data") or {}
    with drawing("alpha", path) as fig:
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        for k, m in enumerate(("text", "vision")):
            ax.bar(x + (k - 0.5) * 0.4, alpha[m], width=0.4, color=MODALITY_COLORS[m], label=f"{m} tokens")
            for i, a in enumerate(alpha[m]):
                if a <= 1e-6 * peak:  # no visible bar: say it is zero rather than missing
                    ax.annotate("≈0", (x[i] + (k - 0.5) * 0.4, 0), xytext=(0, 3), textcoords="offset points",
                                xycoords=("data", "axes fraction"), ha="center", color=MODALITY_COLORS[m])
        ax.axhline(1 / len(layers), color="0.3", ls="--", lw=1, label=f"uniform 1/L = {1 / len(layers):.3g}")
        ax.set_xticks(x, [str(layer) for layer in layers], rotation=90 if len(layers) > 24 else 0)
        ax.set_xlabel("decoder layer (MoE layers only)")
        ax.set_ylabel("alpha (share of the modality's removal KL, sums to 1)" + (", log" if log else ""))
        if log:
            ax.set_yscale("log")
            plain_log_labels(ax.yaxis)
            ax.set_ylim(bottom=min(visible) / 2)
        ax.legend(loc="upper right")
        ax.set_title(f"first {half} of {len(layers)} MoE layers hold {shallow['text']:.0%} of text alpha, "
                     f"{shallow['vision']:.0%} of vision alpha")
        fig.suptitle(f"Layer importance alpha: {model.get('model_type', 'model')}, {data.get('n', '?')} samples, "
                     f"{calib.get('answer_tokens', '?')} answer tokens, removal {calib.get('removal', '?')}")
    return path


def skip_grids(runs):
    """{phase: [3 x runs, L] array of each run's text, vision and all skip ratios (NaN where nothing was counted)};
    every run has the same L."""
    grids, length = {"prefill": [], "decode": []}, None
    for _, spl, where in runs:
        for phase, rows in grids.items():
            part, name = field(spl, phase, where)
            for m in ("text", "vision", "all"):
                values = entries(part, m, name)
                if length not in (None, len(values)):
                    raise ArtifactError(f"field '{name}.{m}' has {len(values)} layers, expected {length}")
                length = len(values)
                rows.append([np.nan if v is None else finite(v, vname) for v, vname in values])
    return {phase: np.array(rows) for phase, rows in grids.items()}


def plot_skip(doc, path):
    """Heatmaps, prefill and decode side by side: decoder layer across, one band of text / vision / all rows per
    run (the generation of generate.py --json, or each bench.py row)."""
    runs = runs_with_skip(doc)
    if not runs:
        raise ArtifactError("missing field 'skip_per_layer' (at the top or in rows)")
    grids = skip_grids(runs)
    n_layers = grids["prefill"].shape[1]
    names = [f"{label} · {m}" for label, _, _ in runs for m in ("text", "vision", "all")]
    with drawing("skip", path) as fig:
        import matplotlib
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (phase, grid) in zip(axes, grids.items()):
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            if grid.size <= 200:  # values are legible only in a small table
                for (r, c), v in np.ndenumerate(grid):
                    if not np.isnan(v):
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 else "white")
            for r in range(3, len(names), 3):
                ax.axhline(r - 0.5, color="white", lw=3)
            ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=8 if n_layers > 30 else 10)
            ax.set(xlabel="decoder layer", title=phase)
        axes[0].set_yticks(range(len(names)), names)
        fig.colorbar(image, ax=axes, label="skip ratio (skipped / routed top-k slots)", shrink=0.9)
        fig.suptitle("Skipped expert slots per layer and modality (grey: nothing counted: a dense layer, or no "
                     "tokens of that modality)")
    return path


def plot_search(doc, path):
    """Three panels: evaluated (tau_text, tau_vision) coloured by prefill skip ratio, the same by KL, and the
    evaluations on the D x D index grid. Feasible points (skip >= target) are ringed; the line is the frontier
    walk in evaluation order (not drawn for --exhaustive, whose order is a raster scan)."""
    points = entries(doc, "evaluated")
    keys = ("i_text", "i_vision", "tau_text", "tau_vision", "kl", "skip")
    ev = {k: np.array([number(p, k, where) for p, where in points]) for k in keys}
    target = number(doc, "target_skip")
    tau, _ = field(doc, "tau")
    chosen_tau = (number(tau, "text", "tau"), number(tau, "vision", "tau"))
    search, _ = field(doc, "search")
    method, _ = field(search, "method", "search")
    D = int(number(field(search, "grid", "search")[0], "n", "search.grid"))
    if not all(0 <= i < D for i in (*ev["i_text"], *ev["i_vision"])):
        raise ArtifactError(f"field 'evaluated' has grid indices outside 0..{D - 1} (search.grid.n = {D})")
    match = np.flatnonzero((ev["tau_text"] == chosen_tau[0]) & (ev["tau_vision"] == chosen_tau[1]))
    if len(match) == 0:
        raise ArtifactError(f"the chosen tau {chosen_tau} is not among the evaluated points")
    best = match[0]
    feasible = ev["skip"] >= target
    walk = method == "frontier"
    loss = number(doc, "loss")
    with drawing("search", path) as fig:
        from matplotlib.colors import ListedColormap, LogNorm
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        ax_skip, ax_kl, ax_grid = fig.subplots(1, 3)
        # a KL of exactly 0 (nothing skipped) has no place on a log scale: it is drawn at the smallest positive one
        kl_floor = min(ev["kl"][ev["kl"] > 0], default=1e-12)
        kl_norm = LogNorm(vmin=kl_floor, vmax=max(ev["kl"].max(), kl_floor * 10))
        log_tau = bool((ev["tau_text"] > 0).all() and (ev["tau_vision"] > 0).all())
        log_note = " (log)" if log_tau else ""
        star = dict(marker="*", s=320, color="red", edgecolors="black", zorder=4)  # the chosen point, in every panel
        for ax, values, by, label, cmap, norm in (
                (ax_skip, ev["skip"], "skip ratio", "prefill skip ratio (skipped / routed slots)", "viridis", None),
                (ax_kl, np.maximum(ev["kl"], kl_floor), "loss", "mean answer-token KL (nats)", "magma_r", kl_norm)):
            if walk:
                ax.plot(ev["tau_text"], ev["tau_vision"], color="0.6", lw=1, zorder=1)
            dots = ax.scatter(ev["tau_text"], ev["tau_vision"], c=values, s=40, zorder=2, cmap=cmap, norm=norm)
            ax.scatter(ev["tau_text"][feasible], ev["tau_vision"][feasible], s=110, facecolors="none",
                       edgecolors="black", lw=1.2, zorder=3)
            ax.scatter(*chosen_tau, **star)
            if log_tau:
                ax.set(xscale="log", yscale="log")
                plain_log_labels(ax.xaxis, ax.yaxis)
            ax.set(xlabel=f"tau_text{log_note}", ylabel=f"tau_vision{log_note}", title=f"evaluated points by {by}")
            bar = fig.colorbar(dots, ax=ax, label=label)
        plain_log_labels(bar.ax.yaxis)  # the KL colour bar
        ring = Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=10, label=f"feasible: skip >= {target:g}")
        walked = [Line2D([], [], color="0.6", label="walk, in evaluation order")] if walk else []
        chosen = Line2D([], [], ls="", marker="*", color="red", mec="black", ms=14, label="chosen")
        ax_skip.legend(handles=[ring, *walked, chosen], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

        colors = {"not evaluated": "0.94", "short of target": "tab:orange", "feasible": "tab:green"}  # of state 0, 1, 2
        state = np.zeros((D, D))  # [i_vision, i_text]
        state[ev["i_vision"].astype(int), ev["i_text"].astype(int)] = np.where(feasible, 2, 1)
        ax_grid.imshow(state, origin="lower", cmap=ListedColormap(list(colors.values())), vmin=0, vmax=2,
                       interpolation="nearest", extent=(-0.5, D - 0.5, -0.5, D - 0.5))
        if D <= 40:  # cell borders help only while cells are big enough to see
            ax_grid.set_xticks(np.arange(-0.5, D, 1), minor=True)
            ax_grid.set_yticks(np.arange(-0.5, D, 1), minor=True)
            ax_grid.grid(which="minor", color="white", lw=0.8)
            ax_grid.tick_params(which="minor", length=0)
        if walk:
            ax_grid.plot(ev["i_text"], ev["i_vision"], color="black", lw=1, marker=".", ms=4)
        ax_grid.scatter(ev["i_text"][best], ev["i_vision"][best], **star)
        ax_grid.set(xlabel="tau_text grid index i", ylabel="tau_vision grid index j", aspect="equal",
                    title=f"{method} search: {len(points)} evaluations\nof the D² = {D * D} grid points (D = {D})")
        ax_grid.legend(handles=[Patch(color=color, label=name) for name, color in reversed(colors.items())],
                       loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
        fig.suptitle(f"Threshold search at target skip {target:g}: chosen tau_text {chosen_tau[0]:.4g}, "
                     f"tau_vision {chosen_tau[1]:.4g}, KL {loss:.4g}, skip {ev['skip'][best]:.3f}")
    return path


def plot_bench(doc, path):
    """Two panels, a bar per policy: time to first token split into vision tower and LM prefill, and decode
    ms/token with its floor (the bytes a step must read at the measured copy bandwidth)."""
    with drawing("bench", path) as fig:  # each row is read as it is drawn: a bad one raises before the PNG is saved
        ax_pre, ax_dec = fig.subplots(1, 2)
        ticks = []
        for i, (r, where) in enumerate(entries(doc, "rows")):
            policy, _ = field(r, "policy", where)
            if isinstance(r, dict) and "error" in r:  # bench.py's row for a policy that failed: named, not drawn
                ticks.append(f"{policy}\nfailed")
                continue
            decode = number(r, "decode_ms", where)
            vision, prefill, floor, skip_prefill, skip_decode = (number(r, k, where, optional=True) for k in (
                "vision_ms", "prefill_ms", "decode_floor_ms", "skip_prefill_all", "skip_decode_all"))
            if prefill is None:  # the transformers row: only a time to first token
                total = number(r, "ttft_ms", where)
                ax_pre.bar(i, total, color="0.7", hatch="//", label="time to first token (not split)")
            else:
                vision = vision or 0.0
                ax_pre.bar(i, vision, color=MODALITY_COLORS["vision"], label="vision tower")
                ax_pre.bar(i, prefill, bottom=vision, color=MODALITY_COLORS["text"], label="LM prefill")
                total = vision + prefill
            ax_pre.text(i, total, f"{total:.1f}", ha="center", va="bottom")
            ax_dec.bar(i, decode, color="tab:purple", label="decode step, measured")
            ax_dec.text(i, decode, f"{decode:.2f}", ha="center", va="bottom")
            if floor is not None:
                ax_dec.hlines(floor, i - 0.4, i + 0.4, color="black", lw=2.5,
                              label="floor: bytes a step reads / copy bandwidth")
                share = f"{100 * floor / decode:.0f}%" if decode > 0 else "-"  # a zero time: nothing to compare
                ax_dec.text(i, floor, f"floor {floor:.2f} ms\n= {share} of measured",
                            ha="center", va="bottom", fontsize=8,
                            bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
            decode_skip = "-" if skip_decode is None else f"{skip_decode:.2f}"
            ticks.append(str(policy) + ("" if skip_prefill is None else f"\nskip {skip_prefill:.2f} / {decode_skip}"))
        for ax, title, label in ((ax_pre, "prefill: time to first token", "ms (median)"),
                                 (ax_dec, "decode step", "ms per token (median)")):
            ax.set_xticks(range(len(ticks)), ticks)
            ax.set(xlabel="policy (skip ratio prefill / decode)", ylabel=label, title=title)
            ax.margins(y=0.1)
        # one legend entry per label, not per bar
        unique = {label: h for ax in (ax_pre, ax_dec) for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=len(unique))
        fig.suptitle(f"Speed per policy: {doc.get('model_type', 'model')} on {doc.get('device', '?')}, "
                     f"{doc.get('dtype', '?')}, batch {doc.get('batch', '?')}, prompt {doc.get('prompt_tokens', '?')} "
                     f"tokens ({doc.get('visual_tokens', '?')} visual), median of {doc.get('repeats', '?')}")
    return path


def fidelity_points(doc):
    """(policy, point) of each row of one evaluate.py document that has a point (fidelity_point)."""
    rows = [(str(field(r, "policy", where)[0]), fidelity_point(r, where)) for r, where in entries(doc, "fidelity")]
    return [(policy, point) for policy, point in rows if point is not None]


def fidelity_point(r, where):
    """One evaluate.py row as a point; accuracy, retention and calib_skip may be null or absent. A baseline that could
    not be fitted (`reached` false, no skip ratio) has none."""
    skip, _ = field(r, "skip", where)
    if r.get("reached") is False and isinstance(skip, dict) and skip.get("all") is None:  # no setting found
        return None
    return dict(reached=r.get("reached") is not False, skip=number(skip, "all", f"{where}.skip"),
                **{k: number(skip, k, f"{where}.skip", optional=True) for k in ("text", "vision", "text_vision")},
                kl=number(r, "kl", where), top1=number(r, "top1", where),
                **{k: number(r, k, where, optional=True) for k in ("accuracy", "retention", "calib_skip")},
                ci=intervals(r, where), layers=layer_shares(r, where))


def intervals(row, where):
    """{metric: (low, high)} of a row's ci95 (evaluate.py's bootstrap intervals; older files have none)."""
    ci = row.get("ci95") or {}
    if not isinstance(ci, dict):
        raise ArtifactError(f"field '{where}.ci95' should be an object")
    out = {}
    for key, value in ci.items():
        if value is not None:
            if not isinstance(value, list) or len(value) != 2:
                raise ArtifactError(f"field '{where}.ci95.{key}' should be [low, high]")
            out[key] = tuple(finite(v, f"{where}.ci95.{key}") for v in value)
    return out


def layer_shares(row, where):
    """{"text": [...], "vision": [...]} skipped share per MoE layer (None: nothing of that modality there), or None
    where the row has no skip_per_layer (older files)."""
    layers = row.get("skip_per_layer")
    if layers is None:
        return None
    out = {}
    for kind in ("text", "vision"):
        values, name = field(layers, kind, f"{where}.skip_per_layer")
        if not isinstance(values, list):
            raise ArtifactError(f"field {name!r} should be a list")
        out[kind] = [None if v is None else finite(v, name) for v in values]
    return out


def plot_fidelity(docs, path):
    """Accuracy, retention, answer KL and top-1 agreement against the held-out skip ratio, one curve per policy
    over the fidelity files (one per --target). The unskipped row is a dashed reference line; a policy whose
    accuracy is null (--no-accuracy) is drawn in the KL and top-1 panels only; a point whose fit missed the target
    (a rule that jumps over it) is drawn hollow."""
    curves = {}
    for doc in docs:
        for policy, point in fidelity_points(doc):
            curves.setdefault(policy, []).append(point)
    full = curves.pop("full", [{}])[-1]  # the unskipped model: a reference line, not a curve
    panels = (("accuracy", "exact-match accuracy", "accuracy (fraction of samples)", False),
              ("retention", "retention", "accuracy / unskipped accuracy (%)", False),
              ("kl", "answer KL against the unskipped model", "mean answer-token KL (nats, log)", True),
              ("top1", "top-1 agreement with the unskipped model", "agreeing answer tokens (fraction)", False))
    with drawing("fidelity", path) as fig:
        import matplotlib
        colors = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]  # red is MoDES's
        axes = fig.subplots(2, 2).ravel()
        for ax, (key, title, label, log) in zip(axes, panels):
            ax.set_title(title)
            for k, (policy, pts) in enumerate(curves.items()):
                pts = sorted((p for p in pts if p[key] is not None and (p[key] > 0 or not log)),
                             key=lambda p: p["skip"])
                if not pts:
                    continue
                mine = policy == "modes"  # MoDES stands out, as in the paper's Figure 1
                color = "red" if mine else colors[(k - 1) % len(colors)]
                ax.plot([p["skip"] for p in pts], [p[key] for p in pts], marker="*" if mine else "o",
                        ms=11 if mine else 5, lw=2.5 if mine else 1.2, zorder=3 if mine else 2, color=color,
                        label=POLICY_LABELS.get(policy, policy))
                bars = [p for p in pts if key in p["ci"]]  # 95% bootstrap intervals over the questions
                if bars:
                    ax.errorbar([p["skip"] for p in bars], [p[key] for p in bars], ls="none", color=color,
                                yerr=np.abs(np.array([[p["ci"][key][0] - p[key], p["ci"][key][1] - p[key]]
                                                      for p in bars]).T), capsize=3, lw=1, zorder=2)
                missed = [p for p in pts if not p["reached"]]
                ax.plot([p["skip"] for p in missed], [p[key] for p in missed], ls="none", marker="o", ms=9,
                        mfc="white", mec=color, zorder=4)
            if not ax.lines:  # an empty panel says why
                why = {"accuracy": "no data: accuracy not measured\n(evaluate.py --no-accuracy)",
                       "retention": "no data: retention needs a nonzero\nunskipped accuracy"}.get(key, "no data")
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set(xticks=[], yticks=[])
                continue
            if full.get(key) is not None and not log:
                ax.axhline(full[key], color="0.3", ls="--", lw=1, label="unskipped")
            if log:
                ax.set_yscale("log")
                plain_log_labels(ax.yaxis)
            ax.set(xlabel="prefill skip ratio, held-out (skipped / routed slots)", ylabel=label)
            ax.grid(alpha=0.3)
        legend = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
        if legend[0]:
            fig.legend(*legend, loc="outside right center")
        fitted = sorted(p["calib_skip"] for p in curves.get("modes", []) if p["calib_skip"] is not None)
        fitted = ", ".join(f"{s:.2f}" for s in fitted) or "?"
        missed = any(not p["reached"] for pts in curves.values() for p in pts)
        has_ci = any(p["ci"] for pts in curves.values() for p in pts)
        fig.suptitle(f"Fidelity against skip ratio: every baseline fitted to MoDES's calibration skip ratio "
                     f"({fitted})" + ("\nhollow: the nearest setting, target missed" if missed else "")
                     + ("\nbars: 95% bootstrap intervals over the questions" if has_ci else ""))
    return path


LAYER_POLICIES = ("modes", "dmt")  # the paper's GMLG question: the same two thresholds with and without alpha


def plot_layers(docs, path):
    """Skipped share per MoE layer, text and vision, of MoDES and DMT without GMLG at each target (one row per
    fidelity file): where GMLG's layer factor moves the skips. Needs files with skip_per_layer."""
    targets = []
    for doc in docs:
        points = dict(fidelity_points(doc))
        if all(points.get(p, {}).get("layers") for p in LAYER_POLICIES):
            targets.append((points["modes"].get("calib_skip") or points["modes"]["skip"], points))
    if not targets:
        raise ArtifactError("no fidelity file has per-layer skip shares of both MoDES and DMT (evaluate.py writes "
                            "them since it records skip_per_layer)")
    targets.sort(key=lambda t: t[0])
    with drawing("layers", path) as fig:
        axes = fig.subplots(len(targets), 2, squeeze=False, sharey=True)
        for row, (target, points) in zip(axes, targets):
            for ax, kind in zip(row, ("text", "vision")):
                for k, policy in enumerate(LAYER_POLICIES):
                    shares = points[policy]["layers"][kind]
                    x = np.arange(len(shares)) + (k - 0.5) * 0.4
                    ax.bar(x, [np.nan if v is None else v for v in shares], width=0.4,
                           color="red" if policy == "modes" else "tab:gray", label=POLICY_LABELS[policy])
                ax.set(title=f"{kind} tokens, target {target:.2f}", ylim=(0, 1.05), xlabel="MoE layer",
                       ylabel="skipped share of routed slots", xticks=range(len(shares)))
                ax.grid(alpha=0.3, axis="y")
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center")
        fig.suptitle("Skipped share per layer on the evaluation set: MoDES (alpha x routing weight)\nagainst "
                     "the same two thresholds on the routing weight alone (DMT without GMLG)")
    return path


def fidelity_table(docs):
    """The markdown table of evaluate.py documents: the unskipped row once, then every other row of each document
    (one per target) in order. A number and its interval share a format: skip ratios, top-1 and accuracy to three
    decimals, KL to three significant digits, retention in % to one decimal; "–" where nothing was measured."""
    def value(point, key, spec, unit=""):
        x = point.get(key)
        if x is None:
            return "–"
        ci = point["ci"].get(key)
        return format(x, spec) + unit + (f" ({format(ci[0], spec)}–{format(ci[1], spec)})" if ci else "")

    lines = ["| target | policy | skip: all (text / vision) | text + vision | answer KL | top-1 agreement | accuracy "
             "| retention |", "|---|---|---|---|---|---|---|---|"]
    for d, doc in enumerate(docs):
        target = number(doc, "target")
        for r, where in entries(doc, "fidelity"):
            policy = str(field(r, "policy", where)[0])
            if policy == "full" and d > 0:
                continue
            p = fidelity_point(r, where) or dict(ci={})
            lines.append("| " + " | ".join([
                "–" if policy == "full" else f"{target:.2f}",
                TABLE_LABELS.get(policy, policy) + ("" if r.get("reached") is not False else " ⚠"),
                f"{value(p, 'skip', '.3f')} ({value(p, 'text', '.3f')} / {value(p, 'vision', '.3f')})",
                value(p, "text_vision", ".3f"), value(p, "kl", ".3g"), value(p, "top1", ".3f"),
                value(p, "accuracy", ".3f"), value(p, "retention", ".1f", "%")]) + " |")
    return "\n".join(lines)


def png_name(source, kind, out_dir=None):
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(out_dir if out_dir is not None else os.path.dirname(source), f"{stem}.{kind}.png")


def draw(path, doc, found, out_dir, alpha_scale="auto", names=None):
    """The plots of the given kinds of the document read from path (to names[kind] where given); errors name the
    file. Numbers no plot can show (a zero time on a log axis, a table without rows) are one line, not a traceback."""
    plots = {"alpha": lambda d, out: plot_alpha(d, out, alpha_scale), "search": plot_search, "skip": plot_skip,
             "bench": plot_bench, "fidelity": lambda d, out: plot_fidelity([d], out)}
    names = names or {}
    try:
        return [plots[kind](doc, names.get(kind) or png_name(path, kind, out_dir)) for kind in found]
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise ArtifactError(f"{path}: cannot be drawn ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def unique_names(planned):
    """planned [(source, kind, png)] -> the same with every png distinct: where two sources would write one PNG
    (two alpha.json of different runs into one --out), each is named after its path below their common folder
    (runs/a/alpha.json -> a_alpha.alpha.png)."""
    by_png = {}
    for i, (_, _, png) in enumerate(planned):
        by_png.setdefault(os.path.abspath(png), []).append(i)
    out = list(planned)
    for clash in (ids for ids in by_png.values() if len(ids) > 1):
        sources = [os.path.abspath(planned[i][0]) for i in clash]
        root = os.path.commonpath([os.path.dirname(p) for p in sources])
        for i, src in zip(clash, sources):
            source, kind, png = planned[i]
            stem = os.path.splitext(os.path.relpath(src, root))[0].replace(os.sep, "_")
            out[i] = (source, kind, os.path.join(os.path.dirname(png), f"{stem}.{kind}.png"))
            print(f"note: {source} and {len(clash) - 1} other file(s) would write {png}; writing "
                  f"{out[i][2]} instead", file=sys.stderr)
    return out


def plot_artifact(path, out_dir, alpha_scale="auto"):
    """Every plot of the JSON file at path, written to out_dir as <stem>.<kind>.png; the list of written paths."""
    doc = read_artifact(path)
    found, why = kinds(doc)
    if not found:
        raise ArtifactError(f"{path}: not a MoDES artifact ({why})")
    return draw(path, doc, found, out_dir, alpha_scale)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def table(paths):
    """fidelity_table of the evaluate.py files among paths, each checked and named in an error."""
    docs = []
    for path, _ in json_files(paths):
        doc = read_artifact(path)
        if "fidelity" not in kinds(doc)[0]:
            raise ArtifactError(f"{path}: not an evaluate.py fidelity file (--table reads only those)")
        try:
            fidelity_points(doc)
            number(doc, "target")
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
        docs.append(doc)
    return fidelity_table(docs)


def json_files(paths):
    """(file, named directly) for each path, a folder giving the *.json files in it and in its sub-folders (not
    hidden ones), in name order; a file named twice is read once."""
    out, seen = [], set()
    for p in paths:
        if not p:
            raise ArtifactError("an empty path; give JSON files or folders")
        if os.path.isdir(p):
            found = []
            for top, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(top, f) for f in sorted(names) if f.endswith(".json")]
            if not found:
                raise ArtifactError(f"{p}: no .json files in it or its sub-folders")
            found = [(f, False) for f in found]
        elif os.path.isfile(p):
            found = [(p, True)]
        else:
            raise ArtifactError(f"{p}: no such file or folder")
        for f, direct in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                out.append((f, direct))
    return out


def main(args):
    if args.table:
        print(table(args.paths))
        return
    require_matplotlib()  # first, so that a missing install is the only line printed
    if args.out is not None:
        check_out_dir(args.out)
    planned, docs, fidelity = [], {}, []
    for path, direct in json_files(args.paths):
        doc = read_artifact(path)
        found, why = kinds(doc)
        if not found:
            if direct:
                raise ArtifactError(f"{path}: not a MoDES artifact ({why})")
            print(f"note: skipped {path}: not a MoDES artifact ({why})", file=sys.stderr)
        if "fidelity" in found:  # drawn together below, each file one point of every curve; checked now by file
            try:
                fidelity_points(doc)
            except ArtifactError as e:
                raise ArtifactError(f"{path}: {e}") from None
            fidelity.append((path, doc))
        docs[path] = doc
        planned += [(path, kind, png_name(path, kind, args.out)) for kind in found if kind != "fidelity"]
    if not planned and not fidelity:
        raise ArtifactError(f"{', '.join(args.paths)}: no MoDES artifacts to plot")
    if fidelity:  # named after its file, or after none of them when several make the plot
        single = png_name(fidelity[0][0], "fidelity", args.out)
        together = single if len(fidelity) == 1 else os.path.join(os.path.dirname(single), "fidelity.png")
        planned.append((fidelity[0][0] if len(fidelity) == 1 else "fidelity", "fidelity", together))
    planned = unique_names(planned)
    for path, kind, png in planned:
        if kind != "fidelity":
            for out in draw(path, docs[path], [kind], args.out, args.alpha_scale, {kind: png}):
                print(f"wrote {out}")
    if fidelity:
        if len({doc.get("source") for _, doc in fidelity}) > 1:
            print("note: the fidelity files come from different models; drawn together anyway", file=sys.stderr)
        try:
            print(f"wrote {plot_fidelity([doc for _, doc in fidelity], planned[-1][2])}")
            if any(point["layers"] for _, doc in fidelity for _, point in fidelity_points(doc)):
                layers = os.path.join(os.path.dirname(planned[-1][2]), "fidelity-layers.png")
                print(f"wrote {plot_layers([doc for _, doc in fidelity], layers)}")
        except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{', '.join(p for p, _ in fidelity)}: cannot be drawn ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None


class HelpFormatter(argparse.HelpFormatter):
    """--help names every option's default (cli.py's formatter; not imported: cli.py imports torch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def parser():
    p = argparse.ArgumentParser(description="PNG plots of calibrate.py, search.py, bench.py and generate.py JSON files.",
                                formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="artifact folders (their *.json files and their sub-folders') or JSON files")
    p.add_argument("--out", help="folder for the PNGs; made if missing (default: next to each JSON file)")
    p.add_argument("--table", action="store_true", help="print the fidelity files as one markdown table instead of "
                   "drawing (no matplotlib needed)")
    p.add_argument("--alpha-scale", default="auto", choices=["auto", "linear", "log"],
                   help="alpha axis; auto is log when the values span more than two decades")
    return p


def cli(argv=None):
    """The command line's exit status: 0, or 2 after one `error:` line (bad input, matplotlib missing)."""
    try:
        main(parser().parse_args(argv))
    except (ArtifactError, MissingMatplotlib, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
