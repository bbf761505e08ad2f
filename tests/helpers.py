"""Plain helpers shared by the tests (fixtures are in the conftest.py files): a closeness check that reports the
error, the devices and backends a test can run on, reproducible random data, small configs and models, model-state
comparisons, and the test doubles several files use.

Importable as ``helpers`` from every test file: ``pythonpath = ["tests"]`` in pyproject.toml's pytest options.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import saefast as sf
from saefast.ops import native, triton_available
from saefast.ops.codes import SparseCodes

# ------------------------------------------------------------------------------------------------------
# Closeness
# ------------------------------------------------------------------------------------------------------


def assert_close(actual, expected, atol: float = 1e-6, rtol: float = 0.0, msg: str = "", equal_nan: bool = False,
                 check_dtype: bool = False) -> None:
    """``|actual − expected| <= atol + rtol·|expected|`` elementwise; on failure prints the max abs error.

    A NaN on one side only always fails; NaN on both sides passes only with ``equal_nan``. ``check_dtype``: the
    dtypes must also be equal."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{msg} dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    both_nan = torch.isnan(a) & torch.isnan(e)
    within = (err <= bound) | both_nan if equal_nan else err <= bound
    ok = bool(within.all()) and not bool(torch.isnan(a).any() ^ torch.isnan(e).any())
    if not ok:
        worst = int(torch.nan_to_num(err - bound, nan=float("inf")).masked_fill(both_nan & equal_nan, 0).argmax())
        raise AssertionError(
            f"{msg} not close: max abs error {float(err.max()):.3e} (atol={atol}, rtol={rtol}); "
            f"worst at flat index {worst}: actual {float(a.flatten()[worst])!r} "
            f"vs expected {float(e.flatten()[worst])!r}"
        )


# ------------------------------------------------------------------------------------------------------
# Devices and backends
# ------------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if CUDA else "cpu")
"""Where the Triton kernels run: the GPU when there is one, else the CPU under Triton's interpreter (see conftest)."""
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_OK = triton_available() and (CUDA or INTERPRETED)
NO_EXTENSION = os.environ.get("SAEFAST_NO_EXTENSION") == "1"
"""Set where saefast was built without its native extension on purpose."""

needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need triton and CUDA or TRITON_INTERPRET=1")
needs_extension = pytest.mark.skipif(NO_EXTENSION, reason="built without the extension on purpose")
needs_native = pytest.mark.skipif(NO_EXTENSION or not native.available(), reason="native extension not built")


def native_on(device: torch.device) -> pytest.MarkDecorator:
    """Skip unless the native ops run on ``device`` (CPU: the extension is built; CUDA: built with CUDA)."""
    return pytest.mark.skipif(NO_EXTENSION or not native.supports(device),
                              reason=f"native extension not built for {device.type}")


def device_of(backend: str) -> torch.device:
    """Where ``backend``'s kernels run in the backend-only parametrisations: Triton on :data:`DEVICE`, native
    (and torch) on the CPU."""
    return DEVICE if backend == "triton" else CPU


FUSED_BACKENDS = [pytest.param("triton", marks=needs_triton), pytest.param("native", marks=native_on(CPU))]
"""The fused backends for a ``backend`` parameter (run on ``device_of(backend)``), skipped where they cannot run."""

FUSED = [pytest.param("triton", DEVICE, marks=needs_triton, id="triton"),
         pytest.param("native", CPU, marks=native_on(CPU), id="native")]
"""``("backend", "device")`` pairs of the fused backends: Triton on :data:`DEVICE`, native on the CPU."""

NATIVE_CUDA = [pytest.param("native", DEVICE, marks=native_on(DEVICE), id="native-cuda")] if CUDA else []
"""With a GPU, the native ops on CUDA too (a CUDA build of the extension): ``FUSED + NATIVE_CUDA``."""

ALL_BACKENDS = ["torch", *FUSED_BACKENDS]
"""Every op backend, for tests on CPU tensors (Triton under its interpreter)."""


def fused_op(backend: str, name: str):
    """The custom op ``torch.ops.saefast.<name>`` (Triton) or ``native_<name>`` (the native extension): both fused
    backends give an op one schema and one contract (``topk_encode``, ``threshold_encode``, ``sparse_decode``,
    ``sparse_decode_grad_values``, ``sparse_decode_grad_weight``)."""
    if backend == "native":
        assert native.load(), native.why_unavailable()
        name = f"native_{name}"
    return getattr(torch.ops.saefast, name)


