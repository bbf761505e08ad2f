"""Real classification tasks for SAE-ception: their data splits and classifiers, all offline and seeded.

* Digits: scikit-learn's bundled 8×8 handwritten digits (1,797 images) and :class:`DigitsMLP`, the paper's
  MNIST MLP 64-16-16-10, hooked at its first hidden layer.
* Text: labelled text such as :func:`saefast.text.fortunes` and :class:`SmolLM2Classifier`, the first decoder
  blocks of SmolLM2-135M (embedded, see :mod:`saefast.hf`) with a linear head, hooked at its last kept block.

A split is ``(inputs, labels)``: ``inputs`` a Tensor ``[N, ...]`` or a dict of Tensors ``[N, ...]`` (passed to the
classifier as ``model(inputs)`` or ``model(**inputs)``), ``labels`` int64 ``[N]``. Every classifier names the
module whose forward output is the hooked activation in ``hook_layer`` (a name from ``named_modules()``), and
no trainable part on the path to it is detached, so an auxiliary loss there trains it and everything before it.
scikit-learn is imported only inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DigitsSplit = tuple[torch.Tensor, torch.Tensor]
TextSplit = tuple[dict[str, torch.Tensor], torch.Tensor]


def _seeded_linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init (uniform ±1/√fan_in) drawn from ``generator``, not the global RNG."""
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = in_features ** -0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _sklearn() -> Any:
    try:
        import sklearn.datasets
        import sklearn.model_selection
    except ImportError as err:
        raise ImportError(f"this needs scikit-learn: pip install scikit-learn ({err})") from err
    return sklearn


def stratified_split(labels: torch.Tensor | Sequence[int], test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified ``(train_idx, test_idx)`` (int64, shuffled) keeping each class's share in both parts."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = torch.as_tensor(labels).cpu()
    train_idx, test_idx = _sklearn().model_selection.train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy())
    return torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(test_idx, dtype=torch.long)


