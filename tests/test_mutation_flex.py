"""optimized/flex_backend.py's rules for CUDA calls and its size limit, checked on the CPU.

The CUDA path (compiled flex) runs only on a GPU, but its rules are plain functions of a call's
facts: which block sizes compiled flex takes (a multiple of 16) and which dtype it refuses, the
compute dtype it picks, the kernel tiles it asks for, the head-dim padding, and the eager path's
score limit at its boundary. ``make mutation`` (experiments/mutation.py) found them unchecked on
the CPU; tests/test_flex_backend.py checks the computations themselves.
"""

from __future__ import annotations

import pytest
import torch

from optimized import flex_backend
from optimized.plan import CallPlan
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig

pytest.importorskip("torch.nn.attention.flex_attention", reason="backend 'flex' needs torch >= 2.5")


class ClaimsCuda:
    """The facts _check_inputs and _compute_dtype read from q, k and v, for a CUDA tensor."""

    is_cuda = True
    device = torch.device("cuda")  # a device object needs no GPU

    def __init__(self, dtype=torch.float32, requires_grad=False):
        self.dtype = dtype
        self.requires_grad = requires_grad


def plan_with_block_size(block_size):
    geometry = AttentionGeometry(DilationConfig((4 * block_size,), (1,), "split"), 4 * block_size, 1)
    return CallPlan.whole(geometry, SparsePatternConfig(block_size=block_size), False, 0.5)


@pytest.mark.parametrize("block_size", [16, 32, 48, 64, 128])
def test_cuda_accepts_block_sizes_that_are_multiples_of_16(block_size):
    q = ClaimsCuda()
    flex_backend._check_inputs(q, q, q, plan_with_block_size(block_size))  # no error


@pytest.mark.parametrize("block_size", [1, 8, 15, 17, 24, 34])
def test_cuda_refuses_other_block_sizes(block_size):
    q = ClaimsCuda()
    with pytest.raises(ValueError, match=rf"multiple of 16 .*got block_size={block_size}$"):
        flex_backend._check_inputs(q, q, q, plan_with_block_size(block_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_accepts_every_dtype_but_float64(dtype):
    q = ClaimsCuda(dtype, requires_grad=True)  # gradients are fine on CUDA
    flex_backend._check_inputs(q, q, q, plan_with_block_size(16))


@pytest.mark.parametrize(
    "dtype, requires_grad, block_size, expected",
    [
        (torch.float16, True, 64, torch.float32),  # half-precision backward without a kernel config
        (torch.bfloat16, True, 16, torch.float32),
        (torch.bfloat16, True, 128, torch.bfloat16),  # a multiple of 128 has one
        (torch.float16, True, 256, torch.float16),
        (torch.float16, False, 64, torch.float16),  # forward only: q.dtype
        (torch.float32, True, 64, torch.float32),
    ],
)
def test_cuda_compute_dtype(dtype, requires_grad, block_size, expected):
    q, plain = ClaimsCuda(dtype, requires_grad), ClaimsCuda(dtype)
    assert flex_backend._compute_dtype(q, plain, plain, block_size) == expected
    assert flex_backend._compute_dtype(plain, plain, q, block_size) == expected  # any input requiring grad
    with torch.no_grad():  # no gradient is recorded: q.dtype
        assert flex_backend._compute_dtype(q, plain, plain, block_size) == dtype


@pytest.mark.parametrize(
    "block_size, tile", [(16, 16), (48, 16), (32, 32), (96, 32), (64, 64), (128, 64), (192, 64), (256, 64)]
)
def test_kernel_tiles_are_the_largest_of_16_32_64_dividing_the_block(block_size, tile):
    assert flex_backend._kernel_options(block_size) == {"BLOCK_M": tile, "BLOCK_N": tile}


@pytest.mark.parametrize("head_dim", [1, 15, 16, 24])
def test_pad_head_dim_pads_below_the_minimum_only(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 5, head_dim, generator=generator) for _ in range(3))
    padded = flex_backend.pad_head_dim(q, k, v, flex_backend.MIN_COMPILED_HEAD_DIM)
    assert len(padded) == 3
    for given, out in zip((q, k, v), padded):
        if head_dim >= 16:
            assert out is given
        else:
            assert out.shape == (2, 3, 5, 16)
            assert torch.equal(out[..., :head_dim], given) and not out[..., head_dim:].any()


@pytest.mark.parametrize("over", [False, True])
def test_eager_score_limit_at_its_boundary(monkeypatch, over):
    """The eager path refuses a table whose B * S * nh * lq * lk scores exceed the limit, not one that meets it."""
    geometry = AttentionGeometry(DilationConfig((16,), (1,), "split"), 16, 1)
    plan = CallPlan.whole(geometry, SparsePatternConfig(pattern_type="dense", block_size=4), False, 0.5)
    scores = 2 * 1 * 1 * 16 * 16  # batch 2, one lattice, one head, 16 query and 16 key slots
    monkeypatch.setattr(flex_backend, "EAGER_SCORE_LIMIT", scores - 1 if over else scores)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, 1, 4, generator=generator) for _ in range(3))
    if over:
        with pytest.raises(ValueError, match=rf"would build {scores} scores .*use backend='torch'"):
            flex_backend.partial_forward(q, k, v, None, plan)
    else:
        out, lse = flex_backend.partial_forward(q, k, v, None, plan)
        assert out.shape == q.shape and bool(torch.isfinite(lse).all())


