"""The comparison arithmetic and the report files, on hand-made lm-eval results."""

import csv
import math
import subprocess
import sys

import pytest

from gqa_uptrain.eval import report


def model(label: str, role: str, acc: float, acc_se: float, ppl: float, kv: int, lastword_acc: float = 0.5) -> dict:
    """A model record as the runner makes it, with lm-eval output for two tasks."""
    return {
        "label": label, "ref": f"./{label}", "role": role, "num_key_value_heads": kv // 256,
        "kv_cache_bytes_per_token": kv, "perplexity": {"token_perplexity": ppl}, "error": None,
        "tasks": {
            "mc": {"results": {"mc": {"alias": "mc", "acc,none": acc, "acc_stderr,none": acc_se,
                                      "acc_norm,none": acc + 0.1, "acc_norm_stderr,none": acc_se}},
                   "higher_is_better": {"mc": {"acc": True, "acc_norm": True}}},
            "lastword": {"results": {"lastword": {"acc,none": lastword_acc, "acc_stderr,none": 0.01,
                                                  "perplexity,none": 20.0, "perplexity_stderr,none": "N/A"}},
                         "higher_is_better": {"lastword": {"acc": True, "perplexity": False}}},
        },
    }


@pytest.fixture
def sample() -> dict:
    base = model("base", "base", acc=0.60, acc_se=0.03, ppl=10.0, kv=4096)
    close = model("gqa8", "candidate", acc=0.58, acc_se=0.04, ppl=10.5, kv=1024)
    far = model("mqa", "candidate", acc=0.40, acc_se=0.03, ppl=14.0, kv=256, lastword_acc=0.3)
    failed = {**model("broken", "candidate", 0, 0, 0, 1024), "error": "model ./broken does not load: bad header",
              "tasks": {}, "perplexity": None}
    return report.build_report({"tasks": ["mc", "lastword"], "limit": None}, base, [close, far, failed])


def rows_of(sample: dict, label: str) -> dict:
    return {(r["task"], r["metric"]): r for r in sample["comparisons"][label]}


def test_delta_and_its_standard_error(sample):
    row = rows_of(sample, "gqa8")[("mc", "acc")]
    assert row["delta"] == pytest.approx(-0.02)
    assert row["delta_stderr"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2))  # 0.05
    assert not row["significant"]  # 0.02 < 2 x 0.05
    assert rows_of(sample, "mqa")[("mc", "acc")]["significant"]  # 0.2 > 2 x 0.042


def test_metric_without_stderr_is_never_marked(sample):
    row = rows_of(sample, "mqa")[("perplexity", "token_perplexity")]
    assert row["delta"] == pytest.approx(4.0) and row["delta_stderr"] is None and not row["significant"]
    assert rows_of(sample, "mqa")[("lastword", "perplexity")]["delta_stderr"] is None


def test_average_uses_one_headline_metric_per_task(sample):
    average = rows_of(sample, "mqa")[("average", "acc+acc_norm")]
    # mc -> acc_norm (0.7 vs 0.5), lastword -> acc (0.5 vs 0.3)
    assert average["base"] == pytest.approx((0.7 + 0.5) / 2)
    assert average["candidate_value"] == pytest.approx((0.5 + 0.3) / 2)
    assert average["delta_stderr"] == pytest.approx(math.sqrt(0.03**2 + 0.03**2 + 0.01**2 + 0.01**2) / 2)


def test_failed_candidate_is_listed_but_not_compared(sample):
    assert list(sample["comparisons"]) == ["gqa8", "mqa"]
    table = report.models_table(sample)
    assert "model ./broken does not load: bad header" in table
    assert "| gqa8 | 4 | none | 1.0 KiB | 0.250 |" in table


def test_markdown_marks_significant_deltas(sample):
    text = report.markdown(sample, images=["deltas.png"])
    mqa_section = text[text.index("## mqa vs base"):]
    assert "| mc | acc | 0.6000 | 0.4000 | -0.2000 * |" in mqa_section
    assert "| mc | acc | 0.6000 | 0.5800 | -0.0200 |" in text
    assert "![deltas.png](deltas.png)" in text


