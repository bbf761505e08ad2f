"""saefast compare and RUN/eval.json: runs grouped by family over seeds, mean ± 95 % Student-t intervals computed by
hand, stability over pairs of seeds, single/expanded named from the ensembles beside them, claims made only where the
intervals separate, the files written, and the errors for runs that cannot be compared."""

from __future__ import annotations

import itertools
import json
import math

import pytest

import saefast as sf
from saefast.cli import main
from saefast.cli.runs import read_evaluation, record_evaluation
from saefast.eval import metrics

T_975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (3 seeds)


def _save(tmp_path, name, model, ev, ce=None):
    path = tmp_path / name
    model.save(path)
    result = {"model": str(path), "explained_variance": ev, "l0": 4.0}
    if ce is not None:
        result["spliced"] = {"ce_loss_score": ce, "kl_score": ce - 0.01, "ce_increase": 1 - ce}
    record_evaluation(path, result)
    return path


def _runs(tmp_path):
    cfg = sf.SAEConfig(d_in=8, n_latents=12, k=2)
    paths, evs = [], {"single": [0.50, 0.52, 0.54], "expanded": [0.60, 0.61, 0.62], "bagging": [0.70, 0.71, 0.72],
                      "boosting": [0.55, 0.62, 0.69]}
    for seed in range(3):
        paths.append(_save(tmp_path, f"single{seed}", sf.SAE(cfg, seed=seed), evs["single"][seed], 0.8))
        paths.append(_save(tmp_path, f"expanded{seed}", sf.SAE(cfg.replace(n_latents=24, k=4), seed=seed),
                           evs["expanded"][seed], 0.9))
        paths.append(_save(tmp_path, f"bagging{seed}", sf.Ensemble(cfg, 2, "bagging", seed=seed),
                           evs["bagging"][seed], 0.85))
        paths.append(_save(tmp_path, f"boosting{seed}", sf.Ensemble(cfg, 2, "boosting", seed=seed),
                           evs["boosting"][seed]))
    return paths, evs


def test_compare_groups_seeds_with_hand_computed_intervals(tmp_path, capsys):
    paths, evs = _runs(tmp_path)
    out = tmp_path / "cmp.json"
    args = ["compare", *map(str, paths), "--json", str(out), "--markdown", str(tmp_path / "cmp.md"),
            "--png", str(tmp_path / "cmp.png")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    groups = {g["family"]: g for g in report["groups"]}
    assert list(groups) == ["single", "expanded (J·k)", "bagging", "boosting"]  # the paper's order
    assert groups["expanded (J·k)"]["members"] == 2 and groups["single"]["members"] == 1
    for family, key in (("single", "single"), ("expanded (J·k)", "expanded"), ("bagging", "bagging"),
                        ("boosting", "boosting")):
        values = evs[key]
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        ev = groups[family]["metrics"]["explained_variance"]
        assert ev["mean"] == pytest.approx(mean) and ev["ci"] == pytest.approx(T_975_2 * sd / math.sqrt(3))
        assert ev["n"] == 3 and groups[family]["seeds"] == [0, 1, 2]
    assert "ce_loss_score" not in groups["boosting"]["metrics"]  # never measured: absent, not invented
    # stability: over the 3 pairs of seeds' decoders
    decoders = [sf.load(tmp_path / f"bagging{seed}").W_dec.detach().reshape(-1, 8) for seed in range(3)]
    pairs = [metrics.relaxed_stability(a, b, symmetric=True) for a, b in itertools.combinations(decoders, 2)]
    assert groups["bagging"]["metrics"]["stability"]["values"] == pytest.approx(pairs)
    claims = {(c["A"], c["B"], c["metric"]): c["verdict"] for c in report["claims"]}
    assert claims[("bagging J=2", "expanded (J·k) J=2", "explained_variance")] == "A better"  # intervals apart
    assert claims[("boosting J=2", "expanded (J·k) J=2", "explained_variance")] == "not distinguishable"
    assert claims[("bagging J=2", "single", "explained_variance")] == "A better"
    printed = capsys.readouterr().out
    assert "expanded (J·k)" in printed and "±" in printed
    assert "| bagging | 2 |" in (tmp_path / "cmp.md").read_text()
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expanded_with_k_active_is_named_apart(tmp_path):
    cfg = sf.SAEConfig(d_in=8, n_latents=12, k=2)
    paths = [_save(tmp_path, "bag", sf.Ensemble(cfg, 2, "bagging", seed=0), 0.7),
             _save(tmp_path, "exp_k", sf.SAE(cfg.replace(n_latents=24), seed=0), 0.6),
             _save(tmp_path, "other", sf.SAE(cfg.replace(n_latents=20, k=3), seed=0), 0.6)]
    assert main(["compare", *map(str, paths), "--json", str(tmp_path / "c.json")]) == 0
    families = [g["family"] for g in json.loads((tmp_path / "c.json").read_text())["groups"]]
    assert families == ["expanded (k)", "SAE", "bagging"]


def test_record_evaluation_merges_sections(tmp_path):
    record_evaluation(tmp_path, {"model": "m", "explained_variance": 0.5, "l0": 3.0, "mse": 1.0})
    record_evaluation(tmp_path, {"model": "m", "spliced": {"ce_loss_score": 0.9}})
    record_evaluation(tmp_path, {"model": "m", "probing": {"mean_accuracy": {"1": 0.7}}})
    merged = read_evaluation(tmp_path)
    assert merged["explained_variance"] == 0.5 and merged["spliced"]["ce_loss_score"] == 0.9
    assert merged["probing"]["mean_accuracy"]["1"] == 0.7
    record_evaluation(tmp_path, {"model": "m", "explained_variance": 0.6, "l0": 2.0})  # a new store evaluation
    merged = read_evaluation(tmp_path)
    assert merged["explained_variance"] == 0.6 and "mse" not in merged and "spliced" in merged


def test_compare_errors_name_the_run(tmp_path, capsys):
    cfg = sf.SAEConfig(d_in=8, n_latents=12, k=2)
    sf.SAE(cfg).save(tmp_path / "unevaluated")
    assert main(["compare", str(tmp_path / "unevaluated")]) == 2
    err = capsys.readouterr().err
    assert "unevaluated has no eval.json" in err and "saefast eval --model" in err
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "unevaluated" / "eval.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "unevaluated")]) == 2
    assert "eval.json is not valid JSON" in capsys.readouterr().err


def test_compare_warns_when_seeds_share_member_inits(tmp_path, capsys):
    cfg = sf.SAEConfig(d_in=8, n_latents=12, k=2)
    paths = [_save(tmp_path, f"bag{seed}", sf.Ensemble(cfg, 3, "bagging", seed=seed), 0.7) for seed in (0, 1)]
    assert main(["compare", *map(str, paths), "--json", str(tmp_path / "c.json")]) == 0
    assert "share member init seeds [1, 2]" in capsys.readouterr().err
    assert "[1, 2]" in json.loads((tmp_path / "c.json").read_text())["groups"][0]["warning"]
    spaced = [_save(tmp_path, f"spaced{seed}", sf.Ensemble(cfg, 3, "bagging", seed=seed), 0.7) for seed in (0, 3)]
    assert main(["compare", *map(str, spaced)]) == 0
    assert "share member init seeds" not in capsys.readouterr().err
