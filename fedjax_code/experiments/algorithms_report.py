"""The report's algorithms comparison: the non-IID gap per algorithm, the personalised algorithms' personal
models, and loss per round per algorithm (``plots/algorithms.png``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from fedjax_code.experiments.answer import noniid_gaps, second_metric
from fedjax_code.experiments.render import markdown_table, save
from fedjax_code.experiments.results import round_records


GAP_COLUMNS = {  # results.csv column -> its header in the algorithms table (non-IID cells, seed means)
    "client_eval_loss_worst10": "worst-10% loss", "rounds_to_target": "rounds to target", "comm_mb": "MB sent",
    "decode_tokens_per_s": "decode tok/s"}
PERSONAL_COLUMNS = {  # results.csv column -> its header in the personal-models table
    "personal_eval_loss": "personal loss", "personal_eval_loss_worst10": "personal worst-10%",
    "personal_humaneval_nll": "personal HumanEval NLL", "personal_rounds_to_target": "personal rounds to target",
    "personal_decode_tokens_per_s": "personal decode tok/s"}


def _mean_of(rows: list[dict], column: str) -> float:
    values = [float(r[column]) for r in rows if r.get(column) not in ("", None)]
    return float(np.mean(values)) if values else float("nan")


def _round_means(cell_dirs, field: str) -> tuple[list, list]:
    """(rounds, mean over the cells) of a RoundRecord field at the rounds that have it."""
    acc = defaultdict(list)
    for cell_dir in cell_dirs:
        for rec in round_records(cell_dir):
            if getattr(rec, field) is not None:
                acc[rec.round].append(getattr(rec, field))
    return sorted(acc), [float(np.mean(acc[k])) for k in sorted(acc)]


def _algorithms_plot(done, plots: Path) -> None:
    """Per partition, held-out loss and worst-10% client loss against round, one colour per algorithm: the global
    model solid (left out where it is not deployable), the personal models dashed; seed means."""
    partitions = sorted({r["partition"] for r, _ in done}, key=lambda p: (p != "iid", p))
    algorithms = list(dict.fromkeys(r["algorithm"] for r, _ in done))
    colours = colormaps["tab20"].colors
    colours = colours[::2] + colours[1::2]  # 20 distinct, the strong shades first
    fig = Figure(figsize=(6.5 * len(partitions), 9))
    grid = fig.subplots(2, len(partitions), squeeze=False)
    axes = list(grid.T.flat)  # per partition: its mean panel, then its worst-10% panel
    for p, part in enumerate(partitions):
        pair = axes[2 * p: 2 * p + 2]
        for a, alg in enumerate(algorithms):
            cells = [(r, d) for r, d in done if (r["partition"], r["algorithm"]) == (part, alg)]
            deployable = all(r["evaluated_model"] == "global" for r, _ in cells)
            labelled = p > 0
            for ax, fields in zip(pair, (("eval_loss", "personal_eval_loss"),
                                         ("client_eval_loss_worst10", "personal_client_eval_loss_worst10"))):
                for field, style in zip(fields, ("-", "--")):
                    x, y = _round_means([d for _, d in cells], field)
                    if x and (deployable or style == "--"):
                        ax.plot(x, y, style, color=colours[a % len(colours)], label=None if labelled else alg)
                        labelled = True
        pair[0].set(xlabel="round", ylabel="held-out loss", title=f"{part}: mean over clients")
        pair[1].set(xlabel="round", ylabel="worst-10% client loss", title=f"{part}: worst 10% of clients")
    save(fig, axes, plots / "algorithms.png")


def _algorithm_gaps(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) per (algorithm, non-IID partition), sorted by loss gap: loss and the second metric iid vs
    non-IID averaged over matched cells, the loss gap's seed spread, and the non-IID cells' GAP_COLUMNS."""
    second, means = second_metric(rows), []
    for metric in ("final_eval_loss", second):
        acc = defaultdict(list)
        for g in noniid_gaps(rows, metric):
            spread = np.nan if g["spread"] is None else g["spread"]
            acc[(g["algorithm"], g["partition"])].append((g["iid"], g["noniid"], g["gap"], spread))
        means.append({k: list(np.mean(v, axis=0)) for k, v in acc.items()})
    body = []
    for (alg, part), loss in means[0].items():
        cells = [r for r in rows if (r["algorithm"], r["partition"]) == (alg, part)]
        body.append([alg, part, *loss, *means[1].get((alg, part), [np.nan] * 4)[:3],
                     *(_mean_of(cells, c) for c in GAP_COLUMNS)])
    header = ["algorithm", "non-IID", "loss iid", "loss non-IID", "loss gap", "gap seed spread",
              *(f"{second} {s}" for s in ("iid", "non-IID", "gap")), *GAP_COLUMNS.values()]
    return header, sorted(body, key=lambda r: (r[1], r[4]))


