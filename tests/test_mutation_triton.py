"""Properties of the Triton kernels and their host side that the backend tests leave open.

``make mutation`` (experiments/mutation.py) ran a sample of the mutants of optimized/triton_backend.py
and optimized/triton_backward.py; each test here asserts a property that some survivors broke while
every other test passed: the head dims refused and run (below the smallest dot tile too), inputs in
wider buffers (strided head dim, NaN past it), every read variant on sub-tiles with listed blocks and
a key chunk inside the lattice, the weights of chunk edges on lattice points, of a one-entry table and
of no block, the launch tables against their own definition here (full blocks, runs, item orders, the
int32 limit), what each launch is told (variant, list size, merge), the NaN poison of unwritten
outputs, the TMA alignment test and allocator, default tiles Triton's CUDA compiler accepts, frozen
records, the byte bounds of the table caches and the layout of grad_out. Sizes stay small: on a
machine without CUDA the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from random_inputs import make_inputs  # noqa: E402 - after the interpreter switch above
from test_triton_backend import check_partial  # noqa: E402
from triton.backends.nvidia.compiler import CUDAOptions  # noqa: E402

from optimized import triton_backend, triton_backward  # noqa: E402
from optimized.plan import CallPlan  # noqa: E402
from reference import (  # noqa: E402
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    partial_attention,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("head_dim", [0, -1, triton_backend.MAX_HEAD_DIM + 1])
def test_a_head_dim_outside_one_to_the_maximum_is_refused(head_dim):
    reasons = triton_backend.unsupported_reasons(block_size=16, head_dim=head_dim, dtype=torch.float32)
    assert len(reasons) == 1 and f"head_dim={head_dim}" in reasons[0]


@pytest.mark.parametrize("head_dim", [1, triton_backend.MAX_HEAD_DIM])
def test_the_head_dims_at_the_ends_of_the_range_run(head_dim):
    assert triton_backend.unsupported_reasons(block_size=16, head_dim=head_dim, dtype=torch.float32) == []


def head_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a (B, N, D, H) buffer seen as (B, N, H, D): stride(-1) = H, stride(-2) = 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def view_of_nan_padded(t: torch.Tensor) -> torch.Tensor:
    """The same values as the first D columns of a buffer twice as wide, the other columns NaN: a kernel that
    reads past the head dim (or past a masked row, into the next one's NaN) gets NaN into its sums."""
    buffer = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    buffer[..., : t.shape[-1]] = t
    return buffer[..., : t.shape[-1]]


@pytest.mark.parametrize("layout", [head_dim_strided, view_of_nan_padded])
def test_a_head_dim_below_the_smallest_tile_with_inputs_laid_out_in_wider_buffers(layout):
    """D = 8 runs padded to the smallest dot tile (16 columns), from q, k, v whose head dim has stride H (a
    transposed buffer: made contiguous once) or that are views into a buffer with NaN past the head dim (read
    as they are: the kernel must read no column past D)."""
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    geometry = AttentionGeometry(DilationConfig((32, 48), (1, 2), "all"), 48, 4)
    q, k, v, mask = make_inputs(23, 1, 48, 4, 2, 8, torch.float32, 0.1)
    q, k, v = (layout(t) for t in (q, k, v))
    assert (q.stride(-1) != 1 and k.stride(-2) == 1) if layout is head_dim_strided else q.stride(-2) == 16
    check_partial(q, k, v, mask, geometry, config, True, context=f"D=8, {layout.__name__}")


# Rows of a 5-block lattice (key blocks per query block): a run of consecutive blocks and others outside it.
SCATTERED_ROWS = ((1, 3, 4), (1, 2, 4), (0, 2), (1, 3), (0, 1, 2, 3, 4))


@pytest.mark.parametrize("variant", ["v2", "v3", "v3tma"])
def test_every_variant_on_sub_tiles_with_listed_blocks_and_a_key_chunk_inside_the_lattice(monkeypatch, variant):
    """Block 32 read in 16 x 16 tiles (two key steps per block), rows holding a run of consecutive full blocks
    and full blocks outside it, and a key chunk [32, 160) that starts a block into the lattice (tensor
    descriptors start at its first point) and ends on its last point (a full block ends there)."""
    layout = torch.zeros(5, 5, dtype=torch.bool)
    for row, blocks in enumerate(SCATTERED_ROWS):
        layout[row, list(blocks)] = True
    config = SparsePatternConfig(pattern_type="custom", block_size=32, block_layout=layout)
    geometry = AttentionGeometry(DilationConfig((160,), (1,), "split"), 160, 2)
    plan = CallPlan(geometry, config, False, 0.25, (0, 160), (32, 160))
    (launch,) = triton_backend.device_tables(plan, DEVICE)
    assert launch.max_listed > 0 and int(launch.items[:, triton_backend.WorkItem.RUN_COUNT].max()) > 1
    monkeypatch.setenv(triton_backend.VARIANT_ENV, variant)
    q, k, v, mask = make_inputs(47, 1, 160, 2, 1, 16, torch.float32, 0.1)
    tile = triton_backend.TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    check_partial(q, k, v, mask, geometry, config, False, None, (32, 160), f"variant={variant}", tile=tile)


def test_weights_of_a_one_entry_table_whose_key_chunk_ends_on_lattice_points():
    """attention_weights on chunks that share one block of 64 (a table of a single entry, D = 8; two batch
    elements, four query heads on two kv heads): the key chunk [8, 40) starts and ends on lattice points inside
    the block. Slots outside the chunks hold 0 (optimized/weights.py: "0 in masked and padding slots"); the
    others are the reference's probabilities."""
    b, (q0, q1), (k0, k1) = 64, (0, 48), (8, 40)
    config = SparsePatternConfig(pattern_type="dense", block_size=b)
    geometry = AttentionGeometry(DilationConfig((80,), (1,), "split"), 80, 4)
    q, k, v, mask = make_inputs(29, 2, 80, 4, 2, 8, torch.float32, 0.1)
    q, k, v = (view_of_nan_padded(t) for t in (q, k, v))
    # Views into the whole tensors, NaN past the head dim: a read past the key chunk finds real keys, not a fault.
    qc, kc, vc, mc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask[:, k0:k1]
    scale = 8**-0.5
    plan = CallPlan(geometry, config, True, scale, (q0, q1), (k0, k1))
    assert [table.nnz for table in plan.tables] == [1]
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    _, lse = triton_backend.partial_forward(dev(qc), dev(kc), dev(vc), dev(mc), plan)
    weights = triton_backend.attention_weights(dev(qc), dev(kc), dev(mc), lse, plan)
    values = weights["block_values"].cpu()
    outside = (weights["query_positions"].cpu() < 0)[:, :, None] | (weights["key_positions"].cpu() < 0)[:, None, :]
    assert values.shape == (2, 4, b, b) and bool(outside.any())
    assert torch.equal(values[:, outside], torch.zeros_like(values[:, outside]))
    kwargs = dict(query_start=q0, key_start=k0, is_causal=True, key_padding_mask=mc, scale=scale, return_weights=True)
    _, _, probs64 = partial_attention(qc, kc, vc, geometry, config, **kwargs)
    _, _, probs_lowp = partial_attention(qc, kc, vc, geometry, config, compute_dtype=None, **kwargs)
    dense = weights.to_dense().cpu()
    assert_within_budget(compare("weights", dense[:, :, q0:q1, k0:k1], probs64, probs_lowp, q.dtype), "one entry")


def test_weights_of_chunks_without_an_allowed_block_are_empty():
    """A causal call whose key chunk lies after its query chunk has no block: no stored block, positions of
    shape (0, b) and an all-zero dense form, as the torch backend's weights have."""
    from optimized import weights as torch_weights

    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((64,), (1,), "split"), 64, 2)
    plan = CallPlan(geometry, config, True, 0.25, (0, 32), (32, 64))
    assert all(table.nnz == 0 for table in plan.tables)
    q, k, _, _ = make_inputs(53, 1, 64, 2, 2, 16, torch.float32)
    lse = torch.full((1, 2, 32), float("-inf"))
    args = (q[:, :32].to(DEVICE), k[:, 32:].to(DEVICE), None, lse.to(DEVICE), plan)
    ours, theirs = triton_backend.attention_weights(*args), torch_weights.attention_weights(*args)
    assert ours.num_blocks == 0 and ours["block_values"].shape == (1, 0, 16, 16)
    for name in ("block_indices", "block_heads", "block_branches", "query_positions", "key_positions"):
        assert ours[name].shape == theirs[name].shape and ours[name].dtype == theirs[name].dtype, name
    assert torch.equal(ours.to_dense().cpu(), torch.zeros(1, 2, 64, 64))


