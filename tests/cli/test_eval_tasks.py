"""``saefast eval --probing --scr`` on a tiny local model: the JSON sections and RUN/eval.json, a missing dataset
skipped with one line naming its install command, and bad options refused before the language model loads."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_local_llama

from saefast.cli import main
from saefast.data import labelled


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    model_dir, text = save_tiny_local_llama(root)
    acts, run = root / "acts", root / "run"
    assert main(["harvest", "--model", str(model_dir), "--text", str(text), "--layer", "1", "--tokens", "600",
                 "--context", "32", "--dtype", "float32", "--no-progress", "--out", str(acts)]) == 0
    assert main(["train", "--data", str(acts), "--latents", "64", "--k", "4", "--steps", "10", "--batch-size",
                 "128", "--no-progress", "--out", str(run)]) == 0
    return model_dir, run


def _require(name):
    try:
        return labelled.probing_dataset(name, per_class=12) if name != "scr" else labelled.scr_dataset(per_cell=12)
    except labelled.DatasetUnavailable as err:
        pytest.skip(str(err))


def test_probing_and_scr_sections(tiny_run, tmp_path, capsys):
    model_dir, run = tiny_run
    _require("code-languages")
    _require("scr")
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(run), "--lm", str(model_dir), "--probing", "--datasets", "code-languages",
            "--per-class", "12", "--probe-k", "1", "2", "--scr", "--scr-per-cell", "12", "--example-tokens", "24",
            "--cache", str(tmp_path / "cache"), "--no-progress", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    probing = report["probing"]["datasets"]["code-languages"]
    assert set(probing["accuracy"]) == {"1", "2"} and 0 <= probing["accuracy"]["2"] <= 1
    assert isinstance(probing["baseline"], float) and {"c", "perl", "python", "shell"} <= set(probing["classes"])
    assert report["probing"]["layer"] == "model.layers.1"  # the hook the run was trained on
    scr = report["scr"]
    assert set(scr["S"]) == {"2", "5", "10", "20", "50"} and scr["skipped_ns"] == [100]  # 64 latents
    assert scr["target_names"] == ["computers", "science"]
    recorded = json.loads((run / "eval.json").read_text())
    assert recorded["probing"] == report["probing"] and recorded["scr"] == report["scr"]
    printed = capsys.readouterr().out
    assert "probing code-languages" in printed and "A_biased" in printed
    assert list((tmp_path / "cache").glob("examples-*.safetensors"))  # the texts' activations, kept
    assert main(args) == 0  # again, from the cache: the same numbers
    assert json.loads(out.read_text())["probing"] == report["probing"]


def test_missing_dataset_is_skipped_with_its_install_command(tiny_run, monkeypatch, capsys):
    model_dir, run = tiny_run

    def unavailable(name, **_):
        raise labelled.DatasetUnavailable(f"{name} needs Debian's fortunes: apt-get install fortunes", "apt-get "
                                          "install fortunes")

    monkeypatch.setattr(labelled, "probing_dataset", unavailable)
    assert main(["eval", "--model", str(run), "--lm", str(model_dir), "--probing", "--datasets", "fortune-topics",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipping the fortune-topics probing task" in err[0] and "apt-get install" in err[0]
    assert json.loads((run / "eval.json").read_text())["probing"]["skipped"]["fortune-topics"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--probing", "--probe-k", "65"], "--probe-k 65 is larger than the model's 64 latents"),
    (["--probing", "--datasets", "klingon"], "unknown --datasets ['klingon']"),
    (["--scr", "--scr-target", "computers"], "--scr-target takes two fortune categories"),
    (["--probing", "--layer", "0", "--lm", "NO_SUCH_MODEL"], "NO_SUCH_MODEL"),
])
def test_bad_options_are_one_line_errors(tiny_run, extra, message, capsys):
    _, run = tiny_run
    assert main(["eval", "--model", str(run), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_run_of_another_width_is_refused_before_any_evaluation(tiny_run, tmp_path, capsys):
    import saefast as sf

    model_dir, _ = tiny_run
    sf.SAE(sf.SAEConfig(d_in=16, n_latents=32, k=4)).save(tmp_path / "narrow")
    for flag in ("--spliced", "--probing", "--scr"):
        assert main(["eval", "--model", str(tmp_path / "narrow"), "--lm", str(model_dir), "--layer", "1", flag,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "has d_in=16 but" in err and "model.layers.1 outputs d=32" in err