class DigitsMLP(nn.Module):
    """The SAE-ception paper's MNIST MLP (64-16-16-10, ReLU) for 8×8 digits; ``hook_layer`` is ``act1``."""

    hook_layer = "act1"

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc1 = _seeded_linear(64, 16, generator)
        self.act1 = nn.ReLU()
        self.fc2 = _seeded_linear(16, 16, generator)
        self.act2 = nn.ReLU()
        self.out = _seeded_linear(16, 10, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]`` of pixels ``[B, 64]`` (or ``[B, 8, 8]``) in [0, 1]."""
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


def digits_splits(test_fraction: float = 0.25, seed: int = 0) -> tuple[DigitsSplit, DigitsSplit]:
    """scikit-learn's 8×8 digits as ``((x_train, y_train), (x_test, y_test))``: fp32 ``[N, 64]`` in [0, 1], int64.

    The split is stratified by digit and seeded (:func:`stratified_split`).
    """
    pixels, digits = _sklearn().datasets.load_digits(return_X_y=True)
    x = torch.as_tensor(pixels, dtype=torch.float32) / 16.0  # the dataset's pixels are counts 0..16
    y = torch.as_tensor(digits, dtype=torch.long)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` int64 ``[N, T]``: truncated to ``max_length`` tokens, right-padded.

    ``T`` is the longest tokenized text (at most ``max_length``); padding uses the pad token, else EOS. Special
    tokens are the tokenizer's defaults (SmolLM2 adds none).
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts to tokenize")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token to pad with")
    # Padding by hand: the tokenizer's padding side and pad token are its owner's settings, not ours to change.
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"texts {empty[:10]} tokenize to no tokens (empty strings?)")
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def text_splits(texts: Sequence[str], categories: Sequence[str], tokenizer: Any, max_length: int = 32,
                test_fraction: float = 0.25, seed: int = 0,
                per_class: int | None = None) -> tuple[TextSplit, TextSplit, list[str]]:
    """Tokenized, stratified ``((inputs_train, y_train), (inputs_test, y_test), class_names)`` of labelled texts.

    ``categories[i]`` is text ``i``'s category; its label is the category's index in ``class_names`` (the sorted
    distinct categories). ``per_class`` caps every class at that many texts (a seeded random subset), which
    balances the classes when it is at most the smallest class's size. Inputs are :func:`tokenize`'s dicts.
    """
    if len(texts) != len(categories):
        raise ValueError(f"{len(texts)} texts but {len(categories)} categories")
    class_names = sorted(set(categories))
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 categories, got {class_names}")
    labels = torch.as_tensor([class_names.index(c) for c in categories], dtype=torch.long)
    keep = torch.arange(len(labels))
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for label in range(len(class_names)):
            members = (labels == label).nonzero().flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        keep = torch.cat(chosen).sort().values
    inputs = tokenize(tokenizer, [texts[i] for i in keep.tolist()], max_length)
    labels = labels[keep]
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    train = ({key: value[train_idx] for key, value in inputs.items()}, labels[train_idx])
    test = ({key: value[test_idx] for key, value in inputs.items()}, labels[test_idx])
    return train, test, class_names


class SmolLM2Classifier(nn.Module):
    """A text classifier on the first ``n_layers`` decoder blocks of SmolLM2-135M.

    The kept blocks run as in the full model (same embeddings, rotary positions, causal mask); the model's final
    RMSNorm is applied to the last kept block's output — it puts every token on one scale, so the first token's
    huge attention-sink activation does not dominate — and a linear head reads the mean of that over the valid
    (``attention_mask``) tokens. Only the last ``trainable_layers`` blocks and the head train; the embeddings,
    earlier blocks and the final norm are frozen. ``hook_layer`` is the last kept block
    (``"backbone.layers.{n_layers - 1}"``, output ``[B, T, 576]``, before the norm).

    The backbone is a copy of the kept part of ``model`` (≈42M parameters for 4 blocks, mostly the embeddings), so
    training never changes ``model`` and one loaded model can seed many classifiers.
    """

    def __init__(self, n_classes: int, n_layers: int = 4, trainable_layers: int = 2, seed: int = 0,
                 model: nn.Module | None = None, tokenizer: Any = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if model is None:
            from ..data.hf import load_model

            model, loaded_tokenizer = load_model("smollm2", progress=False)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        decoder = getattr(model, "model", model)  # a *ForCausalLM wraps the decoder stack as .model
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) or not hasattr(decoder, "norm"):
            raise TypeError(f"model must be a Llama-style decoder (.layers blocks and a final .norm), got "
                            f"{type(model).__name__}")
        if not 1 <= n_layers <= len(decoder.layers):
            raise ValueError(f"n_layers must be in [1, {len(decoder.layers)}], got {n_layers}")
        if not 0 <= trainable_layers <= n_layers:
            raise ValueError(f"trainable_layers must be in [0, n_layers={n_layers}], got {trainable_layers}")
        self.n_layers, self.trainable_layers = n_layers, trainable_layers
        self.tokenizer = tokenizer
        self.backbone = self._truncated_copy(decoder, n_layers)
        self.backbone.requires_grad_(False)
        for block in self.backbone.layers[n_layers - trainable_layers:]:
            block.requires_grad_(True)
        generator = torch.Generator().manual_seed(seed)
        self.head = _seeded_linear(self.backbone.config.hidden_size, n_classes, generator)
        self.hook_layer = f"backbone.layers.{n_layers - 1}"

    @staticmethod
    def _truncated_copy(decoder: nn.Module, n_layers: int) -> nn.Module:
        """A deep copy of ``decoder`` holding only its first ``n_layers`` blocks (the rest is never copied)."""
        all_layers = decoder.layers
        decoder.layers = nn.ModuleList(list(all_layers[:n_layers]))
        try:
            truncated = copy.deepcopy(decoder)
        finally:
            decoder.layers = all_layers
        # The forward loops over layers[:config.num_hidden_layers]; the copy has its own config.
        truncated.config.num_hidden_layers = n_layers
        return truncated

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, n_classes]`` of right-padded token ids ``[B, T]`` (:func:`tokenize`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)