def test_out_is_in_the_input_dtype_for_the_whole_key_range_and_float32_for_a_key_chunk():
    """A call over every key returns out in q's dtype; over a key chunk, a float32 partial to be merged later."""
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32, 2)
    q, k, v, _ = make_inputs(61, 1, 32, 2, 2, 16, torch.float16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    for key_range, dtype in (((0, 32), torch.float16), ((0, 16), torch.float32), ((16, 32), torch.float32)):
        plan = CallPlan(geometry, config, False, 0.25, (0, 32), key_range)
        k0, k1 = key_range
        out, lse = triton_backend.partial_forward(q, k[:, k0:k1], v[:, k0:k1], None, plan)
        assert (out.dtype, lse.dtype) == (dtype, torch.float32), key_range


@pytest.mark.parametrize("wrong", ["out", "lse"])
def test_an_accumulator_the_kernel_cannot_address_is_refused(wrong):
    """The kernel merges into ``into`` with unit stride on out's head dim and a contiguous lse: either one laid
    out otherwise (the other one fine) is a ValueError naming both layouts, before any launch."""
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32, 2)
    plan = CallPlan(geometry, config, False, 0.25, (0, 32), (0, 16))
    q, k, v, _ = make_inputs(59, 1, 32, 2, 2, 16, torch.float32)
    out, lse = torch.zeros(1, 32, 2, 16), torch.full((1, 2, 32), float("-inf"))
    if wrong == "out":
        out = head_dim_strided(out)
    else:
        lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert (out.stride(-1) == 1) != (wrong == "out") and lse.is_contiguous() != (wrong == "lse")
    into = (out.to(DEVICE), lse.to(DEVICE))
    with pytest.raises(ValueError, match="into's out needs unit stride on its last dim and lse must be contiguous"):
        triton_backend.partial_forward(q.to(DEVICE), k[:, :16].to(DEVICE), v[:, :16].to(DEVICE), None, plan, into=into)


