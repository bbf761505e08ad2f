"""saefast.eval.splice: the splice context manager (replace / error / ablate / zero) on a tiny random Llama, checked
against hand computations, and the spliced LM metrics (CE, KL, their scores) — exact when the dictionary
reconstructs perfectly, hand-computed formulas, bad input named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import mirrored_identity_sae, tiny_llama

import saefast as sf
from saefast.eval import loss_scores, splice, spliced_lm

pytest.importorskip("transformers")

LAYER = "model.layers.1"
D = 32


def exact_sae() -> sf.SAE:
    """x̂ = x exactly: latents e_d and −e_d, ``ReLU(x) − ReLU(−x) = x``, all 2·D kept by TopK."""
    return mirrored_identity_sae(D)


def trained_sae(model) -> sf.SAE:
    """A small TopK SAE trained on the layer's outputs over random token windows."""
    ids = torch.randint(3, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = dict(model.named_modules())[LAYER].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(
        o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = seen[0].reshape(-1, D)
    sae = sf.SAE(sf.SAEConfig(d_in=D, n_latents=64, k=4), seed=0)
    sf.train(sae, list(x.split(64)), steps=30, lr=3e-3, progress=False)
    return sae


def windows(n: int = 6, length: int = 10, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([1]), torch.randint(3, 64, (length - 1,), generator=g)]) for _ in range(n)]


def layer_output(model, ids):
    seen = []
    handle = dict(model.named_modules())[LAYER].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).clone()))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    return seen[0], logits


def test_replace_error_ablate_and_zero_against_hand_computations():
    model = tiny_llama()
    sae = trained_sae(model)
    ids = torch.stack(windows(3))
    x, _ = layer_output(model, ids)
    where = torch.ones(ids.shape, dtype=torch.bool)
    where[:, :2] = False
    with torch.no_grad():
        x_hat = sae.reconstruct(x[where])
        codes = sae.encode(x[where])
    ablate = [int(codes.global_indices()[0, 0, 0])]
    keep = codes.global_indices() != ablate[0]
    expected = {
        "replace": x_hat,
        "error": x_hat + (x[where] - x_hat),
        "ablate": sae.decode(codes, mask=keep).detach() + (x[where] - x_hat),
    }
    for mode, rows in expected.items():
        with splice(model, LAYER, sae, mode=mode, positions=where, ablate=ablate if mode == "ablate" else None):
            spliced, _ = layer_output(model, ids)
        torch.testing.assert_close(spliced[where], rows, rtol=1e-5, atol=1e-5)
        assert torch.equal(spliced[~where], x[~where])  # untouched positions stay clean
    assert not torch.allclose(expected["ablate"], expected["error"])  # the ablated latent mattered
    with splice(model, LAYER, None, positions=where):
        zeroed, _ = layer_output(model, ids)
    assert torch.equal(zeroed[where], torch.zeros_like(x[where])) and torch.equal(zeroed[~where], x[~where])
    after, _ = layer_output(model, ids)
    assert torch.equal(after, x)  # the hook is gone after the block


def test_error_mode_keeps_the_value_and_sends_gradients_through_the_dictionary():
    model = tiny_llama()
    sae = trained_sae(model)
    ids = torch.stack(windows(2))
    with splice(model, LAYER, sae, mode="error"):
        loss = model(input_ids=ids).logits.sum()
    loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_a_perfect_reconstruction_restores_the_clean_ce_exactly():
    model = tiny_llama()
    result = spliced_lm(model, LAYER, exact_sae(), windows(), batch_size=4, special_ids=[1])
    assert result["ce_spliced"] == result["ce_clean"] and result["kl_spliced"] == 0.0
    assert result["ce_loss_score"] == 1.0 and result["kl_score"] == 1.0 and result["ce_increase"] == 0.0
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["predicted_tokens"] == 6 * 9 and result["spliced_positions"] == 6 * 8
    assert result["kept_clean"] == {"first_positions": 2, "token_ids": [1], "positions": 6 * 2}


