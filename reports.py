"""Reports of probe results: the tables (Markdown, CSV), the figures (PNG and TensorBoard) and
the test embeddings for TensorBoard's projector.

probe.py calls these after scoring; they read results dicts (see probe.summarize_runs)
and write every file through safety's atomic writer (figures are drawn into memory and
written whole), so a killed run never leaves half a table or a torn PNG.

One command, the last line of `make demo`: the README's claims about the demo, checked on
a demo's results file (one line, "as expected: …" or "unexpected: …"; exit status 0 either
way, since a surprising result is information, not a failure):

    python reports.py check runs/demo-results.json
"""
import argparse
import io
import os
import re

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

import records
import safety
import utils
from utils import UserError

MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "roc_auc", "regression": "r2"}  # a task's headline metric
# probe.py --retrieval's metrics (similar.retrieval_metrics) as the table names them.
RETRIEVAL_NAMES = {"track_top1": "track top-1", "track_mrr": "track MRR", "label_p10": "label P@10",
                   "label_map": "label mAP"}
# What `make demo` showed on each of 5 seeds (README, "Start here": its sentences mirror these,
# as claim_text writes them): (probe, test metric, encoder above, encoder below, least gap).
DEMO_CLAIMS = (("pitch_class", "accuracy", "semi-supervised", "self-supervised", 0.10),
               ("timbre", "accuracy", "self-supervised", "random", 0.10))
# The demo's encoders by how its checkpoints are named (runs/demo-selfsup, runs/demo-seed3-semisup, random).
DEMO_ENCODERS = {"self-supervised": "-selfsup", "semi-supervised": "-semisup", "random": "random"}


def build_parser():
    """The command line: `check RESULTS`."""
    parser = argparse.ArgumentParser(description="Reports of probe results from the command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check the README's claims about the demo on a demo's results file; "
                                              "prints one line, exit status 0 whatever it finds")
    check.add_argument("results", help="a results file of `make demo` (JSON, e.g. runs/demo-results.json)")
    return parser


# ---------------------------------------------------------------- tables

def column_name(result, results):
    """Summary column of a result: the probe name, with the label fraction when it varies."""
    fractions = {r["label_fraction"] for r in results}
    if fractions == {1.0}:
        return result["probe"]
    return f"{result['probe']} @{result['label_fraction']:g}"


def cell_text(mean, std, seeds):
    """'0.812' for one seed, '0.812 ± 0.013' for several."""
    return f"{mean:.3f}" if seeds == 1 else f"{mean:.3f} ± {std:.3f}"


def table_metrics(result):
    """The test metrics a result shows in the summary, as the paper's table reports them.

    multiclass: accuracy (and mirex for keys); multilabel: roc_auc and pr_auc;
    regression: r2, and r2 of each output when there are several (e.g. "r2 arousal");
    then, with --retrieval, the similarity metrics (RETRIEVAL_NAMES; no head, so no
    spread over seeds). Returns a list of (metric name, mean, std).
    """
    test, spread = result["test"], result["test_std"]
    names = {"multiclass": ["accuracy", "mirex"], "multilabel": ["roc_auc", "pr_auc"], "regression": ["r2"]}
    cells = [(name, test[name], spread[name]) for name in names[result["task"]] if name in test]
    if result["task"] == "regression" and len(test["r2_per_output"]) > 1:
        outputs = result["label_column"].split(",")
        cells += [(f"r2 {name}", m, s) for name, m, s in zip(outputs, test["r2_per_output"], spread["r2_per_output"])]
    retrieval = result.get("retrieval", {})
    cells += [(name, retrieval[key], 0.0) for key, name in RETRIEVAL_NAMES.items() if key in retrieval]
    return cells


def summary_records(results):
    """One flat record per (result, table metric), with mean and std over seeds."""
    records = []
    for r in results:
        for metric, mean, std in table_metrics(r):
            column = column_name(r, results)
            records.append({"checkpoint": r["checkpoint"], "probe": r["probe"], "column": column,
                            "header": f"{column} ({metric})", "task": r["task"], "label_fraction": r["label_fraction"],
                            "seeds": 1 if metric in RETRIEVAL_NAMES.values() else len(r["seeds"]),  # no spread
                            "metric": metric, "mean": mean, "std": std,
                            "corrupt": r["corrupt"]})
    return records


