"""``fedjax-code report``: a sweep directory to results.csv, report.md, plots/*.png and answer.json.

The answer is, for each (partition, participation, ...), the scale with the highest HumanEval pass@10, named
the best only where a paired bootstrap over problems and the seed spread both set it apart from every other scale
(chosen in ``answer.py``, numerics in ``fits.py``); results.csv and report.md carry those paired differences.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullLocator

from fedjax_code.experiments import fits
from fedjax_code.experiments.algorithms_report import algorithms_section
from fedjax_code.experiments.answer import (GROUP_AXES, PAIRED_COLUMNS, answer_group, before_sentence, gap_sentence,
                                           has_value, noniid_gaps, paired_columns, pass_metric, second_metric,
                                           sentences)
from fedjax_code.experiments.render import markdown_table, save, subplots
from fedjax_code.experiments.results import AXES, before_results, load_sweep, round_records, scale_axis, scan
from fedjax_code.experiments.tuning import read_chosen
from fedjax_code.records import write_atomic

PLOTS = ("pass_at_k.png", "loss_fits.png", "curves.png", "noniid_gap.png", "algorithms.png", "clients_vs_size.png",
         "lr_tuning.png")
MD_COLUMNS = ("cell", *AXES, "params", "tokens_seen", "initial_eval_loss", "final_eval_loss", "unigram_entropy",
              "heterogeneity", "humaneval_nll", "pass@1", "pass@10", "pass@10_ci", "rounds_to_target")
FIT_COLUMNS = ("line", "metric", "E", "A", "alpha", "rmse", "points", "note")


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(dict.fromkeys(k for r in rows for k in r)), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _label(row: dict, varying: list[str]) -> str:
    parts = [str(row["partition"]), f"{row['participation'] * 100:g}%"]
    parts += [row["algorithm"]] if "algorithm" in varying else []
    return ", ".join(parts + ([f"K={row['clients']}"] if "clients" in varying else []))


def _groups(done, axes=GROUP_AXES) -> dict[tuple, list]:
    groups = defaultdict(list)
    for row, cell_dir in done:
        groups[tuple(row[a] for a in axes)].append((row, cell_dir))
    return groups


def _mean_by(rows: list[dict], keys, metric: str, stat=np.mean) -> dict[tuple, float]:
    """``stat`` (the mean) of ``metric`` over the rows sharing ``keys`` (blanks skipped)."""
    acc = defaultdict(list)
    for r in filter(lambda r: has_value(r, metric), rows):
        acc[tuple(r[k] for k in keys)].append(float(r[metric]))
    return {k: float(stat(v)) for k, v in acc.items()}


def _scale_curve(rows: list[dict], metric: str):
    """(params, mean, std over seeds) per scale, sorted by scale; blanks skipped."""
    pts = []
    for scale in sorted({r["scale"] for r in rows}):
        at = [r for r in rows if r["scale"] == scale and has_value(r, metric)]
        values = [float(r[metric]) for r in at]
        pts += [(np.mean([r["params"] for r in at]), np.mean(values), np.std(values))] if at else []
    return [np.array(c) for c in zip(*pts)] if pts else [np.array([])] * 3


# --- plots and extra analyses: each section draws its plot and returns its markdown ------------------------------

def _pass_section(done, varying, plots: Path) -> str:
    metric = pass_metric([r for r, _ in done])
    fig, axes = subplots(1)
    for cells in _groups(done).values():
        x, y, e = _scale_curve([r for r, _ in cells], metric)
        several = len({r["seed"] for r, _ in cells}) > 1
        axes[0].errorbar(x, y, yerr=e if several else None, marker="o", capsize=3, label=_label(cells[0][0], varying))
    note = " (pass@10 absent: n < 10)" if metric == "pass@1" else ""
    axes[0].set(xscale="log", xlabel="parameters", ylabel=f"HumanEval {metric}", title=f"{metric} vs model size{note}")
    save(fig, axes, plots / "pass_at_k.png")
    return (f"![{metric}](plots/pass_at_k.png)\n\nHumanEval {metric} against parameters (log scale), one line per "
            "group: the mean over seeds, with error bars of one standard deviation when there are several seeds. "
            f"The highest point of a line is its best scale.{' pass@10 needs n >= 10 samples.' if note else ''}\n\n")


def _fits_section(done, varying, plots: Path) -> tuple[str, str]:
    """(plot markdown, fit table markdown) of L = E + A N^-alpha per line, for held-out loss and HumanEval NLL."""
    fig, axes, table = *subplots(2), []
    for ax, metric in zip(axes, ("final_eval_loss", "humaneval_nll")):
        for cells in _groups(done).values():
            label = _label(cells[0][0], varying)
            x, y, _ = _scale_curve([r for r, _ in cells], metric)
            fit = fits.fit_power_law(x, y)
            table.append([{"line": label, "metric": metric, **fit}.get(c, "") for c in FIT_COLUMNS])
            if "E" in fit:
                dense = np.geomspace(x.min(), x.max(), 100)
                text = f"E={fit['E']:.3g}, A={fit['A']:.3g}, α={fit['alpha']:.3g}"
                color = ax.plot(dense, fits.power_law(dense, fit), "--", label=f"{label}: {text}")[0].get_color()
                ax.plot(x, y, "o", color=color)
            else:
                ax.plot(x, y, "o", label=f"{label}: {fit['note']}")
        ax.set(xscale="log", xlabel="parameters", ylabel=metric, title=f"{metric}, fit L = E + A N^-α")
    save(fig, axes, plots / "loss_fits.png")
    text = ("![loss fits](plots/loss_fits.png)\n\nHeld-out loss (left) and HumanEval canonical-solution NLL (right) "
            "against parameters, with L = E + A N^-α fitted to each line (dashed). E is the loss an infinitely large "
            "model would reach; a larger α means size pays off faster.\n\n")
    return text, "## Power-law fits\n\n" + markdown_table(FIT_COLUMNS, table) + "\n"


def _curves_section(done, varying, plots: Path) -> str:
    fig, axes = subplots(3)
    for i, cells in enumerate(_groups(done).values()):
        for j, (row, cell_dir) in enumerate(cells):
            rounds = round_records(cell_dir)
            mb = np.cumsum([(r.bytes_up + r.bytes_down) / 1e6 for r in rounds])
            evals = [(r.tokens_seen, r.round, m, r.eval_loss) for r, m in zip(rounds, mb) if r.eval_loss is not None]
            for k, ax in enumerate(axes):
                ax.plot([e[k] for e in evals], [e[3] for e in evals], ".-", color=f"C{i % 10}", alpha=0.7,
                        label=_label(row, varying) if j == 0 and k == 0 else None)
    entropy = float(np.mean([r["unigram_entropy"] for r, _ in done]))
    axes[0].axhline(entropy, color="grey", ls="--", lw=1, label=f"unigram entropy {entropy:.3g}")
    axes[0].set(xlabel="training tokens", ylabel="held-out eval_loss", title="loss vs tokens (one line per cell)")
    axes[1].set(xlabel="round", ylabel="held-out eval_loss", title="loss vs round")
    axes[2].set(xscale="log", xlabel="communicated MB (up + down, cumulative)", ylabel="held-out eval_loss",
                title="loss vs communication")
    save(fig, axes, plots / "curves.png")
    return ("![curves](plots/curves.png)\n\nHeld-out loss at each evaluation round of every cell (coloured by group), "
            "against training tokens (left, with the data's unigram entropy dashed: the loss of a model that learned "
            "only token frequencies, so a curve must fall well below it to have learned context), rounds (middle) "
            "and cumulative communicated megabytes (right: lines falling faster learn more per byte sent).\n\n")


def _gap_section(rows: list[dict], varying, plots: Path) -> str:
    fig, axes = subplots(3)
    params = _mean_by(rows, ("scale",), "params")
    heterogeneity = _mean_by(rows, ("partition",), "heterogeneity")
    for ax, metric in zip(axes, ("final_eval_loss", second_metric(rows))):
        lines = defaultdict(list)
        for g in noniid_gaps(rows, metric):
            lines[_label(g, varying)].append((params[(g["scale"],)], g["gap"], g["spread"]))
        for label, pts in lines.items():
            x, y, err = zip(*sorted(pts))
            ax.errorbar(x, y, yerr=[e or 0 for e in err], marker="o", capsize=3, label=f"{label} - iid")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="parameters", ylabel=f"{metric} gap", title=f"non-IID minus IID {metric}")
    for scale in sorted({r["scale"] for r in rows}):
        pts = sorted((heterogeneity[(g["partition"],)], g["gap"]) for g in noniid_gaps(rows, "final_eval_loss")
                     if g["scale"] == scale)
        axes[2].plot([heterogeneity.get(("iid",), np.nan)] + [p[0] for p in pts], [0] + [p[1] for p in pts], "o-",
                     label=f"scale {scale:g}")
    axes[2].set(xlabel="heterogeneity (token JS distance)", ylabel="held-out loss gap", title="gap vs heterogeneity")
    save(fig, axes, plots / "noniid_gap.png")
    table = [[g["partition"], heterogeneity[(g["partition"],)], g["scale"], metric, g["iid"], g["noniid"], g["gap"],
              "" if g["spread"] is None else g["spread"], g["seeds"], {None: "one seed", True: "yes", False: "no"}[g["real"]]]
             for metric in dict.fromkeys(("final_eval_loss", "humaneval_nll", second_metric(rows)))
             for g in noniid_gaps(rows, metric)]
    header = ["non-IID", "heterogeneity", "scale", "metric", "iid", "non-IID value", "gap", "seed spread", "seeds",
              "gap beyond spread"]
    return ("![non-IID gap](plots/noniid_gap.png)\n\nThe non-IID penalty: each non-IID partition's metric minus the "
            "IID one at the same scale, participation, algorithm and clients (seed means; error bars: the seed-to-seed "
            "standard deviation of the difference, a gap inside them is noise). A loss or NLL gap above 0, or a pass@k "
            "gap below 0, means non-IID data hurts; a gap shrinking with parameters means larger models absorb the "
            "heterogeneity. Right: the loss gap against each partition's measured heterogeneity.\n\n"
            "Held-out loss is measured on each partition's own held-out files (its clients' held-out tails), so its "
            "gap mixes the model with the evaluation set; HumanEval NLL is the same 164 problems for every "
            "partition, the cleaner comparison. The seed spread is sqrt(var_iid + var_non-IID) over seeds (ddof 1).\n\n"
            + markdown_table(header, table) + "\n")


def _tuning_section(chosen: dict, plots: Path) -> str:
    """Held-out loss of every tuning trial against its client learning rate, one line per tuning group."""
    fig, axes = subplots(1)
    rows = []
    for group, c in chosen.items():
        pts = sorted((float(lr), loss) for lr, loss in c["trials"].items() if loss is not None)
        color = axes[0].plot(*zip(*pts), "o-", label=group)[0].get_color() if pts else None
        if c["client_lr"] in dict(pts):
            axes[0].plot([c["client_lr"]], [dict(pts)[c["client_lr"]]], "*", ms=14, color=color)
        rows.append([group, c["client_lr"], *(c["trials"].get(f"{lr:g}") for lr in sorted(map(float, c["trials"])))])
    axes[0].set(xscale="log", xlabel="client learning rate", ylabel="held-out loss after the trial",
                title="per-scale learning-rate tuning (star: chosen)")
    save(fig, axes, plots / "lr_tuning.png")
    return ("## Learning-rate tuning\n\nEach scale's cells trained at the client learning rate whose short trial "
            "(on the tuning partition) reached the lowest held-out loss (experiments/tuning.py). A chosen rate at "
            "the edge of the candidates means the grid should widen.\n\n![lr tuning](plots/lr_tuning.png)\n\n"
            + markdown_table(["group", "chosen client_lr", *(f"loss @ {lr}" for lr in sorted(
                {float(lr) for c in chosen.values() for lr in c["trials"]}))], rows) + "\n")


def _clients_section(rows: list[dict], varying, plots: Path) -> str:
    """N_opt(K) per line and the fitted exponent of N_opt ∝ K^-beta (arXiv 2511.12188), with a plot."""
    lines, shown = defaultdict(dict), [v for v in varying if v != "clients"]
    for (part, pp, alg, k), cells in _groups([(r, None) for r in rows]).items():
        x, y, _ = _scale_curve([r for r, _ in cells], "final_eval_loss")
        if len(x):
            label = _label({"partition": part, "participation": pp, "algorithm": alg}, shown)
            lines[label][k] = fits.optimal_size(x, y)
    fig, axes = subplots(1)
    sentences = []
    for label, by_k in lines.items():
        ks = sorted(by_k)
        n_opt, edge = [by_k[k][0] for k in ks], [str(k) for k in ks if by_k[k][1]]
        color = axes[0].plot(ks, n_opt, "o", label=label)[0].get_color()
        flag = f" (N_opt is at the edge of the grid for K = {', '.join(edge)})" if edge else ""
        if len(ks) < 2:
            sentences.append(f"For {label}, only one client count has finished, so no exponent is fitted{flag}.")
            continue
        c, beta = fits.size_exponent(ks, n_opt)
        fitted = np.exp(c) * np.asarray(ks, float) ** -beta
        axes[0].plot(ks, fitted, "--", color=color, label=f"{label}: β={beta:.3g}")
        verdict = (f"falls as K^-beta with beta = {beta:.3g}, as arXiv 2511.12188 predicts" if beta > 0
                   else f"does not fall with K (beta = {beta:.3g})")
        sentences.append(f"For {label}, the optimal model size {verdict}{flag}.")
    axes[0].set(xscale="log", yscale="log", xlabel="clients K", ylabel="compute-optimal parameters N_opt",
                title="N_opt vs number of clients")
    all_k = sorted({k for by_k in lines.values() for k in by_k})
    axes[0].set_xticks(all_k, [str(k) for k in all_k], minor=False)
    axes[0].xaxis.set_minor_locator(NullLocator())
    save(fig, axes, plots / "clients_vs_size.png")
    return ("## Clients vs model size\n\n" + " ".join(sentences) + "\n\n![N_opt vs K](plots/clients_vs_size.png)\n\n"
            "N_opt(K) minimises held-out loss across scales (a parabola in log N through the minimum and its two "
            "neighbours); the dashed line is the least-squares fit log N_opt = c - β log K.\n\n")


def _paired_section(groups: list[dict], varying) -> str:
    """Each group's scales against its top scale on the same problems: the PAIRED_COLUMNS of results.csv."""
    body = [[_label(g, varying), scale, mean, *paired_columns(g, scale).values()]
            for g in groups if g["paired"] for scale, mean in g["values"].items()]
    if not body:
        return ""
    return ("## Paired differences\n\nEach scale of a group against the group's top scale (`paired_best`) on the same "
            "HumanEval problems: `paired_diff_vs_best` is the top's mean minus the scale's (negative for "
            "humaneval_nll, where lower is better), each problem averaged over seeds first, with a 95% bootstrap CI "
            "that resamples problems, the same for both cells. That CI cannot see seed noise; the seed spread is the "
            "standard deviation over seeds (ddof 1) of the per-seed difference (`paired_diff_seed_spread`) or of a "
            "scale's mean (`metric_seed_spread`), blank with one seed. The answer names a best only where "
            "`paired_distinct` holds against every other scale: the CI excludes 0 and the difference exceeds its "
            "seed spread.\n\n" + markdown_table(("group", "scale", "mean", *PAIRED_COLUMNS), body) + "\n")