def _gap_sentences(body: list[list]) -> list[str]:
    """Per non-IID partition: the algorithm with the smallest loss gap, its margin over the next and its spread."""
    out = []
    for part in dict.fromkeys(r[1] for r in body):
        best, *rest = [r for r in body if r[1] == part]
        margin = f"{rest[0][4] - best[4]:.3g} nats less than {rest[0][0]}'s" if rest else "the only algorithm"
        spread = "one seed, so the seed spread is unknown" if np.isnan(best[5]) else f"the gap's seed spread {best[5]:.3g}"
        lowest = min((r for r in body if r[1] == part), key=lambda r: r[3])
        out.append(f"On {part} data, {best[0]} closes the non-IID gap most (held-out loss {best[4]:+.3g} nats "
                   f"against iid, {margin}; {spread}); the lowest non-IID loss is {lowest[0]}'s ({lowest[3]:.4g}).")
    return out


def algorithms_section(done, plots: Path) -> tuple[str, list[str]]:
    """The non-IID gap per algorithm (``_algorithm_gaps``), the personalised algorithms' personal models
    (``_personal_table``) and ``_algorithms_plot``: the markdown and its summary sentences."""
    rows = [r for r, _ in done]
    _algorithms_plot(done, plots)
    header, body = _algorithm_gaps(rows)
    sentences = _gap_sentences(body)
    own = sorted({r["algorithm"] for r in rows if r["evaluated_model"] != "global"})
    note = (f" {', '.join(own)}: every figure is of the personal models, the models its clients deploy (its server "
            "model lacks the part each client keeps)." if own else "")
    personal, personal_sentences = _personaltable(rows)
    return (f"## Algorithms and the non-IID gap\n\n{' '.join(sentences)}{note} Columns after the gaps are the "
            "non-IID cells': the worst-10% client loss, rounds to the target loss, MB sent in all, and the decode "
            "tokens/s of the model HumanEval sampled (the global model, the messenger, or a personal model where "
            "clients deploy their own; on a shared CPU, decode speeds of one architecture differ by noise).\n\n"
            + markdown_table(header, body) + "\n" + personal
            + "\n![algorithms](plots/algorithms.png)\n\nPer partition, the held-out loss (left) and the worst 10% "
            "of clients' loss (right) at each evaluation round, one colour per algorithm: the global model solid, "
            "the personal models on their own clients' held-out splits dashed (seed means).\n\n",
            sentences + personal_sentences)


def _personaltable(rows: list[dict]) -> tuple[str, list[str]]:
    """Per personalised (algorithm, partition), seed means: the global (evaluated) model's held-out loss beside
    the personal models' on their own clients' held-out splits, their fairness, NLL, rounds and decode speed."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("personal_eval_loss") not in ("", None):
            groups[(r["algorithm"], r["partition"])].append(r)
    if not groups:
        return "", []
    body = []
    for (alg, part), cells in groups.items():
        own = any(r["evaluated_model"] != "global" for r in cells)
        loss, personal = _mean_of(cells, "final_eval_loss"), _mean_of(cells, "personal_eval_loss")
        body.append([alg, part, np.nan if own else loss, np.nan if own else personal - loss,
                     *(_mean_of(cells, c) for c in PERSONAL_COLUMNS)])
    body.sort(key=lambda r: (r[1], r[4]))
    sentences = []
    for part in dict.fromkeys(r[1] for r in body):
        best = min((r for r in body if r[1] == part and np.isfinite(r[3])), key=lambda r: r[3], default=None)
        if best is not None:
            sentences.append(f"On {part} data, {best[0]}'s personal models are {abs(best[3]):.3g} nats "
                             f"{'below' if best[3] < 0 else 'above'} its global model on their own clients' "
                             "held-out splits.")
    header = ["algorithm", "partition", "global loss", "personal - global", *PERSONAL_COLUMNS.values()]
    return ("\n### Personal models\n\n" + " ".join(sentences) + " Each client's personal model is scored on its "
            "own held-out split (a client that never trained: the model it would start from). The global loss is "
            "blank where the server's model is not deployable (FedRep). The personal HumanEval NLL is the mean over "
            "four clients; personal decode tok/s is measured only where the personal model is built differently "
            "from the evaluated one (the messengers' private models), elsewhere it is the table above's.\n\n"
            + markdown_table(header, body) + "\n", sentences)
