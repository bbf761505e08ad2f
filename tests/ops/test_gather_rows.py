"""The store's batch gather, ``ops.gather_rows_`` (``csrc/cpu/gather_rows.cpp`` and the torch path), against
:func:`saefast.ops.ref.gather_rows`: ``out[n] = sources[source_index[n]][row_index[n]]`` in ``out``'s dtype.

Exact: a gather copies bits, widening bf16/fp16 → fp32 is exact, and narrowing rounds to nearest even on every path
(as ``Tensor.to``). Checked on ragged sources (one row, empty, row counts not powers of two), row shapes
(d = 1, 2,304, an extra's 0-d rows, a 2-d row), every dtype pair, repeated and out-of-order rows, into poisoned
outputs (every row must be written), and bad input (named, before anything is written).
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_native

from saefast import ops
from saefast.ops import ref

BACKENDS = ["torch", pytest.param("native", marks=needs_native)]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def random_sources(counts, row_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return [(torch.randn(n, *row_shape, generator=g) * 3).to(dtype) for n in counts]
    if dtype == torch.bool:
        return [torch.randint(0, 2, (n, *row_shape), generator=g).bool() for n in counts]
    return [torch.randint(-100, 100, (n, *row_shape), generator=g).to(dtype) for n in counts]


def random_indices(counts, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    usable = [s for s, c in enumerate(counts) if c > 0]
    source = torch.tensor(usable)[torch.randint(0, len(usable), (n,), generator=g)]
    row = (torch.rand(n, generator=g) * torch.tensor(counts, dtype=torch.float64)[source]).long()
    return source, row


def poisoned(shape, dtype):
    out = torch.empty(shape, dtype=dtype)
    if dtype.is_floating_point:
        out.fill_(float("nan"))
    else:
        out.fill_(True if dtype == torch.bool else 77)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,row_shape,n", [
    ([5, 1, 0, 130], (2304,), 301),
    ([4096, 333], (576,), 1000),
    ([7], (1,), 20),
    ([3, 9, 2], (3, 5), 17),
    ([16, 1], (37,), 0),
])
@pytest.mark.parametrize("src_dtype,out_dtype", [(a, b) for a in FLOATS for b in FLOATS])
def test_matches_the_oracle(backend, counts, row_shape, n, src_dtype, out_dtype):
    sources = random_sources(counts, row_shape, src_dtype, seed=n)
    source, row = random_indices(counts, n, seed=len(counts))
    out = poisoned((n, *row_shape), out_dtype)
    got = ops.gather_rows_(sources, source, row, out, backend=backend)
    assert got is out
    want = ref.gather_rows(sources, source, row, out_dtype)
    assert torch.equal(out.view(torch.uint8) if n else out, want.view(torch.uint8) if n else want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64])
def test_extras_copy_bits(backend, dtype):
    counts = [10, 3, 41]
    sources = random_sources(counts, (), dtype)
    source, row = random_indices(counts, 50)
    out = poisoned((50,), dtype)
    ops.gather_rows_(sources, source, row, out, backend=backend)
    assert torch.equal(out, ref.gather_rows(sources, source, row, dtype))


@pytest.mark.parametrize("src_dtype", FLOATS)
def test_other_conversions_take_the_torch_path(src_dtype):
    """``auto`` runs what the native kernel does not convert (here into float64) on the torch path."""
    sources = random_sources([30, 7], (11,), src_dtype)
    source, row = random_indices([30, 7], 40)
    out = ops.gather_rows_(sources, source, row, poisoned((40, 11), torch.float64))
    assert torch.equal(out, ref.gather_rows(sources, source, row, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_repeat_and_come_in_any_order(backend):
    sources = random_sources([6, 6], (9,), torch.bfloat16)
    source = torch.tensor([1, 1, 0, 1, 0, 0, 1])
    row = torch.tensor([5, 5, 0, 0, 5, 2, 3])
    out = poisoned((7, 9), torch.float32)
    ops.gather_rows_(sources, source, row, out, backend=backend)
    for n in range(7):
        assert torch.equal(out[n], sources[source[n]][row[n]].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float32)])
def test_unaligned_outputs_and_sources(backend, src_dtype, out_dtype):
    """Streaming stores need 16-byte aligned rows; an output or source off that alignment takes the plain path."""
    counts, d, n = [40, 9], 64, 33
    sources = [torch.cat([torch.zeros(1), s.flatten().float()]).to(src_dtype)[1:].view(s.shape)
               for s in random_sources(counts, (d,), src_dtype)]
    flat = torch.full((n * d + 1,), float("nan"), dtype=out_dtype)
    out = flat[1:].view(n, d)  # 2 or 4 bytes past an aligned start
    assert out.data_ptr() % 16 and sources[0].data_ptr() % 16
    source, row = random_indices(counts, n)
    ops.gather_rows_(sources, source, row, out, backend=backend)
    assert torch.equal(out, ref.gather_rows(sources, source, row, out_dtype))


def test_memory_mapped_sources(tmp_path):
    """The store's case: sources are slices of read-only-shared, copy-on-write mappings of ``.npy`` files."""
    import numpy as np

    data = np.arange(40 * 6, dtype=np.uint16).reshape(40, 6)
    np.save(tmp_path / "a.npy", data)
    mapped = torch.from_numpy(np.load(tmp_path / "a.npy", mmap_mode="c").view(np.int16)).view(torch.bfloat16)
    sources = [mapped[10:20], mapped[0:5]]
    source, row = torch.tensor([0, 1, 0]), torch.tensor([9, 0, 3])
    out = ops.gather_rows_(sources, source, row, poisoned((3, 6), torch.bfloat16))
    assert torch.equal(out.view(torch.int16), torch.from_numpy(data[[19, 0, 13]].view(np.int16)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named_before_anything_is_written(backend):
    sources = random_sources([4, 3], (5,), torch.float32)
    out = poisoned((2, 5), torch.float32)
    cases = [
        (sources, torch.tensor([0, 2]), torch.tensor([0, 0]), out, "outside \\[0, 2\\)"),
        (sources, torch.tensor([0, 1]), torch.tensor([0, 3]), out, "row_index\\[1\\] = 3 is outside \\[0, 3\\)"),
        (sources, torch.tensor([0, -1]), torch.tensor([0, 0]), out, "outside"),
        (sources, torch.tensor([0, 1]), torch.tensor([0, 0], dtype=torch.int32), out, "int64"),
        (sources, torch.tensor([0, 1]), torch.tensor([0]), out, "one length"),
        (sources, torch.tensor([0, 1]), torch.tensor([0, 0]), poisoned((2, 4), torch.float32), "out must be"),
        ([sources[0], sources[1].double()], torch.tensor([0, 1]), torch.tensor([0, 0]), out, "one dtype"),
        ([sources[0], torch.zeros(3, 4)], torch.tensor([0, 1]), torch.tensor([0, 0]), out, "row shape"),
        ([], torch.tensor([0, 1]), torch.tensor([0, 0]), out, "empty"),
        ([torch.zeros(3, 5, dtype=torch.int32)], torch.tensor([0, 1]), torch.tensor([0, 0]), out, "floating"),
    ]
    for sources_, source, row, out_, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.gather_rows_(sources_, source, row, out_, backend=backend)
    assert bool(out.isnan().all())
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gather_rows_(sources, torch.tensor([0, 1]), torch.tensor([0, 0]), out, backend="triton")


@needs_native
def test_the_native_kernel_checks_its_own_input():
    """The kernel does not trust its Python caller: a bad index is refused there too, before a row is written."""
    sources = random_sources([4, 3], (5,), torch.float32)
    out = poisoned((2, 5), torch.float32)
    with pytest.raises(ValueError, match="row_index\\[1\\] = 9"):
        torch.ops.saefast.native_gather_rows_(sources, torch.tensor([0, 1]), torch.tensor([0, 9]), out)
    with pytest.raises(ValueError, match="source_index\\[0\\] = 5"):
        torch.ops.saefast.native_gather_rows_(sources, torch.tensor([5, 1]), torch.tensor([0, 0]), out)
    assert bool(out.isnan().all())


def test_native_refuses_what_it_cannot_run():
    sources = random_sources([4], (5,), torch.float32)
    with pytest.raises(ValueError, match="backend 'native' needs"):
        ops.gather_rows_(sources, torch.tensor([0]), torch.tensor([1]), poisoned((1, 5), torch.float64),
                         backend="native")