# --- report.md and the entry point ------------------------------------------------------------------------------

def _header(sweep: dict, answer: str, finished: int) -> str:
    budget = sweep.get("spec", {}).get("budget", {})
    value = budget.get("value", "?")
    value = f"{value:,.0f}" if isinstance(value, (int, float)) and float(value).is_integer() else value
    axis = scale_axis(sweep)
    params = " (`params` counts the trained adapters)" if axis["key"] == "model.lora_rank" else ""
    return (f"# Sweep report: {sweep.get('name', '(unnamed)')}\n\n{sweep.get('description', '')}\n\n"
            f"Budget per cell: {value} {budget.get('kind', '')}. Finished cells: {finished} of "
            f"{len(sweep.get('cells', []))}. The scale axis is the {axis['label']} (`{axis['key']}`){params}.\n\n"
            f"## Answer\n\n{answer}\n\n")


def _data_section(rows: list[dict]) -> str:
    """Which data the cells trained on, by content hash, so two reports can be compared."""
    hashes = sorted({r["tokens_sha256"] for r in rows})
    sentence = (f"every cell trained on the token stream {hashes[0]}" if len(hashes) == 1 else
                f"the cells trained on {len(hashes)} different token streams ({', '.join(hashes)})")
    return (f"## Data\n\nBy content hash, {sentence}; results.csv gives each cell's `tokens_sha256` and "
            "`partition_sha256` (the client of every example).\n\n")


