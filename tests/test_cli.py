"""The command line: the demo writes its results; bad input exits 2 with one line."""

import json
import subprocess
import sys

from saefast.cli import main


def test_quick_demo_writes_results_for_all_three_models(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "20", "--members", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"single", "bagging", "boosting"}
    assert rows["bagging"]["latents"] == 2 * rows["single"]["latents"]
    for row in rows.values():
        assert 0 < row["explained_variance"] <= 1 and row["train_tokens_per_s"] > 0
    assert "explained_variance" in capsys.readouterr().out
    assert (tmp_path / "model_bagging" / "config.json").is_file()


def test_bad_input_exits_2_with_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "saefast", "demo", "--quick", "--members", "0", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("saefast demo: error: an ensemble needs members >= 1")


def test_help_lists_the_demo():
    result = subprocess.run([sys.executable, "-m", "saefast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
