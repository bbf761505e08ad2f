"""The browser's statistics against a dense oracle: frequencies, maxima, means, top contexts, histograms, samples,
contexts shaded by the right latent, and the ensemble views."""

from __future__ import annotations

import json

import pytest
import torch

import saefast as sf
from saefast.browse import browse, collect
from saefast.browse.collect import group_top
from saefast.browse.views import nearest_latents, shared_matrix
from saefast.data.store import write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    ids = torch.randint(0, 50, (1500,), generator=generator, dtype=torch.int32)
    return write_store(tmp_path_factory.mktemp("browse") / "store", x, shard_tokens=600,
                       extras={"token_ids": ids})


@pytest.fixture(scope="module", params=["bagging", "boosting"])
def model(request, store):
    cfg = sf.SAEConfig(d_in=16, n_latents=24, k=3)
    make = sf.Ensemble.bagging if request.param == "bagging" else sf.Ensemble.boosting
    ensemble = make(cfg, 3, seed=1)
    sf.train(ensemble, store.batches(256, epochs=None), steps=15, progress=False)
    return ensemble


def _dense_codes(model, store) -> torch.Tensor:
    """``[N, J·M]`` codes of the whole store: the oracle the streaming pass must never build."""
    with torch.no_grad():
        return model.encode(store.read(0, store.n_tokens)).to_dense()


def test_group_top_is_a_per_group_sort():
    keys = torch.tensor([0.5, 2.0, 1.0, 3.0, -1.0, 0.75])
    groups = torch.tensor([1, 0, 1, 0, 2, 1])
    payload = torch.arange(6, dtype=torch.float64).unsqueeze(1)
    values, rows = group_top(keys, groups, payload, 4, 2)
    assert values.tolist() == [[3.0, 2.0], [1.0, 0.75], [-1.0, float("-inf")], [float("-inf")] * 2]
    assert rows[0, :, 0].tolist() == [3.0, 1.0] and rows[1, :, 0].tolist() == [2.0, 5.0]


def test_streaming_statistics_equal_the_dense_oracle(model, store):
    dense = _dense_codes(model, store)
    stats = collect(model, store, top_n=4, sample=8, chunk=512, progress=False)  # three chunks, ragged last
    fired = dense > 0
    assert torch.equal(stats.count, fired.sum(0))
    assert torch.allclose(stats.maximum, dense.amax(0))
    assert torch.allclose(stats.total, dense.double().sum(0), rtol=1e-5)
    best = dense.topk(4, dim=0)
    for g in range(dense.shape[1]):
        real = int(fired[:, g].sum().clamp(max=4))
        assert torch.allclose(stats.top[g, :real, 1].float(), best.values[:real, g])
        assert torch.equal(dense[stats.top[g, :real, 0].long(), g], stats.top[g, :real, 1].float())
        sampled = stats.sample[g][~torch.isnan(stats.sample[g, :, 0])]
        assert sampled.shape[0] == min(8, int(fired[:, g].sum()))  # without replacement, every firing eligible
        assert torch.equal(dense[sampled[:, 0].long(), g], sampled[:, 1].float())
    assert torch.equal(stats.histogram.sum(1), stats.count)  # every firing lands in one bin


def test_the_site_data_shades_each_context_by_its_latent(model, store, tmp_path):
    dense = _dense_codes(model, store)
    ids = store.read_extra("token_ids", 0, store.n_tokens).tolist()
    summary = browse(model, store, tmp_path / "site", top_n=3, per_band=2, width=2, progress=False)
    assert summary["latents"] == dense.shape[1] and summary["tokens"] == store.n_tokens
    assert (tmp_path / "site" / "index.html").is_file()
    text = (tmp_path / "site" / "data" / "shard-00000.js").read_text()
    shard = json.loads(text[text.index(",") + 1:text.rindex(")")])
    M = model.latents_per_stack
    for key, entry in shard.items():
        g = entry["member"] * M + entry["latent"]
        assert entry["frequency"] == pytest.approx(float((dense[:, g] > 0).float().mean()), abs=1e-6)
        for context in entry["top"]:
            assert context["activations"][context["focus"]] == max(context["activations"])
            assert context["value"] == pytest.approx(context["activations"][context["focus"]])
        for example in [c for band in entry["quantiles"] for c in band["examples"]] + entry["top"]:
            row = _row_of(example, dense[:, g], ids)
            assert row is not None, key
        assert {n["member"] for n in entry["neighbours"]} == set(range(model.n_stacked)) - {entry["member"]}