# ------------------------------------------------------------------------------------------------------
# Random data (made on the CPU, so the same numbers on every device)
# ------------------------------------------------------------------------------------------------------


def rand(*shape: int, kind: str = "randn", seed: int | None = None, device: torch.device | str = CPU) -> torch.Tensor:
    """``torch.<kind>(*shape)`` from the global RNG (seeded per test, see conftest) or, given ``seed``, from a
    generator of its own; drawn on the CPU and moved to ``device``."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return getattr(torch, kind)(*shape, generator=generator).to(device)


def random_stack(J: int, M: int, D: int, seed: int = 0, device: torch.device | str = CPU,
                 small_decoder: bool = True) -> tuple[torch.Tensor, ...]:
    """Random member-stacked ``W_enc [J, M, D]`` (rows of norm ≈ 1), ``b_enc [J, M]`` (scale 0.1), ``W_dec [J, M, D]``
    and ``b_dec [J, D]``: with ``small_decoder`` decoder rows of norm ≈ 1 and ``b_dec`` of scale 0.2, else both of
    scale 1 (larger gradients). Drawn in that order from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(J, M, D, generator=g) / D**0.5
    b_enc = 0.1 * torch.randn(J, M, generator=g)
    W_dec = torch.randn(J, M, D, generator=g)
    b_dec = torch.randn(J, D, generator=g)
    if small_decoder:
        W_dec, b_dec = W_dec / D**0.5, 0.2 * b_dec
    return tuple(t.to(device) for t in (W_enc, b_enc, W_dec, b_dec))


def data(n: int, d: int, seed: int, scale: float = 1.0, offset: float = 0.4) -> torch.Tensor:
    """``scale · randn(n, d) + offset`` from a generator seeded with ``seed`` (activations off centre)."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g) + offset


def random_codes(n: int, j: int, m: int, k: int, gen: torch.Generator, p_zero: float = 0.3) -> SparseCodes:
    """``[n, j, k]`` sparse codes of ``j`` members of ``m`` latents: repeated indices on purpose, values in
    [0.1, 1.1), about ``p_zero`` of them zeroed (slots that never fire)."""
    idx = torch.randint(0, m, (n, j, k), generator=gen)
    vals = torch.rand(n, j, k, generator=gen) + 0.1
    vals[torch.rand(n, j, k, generator=gen) < p_zero] = 0.0
    return SparseCodes(vals, idx, m)


def T(rows) -> torch.Tensor:
    """Hand-computed values as a float64 tensor."""
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------
# Configs, models and their states
# ------------------------------------------------------------------------------------------------------

ACTS = ["topk", "batchtopk", "relu", "jumprelu"]
"""Every SAE activation."""

SMALL_D, SMALL_M = 7, 11
"""``d_in`` and ``n_latents`` of :func:`cfg_for`'s default config."""


def cfg_for(activation: str = "topk", d_in: int = SMALL_D, n_latents: int = SMALL_M, k: int = 3,
            **kw) -> sf.SAEConfig:
    """An :class:`SAEConfig` of ``activation`` (test files with other sizes bind them with ``functools.partial``)."""
    return sf.SAEConfig(d_in=d_in, n_latents=n_latents, k=k, activation=activation, **kw)


KINDS = ["sae", "bagging", "boosting"]
"""The model kinds: a single SAE and the two combination rules of an ensemble."""


def make(kind: str, cfg: sf.SAEConfig, seed: int = 3, members: int = 2):
    """A model of ``kind`` (:data:`KINDS`): an SAE, or an ensemble of ``members``."""
    if kind == "sae":
        return sf.SAE(cfg, seed=seed)
    return sf.Ensemble(cfg, members=members, combine=kind, seed=seed)


def quiet(**kw) -> dict:
    """``sf.train`` options without the progress bar."""
    return dict(progress=False, **kw)


def _state(model_or_state) -> dict:
    return model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state


def state_equal(a, b) -> None:
    """Two models (or state dicts) hold the same tensors: same names, dtypes, shapes and values, bit for bit."""
    sa, sb = _state(a), _state(b)
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def state_close(a, b, atol: float = 1e-5) -> None:
    """Two models (or state dicts) agree: float tensors within ``atol``, the others (counters, flags) exactly."""
    sa, sb = _state(a), _state(b)
    assert set(sa) == set(sb)
    for name in sa:
        if sa[name].is_floating_point():
            assert_close(sa[name], sb[name], atol=atol, msg=name)
        else:
            assert torch.equal(sa[name], sb[name]), f"{name} differs"