CALL_FLEX = flex_backend._call_flex  # before a test replaces it


def eager_flex(flex, query, key, value, block_mask, scale):
    return CALL_FLEX(flex, flex.flex_attention, query, key, value, block_mask, scale, None)


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose ``is_cuda`` is True: _run_flex takes its CUDA branch, the work stays on the CPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("head_dim, block_size", [(4, 16), (16, 32), (24, 64)])
def test_cuda_branch_pads_the_head_dim_raises_the_recompile_limit_and_slices_back(monkeypatch, head_dim, block_size):
    """_run_flex on CUDA: compiled flex (here eager flex in its place) gets q, k, v padded to >= 16 columns, the
    kernel tiles of the block, dynamo's recompile limit at least RECOMPILE_LIMIT with failing on the limit; the
    caller gets out's first D columns and the lse, as eager flex computes them unpadded."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import create_block_mask

    flex = flex_backend._flex_module()
    seen = {}

    def call_flex(module, function, query, key, value, block_mask, scale, options):
        seen.update(
            function=function,
            head_dims={t.shape[-1] for t in (query, key, value)},
            options=options,
            recompile_limit=dynamo_config.recompile_limit,
            fail=dynamo_config.fail_on_recompile_limit_hit,
        )
        plain = (t.as_subclass(torch.Tensor) for t in (query, key, value))
        return eager_flex(flex, *plain, block_mask, scale)

    compiled = object()
    monkeypatch.setattr(flex_backend, "_call_flex", call_flex)
    monkeypatch.setattr(flex_backend, "_compiled_flex_attention", lambda: compiled)
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, 2 * block_size, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = create_block_mask(
        lambda b, h, i, j: j <= i, None, None, 2 * block_size, 2 * block_size, "cpu", BLOCK_SIZE=block_size
    )
    with dynamo_config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        out, lse = flex_backend._run_flex(q.as_subclass(ReportsCuda), k, v, mask, 0.5)
        assert dynamo_config.recompile_limit == 8 and not dynamo_config.fail_on_recompile_limit_hit  # restored
    assert seen == dict(
        function=compiled,
        head_dims={max(head_dim, 16)},
        options=flex_backend._kernel_options(block_size),
        recompile_limit=max(flex_backend.RECOMPILE_LIMIT, 8),
        fail=True,
    )
    expected_out, expected_lse = eager_flex(flex, q, k, v, mask, 0.5)
    assert out.shape == q.shape
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.as_subclass(torch.Tensor), expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_a_tables_bytes_count_every_tensor_it_holds(causal):
    """The layout cache's byte bound counts each entry's index tensors, the mask_mod's tensors (the layout
    included, off CUDA) and the BlockMask's lists."""
    geometry = AttentionGeometry(DilationConfig((8, 16), (1, 2), "all"), 24, 2)
    config = SparsePatternConfig(pattern_type="global_local", block_size=2, local_window_size=4, global_tokens=2)
    plan = CallPlan.whole(geometry, config, causal, 0.5)
    cache = flex_backend.LayoutCache(flex_backend.LAYOUT_CACHE_BYTES)
    for _, table in cache.get(plan, torch.device("cpu"), 2, 1, False):
        held = [
            *(table.q_index, table.k_index, table.query_heads, table.kv_heads, table.local_heads),
            *(table.keep_lattice, table.keep_slot, table.keep_index),
            *table.mask_parts,
        ]
        assert all(t is not None for t in held)  # off CUDA the layout travels with the mask_mod
        mask = table.block_mask
        lists = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
        lists += [mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices]
        held += [t for t in lists if t is not None]
        assert [id(t) for t in table.tensors()] == [id(t) for t in held]
        assert table.nbytes() == sum(t.numel() * t.element_size() for t in held)