# ------------------------------------------------------------------------------------------
# Launch tables, against their definition
# ------------------------------------------------------------------------------------------


def _is_full(key_block, lattice_start, length, stride, b, key_range, causal, query_block):
    """Every point of the key block exists and lies in the key chunk, and it is not the causal diagonal."""
    lo, hi = key_range
    points = [lattice_start + stride * t for t in range(key_block * b, (key_block + 1) * b)]
    exists = (key_block + 1) * b <= length
    return exists and all(lo <= p < hi for p in points) and not (causal and key_block == query_block)


def _longest_run(blocks: list[int]) -> int:
    best, run = 0, 0
    for i, block in enumerate(blocks):
        run = run + 1 if i and block == blocks[i - 1] + 1 else 1
        best = max(best, run)
    return best


@pytest.mark.parametrize(
    "pattern, head_mode, causal, query_range, key_range",
    [
        ("random", "split", True, (0, 250), (0, 250)),
        ("dilated_sparse", "all", False, (37, 250), (5, 203)),
    ],
)
def test_launch_table_rows_follow_their_definition(pattern, head_mode, causal, query_range, key_range):
    """Per work item: the full key blocks (every point on the lattice and in the key chunk, not the causal
    diagonal) come first, led by a longest run of consecutive ones (RUN_BLOCK, RUN_COUNT), ascending
    within the run, the other full ones and the masked ones; max_full, max_listed and mean_run summarise
    the rows. Checked point by point here, on layouts with scattered blocks and chunk edges."""
    b = 16
    kwargs = dict(sparsity_ratio=0.5, seed=3) if pattern == "random" else dict(sparsity_ratio=0.5)
    config = SparsePatternConfig(pattern_type=pattern, block_size=b, **kwargs)
    geometry = AttentionGeometry(DilationConfig((250, 128), (1, 2), head_mode), 250, 4)
    plan = CallPlan(geometry, config, causal, 1.0, query_range, key_range)
    W = triton_backend.WorkItem
    for launch in triton_backend.device_tables(plan, "cpu"):
        items, key_blocks = launch.items.tolist(), launch.key_block.tolist()
        full_counts, listed_counts, runs = [], [], []
        for item in items:
            blocks = key_blocks[item[W.ENTRY_START] : item[W.ENTRY_STOP]]
            n_full = item[W.FULL_STOP] - item[W.ENTRY_START]
            full = [
                _is_full(
                    kb, item[W.LATTICE_START], item[W.LATTICE_LENGTH], item[W.STRIDE], b, key_range, causal,
                    item[W.QUERY_BLOCK],
                )
                for kb in blocks
            ]  # fmt: skip
            assert full == [True] * n_full + [False] * (len(blocks) - n_full), (item, blocks)
            run_count, run_block = item[W.RUN_COUNT], item[W.RUN_BLOCK]
            assert run_count == _longest_run(sorted(blocks[:n_full])), (item, blocks)
            assert blocks[:run_count] == list(range(run_block, run_block + run_count)), (item, blocks)
            assert blocks[run_count:n_full] == sorted(blocks[run_count:n_full]), (item, blocks)
            assert blocks[n_full:] == sorted(blocks[n_full:]), (item, blocks)
            # The item's chunks, and the rows they sit at in a plan's own tensors (the chunks themselves).
            chunks = (item[W.QUERY_LO], item[W.QUERY_HI], item[W.KEY_LO], item[W.KEY_HI])
            assert chunks == (*query_range, *key_range), item
            assert (item[W.QUERY_SHIFT], item[W.KEY_SHIFT]) == (query_range[0], key_range[0]), item
            full_counts.append(n_full)
            listed_counts.append(n_full - run_count)
            if run_count:
                runs.append(run_count)
        assert launch.num_items == len(items)
        assert launch.max_full == max(full_counts) and launch.max_listed == max(listed_counts)
        assert launch.max_listed > 0 and launch.max_listed < launch.max_full, "runs and listed blocks both occur"
        assert launch.mean_run == pytest.approx(sum(runs) / len(runs), rel=1e-12)