def untie_encoder(model, seed: int) -> None:
    """Move the encoder off its tied initialisation (W_enc = W_dec, b_enc = 0), where some encoder gradients are
    analytically 0 and pure rounding noise that Adam's first steps would blow up to ±lr."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W_enc.add_(0.3 * torch.randn(model.W_enc.shape, generator=g))
        model.b_enc.add_(0.1 * torch.randn(model.b_enc.shape, generator=g))


def record_inputs(model) -> list[torch.Tensor]:
    """Spy on the training step: every ``x_in`` that ``training_terms`` reads, in order."""
    seen: list[torch.Tensor] = []
    terms = model.training_terms

    def spy(x_in, *args, **kwargs):
        seen.append(x_in.detach().clone())
        return terms(x_in, *args, **kwargs)

    model.training_terms = spy
    return seen


# ------------------------------------------------------------------------------------------------------
# Bad input: what the models, the trainer and evaluate must refuse before any compute (see conftest's fixtures)
# ------------------------------------------------------------------------------------------------------


def good(n: int = 5) -> torch.Tensor:
    return torch.randn(n, SMALL_D)


def with_nan() -> torch.Tensor:
    x = good(6)
    x[2, 3] = float("nan")
    return x


def with_inf() -> torch.Tensor:
    x = good(6)
    x[0, 0] = float("inf")
    x[4, 1] = float("-inf")
    return x


BAD_INPUT_MODELS = {
    "sae": lambda: sf.SAE(cfg_for(), seed=0),
    "bagging": lambda: sf.Ensemble.bagging(cfg_for(), members=2),
    "boosting": lambda: sf.Ensemble.boosting(cfg_for(), members=2),
}

BAD = [
    # (input, exception, message pattern)
    pytest.param(lambda: torch.randn(5, SMALL_D + 2), ValueError, rf"d_in=9.*expects d_in={SMALL_D}",
                 id="wrong-d_in"),
    pytest.param(lambda: torch.randn(5, SMALL_D - 1), ValueError, rf"d_in=6.*expects d_in={SMALL_D}",
                 id="narrow-d_in"),
    pytest.param(lambda: torch.ones(5, SMALL_D, dtype=torch.int64), TypeError, r"floating dtype.*int64",
                 id="int"),
    pytest.param(lambda: torch.ones(5, SMALL_D, dtype=torch.bool), TypeError, r"floating dtype", id="bool"),
    pytest.param(with_nan, ValueError, r"NaN or Inf.*1 of 6 rows", id="nan"),
    pytest.param(with_inf, ValueError, r"NaN or Inf.*2 of 6 rows", id="inf"),
    pytest.param(lambda: torch.empty(0, SMALL_D), ValueError, r"empty batch", id="empty"),
    pytest.param(lambda: torch.randn(SMALL_D), ValueError, r"2-D", id="1-D"),
    pytest.param(lambda: torch.randn(2, 3, SMALL_D), ValueError, r"2-D", id="3-D"),
    pytest.param(lambda: torch.randn(5, SMALL_D).tolist(), TypeError, r"torch\.Tensor", id="list"),
    pytest.param(lambda: torch.randn(5, SMALL_D).numpy(), TypeError, r"torch\.Tensor.*ndarray", id="numpy"),
    pytest.param(lambda: None, TypeError, r"torch\.Tensor.*NoneType", id="none"),
]
"""``(make_x, exception, message pattern)`` for inputs every model refuses; the first 8 are batches ``train``
refuses too."""


# ------------------------------------------------------------------------------------------------------
# Test doubles: a byte-level tokenizer, a tiny random Llama, SAE-ception's small models
# ------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """The tokenizer interface text.py and harvest.py use: one id per byte, BOS=1, EOS=2, no pad."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = None

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [[3 + b % 61 for b in text.encode()] for text in texts]}

    def get_vocab(self):
        return {f"<{i}>": i for i in range(64)}


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 3-layer, d=32 random Llama (bos=1, eos=2, no pad, vocabulary 64), in eval mode (needs transformers)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def identity_sae(activation: str = "relu", k: int = 2, b_dec: float = 0.5) -> sf.SAE:
    """d = M = 4, W_enc = W_dec = I, b_enc = 0: ``z = h(x − b_dec)``, ``x̂ = z + b_dec``."""
    sae = sf.SAE(sf.SAEConfig(d_in=4, n_latents=4, k=k, activation=activation), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.fill_(b_dec)
    return sae.eval()


HAND_CODES = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
"""The codes ``x − b_dec`` of :func:`identity_sae`'s hand case: class 0 = rows 0, 1; class 1 = row 2."""
HAND_LABELS = torch.tensor([0, 0, 1])


def trained(model, d: int = 12, n: int = 240, steps: int = 15):
    """``model`` after a few torch-backend steps on random data, in eval mode."""
    x = torch.randn(n, d)
    sf.train(model, [x], steps=steps, lr=3e-3, progress=False, backend="torch")
    return model.eval()


class MLP(nn.Module):
    """A d → hidden → classes MLP whose hooked layer is ``act1``."""

    def __init__(self, d: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.fc1, self.act1, self.out = nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        self.hook_layer = "act1"

    def forward(self, x):
        return self.out(self.act1(self.fc1(x)))



def save_tiny_local_llama(root) -> tuple:
    """A tiny random 2-layer Llama (d = 32) with a byte-level tokenizer saved as a local Hugging Face model under
    ``root/model``, and a text file ``root/text.txt`` of 8 documents of random words: ``(model dir, text file)``."""
    import random

    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(ByteLevel.alphabet()))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>") \
        .save_pretrained(root / "model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                                      bos_token_id=0, eos_token_id=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    rng = random.Random(0)
    words = "sparse dictionary latent feature harvest token layer residual stream shard".split()
    (root / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(8)))
    return root / "model", root / "text.txt"