def _row_of(context, column, ids):
    """The store row whose neighbourhood the context shows: its ``⟨id⟩`` tokens and (rounded) activations match."""
    tokens = [int(t.strip("⟨⟩")) for t in context["tokens"]]
    for row in range(context["focus"], len(ids)):
        a = row - context["focus"]
        if ids[a:a + len(tokens)] == tokens and all(abs(float(column[a + i]) - v) < 1e-3
                                                    for i, v in enumerate(context["activations"])):
            return row
    return None


def test_nearest_latents_and_the_shared_matrix():
    W = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    W[1, 3] = W[0, 1]  # member 1's latent 3 is member 0's latent 1
    cosine, index = nearest_latents(W, block=2)
    assert int(index[0, 1, 1]) == 3 and cosine[0, 1, 1] == pytest.approx(1.0)
    assert int(index[1, 3, 0]) == 1
    brute = W[0] @ W[0].T
    brute.fill_diagonal_(float("-inf"))
    assert torch.allclose(cosine[0, :, 0], brute.max(1).values)
    shared = shared_matrix(cosine, 0.99)
    assert shared[0][0] == 1.0 and shared[0][1] == pytest.approx(0.2)


def test_bad_input_is_named_before_any_compute(store, tmp_path):
    cfg = sf.SAEConfig(d_in=16, n_latents=8, k=2)
    with pytest.raises(ValueError, match="d_in=8"):
        browse(sf.SAE(cfg.replace(d_in=8)), store, tmp_path / "s", progress=False)
    plain = write_store(tmp_path / "plain", torch.randn(10, 16))
    with pytest.raises(ValueError, match="token_ids"):
        browse(sf.SAE(cfg), plain, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="chain"):
        browse(sf.Ensemble.boosting(cfg, 2, chains=2), store, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="top_n"):
        browse(sf.SAE(cfg), store, tmp_path / "s", top_n=0, progress=False)


def test_sharpened_class_sets_are_listed(store, tmp_path):
    cfg = sf.SAEConfig(d_in=16, n_latents=8, k=2)
    sae = sf.SAE(cfg, seed=0)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 5]] = True
    browse(sae, store, tmp_path / "site", top_n=2, per_band=1, width=1, progress=False,
           classes={"animals": mask, "numbers": [7]})
    text = (tmp_path / "site" / "data" / "index.js").read_text()
    index = json.loads(text[text.index("=") + 1:text.rindex(";")])
    assert index["ensemble"]["classes"] == {"animals": [[0, 1], [0, 5]], "numbers": [[0, 7]]}
    with pytest.raises(ValueError, match="one entry per latent"):
        browse(sae, store, tmp_path / "s", classes={"x": torch.ones(3, dtype=torch.bool)}, progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        browse(sae, store, tmp_path / "s", classes={"x": [8]}, progress=False)


def test_saefast_browse_command_with_sharpened_classes(store, tmp_path, capsys):
    from safetensors.torch import save_file

    from saefast.cli import main

    model = sf.Ensemble.bagging(sf.SAEConfig(d_in=16, n_latents=6, k=2), 2)
    model.save(tmp_path / "run")
    cycle = tmp_path / "sharpen" / "cycle_1"
    cycle.mkdir(parents=True)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [0, 7]] = True
    save_file({"masks": masks}, str(cycle / "masks.safetensors"))
    (tmp_path / "sharpen" / "results.json").write_text(json.dumps({"info": {"classes": ["cats", "dogs"]}}))
    assert main(["browse", "--model", str(tmp_path / "run"), "--data", str(store.path), "--out", str(tmp_path / "s"),
                 "--classes", str(cycle / "masks.safetensors"), "--no-progress", "--top-n", "2"]) == 0
    assert "open " in capsys.readouterr().out
    text = (tmp_path / "s" / "data" / "index.js").read_text()
    index = json.loads(text[text.index("=") + 1:text.rindex(";")])
    assert index["ensemble"]["classes"] == {"cats": [[0, 0], [1, 1]], "dogs": []}
    assert main(["browse", "--model", str(tmp_path / "run"), "--data", str(store.path), "--out", str(tmp_path / "s"),
                 "--top-n", "0"]) == 2