def _listed(num_blocks, indices, shape):
    """(S, rows, span) bool: the blocks a BlockMask's (num_blocks, indices) lists (None: none)."""
    listed = torch.zeros(shape, dtype=torch.bool)
    if num_blocks is None:
        return listed
    num_blocks, indices = num_blocks[:, 0].long(), indices[:, 0].long()
    lattice, row, position = (torch.arange(indices.shape[-1]) < num_blocks.unsqueeze(-1)).nonzero(as_tuple=True)
    listed[lattice, row, indices[lattice, row, position]] = True
    return listed


@pytest.mark.parametrize("query_range", [(0, 12), (3, 11)])
def test_blocks_of_one_point_on_the_causal_diagonal_are_full(query_range):
    """With blocks of one point the diagonal block (t_k == t_q) is allowed entirely: a full block, as every
    other allowed point; compiled flex then runs no mask_mod on any listed block."""
    geometry = AttentionGeometry(DilationConfig((6, 12), (1, 2), "all"), 12, 2)
    config = SparsePatternConfig(pattern_type="local_window", block_size=1, local_window_size=4)
    plan = CallPlan(geometry, config, True, 0.5, query_range, (0, 12))
    cache = flex_backend.LayoutCache(flex_backend.LAYOUT_CACHE_BYTES)
    diagonal_blocks = 0
    for _, table in cache.get(plan, torch.device("cpu"), 2, 2, False):
        shape = (table.num_lattices, table.query_len, table.key_len)  # b = 1: a block is a slot
        lattice = torch.arange(shape[0]).view(-1, 1, 1)
        q_idx, kv_idx = torch.arange(shape[1]).view(1, -1, 1), torch.arange(shape[2]).view(1, 1, -1)
        exact = table.mask_mod()(lattice, torch.zeros_like(lattice), q_idx, kv_idx).expand(shape)
        mask = table.block_mask
        assert torch.equal(_listed(mask.full_kv_num_blocks, mask.full_kv_indices, shape), exact)
        assert not _listed(mask.kv_num_blocks, mask.kv_indices, shape).any()
        diagonal = table.mask_parts[2].view(-1, 1, 1)  # t_k == t_q at kv_idx - q_idx == diagonal
        diagonal_blocks += int((exact & (kv_idx - q_idx == diagonal)).sum())
    assert diagonal_blocks > 0


def test_padded_calls_use_tables_without_full_blocks_and_unpadded_calls_tables_with_them(monkeypatch):
    """The key padding may mask any key, so a padded call's BlockMask lists no full block (on CUDA flex would
    skip the mask_mod there); an unpadded call's lists the entirely allowed blocks as full."""
    cache = flex_backend.LayoutCache(flex_backend.LAYOUT_CACHE_BYTES)
    monkeypatch.setattr(flex_backend, "layout_cache", cache)
    geometry = AttentionGeometry(DilationConfig((8, 16), (1, 2), "all"), 16, 2)
    plan = CallPlan.whole(geometry, SparsePatternConfig(pattern_type="dense", block_size=2), False, 0.5)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16, 2, 4, generator=generator) for _ in range(3))
    mask = torch.rand(2, 16, generator=generator) < 0.3
    for key_padding_mask, padded in ((mask, True), (None, False)):
        cache.clear()
        flex_backend.partial_forward(q, k, v, key_padding_mask, plan)
        ((key, entry),) = cache._entries.items()
        assert key[-1] is padded
        has_full = [table.block_mask.full_kv_num_blocks is not None for _, table in entry]
        assert not any(has_full) if padded else all(has_full)