@pytest.mark.parametrize("order", triton_backend.ITEM_ORDERS)
def test_each_item_order_launches_as_it_names(order):
    """longest_first: work items by descending key-block count (ties in table order); by_lattice: all query
    blocks of one (lattice, head) side by side, heads of a table one after another. The same items either way."""
    config = SparsePatternConfig(pattern_type="random", block_size=16, sparsity_ratio=0.5, seed=4)
    geometry = AttentionGeometry(DilationConfig((128, 256), (1, 2), "split"), 256, 4)
    plan = CallPlan.whole(geometry, config, True, 1.0)
    W = triton_backend.WorkItem
    (launch,) = triton_backend.device_tables(plan, "cpu", order)
    items = launch.items.tolist()
    counts = [item[W.ENTRY_STOP] - item[W.ENTRY_START] for item in items]
    assert len(set(counts)) > 2, "rows of several lengths"
    if order == "longest_first":
        assert counts == sorted(counts, reverse=True)
    else:
        lattices = [(item[W.HEAD], item[W.LATTICE_START]) for item in items]
        first = {lattice: lattices.index(lattice) for lattice in lattices}
        assert len(first) > 2 and all(
            first[lattice] + lattices.count(lattice) > i for i, lattice in enumerate(lattices)
        )
        assert all(
            items[i][W.QUERY_BLOCK] < items[i + 1][W.QUERY_BLOCK]
            for i in range(len(items) - 1)
            if lattices[i] == lattices[i + 1]
        )
    (other,) = triton_backend.device_tables(plan, "cpu", [o for o in triton_backend.ITEM_ORDERS if o != order][0])
    assert sorted(items) == sorted(other.items.tolist())