def test_spliced_metrics_match_a_hand_computation():
    model = tiny_llama()
    sae = trained_sae(model)
    data = windows(4)
    result = spliced_lm(model, LAYER, sae, data, batch_size=3, special_ids=[1], exclude_first=2)
    ids = torch.stack(data)
    where = torch.ones(ids.shape, dtype=torch.bool)
    where[:, :2] = False

    def ce_kl(logits, clean):
        logp = F.log_softmax(logits[:, :-1].double(), -1)
        clean_logp = F.log_softmax(clean[:, :-1].double(), -1)
        ce = -logp.gather(-1, ids[:, 1:, None]).mean()
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()
        return float(ce), float(kl)

    x, clean = layer_output(model, ids)
    with splice(model, LAYER, sae, positions=where):
        _, spliced = layer_output(model, ids)
    with splice(model, LAYER, None, positions=where):
        _, zero = layer_output(model, ids)
    ce_clean, _ = ce_kl(clean, clean)
    ce_spliced, kl_spliced = ce_kl(spliced, clean)
    ce_zero, kl_zero = ce_kl(zero, clean)
    for key, value in (("ce_clean", ce_clean), ("ce_spliced", ce_spliced), ("ce_zero_ablation", ce_zero),
                       ("kl_spliced", kl_spliced), ("kl_zero_ablation", kl_zero)):
        assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert result["ce_loss_score"] == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), rel=1e-3)
    assert result["kl_score"] == pytest.approx((kl_zero - kl_spliced) / kl_zero, rel=1e-3)
    rows = x[where]
    expected = sf.evaluate(sae, rows)
    with torch.no_grad():
        residual = float(((rows - sae.reconstruct(rows)) ** 2).sum())
    assert result["explained_variance"] == pytest.approx(1 - residual
                                                         / float(((rows - rows.mean(0)) ** 2).sum()), rel=1e-4)
    assert result["l0"] == pytest.approx(expected["l0"], rel=1e-6)


def test_loss_scores_formulas():
    scores = loss_scores(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0, kl_spliced=0.4, kl_zero=5.0)
    assert scores == {"ce_loss_score": pytest.approx(0.9), "kl_score": pytest.approx(0.92), "ce_increase": 0.5}
    assert math.isnan(loss_scores(1.0, 1.0, 1.0, 0.0, 0.0)["ce_loss_score"])


def test_bad_input_is_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="model has no module 'model.layers.9'"):
        spliced_lm(model, "model.layers.9", exact_sae(), windows())
    wrong = sf.SAE(sf.SAEConfig(d_in=16, n_latents=32, k=4))
    with pytest.raises(ValueError, match="outputs d=32 but the dictionary expects d_in=16"):
        spliced_lm(model, LAYER, wrong, windows())
    with pytest.raises(ValueError, match="unknown splice mode 'swap'"):
        with splice(model, LAYER, exact_sae(), mode="swap"):
            pass
    with pytest.raises(ValueError, match="needs the latents to ablate"):
        with splice(model, LAYER, exact_sae(), mode="ablate"):
            pass
    with pytest.raises(ValueError, match="outside 0..63"):
        with splice(model, LAYER, exact_sae(), mode="ablate", ablate=[64]):
            pass
    with pytest.raises(ValueError, match="no token windows"):
        spliced_lm(model, LAYER, exact_sae(), [])


def test_cli_eval_spliced_writes_the_contract_keys(tmp_path, capsys):
    """harvest → train → ``saefast eval --spliced`` on a tiny local model: the JSON holds the spliced metrics (the
    layer defaults to the hook the run was trained on), next to the store's metrics when --data is given too."""
    import json

    from helpers import save_tiny_local_llama

    from saefast.cli import main

    model_dir, text = save_tiny_local_llama(tmp_path)
    acts, run, out = tmp_path / "acts", tmp_path / "run", tmp_path / "eval.json"
    assert main(["harvest", "--model", str(model_dir), "--text", str(text), "--layer", "1", "--tokens", "600",
                 "--context", "32", "--dtype", "float32", "--no-progress", "--out", str(acts)]) == 0
    assert main(["train", "--data", str(acts), "--latents", "64", "--k", "4", "--steps", "20", "--batch-size",
                 "128", "--no-progress", "--out", str(run)]) == 0
    assert main(["eval", "--model", str(run), "--data", str(acts), "--spliced", "--lm", str(model_dir), "--text",
                 str(text), "--tokens", "256", "--context", "32", "--skip-windows", "20", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    spliced = report["spliced"]
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_score", "kl_score", "ce_increase"):
        assert isinstance(spliced[key], float), key
    assert spliced["layer"] == "model.layers.1" and spliced["predicted_tokens"] == 8 * 31
    assert spliced["kept_clean"]["first_positions"] == 2 and report["n_tokens"] == 600  # and the store's metrics
    assert "kept clean" in capsys.readouterr().out
    assert main(["eval", "--model", str(run)]) == 2
    assert "give --data STORE" in capsys.readouterr().err
    assert main(["eval", "--model", str(run), "--spliced", "--lm", str(model_dir), "--text", str(text), "--layer",
                 "7"]) == 2
    assert "7" in capsys.readouterr().err
