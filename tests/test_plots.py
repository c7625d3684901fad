"""The plots (grpo/runlog.py per stage, curriculum/summary.py for the pipeline): a y label on every panel,
whole-number step ticks, a marker where a series has one point, a colour per legend entry, no empty panel or
figure, and no matplotlib warning."""
import json
import os
import warnings

import pytest

from curriculum.config import build_config
from curriculum.summary import FIGURES, pipeline_curves, plot_pipeline
from grpo.runlog import expand_keys, metrics_figure, plot_metrics, pyplot

ROWS = [{"step": s, "loss": 5.0 - s / 10} for s in range(8)]
ROWS[-1].update(eval_loss=4.4, format_validity=0.125, parallel_ratio=0.0)  # measured once, at the last step
PANELS = {"loss": ["loss", "eval_loss"], "format": ["format_validity", "parallel_ratio"],
          "first <Parallel>": ["first_block_position"]}  # never logged: no block sampled


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    assert [str(w.message) for w in caught] == []


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.lines}


def test_a_stage_figure_shows_one_point_series_and_leaves_out_empty_panels(no_warnings):
    fig = metrics_figure(ROWS, PANELS)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "format"]  # the panel with nothing to draw is left out
    loss, fmt = (lines(ax) for ax in fig.axes)
    assert loss["loss"].get_marker() == "o" and len(loss["loss"].get_xdata()) == 8
    assert loss["eval_loss"].get_marker() == "o" and list(loss["eval_loss"].get_xdata()) == [7]
    assert fmt["format_validity"].get_marker() == "o" and fmt["format_validity"].get_xdata() == [7]
    colours = [line.get_color() for ax in fig.axes for line in ax.lines]
    assert len(set(colours)) == len(colours) == 4  # one per legend entry, across the figure
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (nats per token)", "share of responses"]
    for ax in fig.axes:
        assert ax.get_xlim() == (-0.5, 7.5)  # every panel spans the stage: the single points sit at step 7
        assert all(float(t).is_integer() for t in ax.get_xticks())
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines(ax))
    pyplot().close(fig)


def test_long_series_have_no_markers_and_nothing_logged_draws_nothing(tmp_path, no_warnings):
    rows = [{"step": s, "reward": float(s % 3)} for s in range(40)]
    fig = metrics_figure(rows, {"reward": ["reward"]})
    assert fig.axes[0].lines[0].get_marker() == "None"
    pyplot().close(fig)
    assert metrics_figure(rows, {"empty": ["accuracy"]}) is None
    assert plot_metrics(str(tmp_path), {"loss": ["loss"]}) is None  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert plot_metrics(str(tmp_path), PANELS) == str(tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_pipeline_figures_break_at_stages_and_skip_what_no_stage_logged(tmp_path, no_warnings):
    cfg = build_config({"kind": "pipeline", "run_dir": str(tmp_path), "stages": [
        {"name": "sft", "kind": "sft"}, {"name": "rl", "kind": "grpo"}]})
    os.makedirs(tmp_path / "sft")
    os.makedirs(tmp_path / "rl")
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rl = [{"step": s, "reward": -1.0 + s, "accuracy": 0.5, "loss": 9.0, "parallel_ratio": 0.25} for s in range(2)]
    (tmp_path / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))
    (tmp_path / "first_parallel_position.png").write_bytes(b"from an earlier run")
    paths = plot_pipeline(cfg)
    assert [os.path.basename(p) for p in paths] == ["reward_accuracy.png", "parallel_ratio.png", "sft_loss.png"]
    assert not os.path.exists(tmp_path / "first_parallel_position.png")  # nothing to draw, and nothing stale
    assert set(FIGURES) - {os.path.basename(p) for p in paths} == {"response_length.png", "first_parallel_position.png",
                                                                     "heldout_accuracy.png", "heldout_parallel.png"}
    for p in paths:
        assert os.path.getsize(p) > 1000


def test_held_out_curves_draw_every_set_logged_by_eval_every(tmp_path, no_warnings):
    """eval/<set>/mean_at_k of every set a stage logged (eval.every), as curves over the pipeline's steps."""
    cfg = build_config({"kind": "pipeline", "run_dir": str(tmp_path), "stages": [{"name": "rl", "kind": "grpo"}]})
    os.makedirs(tmp_path / "rl")
    rl = [{"step": s, "reward": 0.0, **({"eval/easy/mean_at_k": 0.1 * s, "eval/hard/mean_at_k": 0.05 * s}
                                        if s % 2 else {})} for s in range(6)]
    (tmp_path / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))
    curves, _ = pipeline_curves(cfg)
    assert expand_keys(["eval/*/mean_at_k"], [curves]) == ["eval/easy/mean_at_k", "eval/hard/mean_at_k"]
    assert curves["eval/hard/mean_at_k"]["rl"] == [(1, 0.05), (3, 0.15000000000000002), (5, 0.25)]
    assert "heldout_accuracy.png" in [os.path.basename(p) for p in plot_pipeline(cfg)]
    fig = metrics_figure(rl, {"held-out": ["eval/*/mean_at_k"]})
    assert sorted(line.get_label() for line in fig.axes[0].lines) == ["eval/easy/mean_at_k", "eval/hard/mean_at_k"]
    pyplot().close(fig)


def test_pipeline_axes_name_the_stages(tmp_path, monkeypatch, no_warnings):
    """The parallel-ratio figure: the SFT stage's one format check and the RL steps, a segment per stage (no line
    across the boundary), the dashed boundary, each stage named above its span."""
    kept = []
    monkeypatch.setattr("curriculum.summary.save_figure", lambda fig, path: kept.append(fig) or path)
    cfg = build_config({"kind": "pipeline", "run_dir": str(tmp_path), "stages": [
        {"name": "sft", "kind": "sft"}, {"name": "rl", "kind": "grpo"}]})
    for name, rows in (("sft", ROWS), ("rl", [{"step": s, "parallel_ratio": 0.25 * s} for s in range(2)])):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_pipeline(cfg)
    ax = kept[0].axes[0]
    assert ax.get_title() == "parallel ratio / format validity" and ax.get_ylabel() == "share of responses"
    segments = [(line.get_color(), list(line.get_xdata())) for line in ax.lines if line.get_linestyle() == "-"]
    assert segments == [("C0", [7]), ("C0", [8, 9]), ("C1", [7])]  # parallel_ratio in two stages, format_validity
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["parallel_ratio", "format_validity"]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [7.5]
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("sft", 3.5), ("rl", 8.5)]
    assert ax.get_xlim() == (-0.5, 9.5)
    for fig in kept:
        pyplot().close(fig)