def test_tiles_and_launch_tables_are_frozen():
    """Launch tables are cached and shared by every call of a plan: none may be changed in place."""
    tile = triton_backend.default_tile(32, 16, torch.float16)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32, 2)
    (launch,) = triton_backend.device_tables(CallPlan.whole(geometry, config, False, 1.0), "cpu")
    for record, field in ((tile, "block_m"), (launch, "max_full")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, 1)


@pytest.mark.parametrize("seq_len, refused", [(2**31 - 2**26, False), (2**31, True)])
def test_launch_tables_hold_positions_up_to_the_int32_limit(seq_len, refused):
    """The kernels read int32 records: positions up to 2**31 - 1 are accepted (here above 2**30), a segment
    ending at 2**31 is refused. Segments of 2**26 at rate 2**20 keep the tables tiny; no kernel runs."""
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((2**26,), (2**20,), "split"), seq_len, 2)
    chunk = (seq_len - 2**26, seq_len)
    plan = CallPlan(geometry, config, True, 1.0, chunk, chunk)
    if refused:
        with pytest.raises(ValueError, match=r"int32 block tables \(positions >= 2\*\*31\)"):
            triton_backend.device_tables(plan, "cpu")
    else:
        (launch,) = triton_backend.device_tables(plan, "cpu")
        assert launch.items.dtype == torch.int32 and 2**30 < int(launch.items.max()) < 2**31


