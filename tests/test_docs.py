"""Numbers in docs/ that a command regenerates must be what the command prints."""

from pathlib import Path

from benchmarks import param_budget

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_parameter_table_matches_the_script(capsys):
    param_budget.main(["--model", "vit_base_patch16_224"])
    printed = capsys.readouterr().out.strip()
    assert printed in (DOCS / "parameters.md").read_text()
