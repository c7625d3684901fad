"""What an evaluation writes and reads back (DESIGN.md "Evaluation"; issue 10): the per-sample records of
samples.jsonl and resuming from them, the figures, the paper-style tables and the plots.

The figures are pure functions of the records (`make_record`), so the analysis is tested on
hand-written responses without a model: mean@k and the unbiased pass@k
(rewards.metrics) and Parallel-R1's parallel-thinking figures (parallel ratio, blocks and paths,
format validity, accuracy with / without a block, path agreement, first-block position, length).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict

from rewards import aggregate_by_problem, parallel_stats, path_agreement

HIST_BINS = 10  # first-block position histogram: tenths of the response
# what a training step logs of each held-out set under eval/<set>/<metric> (eval.every; docs/metrics.md)
STEP_METRICS = ("mean_at_k", "pass_at_k", "format_validity", "parallel_ratio", "first_block_position", "mean_length")
LABELS = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH-500",
          "math500_test": "MATH-500", "gsm8k": "GSM8K", "gsm8k_test": "GSM8K"}
PLOTS = ("accuracy.png", "first_block_position.png", "accuracy_by_block.png")
# what decides a response besides the model and the problem; a resumed run must match (settings.json)
SETTINGS = ("max_new_tokens", "top_p", "top_k", "structured", "prompt_style", "instruction", "template",
            "max_prompt_tokens", "num_paths", "max_parallel_blocks", "max_path_tokens", "seed", "weights")


class EvalError(ValueError):
    """A bad --model / --across directory, or an output directory written with other settings."""


# --- records ------------------------------------------------------------------------------------------

def problem_hash(example) -> str:
    """A short fingerprint of a problem's question and answer: ids alone (a row number, "hard-1002-7")
    survive an edited data file or a changed task generator, so resuming checks this too."""
    return hashlib.sha1(f"{example.question}\x00{example.answer}".encode()).hexdigest()[:16]


def make_record(*, benchmark: str, problem_index: int, problem_id: str, sample: int, response: str, gold: str,
                correct: bool, answer: str | None, length: int, finish_reason: str, temperature: float,
                verdict: str = "", problem_hash: str | None = None) -> dict:
    """One line of samples.jsonl: a scored response plus the parallel-thinking fields of its tags."""
    stats = parallel_stats(response)
    agreeing, checked = path_agreement(response)
    return {"benchmark": benchmark, "problem_index": problem_index, "problem_id": problem_id,
            "problem_hash": problem_hash, "sample": sample,
            "temperature": temperature, "gold": gold, "answer": answer, "correct": bool(correct), "verdict": verdict,
            "num_blocks": stats.num_blocks, "paths_per_block": list(stats.paths_per_block),
            "well_formed": stats.well_formed, "first_block_position": stats.first_block_position,
            "agreeing_blocks": agreeing, "checked_blocks": checked, "length": int(length),
            "finish_reason": finish_reason, "response": response}


def read_records(path: str) -> list[dict]:
    """The records of a samples.jsonl; a torn line (the run was killed while writing it) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and {"benchmark", "problem_index", "sample"} <= set(record):
                out.append(record)
    return out


def append_records(path: str, records: list[dict]) -> None:
    """Append and flush to disk at once: what is in the file survives a kill."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def write_records(path: str, records: list[dict]) -> None:
    """Replace the file atomically (write a temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


# --- the output directory: resuming -------------------------------------------------------------------

def resume(out_dir, settings: dict, benchmarks: dict, ks: dict, temps: dict, restart: bool = False) -> list[dict]:
    """The records of problems finished in an earlier run into out_dir. samples.jsonl is rewritten without
    the unfinished problems' samples (and a torn last line); other benchmarks' records stay in it."""
    if out_dir is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    samples_path, settings_path = os.path.join(out_dir, "samples.jsonl"), os.path.join(out_dir, "settings.json")
    if os.path.exists(samples_path) and os.path.exists(settings_path):
        with open(settings_path) as f:
            saved = json.load(f)
        diff = [f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if saved.get(k) != settings[k]]
        if diff and not restart:
            raise EvalError(f"{out_dir} holds samples drawn with other settings or weights ({'; '.join(diff)}); "
                            f"write elsewhere (--out) or delete {samples_path} to start over")
        if diff:
            os.remove(samples_path)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)
    finished, keep = split_finished(read_records(samples_path), benchmarks, ks, temps)
    if os.path.exists(samples_path):
        write_records(samples_path, keep)
    return finished


