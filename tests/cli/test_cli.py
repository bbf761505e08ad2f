"""saefast.cli (commands, parser): the command line — train / eval contracts (and resume, config files, ensemble
modes), the bench and sharpen commands, ``--help`` of every subcommand; bad input exits 2 with one line. (The demo:
tests/cli/test_demo.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import saefast as sf
from saefast.cli import main
from saefast.data.store import write_store


@pytest.fixture()
def store_dir(tmp_path):
    """A small store of low-rank activations (so an SAE can learn them) with two shards."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(24, 20, generator=g)
    x = (torch.randn(3000, 24, generator=g).relu() ** 2) @ basis
    path = tmp_path / "acts"
    write_store(path, x, shard_tokens=2048, dtype=torch.float32)
    return path, x


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saefast", *args], capture_output=True, text=True, timeout=300)


def test_train_then_eval_contract(store_dir, tmp_path, capsys):
    data, x = store_dir
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--kind", "bagging", "--members", "3", "--latents", "40", "--k", "4",
                 "--steps", "60", "--batch-size", "256", "--lr", "3e-3", "--no-progress", "--out", str(run)]) == 0
    model = sf.load(run)
    assert isinstance(model, sf.Ensemble) and model.members == 3 and model.cfg.n_latents == 40
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["step"] == 60 and history[-1]["fvu"] < 1.0
    assert json.loads((run / "run.json").read_text())["tokens_per_s"] > 0

    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(run), "--data", str(data), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("mse", "fvu", "explained_variance", "l0"):
        assert key in result
    expected = sf.evaluate(model, x)
    assert result["n_tokens"] == x.shape[0]
    assert result["fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
    assert result["l0"] == pytest.approx(expected["l0"], rel=1e-6)
    assert 0 < result["explained_variance"] <= 1
    assert "explained_variance" in capsys.readouterr().out


def test_train_multi_chain_boosting_and_bootstrap_bagging(store_dir, tmp_path):
    data, x = store_dir
    common = ["--data", str(data), "--members", "2", "--latents", "24", "--k", "3", "--steps", "8", "--batch-size",
              "256", "--no-progress"]
    assert main(["train", "--kind", "boosting", "--chains", "3", *common, "--out", str(tmp_path / "chains")]) == 0
    model = sf.load(tmp_path / "chains")
    assert isinstance(model, sf.Ensemble) and model.members == 2 and model.chains == 3
    run = json.loads((tmp_path / "chains" / "run.json").read_text())
    assert run["chains"] == 3 and not run["bootstrap"]
    # the chains start from different seeds and stay different after training
    assert not torch.allclose(model.chain(0).W_dec, model.chain(1).W_dec)

    assert main(["train", "--kind", "bagging", "--bootstrap", *common, "--out", str(tmp_path / "boot")]) == 0
    run = json.loads((tmp_path / "boot" / "run.json").read_text())
    assert run["bootstrap"] and run["chains"] == 1 and run["train"]["bootstrap"] is True


def test_train_refuses_to_overwrite_a_run_and_resumes_it(store_dir, tmp_path, capsys):
    data, _ = store_dir
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--latents", "32", "--k", "3", "--steps", "6", "--batch-size", "128",
            "--no-progress", "--out", str(run)]
    assert main(args) == 0
    before = sf.load(run).state_dict()
    assert main(args) == 2
    assert "already holds a trained model" in capsys.readouterr().err
    run_json = (run / "run.json").read_bytes()
    assert main(args + ["--resume"]) == 0  # already finished: nothing left to train, the model is unchanged
    assert "already finished its 6 steps: nothing to train" in capsys.readouterr().out
    after = sf.load(run).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert (run / "run.json").read_bytes() == run_json  # nothing trained, nothing recorded


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_train_from_a_config_file_with_flag_overrides(store_dir, tmp_path, suffix):
    data, _ = store_dir
    config = tmp_path / f"run{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps({"kind": "boosting", "members": 2, "latents": 32, "k": 3, "steps": 7,
                                      "batch_size": 128, "sae": {"aux_coef": 0.0}, "train": {"log_every": 7}}))
    else:
        config.write_text('kind = "boosting"\nmembers = 2\nlatents = 32\nk = 3\nsteps = 7\nbatch_size = 128\n'
                          '[sae]\naux_coef = 0.0\n[train]\nlog_every = 7\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(data), "--k", "5", "--no-progress",
                 "--out", str(run)]) == 0
    model = sf.load(run)
    assert model.combine == "boosting" and model.members == 2 and model.cfg.k == 5 and model.cfg.aux_coef == 0.0
    history = json.loads((run / "history.json").read_text())
    assert [h["stage"] for h in history] == [0, 1] and history[-1]["step"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "DATA", "--members", "0", "--out", "RUN"], "--members must be a whole number >= 1"),
        (["train", "--data", "NOWHERE", "--out", "RUN"], "NOWHERE"),
        (["train", "--data", "DATA", "--latents", "8", "--k", "9", "--out", "RUN"], "k=9 exceeds the number"),
        (["train", "--data", "DATA", "--config", "BADCONF", "--out", "RUN"], "unknown key"),
        (["eval", "--model", "NOWHERE", "--data", "DATA"], "NOWHERE"),
        (["train", "--data", "DATA", "--activation", "relu", "--backend", "native", "--steps", "1", "--out", "RUN"],
             "backend 'native' implements the topk"),
        (["train", "--data", "DATA", "--kind", "bagging", "--chains", "2", "--out", "RUN"],
         "--chains applies to --kind boosting"),
        (["train", "--data", "DATA", "--kind", "boosting", "--bootstrap", "--out", "RUN"],
         "--bootstrap applies to --kind single or bagging"),
        (["demo", "--members", "0", "--out", "RUN"], "argument --members: must be >= 1, got 0"),
        (["harvest", "--model", "no/such/model", "--tokens", "10", "--out", "RUN"], "no/such/model"),
        (["harvest", "--tokens", "0", "--out", "RUN"], "argument --tokens: must be >= 1, got 0"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_error(store_dir, tmp_path, args, message):
    data, _ = store_dir
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "single", "latnts": 3}))
    substitute = {"DATA": str(data), "RUN": str(tmp_path / "run"), "NOWHERE": str(tmp_path / "nowhere"),
                  "BADCONF": str(tmp_path / "bad.json")}
    result = run_cli(*[substitute.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"saefast {args[0]}: error:") and message.replace("NOWHERE", "nowhere") in lines[0]


@pytest.mark.parametrize("command", ["harvest", "train", "eval", "demo"])
def test_every_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage: saefast " + command in result.stdout


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("harvest", "train", "eval", "demo"):
        assert command in result.stdout


# ------------------------------------------------------------------------------------------------------
# saefast bench and saefast sharpen
# ------------------------------------------------------------------------------------------------------


def test_cli_bench_writes_json_markdown_and_png(tmp_path, capsys):
    paths = {kind: tmp_path / f"out.{kind}" for kind in ("json", "md", "png")}
    rc = main(["bench", "--preset", "tiny", "--cases", "sharpen", "boosting_chain", "--backends", "eager_loop",
               "eager_stacked", "native", "--repeats", "1", "--no-progress", "--json", str(paths["json"]),
               "--markdown", str(paths["md"]), "--png", str(paths["png"])])
    assert rc == 0
    report = json.loads(paths["json"].read_text())
    assert {row["case"] for row in report["results"]} == {"sharpen", "boosting_chain"}
    assert all(row["ok"] for row in report["results"] if row["backend"] != "native" or sf.native.available())
    assert "| tiny | sharpen | eager_loop |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 0
    assert "| shape | case | backend |" in capsys.readouterr().out


def test_cli_bench_data_case_prints_the_reader_table(tmp_path, capsys):
    out = tmp_path / "data.json"
    rc = main(["bench", "--cases", "data", "--data-mib", "1", "--data-dir", str(tmp_path), "--no-progress",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())["data"]
    assert {row["d"] for row in report["rows"]} == {576, 2304} and len(report["rows"]) == 16
    printed = capsys.readouterr().out
    assert "| d | out | workers | phase | M rows/s |" in printed and "GB/s of bf16 at d = 2,304" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_cli_sharpen_runs_the_digits_cycle(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    rc = main(["sharpen", "--out", str(out), "--cycles", "1", "--epochs", "3", "--finetune-epochs", "1",
               "--sae-steps", "30", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| cycle | test acc |" in printed and "cycle 1: test accuracy" in printed
    report = json.loads((out / "results.json").read_text())
    assert [row["cycle"] for row in report["history"]] == [0, 1] and report["task"] == "digits"
    assert (out / "history.png").stat().st_size > 0 and (out / "cycle_1" / "masks.safetensors").exists()
    assert main(["sharpen", "--out", str(tmp_path / "bad"), "--top-n", "0"]) == 2  # (--out: a new one)
    assert "argument --top-n: must be >= 1, got 0" in capsys.readouterr().err
