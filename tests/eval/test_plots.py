"""deltas.png: one panel per kind of metric, so that a huge perplexity delta cannot flatten the accuracy bars."""

import math

import pytest

from gqa_uptrain.eval import plots, report


def lm_eval_output(acc: float, perplexity: float, perplexity_se: float) -> dict:
    """A model's lm-eval output for LAMBADA: accuracy and perplexity, each with its standard error."""
    return {"lambada_openai": {
        "results": {"lambada_openai": {"acc,none": acc, "acc_stderr,none": 0.005,
                                       "perplexity,none": perplexity, "perplexity_stderr,none": perplexity_se}},
        "higher_is_better": {"lambada_openai": {"acc": True, "perplexity": False}}}}


def model(label: str, acc: float, perplexity: float, perplexity_se: float) -> dict:
    return {"label": label, "ref": f"./{label}", "role": "candidate", "kv_cache_bytes_per_token": 1024,
            "perplexity": None, "error": None, "tasks": lm_eval_output(acc, perplexity, perplexity_se)}


@pytest.fixture
def blown_up() -> dict:
    """What made deltas.png blank: a mean-pooled MQA whose LAMBADA perplexity went from 4 to about 13 million."""
    base = {**model("base", acc=0.70, perplexity=4.0, perplexity_se=0.1), "role": "base"}
    mqa = model("mqa", acc=0.05, perplexity=13e6, perplexity_se=2e6)
    gqa = model("gqa8", acc=0.66, perplexity=4.4, perplexity_se=0.12)
    return report.build_report({}, base, [gqa, mqa])


def bars(ax) -> list:
    return [patch for patch in ax.patches if patch.get_width() > 0]


def test_scores_and_perplexities_get_a_panel_each(blown_up):
    series = report.delta_series(blown_up)
    assert {(r["task"], r["metric"]) for r in series["mqa"]} >= {("lambada_openai", "acc"),
                                                                 ("lambada_openai", "perplexity")}
    figure = plots.deltas_figure(series, plots.cycle_colors(list(series)))
    scores, perplexities = figure.axes

    assert scores.get_yscale() == "linear"
    assert [t.get_text() for t in scores.get_xticklabels()] == ["lambada_openai\n(acc)", "average\n(acc)"]
    low, high = scores.get_ylim()
    assert -1 <= low < -0.65 and 0 <= high < 0.1  # the scale of the accuracy deltas, not of 13 million
    heights = sorted(round(bar.get_height(), 3) for bar in bars(scores))
    assert heights == [-0.65, -0.65, -0.04, -0.04]  # acc and the average, for mqa and gqa8

    assert perplexities.get_yscale() == "log" and "candidate / base" in perplexities.get_ylabel()
    assert [t.get_text() for t in perplexities.get_xticklabels()] == ["lambada_openai\n(perplexity)"]
    tops = sorted(bar.get_y() + bar.get_height() for bar in bars(perplexities))
    assert tops == pytest.approx([1.1, 13e6 / 4])  # ratios, drawn up from 1
    low, high = perplexities.get_ylim()
    assert low <= 1 and high >= 13e6 / 4
    assert math.log10(high / low) < 9  # the whiskers (two relative stderrs) stay on the axis


def test_only_the_kinds_present_get_a_panel(blown_up):
    series = {label: [r for r in rows if r["metric"] != "perplexity"]
              for label, rows in report.delta_series(blown_up).items()}
    figure = plots.deltas_figure(series, plots.cycle_colors(list(series)))
    assert len(figure.axes) == 1 and figure.axes[0].get_yscale() == "linear"


def test_metric_kinds():
    def rows(metric, base, candidate):
        return [{"metric": metric, "base": base, "candidate_value": candidate}]

    assert plots.metric_kind(rows("acc_norm", 0.5, 0.4)) == plots.SCORE
    assert plots.metric_kind(rows("word_perplexity", 20.0, 30_853.0)) == plots.RATIO
    assert plots.metric_kind(rows("bleu", 30.0, 25.0)) == plots.OTHER
    assert plots.metric_kind(rows("bits_per_byte", 0.9, 1.4)) == plots.OTHER


def test_ratio_whiskers_stay_above_zero():
    row = {"base": 4.0, "base_stderr": 0.1, "candidate_value": 13e6, "candidate_stderr": 2e6}
    value, (below, above) = plots._bar(row, ratio=True)
    assert value == pytest.approx(3.25e6)
    assert 0 < value - below < value < value + above