def mirrored_identity_sae(d: int, activation: str = "topk") -> sf.SAE:
    """An SAE with ``x̂ = x`` exactly: latents ``e_i`` (index i) and ``−e_i`` (index d + i), so
    ``ReLU(x) − ReLU(−x) = x``; with TopK all 2·d latents are kept. In eval mode."""
    sae = sf.SAE(sf.SAEConfig(d_in=d, n_latents=2 * d, k=2 * d, activation=activation), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


# ------------------------------------------------------------------------------------------------------
# Other libraries' SAEs (tests/fixtures/interop: folders written by the real libraries, with their outputs)
# ------------------------------------------------------------------------------------------------------

INTEROP_FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "interop"


def interop_expected(name: str) -> dict[str, torch.Tensor]:
    """The library's own outputs stored with fixture ``name``: ``x`` and its codes and reconstruction."""
    from safetensors.torch import load_file

    return load_file(str(INTEROP_FIXTURES / name / "expected.safetensors"))


def close_to_library(actual: torch.Tensor, reference: torch.Tensor, msg: str = "") -> None:
    """Equal within 1e-5 relative to the reference's scale (fp32 rounding of a differently ordered sum)."""
    actual, reference = actual.detach(), reference.detach()
    scale = max(float(reference.abs().max()), 1.0)
    assert_close(actual, reference, atol=1e-5 * scale, rtol=1e-5, msg=msg)


def copy_interop_fixture(tmp_path, name: str, target=None):
    """A writable copy of fixture ``name`` (at ``target``, default ``tmp_path / name``)."""
    import shutil

    target = tmp_path / name if target is None else target
    shutil.copytree(INTEROP_FIXTURES / name, target)
    return target


def edit_json(path, **changes) -> None:
    """Set (or, with None, remove) top-level fields of the JSON file ``path``."""
    import json

    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_safetensors(path, edit) -> None:
    """Apply ``edit(tensors)`` (in place on the dict) to the safetensors file ``path``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def check_library_outputs(model, reference: dict[str, torch.Tensor], backend: str, what: str,
                          codes_key: str = "feature_acts", output_key: str = "x_hat") -> None:
    """``model``'s codes and reconstruction of ``reference["x"]`` on ``backend`` (on its device) are the library's."""
    device = device_of(backend)
    model, x = model.to(device), reference["x"].to(device)
    with sf.use_backend(backend):
        close_to_library(model.encode(x).to_dense().cpu(), reference[codes_key], f"{what} encode")
        close_to_library(model.reconstruct(x).cpu(), reference[output_key], f"{what} reconstruct")