def summary_table(results):
    """The main table as Markdown, caption first: one row per checkpoint, one column per
    (probe, metric) on test; below it, the file, step and SHA-256 of each checkpoint."""
    records = summary_records(results)
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    columns = list(dict.fromkeys(r["header"] for r in records))
    cells = {(r["checkpoint"], r["header"]): r for r in records}
    caption = ("Test results: rows are checkpoints, columns probe (metric); mean ± sample std over seeds where "
               "there are several.")
    corrupted = next((r["corrupt"] for r in records if r["corrupt"]), None)
    if corrupted:
        caption += f" Test audio corrupted by {','.join(corrupted['names'])} at severity {corrupted['severity']:g}."
    lines = [caption, "", "| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for checkpoint in checkpoints:
        values = []
        for c in columns:
            r = cells.get((checkpoint, c))
            values.append(cell_text(r["mean"], r["std"], r["seeds"]) if r else "-")
        lines.append(f"| {checkpoint} | " + " | ".join(values) + " |")
    lines.append("")
    for checkpoint in checkpoints:
        r = next(r for r in results if r["checkpoint"] == checkpoint)
        lines.append(f"- {checkpoint}: " + (f"{r['checkpoint_file']}, step {r['checkpoint_step']}, sha256 "
                                            f"{r['checkpoint_sha256']}" if r["checkpoint_file"] else
                                            "random-init encoder"))
    return "\n".join(lines)


def summary_frame(results):
    """The summary table as a DataFrame for CSV: mean per column, plus 'COLUMN std' with seeds."""
    records = summary_records(results)
    frame = {}
    for r in records:
        row = frame.setdefault(r["checkpoint"], {"checkpoint": r["checkpoint"]})
        row[r["header"]] = r["mean"]
        if r["seeds"] > 1:
            row[f"{r['header']} std"] = r["std"]
    return pd.DataFrame(list(frame.values()))


def robustness_table(results):
    """Markdown table of the main test metric per sweep severity, caption first: rows (checkpoint, probe)."""
    swept = [r for r in results if "sweep" in r]
    if not swept:
        return ""
    severities = list(swept[0]["sweep"])
    names = ",".join(swept[0]["corrupt"]["names"])
    lines = [f"Robustness: the main test metric with the test audio corrupted by {names}, per severity s "
             f"(s=0: clean audio).", "",
             f"| checkpoint | probe ({names}) | " + " | ".join(f"s={s}" for s in severities) + " |",
             "|---" * (len(severities) + 2) + "|"]
    for r in swept:
        metric = MAIN_METRIC[r["task"]]
        values = [cell_text(r["sweep"][s][metric], r["sweep_std"][s][metric], len(r["seeds"])) for s in severities]
        lines.append(f"| {r['checkpoint']} | {column_name(r, results)} ({metric}) | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_summary(out, results, report):
    """Write the full results (JSON) to `out`, the tables (`report`, Markdown) next to it as
    .md and the main table as .csv. Returns the paths written."""
    stem = os.path.splitext(out)[0]
    safety.write_json(out, results)
    safety.write_text(stem + ".md", report + "\n")
    safety.write_csv(stem + ".csv", summary_frame(results))
    return [out, stem + ".md", stem + ".csv"]


# ---------------------------------------------------------------- figures

def new_figure(**kwargs):
    """plt.subplots(**kwargs) drawn off screen (files only, no display).

    matplotlib is imported on the first figure, not with the module: probing without
    --plot then runs where matplotlib is absent (the GPU check's machine has none).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(**kwargs)


def confusion_figure(counts, class_names, title):
    """A confusion matrix as a matplotlib Figure: true class down, predicted class across.

    counts `[C, C]` (row = true, column = predicted); each cell is shaded by its share of
    the row (white 0 to dark blue 1, colour bar at the side) and shows its count (every
    cell up to 15 classes, the non-zero ones beyond). class_names label both axes.
    """
    counts = np.asarray(counts)
    n = len(counts)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # [C, C]
    side = min(24.0, max(4.5, 0.32 * n + 2.5))  # inches: room for the names as classes grow
    figure, axes = new_figure(figsize=(side + 1.2, side), dpi=120)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), labels=class_names, rotation=90 if n > 5 else 45, ha="center" if n > 5 else "right",
                    rotation_mode="anchor" if n <= 5 else "default")
    axes.set_yticks(range(n), labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    font = max(4.0, min(10.0, 160 / n))
    for i in range(n):
        for j in range(n):
            if counts[i, j] or n <= 15:
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                          color="white" if rates[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class's test tracks")
    figure.tight_layout()
    return figure


def curve_figure(lines, xlabel, ylabel, title, log_x=False):
    """Metric curves as a Figure: lines {label: (x `[n]`, mean `[n]`, std `[n]`)}, one line each,
    with ± std error bars and a shaded band where std is non-zero."""
    figure, axes = new_figure(figsize=(6.4, 4.4), dpi=120)
    for label, (x, mean, std) in lines.items():
        x, mean, std = (np.asarray(v, dtype=np.float64) for v in (x, mean, std))
        axes.errorbar(x, mean, yerr=std if std.any() else None, marker="o", capsize=3, label=label)
        if std.any():
            axes.fill_between(x, mean - std, mean + std, alpha=0.15)
    if log_x:
        axes.set_xscale("log")
        ticks = sorted({float(v) for x, _, _ in lines.values() for v in x})
        axes.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_figure(figure, path, writer, tag):
    """Write `figure` as a PNG at `path` (drawn in memory, written whole) and as image `tag` to a
    TensorBoard writer, then close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    safety.write_bytes(path, png.getvalue())
    writer.add_figure(tag, figure, close=True)


def write_projector(folder, embeddings, metadata, header):
    """Test embeddings `[N, E]` for TensorBoard's projector in `folder`, one metadata row
    (a list of header's columns) per embedding. Open with `tensorboard --logdir FOLDER`."""
    subfolder = os.path.join(folder, "00000", "test")  # where TensorBoard's add_embedding puts step 0 of "test"
    os.makedirs(subfolder, exist_ok=True)
    rows = torch.as_tensor(embeddings).float().tolist()  # [N, E]
    safety.write_text(os.path.join(subfolder, "tensors.tsv"), "".join("\t".join(map(str, r)) + "\n" for r in rows))
    safety.write_text(os.path.join(subfolder, "metadata.tsv"),
                      "".join("\t".join(map(str, r)) + "\n" for r in [header] + metadata))
    safety.write_text(os.path.join(folder, "projector_config.pbtxt"),
                      'embeddings {\n  tensor_name: "test:00000"\n  tensor_path: "00000/test/tensors.tsv"\n'
                      '  metadata_path: "00000/test/metadata.tsv"\n}\n')
    SummaryWriter(log_dir=folder).close()  # an event file, so that TensorBoard lists the folder as a run


def safe_name(text):
    """A folder name from free text: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "probe"


def checkpoint_label(result):
    """How figures name a result's checkpoint: as typed, with its step when it has one."""
    step = result.get("checkpoint_step")
    return result["checkpoint"] if not result.get("checkpoint_file") else f"{result['checkpoint']} (step {step})"


def plot_curves(args, results):
    """--plot after every probe: per probe, the few-label curve (with several label fractions)
    and the robustness curve (with --severity-sweep; one per label fraction), one line per
    checkpoint, as PNGs in --plot-dir and in its TensorBoard log. Returns the PNG paths."""
    if len(args.label_fractions) < 2 and not args.severities:
        return []
    written = []
    writer = SummaryWriter(log_dir=args.plot_dir)
    for probe in dict.fromkeys(r["probe"] for r in results):
        mine = [r for r in results if r["probe"] == probe]
        metric = MAIN_METRIC[mine[0]["task"]]
        seeds = len(mine[0]["seeds"])
        spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
        if len({r["label_fraction"] for r in mine}) > 1:
            lines = {}
            for checkpoint in dict.fromkeys(r["checkpoint"] for r in mine):
                ordered = sorted((r for r in mine if r["checkpoint"] == checkpoint), key=lambda r: r["label_fraction"])
                lines[checkpoint_label(ordered[0])] = ([r["label_fraction"] for r in ordered],
                                                       [r["test"][metric] for r in ordered],
                                                       [r["test_std"][metric] for r in ordered])
            corrupt = mine[0]["corrupt"]
            audio = f"\ntest audio corrupted by {','.join(corrupt['names'])} at s={corrupt['severity']:g}" \
                if corrupt else ""
            path = os.path.join(args.plot_dir, f"few-labels__{safe_name(probe)}.png")
            save_figure(curve_figure(lines, "share of labeled train tracks", f"test {metric}",
                                     f"{probe}: test {metric} against label fraction{spread}{audio}", log_x=True),
                        path, writer, f"few-labels/{probe}")
            written.append(path)
        for fraction in dict.fromkeys(r["label_fraction"] for r in mine if "sweep" in r):
            swept = [r for r in mine if "sweep" in r and r["label_fraction"] == fraction]
            names = ",".join(swept[0]["corrupt"]["names"])
            lines = {checkpoint_label(r): ([float(s) for s in r["sweep"]], [m[metric] for m in r["sweep"].values()],
                                           [d[metric] for d in r["sweep_std"].values()]) for r in swept}
            suffix = "" if fraction == 1 else f"@{fraction:g}"
            path = os.path.join(args.plot_dir, f"robustness__{safe_name(probe + suffix)}.png")
            save_figure(curve_figure(lines, f"severity s of the test corruption ({names})", f"test {metric}",
                                     f"{probe}{' ' + suffix if suffix else ''}: robustness{spread}"),
                        path, writer, f"robustness/{probe}{suffix}")
            written.append(path)
    writer.close()
    return written


def plot_run(args, result, data, shown):
    """--plot for one results dict: its first run's test embeddings in the projector (path,
    label and, for multiclass, predicted class) and, for multiclass, the confusion matrix
    as confusion_matrix.png, .csv and a TensorBoard image, in its own folder of --plot-dir."""
    embeddings, tracks, outputs = shown
    column = data.column
    labels = [",".join(data.rows[c].iat[t] for c in column.columns) for t in tracks]
    paths = [display_path(data.paths[t], result["csv"]) for t in tracks]
    folder = [safe_name(result["checkpoint"]), safe_name(result["probe"])]
    if len(args.label_fractions) > 1 or result["label_fraction"] < 1:
        folder.append(f"fraction{result['label_fraction']:g}")
    folder = os.path.join(args.plot_dir, "__".join(folder))
    if column.task == "multiclass":
        predicted = [column.classes[c] for c in outputs.argmax(1).tolist()]
        write_projector(folder, embeddings, [list(row) for row in zip(paths, labels, predicted)],
                        ["path", "label", "predicted"])
        counts = np.asarray(result["runs"][0]["confusion_matrix"])
        table = pd.DataFrame(counts, index=column.classes, columns=column.classes)
        safety.write_text(os.path.join(folder, "confusion_matrix.csv"), table.to_csv(index_label="true \\ predicted"))
        title = (f"{checkpoint_label(result)} · {result['probe']}\ntest accuracy "
                 f"{np.trace(counts) / max(counts.sum(), 1):.3f} on {counts.sum()} tracks")
        writer = SummaryWriter(log_dir=folder)
        save_figure(confusion_figure(counts, column.classes, title), os.path.join(folder, "confusion_matrix.png"),
                    writer, "confusion_matrix")
        writer.close()
    else:
        write_projector(folder, embeddings, [list(row) for row in zip(paths, labels)], ["path", "label"])
    result["plot_dir"] = folder
    print(f"plots: {folder} (tensorboard --logdir {folder})")


def display_path(path, csv):
    """A file's path as the projector shows it: relative to its manifest's folder when inside it."""
    folder = csv if os.path.isdir(csv) else os.path.dirname(os.path.abspath(csv))
    relative = os.path.relpath(os.path.abspath(path), folder)
    shown = path if relative.startswith("..") else relative
    return shown.replace("\t", " ").replace("\n", " ")


# ---------------------------------------------------------------- the demo's check

def claim_text(claim):
    """A claim as the README states it: 'semi-supervised above self-supervised on pitch class
    (accuracy) by at least 0.10'."""
    probe, metric, above, below, gap = claim
    return f"{above} above {below} on {probe.replace('_', ' ')} ({metric}) by at least {gap:.2f}"


def demo_encoder(checkpoint):
    """The DEMO_ENCODERS name of a checkpoint as `make demo` names it, or None."""
    return next((name for name, end in DEMO_ENCODERS.items() if checkpoint.endswith(end)), None)


def demo_check(results, claims=DEMO_CLAIMS):
    """One line that checks `claims` (DEMO_CLAIMS) on a demo's results dicts.

    A claim holds when the encoder above beats the one below on the probe's test metric (a
    head metric, or a --retrieval one) by at least its gap. Returns 'as expected: A above B
    on PROBE by GAP, …' (the gaps measured) when every claim holds, else 'unexpected: …'
    naming each claim that failed with both values, or the result that is missing (an
    encoder, probe or metric the results do not hold), then where the README explains.
    """
    values = {}
    for r in results:
        encoder = demo_encoder(r["checkpoint"])
        for metric, value in {**r.get("retrieval", {}), **r["test"]}.items():
            values[(encoder, r["probe"], metric)] = value
    held, failed = [], []
    for probe, metric, above, below, gap in claims:
        task = probe.replace("_", " ")
        missing = [name for name in (above, below) if (name, probe, metric) not in values]
        if missing:
            failed.append(f"no {task} {metric} for the {' and '.join(missing)} encoder")
            continue
        high, low = values[(above, probe, metric)], values[(below, probe, metric)]
        if high - low >= gap:
            held.append(f"{above} above {below} on {task} by {high - low:.2f}")
        else:
            failed.append(f"{above} {high:.2f} against {below} {low:.2f} on {task} {metric} "
                          f"(at least {gap:.2f} above expected)")
    if not failed:
        return "as expected: " + ", ".join(held)
    return "unexpected: " + "; ".join(failed) + "; see README, 'Start here'"


def read_results(path):
    """The results dicts of a probe's --out file; a missing or damaged file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such results file; run `make demo` (or probe.py --out {path}) first")
    try:
        return records.load_results(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a results file ({str(error).splitlines()[0][:120]}); run the probe again") \
            from None


def main(argv=None):
    """`check RESULTS`: print demo_check's line for the file; returns it."""
    args = build_parser().parse_args(argv)
    line = demo_check(read_results(args.results))
    print(line)
    return line


if __name__ == "__main__":
    utils.run_cli(main)