def split_finished(records: list[dict], benchmarks: dict, ks: dict, temps: dict) -> tuple[list, list]:
    """(records of problems with all k samples for this run, records to keep in the file). A record of this
    run's problems counts only with the same problem id, problem hash (question and answer) and temperature
    (else the data or setting changed)."""
    groups: dict = defaultdict(dict)
    keep = []
    hashes = {name: [problem_hash(ex) for ex in examples] for name, examples in benchmarks.items()}
    for r in records:
        name, i = r["benchmark"], r["problem_index"]
        if name not in benchmarks or i >= len(benchmarks[name]):
            keep.append(r)  # another benchmark, or a problem beyond this run's --limit: not ours to judge
        elif (r.get("problem_id") == benchmarks[name][i].id and r.get("problem_hash") == hashes[name][i]
              and r.get("temperature") == temps[name] and r["sample"] < ks[name]):
            groups[(name, i)][r["sample"]] = r
    finished = [r for (name, _), group in groups.items() if len(group) == ks[name] for r in group.values()]
    return finished, keep + finished


# --- figures ------------------------------------------------------------------------------------------

def _mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def histogram(values: list[float], bins: int = HIST_BINS) -> list[int]:
    """Counts of values in [0, 1] over `bins` equal bins (1.0 falls in the last one)."""
    counts = [0] * bins
    for v in values:
        counts[min(max(int(v * bins), 0), bins - 1)] += 1
    return counts


def parallel_figures(records: list[dict]) -> dict:
    """The parallel-thinking analysis of any set of responses. "With a block" means >= 1 valid block
    (closed, >= 2 paths: ParallelStats.num_blocks); ratios with an empty denominator are None."""
    n = len(records)
    with_block = [r for r in records if r["num_blocks"] >= 1]
    without = [r for r in records if r["num_blocks"] == 0]
    opened = [p for r in records for p in r["paths_per_block"]]  # paths of every block opened
    valid = sum(r["num_blocks"] for r in records)
    checked = sum(r["checked_blocks"] for r in records)
    # every response that opens a <Parallel>, valid block or not (as the trainer logs it)
    firsts = [r["first_block_position"] for r in records if r["first_block_position"] is not None]
    return {
        "parallel_ratio": len(with_block) / n,
        "parallel_ratio_well_formed": sum(bool(r["well_formed"]) for r in with_block) / n,  # the reward's test
        "blocks_per_response": valid / n,
        "paths_per_block": _mean(opened),
        "format_validity": _mean(r["well_formed"] for r in records),
        "block_validity": valid / len(opened) if opened else None,
        "accuracy_with_block": _mean(r["correct"] for r in with_block),
        "accuracy_without_block": _mean(r["correct"] for r in without),
        "n_with_block": len(with_block),
        "n_without_block": len(without),
        "path_agreement": sum(r["agreeing_blocks"] for r in records) / checked if checked else None,
        "first_block_position": _mean(firsts),
        "first_block_histogram": histogram(firsts),
        "mean_length": _mean(r["length"] for r in records),
        "clipped_ratio": _mean(r["finish_reason"] != "stop" for r in records),
    }


def benchmark_figures(records: list[dict]) -> dict:
    """mean@k and unbiased pass@k (k = samples per problem), accuracy, and the parallel figures."""
    agg = aggregate_by_problem([r["problem_index"] for r in records], [r["correct"] for r in records])
    return {"n_problems": agg["problems"], "samples": agg["k"], "n_responses": len(records),
            "mean_at_k": agg["mean_at_k"], "pass_at_k": agg["pass_at_k"],
            "accuracy": _mean(r["correct"] for r in records), **parallel_figures(records)}