class LaunchRecorder:
    """Stands in for a jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def _compiles_for_cuda(kwargs) -> None:
    """Triton's CUDA compile options accept the launch's warps and stages (warps: a power of two)."""
    CUDAOptions(num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"])


@pytest.mark.parametrize("index", triton_backend.INDEX_MODES)
def test_each_variant_launches_the_reading_it_names(monkeypatch, index):
    """v2 reads every full block from its list, v3 walks each row's run by pointer steps, v3tma through
    tensor descriptors (the inputs here are 16-byte aligned), auto picks per launch by its mean run; the
    listed blocks fit the in-register list; later launches merge, the first one zeroes the gaps. The
    kernels are recorded, not run: what the A/B of experiments/bench_gpu.py compares is what it names.
    (Default tiles: the test below.)"""
    # Scattered blocks over two launches (head_mode "all"); rows of 32 full blocks in one run (max_listed 0).
    sparse = SparsePatternConfig(pattern_type="dilated_sparse", block_size=16, sparsity_ratio=0.5)
    dense = SparsePatternConfig(pattern_type="dense", block_size=16)
    cases = [
        (CallPlan.whole(AttentionGeometry(DilationConfig((64, 128), (1, 2), "all"), 128, 2), sparse, True, 0.25), 2),
        (CallPlan.whole(AttentionGeometry(DilationConfig((512,), (1,), "split"), 512, 2), dense, False, 0.25), 1),
    ]
    for plan, layers in cases:
        N = plan.geometry.seq_len
        q, k, v, _ = make_inputs(31, 2, N, 2, 2, 16, torch.float16)
        q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
        assert triton_backend._tma_ready(k, v)
        launches = triton_backend.device_tables(plan, DEVICE)
        assert len(launches) == layers
        for variant in triton_backend.VARIANTS:
            recorder = LaunchRecorder()
            monkeypatch.setattr(triton_backend, "_forward_kernel", recorder)
            triton_backend.partial_forward(q, k, v, None, plan, variant=variant, index=index)
            assert len(recorder.launches) == len(launches), variant
            for layer, (launch, (grid, kwargs)) in enumerate(zip(launches, recorder.launches)):
                reads = triton_backend._auto_variant(launch) if variant == "auto" else variant
                assert (kwargs["RUNS"], kwargs["TMA"]) == (reads != "v2", reads == "v3tma"), (variant, layer)
                # Without runs every full block of a row is listed; with them, those outside its run.
                listed = launch.max_listed if kwargs["RUNS"] else launch.max_full
                assert kwargs["REGISTER_INDEX"] == (index == "registers"), (variant, layer)
                assert kwargs["MAX_ENTRIES"] >= listed and kwargs["MAX_ENTRIES"] in (16, 32, 64, 128, 256)
                assert (kwargs["MERGE"], kwargs["ZERO_GAPS"]) == (layer > 0, layer == 0)
                assert grid == (launch.num_items * (16 // kwargs["BLOCK_M"]), 2)
                assert (kwargs["HEAD_DIM"], kwargs["BLOCK_D"], kwargs["EVEN_D"]) == (16, 16, True)
        if plan.sparse_config is dense:
            assert (launches[0].max_full, launches[0].max_listed) == (32, 0), "more full blocks than 16 slots"
    recorder = LaunchRecorder()
    monkeypatch.setattr(triton_backend, "_weights_kernel", recorder)
    triton_backend.attention_weights(q, k, None, torch.zeros(2, 2, N, device=DEVICE), plan)
    ((grid, kwargs),) = recorder.launches
    _compiles_for_cuda(kwargs)  # the weights kernel's warps and stages are the same on every device
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"]) == (16, 16, 16)


def test_the_descriptor_allocator_is_installed_once_before_a_tma_launch(monkeypatch):
    """Tensor descriptors built in a kernel need a scratch allocator: the first v3tma launch on CUDA installs
    it, later ones do not again. Off CUDA nothing launches through descriptors on the device, so nothing has
    installed it yet (the flag must say so, or the first CUDA launch would run without one)."""
    installed = []
    monkeypatch.setattr(triton, "set_allocator", installed.append)
    monkeypatch.setattr(triton_backend, "_allocator_set", triton_backend._allocator_set)  # restored afterwards
    if not torch.cuda.is_available():
        assert triton_backend._allocator_set is False
    before = triton_backend._allocator_set
    triton_backend._ensure_descriptor_allocator()
    triton_backend._ensure_descriptor_allocator()
    assert len(installed) == (0 if before else 1) and triton_backend._allocator_set is True


def test_outputs_the_first_launch_does_not_fill_are_nan_off_cuda():
    """Heads the first launch writes in full start as NaN off CUDA (a point the kernel misses fails every
    comparison); the others start as out 0, lse -inf."""
    covered = torch.tensor([True, False, False, True, False])
    out, lse = triton_backend._allocate_outputs(2, 3, 5, 4, torch.float16, "cpu", covered)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float16 and lse.shape == (2, 5, 3)
    assert bool(out[:, :, covered].isnan().all()) and bool(lse[:, covered].isnan().all())
    assert bool((out[:, :, ~covered] == 0).all()) and bool(lse[:, ~covered].isneginf().all())


def test_tensor_descriptors_need_16_byte_aligned_bases_and_strides():
    aligned = torch.randn(1, 8, 2, 16)  # strides of 1024, 128 and 64 bytes
    assert triton_backend._tma_ready(aligned, aligned[:, 2:])
    assert not triton_backend._tma_ready(aligned, torch.randn(1, 8, 2, 6, dtype=torch.float16))  # rows of 12 bytes
    assert not triton_backend._tma_ready(torch.randn(65)[1:].view(1, 4, 1, 16))  # base 4 bytes past alignment
    assert not triton_backend._tma_ready(torch.randn(1, 8, 2, 18)[..., :16])  # heads 72 bytes apart


def _check_tile(rows: int, step: int, num_warps: int, num_stages: int, block_size: int, compiled: bool) -> None:
    for side in (rows, step):
        assert side >= 16 and side & (side - 1) == 0 and block_size % side == 0, (rows, step, block_size)
    if compiled:  # the interpreter runs each program as Python: it drops num_warps and num_stages
        CUDAOptions(num_warps=num_warps, num_stages=num_stages)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_default_tiles_divide_the_block_and_compile_for_cuda(monkeypatch, interpret):
    """Every default tile (forward and backward, each dtype, block size and padded head dim) divides the
    block into power-of-two sides of at least 16 (tl.arange and tl.dot); off the interpreter its warps and
    stages are ones Triton's CUDA compiler accepts. The environment variable is read at call time."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    compiled = interpret == "0"
    for dtype in triton_backend.SUPPORTED_DTYPES:
        for block_size in (16, 32, 64, 128, 256):
            for block_d in (16, 32, 64, 128, 256):
                tile = triton_backend.default_tile(block_size, block_d, dtype)
                _check_tile(tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, block_size, compiled)
                backward = triton_backward.default_backward_tile(block_size, block_d, dtype)
                for kernel in (backward.dq, backward.kv):
                    _check_tile(kernel.rows, kernel.step, kernel.num_warps, kernel.num_stages, block_size, compiled)