def _missing_section(missing: list[dict]) -> str:
    if not missing:
        return "## Missing and failed cells\n\nNone: every cell has finished.\n"
    return "## Missing and failed cells\n\n" + markdown_table(["cell", "status", "error"],
                                                      [[m["id"], m["status"], m["error"] or ""] for m in missing])


def write_report(sweep_dir) -> dict:
    """Write results.csv, report.md, plots/*.png and answer.json into ``sweep_dir``; return the answer.

    Returns ``{"answer": sentences, "report": path of report.md, "finished": n, "missing": [{id, status, error}]}``.
    """
    root = Path(sweep_dir)
    sweep = load_sweep(root)
    done, missing = scan(root, sweep)
    out = {"report": str(root / "report.md"), "finished": len(done), "missing": missing}
    if not done:
        answer = f"No cell of the sweep has finished yet ({len(missing)} missing), so there is no answer."
        write_atomic(root / "answer.json", json.dumps({"answer": answer, "groups": []}, indent=1) + "\n")
        write_atomic(root / "report.md", _header(sweep, answer, 0) + _missing_section(missing))
        return {"answer": answer, **out}
    resamples = sweep["spec"]["report"]["bootstrap"]
    answers = {key: answer_group(cells, resamples) for key, cells in _groups(done).items()}
    groups = list(answers.values())
    rows = [{**r, **paired_columns(answers[tuple(r[a] for a in GROUP_AXES)], r["scale"])} for r, _ in done]
    varying = [a for a in AXES if len({r[a] for r in rows}) > 1]
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    partitions = {r["partition"] for r in rows}
    gaps = "iid" in partitions and len(partitions) > 1
    algorithms, algorithm_sentences = algorithms_section(done, plots) if "algorithm" in varying and gaps else ("", [])
    label = scale_axis(sweep)["label"]
    if len({c["axes"]["scale"] for c in sweep["cells"]}) > 1:
        found = sentences(groups, label)
    else:  # the grid has one scale: the answer is the comparison of the other axes
        found = [f"Every cell trains at one {label}, so no {label} is ranked.", *algorithm_sentences]
    answer = " ".join(filter(None, [*found, gap_sentence(rows, label), before_sentence(before_results(root), resamples)]))
    write_atomic(root / "results.csv", _csv(rows))
    fits_plot, fits_table = _fits_section(done, varying, plots)
    results = markdown_table(MD_COLUMNS, [[r[c] for c in MD_COLUMNS] for r in rows])
    md = [_header(sweep, answer, len(done)), _data_section(rows), "## Results\n\n", results,
          "\nAll columns are in results.csv.\n\n", _paired_section(groups, varying), "## Plots\n\n",
          _pass_section(done, varying, plots), fits_plot, _curves_section(done, varying, plots)]
    produced = {"pass_at_k.png", "loss_fits.png", "curves.png"}
    if gaps:
        md.append(_gap_section(rows, varying, plots))
        produced.add("noniid_gap.png")
    else:
        md.append("No non-IID gap plot: the finished cells do not include both an iid and a non-iid partition.\n\n")
    md.append(fits_table)
    if algorithms:
        md.append(algorithms)
        produced.add("algorithms.png")
    if "clients" in varying:
        md.append(_clients_section(rows, varying, plots))
        produced.add("clients_vs_size.png")
    if chosen := read_chosen(root):
        md.append(_tuning_section(chosen, plots))
        produced.add("lr_tuning.png")
    for stale in set(PLOTS) - produced:
        (plots / stale).unlink(missing_ok=True)
    write_atomic(root / "answer.json", json.dumps({"answer": answer, "groups": groups}, indent=1) + "\n")
    write_atomic(root / "report.md", "".join(md + [_missing_section(missing)]))
    return {"answer": answer, **out}
