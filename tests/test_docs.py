"""Numbers in docs/ that a command regenerates must be what the command prints."""

from pathlib import Path

from benchmarks import param_budget

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_parameter_table_matches_the_script(capsys):
    param_budget.main(["--model", "vit_base_patch16_224"])
    printed = capsys.readouterr().out.strip()
    assert printed in (DOCS / "parameters.md").read_text()


def test_the_table4_loop_in_benchmarks_md_runs_every_paper_and_reading_row_of_the_suite():
    """Every Table 4 row of benchmarks.suite with a variant we train on real data (LoRA is our
    extra, run on its own), both eq. 12 readings and both FFTs included."""
    import re

    from benchmarks import suite

    text = (DOCS / "benchmarks.md").read_text()
    loop = re.search(r"for d in nyudv2 mfnet whu_opt_sar; do for v in ([a-z_ ]+); do", text)
    table4 = next(t for t in suite.TABLES if t.title.startswith("Table 4"))
    rows = [v for row in table4.rows for v in row.variants if v != "lora"]
    assert loop.group(1).split() == rows
    assert {"gopt_rgb_query", "fft", "fft_early"} <= set(rows)


def test_method_md_points_eq_3_at_the_code_that_runs_it():
    import inspect

    from gopt_adapter.prompter import GroupingPrompter

    text = (DOCS / "method.md").read_text()
    eq3 = next(line for line in text.splitlines() if line.startswith("| eq. 3 |"))
    assert "`prompter.GroupingPrompter.inject` -> `tokens.rescale_patch_tokens_linear`" in eq3
    assert "rescale_patch_tokens_linear(" in inspect.getsource(GroupingPrompter.inject)
    assert "ACP's query" in text.split("## Equations")[0]  # the intro names it as going beyond the shared reading