# ------------------------------------------------------------------------------------------
# The table caches
# ------------------------------------------------------------------------------------------


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_the_table_caches_keep_the_most_recent_tables_within_their_byte_bound(monkeypatch, which):
    """Three plans with equal tables (they differ in scale only): a bound of two plans' bytes keeps the two
    most recently used, one byte less keeps only the newest (never none)."""
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    geometry = AttentionGeometry(DilationConfig((64, 128), (1, 2), "all"), 128, 4)
    plans = [CallPlan.whole(geometry, config, False, scale) for scale in (0.25, 0.5, 1.0)]
    if which == "forward":
        module, cache, bound = triton_backend, "_table_cache", "TABLE_CACHE_BYTES"
        build = lambda plan: triton_backend.device_tables(plan, "cpu")  # noqa: E731
        size = lambda launches: _nbytes(t for launch in launches for t in (launch.items, launch.key_block))  # noqa: E731
    else:
        module, cache, bound = triton_backward, "_column_cache", "COLUMN_CACHE_BYTES"
        build = lambda plan: triton_backward.column_launches(plan, "cpu", 2)  # noqa: E731
        size = lambda launches: _nbytes(t for launch in launches for t in (launch.items, launch.query_block))  # noqa: E731
    one = size(build(plans[0]))
    assert one > 0 and all(size(build(plan)) == one for plan in plans)
    monkeypatch.setattr(module, bound, 2 * one)
    monkeypatch.setattr(module, cache, OrderedDict())
    first = build(plans[0])
    build(plans[1])
    assert build(plans[0]) is first  # a hit, now the most recently used
    build(plans[2])
    assert [plans.index(key[0]) for key in getattr(module, cache)] == [0, 2]
    monkeypatch.setattr(module, bound, 2 * one - 1)
    build(plans[1])
    assert [plans.index(key[0]) for key in getattr(module, cache)] == [1]


def test_gradients_do_not_depend_on_the_layout_of_grad_out():
    """The backward reads grad_out with a unit-stride head dim: one that is strided along it (a transposed
    buffer) gives the same gradients, bit for bit, as its contiguous copy (the backward has a fixed order)."""
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32, 2)
    plan = CallPlan.whole(geometry, config, True, 0.25)
    q, k, v, _ = make_inputs(41, 1, 32, 2, 2, 16, torch.float32)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out, _ = triton_backward.differentiable_forward(q, k, v, None, plan)
    grad_out = head_dim_strided(torch.randn(out.shape, generator=torch.Generator().manual_seed(43)).to(DEVICE))
    assert grad_out.stride(-1) != 1 and grad_out.stride(-2) == 1
    strided = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    contiguous = torch.autograd.grad(out, (q, k, v), grad_out.contiguous())
    for name, a, b in zip("qkv", strided, contiguous):
        assert torch.equal(a, b), f"d{name}"