def test_written_files(sample, tmp_path):
    paths = report.write_report(sample, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(
        ["report.json", "report.csv", "report.md", "deltas.png", "quality_vs_kv_cache.png"])
    with open(tmp_path / "out" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["candidate"] for r in rows} == {"gqa8", "mqa"}
    assert len(rows) == 2 * 6  # mc acc/acc_norm, lastword acc/perplexity, perplexity, average
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_speed_table_gives_speedup_over_base(sample):
    sample["base"]["speed"] = [{"batch": 8, "context": 4096, "tokens_per_s": 260.0, "generate_tokens_per_s": 130.0,
                                "floor_tokens_per_s": 769.0}]
    sample["candidates"][0]["speed"] = [{"batch": 8, "context": 4096, "tokens_per_s": 373.0,
                                         "generate_tokens_per_s": 143.0, "floor_tokens_per_s": 1340.0,
                                         "launch_bound_share": 0.25}]
    table = report.speed_table(sample)
    assert "| base | 8 | 4096 | 260.0 | 130.0 | 769.0 | 0.3381 | 1.0000 | 1.0000 |  |" in table  # CPU: no profile
    assert "| gqa8 | 8 | 4096 | 373.0 | 143.0 | 1340.0 | 0.2784 | 1.4346 | 1.1000 | 0.2500 |" in table


def test_the_launch_bound_share_is_idle_time_plus_short_kernels():
    from gqa_uptrain.eval.speed import launch_bound_share

    kernels = {"busy_seconds": 8e-3, "short_kernel_seconds": 1e-3}
    assert launch_bound_share(kernels, 10e-3) == pytest.approx(0.3)  # 2 ms idle + 1 ms in short kernels
    assert launch_bound_share(kernels, 7.9e-3) == pytest.approx(1e-3 / 7.9e-3)  # timing noise: never negative idle
    assert launch_bound_share(None, 10e-3) is None


def test_matplotlib_is_set_up_only_when_a_plot_is_drawn():
    code = "import sys; from gqa_uptrain.eval import report, plots; print('matplotlib' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]


def test_deltas_plot_shows_every_metric_beyond_two_standard_errors(sample):
    from gqa_uptrain.eval import plots

    series = report.delta_series(sample)
    shown = {label: [(r["task"], r["metric"]) for r in rows] for label, rows in series.items()}
    assert rows_of(sample, "mqa")[("mc", "acc")]["significant"]  # not mc's headline metric (acc_norm)...
    assert ("mc", "acc") in shown["mqa"] and ("mc", "acc") in shown["gqa8"]  # ...shown all the same, for every model
    assert ("mc", "acc_norm") in shown["mqa"] and ("average", "acc+acc_norm") in shown["mqa"]
    assert ("lastword", "perplexity") not in shown["mqa"]  # no standard error: never beyond two of them
    figure = plots.deltas_figure(series, plots.cycle_colors(list(series)))
    ticks = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert "mc\n(acc)" in ticks and "mc\n(acc_norm)" in ticks and "lastword\n(acc)" in ticks


def test_quality_plot_uses_a_log_axis_for_values_decades_apart_and_names_the_base(sample):
    from gqa_uptrain.eval import plots

    colors = plots.cycle_colors([c["label"] for c in sample["candidates"]])
    linear = plots.quality_vs_kv_figure(report.quality_vs_kv_panels(sample, colors))
    assert [ax.get_yscale() for ax in linear.axes] == ["linear", "linear"]  # 10 to 14: no decade
    legend = [text.get_text() for text in linear.axes[1].get_legend().get_texts()]
    assert legend == ["base (base)", "candidates (labelled)"]

    sample["base"]["perplexity"]["token_perplexity"] = 23.8
    sample["candidates"][1]["perplexity"]["token_perplexity"] = 30_853.0
    figure = plots.quality_vs_kv_figure(report.quality_vs_kv_panels(sample, colors))
    perplexity_axis = figure.axes[1]
    assert perplexity_axis.get_yscale() == "log" and "log scale" in perplexity_axis.get_ylabel()
    assert figure.axes[0].get_yscale() == "linear"
