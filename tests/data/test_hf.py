"""saefast.data.hf: loading Hugging Face models offline — an unknown name fails fast and lists the embedded models; a
local directory loads a causal LM (or the bare model of an encoder) frozen, in eval mode, with its source recorded."""

from __future__ import annotations

import time

import pytest
from helpers import tiny_llama

from saefast.data.harvest import layer_hook
from saefast.data.hf import EMBEDDED_MODELS, load_model

transformers = pytest.importorskip("transformers")


def test_unavailable_model_fails_fast_and_offline():
    start = time.perf_counter()
    for name in ("no/such/model", "HuggingFaceTB/no-such-model-here", "definitely-not-a-model"):
        with pytest.raises(FileNotFoundError, match="not available offline") as info:
            load_model(name)
        assert all(repr(embedded) in str(info.value) for embedded in EMBEDDED_MODELS)
    assert time.perf_counter() - start < 5


def test_load_model_from_a_local_directory(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    model, tokenizer = load_model(str(tmp_path / "tiny"), progress=False)
    assert tokenizer is None  # no tokenizer files: harvest it from windows
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.saefast_source == str((tmp_path / "tiny").resolve())
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    bert.save_pretrained(tmp_path / "encoder")
    encoder, _ = load_model(str(tmp_path / "encoder"), progress=False)  # not a causal LM: loaded as the bare model
    assert type(encoder).__name__ == "BertModel" and layer_hook(encoder, 1) == "encoder.layer.1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