@pytest.mark.parametrize("module", [triton_backend, triton_backward], ids=lambda m: m.__name__)
def test_every_function_that_uses_triton_language_is_jit_compiled(module):
    """A helper that calls ``tl.`` runs only as a Triton JIT function on a GPU.

    The interpreter also runs it as plain Python, so a lost ``@triton.jit`` passes every CPU test
    of the kernels and fails only at the first compile on CUDA; this reads the source instead.
    """
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    uses_tl = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(isinstance(n, ast.Name) and n.id == "tl" for n in ast.walk(node))
    ]
    assert uses_tl, "the module has kernels"
    # triton.jit wraps the function (a JITFunction, or the interpreter's wrapper); a plain function is not.
    plain = [name for name in uses_tl if inspect.isfunction(getattr(module, name))]
    assert not plain, f"functions using triton.language without @triton.jit: {plain}"


def test_gradients_of_a_head_dim_that_is_not_a_power_of_two():
    """D = 24 runs in 32-wide tiles: the columns past the head dim are neither read nor written by the backward."""
    from equivalence_tests.helpers import check_gradients
    from equivalence_tests.strategies import AttentionCase, Shape

    case = AttentionCase(
        shape=Shape(batch=1, seq_len=48, num_heads=2, num_kv_heads=1, head_dim=24),
        dilation=DilationConfig((16, 48), (1, 2), "split"),
        sparse_config=SparsePatternConfig(pattern_type="dense", block_size=16),
        is_causal=False,
        key_padding_mask=None,
        input_seed=3,
    )
    check_gradients(case, "triton", torch.float32, DEVICE)


@pytest.mark.parametrize("head_mode, several", [("split", False), ("all", True)])
def test_gradient_buffers_are_float32_exactly_when_several_launches_add_into_them(monkeypatch, head_mode, several):
    """dq (and dk, dv) sum several launches in float32; one launch writes the input dtype directly."""
    seen = {}

    class Spy:
        def __init__(self, kernel, name, positions):
            self.kernel, self.name, self.positions = kernel, name, positions

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.setdefault(self.name, set()).update(args[p].dtype for p in self.positions)
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_backward, "_dq_kernel", Spy(triton_backward._dq_kernel, "dq", (7,)))
    monkeypatch.setattr(triton_backward, "_dkdv_kernel", Spy(triton_backward._dkdv_kernel, "dkdv", (7, 8)))
    geometry = AttentionGeometry(DilationConfig((16, 32), (1, 2), head_mode), 32, 2)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    plan = CallPlan(geometry, config, False, 0.25, (0, 32), (0, 32))
    generators = (torch.Generator().manual_seed(i) for i in range(3))
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g).half().to(DEVICE) for g in generators)
    out, lse = triton_backend.partial_forward(q, k, v, None, plan)
    triton_backward.partial_backward(q, k, v, None, plan, out, lse, torch.randn_like(out), None)
    expected = {torch.float32} if several else {torch.float16}
    assert seen == {"dq": expected, "dkdv": expected}


def test_float32_takes_the_small_backward_tiles_and_half_precision_the_tuned_ones(monkeypatch):
    """On a GPU, float32 operands take twice the shared memory: their tiles stay at 32 x 32 points."""
    monkeypatch.setattr(triton_backward, "_interpreting", lambda: False)
    area = lambda tile: tile.rows * tile.step  # noqa: E731
    for block_d in (16, 64, 128):
        small = triton_backward.default_backward_tile(128, block_d, torch.float32)
        half = triton_backward.default_backward_tile(128, block_d, torch.float16)
        assert area(small.dq) <= 32 * 32 and area(small.kv) <= 32 * 32, small
        assert area(half.dq) > area(small.dq) and area(half.kv) > area(small.kv), half