def summarize(records: list[dict], order: list[str] | None = None) -> dict:
    """{benchmark: figures, ..., "overall": figures}. overall["mean_at_k"] is the paper's Avg column (the
    unweighted mean of the benchmarks' mean@k); overall["accuracy"] and the parallel figures pool every
    response. Records are sorted first, so the result does not depend on the order they came in."""
    by_name: dict = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["benchmark"], r["problem_index"], r["sample"])):
        by_name[r["benchmark"]].append(r)
    names = [n for n in order or [] if n in by_name] + sorted(n for n in by_name if n not in (order or []))
    out = {name: benchmark_figures(by_name[name]) for name in names}
    if names:
        pooled = [r for name in names for r in by_name[name]]
        out["overall"] = {"n_problems": sum(out[n]["n_problems"] for n in names), "n_responses": len(pooled),
                          "mean_at_k": _mean(out[n]["mean_at_k"] for n in names),
                          "accuracy": _mean(r["correct"] for r in pooled), **parallel_figures(pooled)}
    return out


# --- tables ---------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def benchmark_names(results: list[dict]) -> list[str]:
    """Benchmark names in first-seen order over several results ("overall" left out)."""
    return list(dict.fromkeys(n for r in results for n in r if n != "overall"))


def results_table(rows: list[tuple[str, dict]]) -> str:
    """The paper's table, one row per model and one column per benchmark: mean@k / pass@k (mean@k alone
    where k = 1), then the Avg. of the mean@k figures and the parallel ratio, all in percent."""
    names = benchmark_names([r for _, r in rows])
    ks = {n: next(r[n]["samples"] for _, r in rows if n in r) for n in names}
    head = ["model"] + [f"{LABELS.get(n, n)} mean@{ks[n]}" + (f" / pass@{ks[n]}" if ks[n] > 1 else "")
                        for n in names] + ["Avg.", "parallel ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, result in rows:
        cells = [label]
        for n in names:
            fig = result.get(n, {})
            cells.append(_pct(fig.get("mean_at_k")) + (f" / {_pct(fig.get('pass_at_k'))}" if ks[n] > 1 else ""))
        overall = result.get("overall", {})
        cells += [_pct(overall.get("mean_at_k")), _pct(overall.get("parallel_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ANALYSIS = (("n_responses", "responses", None), ("parallel_ratio", "parallel %", "pct"),
            ("blocks_per_response", "blocks/resp", 2), ("paths_per_block", "paths/block", 2),
            ("format_validity", "well-formed %", "pct"), ("block_validity", "valid blocks %", "pct"),
            ("accuracy_with_block", "acc w/ block %", "pct"), ("accuracy_without_block", "acc w/o block %", "pct"),
            ("path_agreement", "paths agree %", "pct"), ("first_block_position", "first block pos", 2),
            ("mean_length", "mean length", 0), ("clipped_ratio", "truncated %", "pct"))


def analysis_table(result: dict) -> str:
    """The parallel-thinking analysis, one row per benchmark and one for all responses pooled."""
    lines = ["| benchmark | " + " | ".join(title for _, title, _ in ANALYSIS) + " |",
             "|" + "---|" * (len(ANALYSIS) + 1)]
    for name, fig in result.items():
        cells = [_pct(fig.get(k)) if kind == "pct" else str(fig.get(k)) if kind is None else _num(fig.get(k), kind)
                 for k, _, kind in ANALYSIS]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(label: str, result: dict) -> str:
    return (f"# Evaluation: {label}\n\n{results_table([(label, result)])}\n\n"
            "## Parallel thinking\n\nBlocks count when closed with >= 2 paths; the first-block position is the "
            "offset of the first `<Parallel>` / response length (early = exploration, late = verification).\n\n"
            f"{analysis_table(result)}\n")


def across_markdown(entries: list[dict]) -> str:
    """Results over training: the paper's table with one row per checkpoint, then the strategy figures."""
    rows = [(e["name"], e["results"]) for e in entries]
    head = "| checkpoint | Avg. mean@k | parallel % | blocks/resp | first block pos | well-formed % | mean length |"
    lines = [head, "|" + "---|" * 7]
    for e in entries:
        o = e["results"].get("overall", {})
        lines.append(f"| {e['name']} | {_pct(o.get('mean_at_k'))} | {_pct(o.get('parallel_ratio'))} | "
                     f"{_num(o.get('blocks_per_response'))} | {_num(o.get('first_block_position'))} | "
                     f"{_pct(o.get('format_validity'))} | {_num(o.get('mean_length'), 0)} |")
    evolution = "\n".join(lines)
    return f"# Evaluation across training\n\n{results_table(rows)}\n\n## Strategy evolution\n\n{evolution}\n"


# --- files and plots ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _bars(ax, names: list[str], series: dict) -> None:
    """Grouped bars: one group per benchmark, one bar per series (None values left out)."""
    width = 0.8 / max(len(series), 1)
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [100 * v for v in values if v is not None], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_ylim(0, 105)  # percent: a zero bar still reads as zero
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot_results(result: dict, out_dir: str) -> list[str]:
    """accuracy.png (mean@k, pass@k), first_block_position.png (histogram), accuracy_by_block.png."""
    plt = _pyplot()
    names = [n for n in result if n != "overall"]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 3.2))
    _bars(ax, names, {"mean@k": [result[n]["mean_at_k"] for n in names],
                      "pass@k": [result[n]["pass_at_k"] if result[n]["samples"] > 1 else None for n in names]})
    ax.set_title("accuracy per benchmark", fontsize=10)
    paths = [_save(fig, os.path.join(out_dir, PLOTS[0]))]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    edges = [(i + 0.5) / HIST_BINS for i in range(HIST_BINS)]
    for name in result:
        counts = result[name]["first_block_histogram"]
        ax.plot(edges, counts, marker="o", lw=2 if name == "overall" else 1, label=LABELS.get(name, name))
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative position of the first <Parallel> (early: exploration, late: verification)", fontsize=8)
    ax.set_ylabel("responses")
    ax.set_title("where the first block opens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out_dir, PLOTS[1])))
    fig, ax = plt.subplots(figsize=(1.6 * len(result) + 2.5, 3.2))
    _bars(ax, list(result), {"with a block": [result[n]["accuracy_with_block"] for n in result],
                             "without": [result[n]["accuracy_without_block"] for n in result]})
    ax.set_title("accuracy of responses with / without a parallel block", fontsize=10)
    paths.append(_save(fig, os.path.join(out_dir, PLOTS[2])))
    return paths


def write_results(out_dir: str, label: str, result: dict) -> list[str]:
    """results.json, results.md and the plots in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(results_markdown(label, result))
    return [path, md] + (plot_results(result, out_dir) if result else [])


def plot_across(entries: list[dict], path: str) -> str:
    """The strategy-evolution figure: accuracy, parallel ratio, blocks per response and first-block
    position of each checkpoint, in training order."""
    plt = _pyplot()
    xs, labels = range(len(entries)), [e["name"] for e in entries]
    panels = {"accuracy (mean@k)": "mean_at_k", "parallel ratio": "parallel_ratio",
              "blocks per response": "blocks_per_response", "first <Parallel> position": "first_block_position"}
    names = benchmark_names([e["results"] for e in entries]) + ["overall"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, key) in zip(axes, panels.items()):
        for name in names if key == "mean_at_k" else ["overall"]:
            pts = [(x, e["results"][name][key]) for x, e in zip(xs, entries)
                   if e["results"].get(name, {}).get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=2 if name == "overall" else 1,
                        label=LABELS.get(name, name) if name != "overall" else "Avg." if key == "mean_at_k" else "all")
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def write_across(out_dir: str, entries: list[dict]) -> list[str]:
    """across.json ({"checkpoints": entries}), across.md and across.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    path, md = os.path.join(out_dir, "across.json"), os.path.join(out_dir, "across.md")
    with open(path, "w") as f:
        json.dump({"checkpoints": entries}, f, indent=2)
    with open(md, "w") as f:
        f.write(across_markdown(entries))
    return [path, md, plot_across(entries, os.path.join(out_dir, "across.png"))]
