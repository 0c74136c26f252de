"""The dense reference against an independent brute force, SDPA and itself split into chunks
(issue 2, section 3; docs/semantics.md sections 2-5 and docs/numerics.md)."""

from __future__ import annotations

import brute_force
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from equivalence_tests import strategies as s
from reference import (
    AttentionGeometry,
    BlockSparseRingDilatedAttention,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    merge_partials,
    partial_attention,
)

# Non-custom patterns: with one block per lattice each of them keeps the (only) diagonal block.
SELF_CONTAINED_PATTERNS = ("dense", "local_window", "dilated_sparse", "global_local", "random")


def assert_same(name, actual, expected, context, empty_rows=None):
    """Two float64 computations of the same quantity must agree to float32's rounding budget,
    which is far below the size of any semantic error (a wrong key moves a value by O(1)).

    ``empty_rows``: bool (B, H, N), rows that must be exactly out = 0 / lse = -inf / weights = 0.
    """
    empty = None
    empty_value = 0.0
    if empty_rows is not None:
        if name == "lse":
            empty, empty_value = empty_rows, float("-inf")
        elif name == "out":
            empty = empty_rows.transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1)
        else:  # weights (B, H, N, N)
            empty = empty_rows.unsqueeze(-1)
    verdict = compare(name, actual, expected, expected, torch.float32, empty=empty, empty_value=empty_value)
    assert_within_budget(verdict, context)


def reference_module(case, compute_dtype=torch.float64):
    return BlockSparseRingDilatedAttention(**s.module_kwargs(case), compute_dtype=compute_dtype)


def geometry_of(case):
    return AttentionGeometry(case.dilation, case.shape.seq_len, case.shape.num_heads)


def run_reference(case, q, k, v, mask, scale=None):
    """(out, lse, weights) of the reference module in float64."""
    out, weights, lse = reference_module(case)(
        q,
        k,
        v,
        is_causal=case.is_causal,
        key_padding_mask=mask,
        return_attention_weights=True,
        return_lse=True,
        scale=scale,
    )
    return out, lse, weights


def expand_kv(t, num_heads):
    """(B, N, H_kv, D) -> (B, H, N, D): query head h reads kv head h // (H // H_kv)."""
    return t.repeat_interleave(num_heads // t.shape[2], dim=2).transpose(1, 2)


def sdpa(q, k, v, attend=None, is_causal=False):
    """torch's scaled_dot_product_attention in float64 on (B, N, H, D) tensors; ``attend`` is a
    bool (B, H, N, N) mask, True = attend. Rows with nothing to attend are set to 0."""
    num_heads = q.shape[2]
    out = F.scaled_dot_product_attention(
        q.to(torch.float64).transpose(1, 2),
        expand_kv(k.to(torch.float64), num_heads),
        expand_kv(v.to(torch.float64), num_heads),
        attn_mask=attend,
        is_causal=is_causal,
    ).transpose(1, 2)
    if attend is not None:
        out = out.masked_fill(~attend.any(-1).transpose(1, 2).unsqueeze(-1), 0.0)
    return out


# --------------------------------------------------------------------------------------------
# (a) against the brute force of tests/brute_force.py
# --------------------------------------------------------------------------------------------

TINY = dict(max_batch=2, max_seq_len=12, max_heads=4, max_head_dim=4, max_block_size=4)


@given(case=s.attention_cases(**TINY), scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
def test_reference_matches_the_brute_force(case, scale):
    q, k, v, mask = s.make_inputs(case, torch.float64)
    out, lse, weights = run_reference(case, q, k, v, mask, scale)
    expected_out, expected_lse, expected_weights = brute_force.attention(
        q, k, v, case.dilation, case.sparse_config, case.is_causal, mask, scale
    )
    empty = torch.isneginf(expected_lse)
    context = case.describe()
    assert_same("lse", lse, expected_lse, context, empty)
    assert_same("out", out, expected_out, context, empty)
    assert_same("weights", weights, expected_weights, context, empty)
    assert out.dtype == lse.dtype == torch.float64


def test_a_key_allowed_in_two_branches_counts_twice():
    # "all" mode, two identical dense branches: every key is allowed twice, so the probabilities
    # are unchanged, lse grows by log 2, and each weight is the sum of its two equal terms.
    case_one = s.AttentionCase(
        s.Shape(1, 7, 2, 1, 3),
        DilationConfig((7,), (1,), "all"),
        SparsePatternConfig(pattern_type="dense"),
        False,
        None,
        5,
    )
    case_two = s.AttentionCase(
        case_one.shape,
        DilationConfig((7, 7), (1, 1), "all"),
        case_one.sparse_config,
        False,
        None,
        5,
    )
    q, k, v, _ = s.make_inputs(case_one, torch.float64)
    out_one, lse_one, weights_one = run_reference(case_one, q, k, v, None)
    out_two, lse_two, weights_two = run_reference(case_two, q, k, v, None)
    log2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert_same("lse", lse_two, lse_one + log2, "two identical branches")
    assert_same("out", out_two, out_one, "two identical branches")
    assert_same("weights", weights_two, weights_one, "two identical branches")
    brute_lse = brute_force.attention(q, k, v, case_two.dilation, case_two.sparse_config)[1]
    assert_same("lse", lse_two, brute_lse, "two identical branches, brute force")


# --------------------------------------------------------------------------------------------
# (b) against SDPA with a boolean mask, wherever no key counts twice
# --------------------------------------------------------------------------------------------


def _single_count_cases(is_causal):
    small = dict(max_seq_len=24, is_causal=is_causal)
    return st.one_of(
        s.attention_cases(head_mode="split", **small),
        s.attention_cases(head_mode="all", max_branches=1, **small),
    )


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@given(data=st.data())
def test_reference_matches_sdpa_with_a_boolean_mask(is_causal, data):
    case = data.draw(_single_count_cases(is_causal), label="case")
    q, k, v, mask = s.make_inputs(case, torch.float64)
    shape = case.shape
    padded_rows = [None] * shape.batch if mask is None else [row.tolist() for row in mask]
    counts = torch.tensor(
        [
            brute_force.multiplicity(
                shape.seq_len, shape.num_heads, case.dilation, case.sparse_config, is_causal, padded
            )
            for padded in padded_rows
        ]
    )
    assert int(counts.max()) <= 1, "premise: no key counts twice in split mode or with one branch"
    attend = counts > 0
    out, lse, _ = run_reference(case, q, k, v, mask)
    empty = ~attend.any(-1)
    assert_same("out", out, sdpa(q, k, v, attend), case.describe(), empty)
    assert bool(torch.isneginf(lse).eq(empty).all())


# --------------------------------------------------------------------------------------------
# (c) degenerate configurations are plain attention
# --------------------------------------------------------------------------------------------


@st.composite
def plain_attention_cases(draw, gqa, is_causal):
    """One lattice per head covering the whole sequence and one (or a dense) block layout:
    segments >= N, rate 1, each head in one branch (split mode, or "all" with G = 1)."""
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(2, 3)) if gqa else 1
    num_heads = kv_heads * group
    seq_len = draw(st.integers(1, 33))
    head_mode = draw(s.head_modes())
    num_branches = draw(st.integers(1, num_heads)) if head_mode == "split" else 1
    segments = draw(st.lists(st.integers(seq_len, 2 * seq_len + 3), min_size=num_branches, max_size=num_branches))
    dilation = DilationConfig(tuple(segments), (1,) * num_branches, head_mode)
    if draw(st.booleans()):
        config = draw(s.layouts(pattern_types=("dense",)))
    else:  # any pattern with a single block per lattice
        config = draw(s.layouts(pattern_types=SELF_CONTAINED_PATTERNS, block_sizes=(seq_len, seq_len + 1, 64)))
    shape = s.Shape(draw(st.integers(1, 2)), seq_len, num_heads, kv_heads, draw(st.integers(1, 8)))
    return s.AttentionCase(shape, dilation, config, is_causal, None, draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@given(data=st.data())
def test_degenerate_configurations_are_plain_attention(gqa, is_causal, data):
    case = data.draw(plain_attention_cases(gqa, is_causal), label="case")
    q, k, v, _ = s.make_inputs(case, torch.float64)
    out, lse, _ = run_reference(case, q, k, v, None)
    context = case.describe()
    assert_same("out", out, sdpa(q, k, v, is_causal=is_causal), context)
    scores = torch.einsum("bqhd,bhkd->bhqk", q, expand_kv(k, q.shape[2])) * q.shape[3] ** -0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    assert_same("lse", lse, torch.logsumexp(scores, dim=-1), context)


# --------------------------------------------------------------------------------------------
# (d) chunked partials merge to the unsplit result
# --------------------------------------------------------------------------------------------


def _empty_partial(q):
    """The partial of a chunk with no keys: out 0, lse -inf (the identity of merge_partials)."""
    batch, length, heads, dim = q.shape
    return (
        torch.zeros(batch, length, heads, dim, dtype=q.dtype),
        torch.full((batch, heads, length), float("-inf"), dtype=q.dtype),
    )


def _chunk_bounds(lengths):
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


@given(case=s.attention_cases(max_seq_len=32), data=st.data())
def test_chunked_partials_merge_to_the_unsplit_result(case, data):
    """Query chunks x key chunks, as a ring computes them; a chunk may hold no allowed key for
    a row (its partial is empty there), and merging it must change nothing."""
    n = case.shape.seq_len
    query_chunks = _chunk_bounds(data.draw(s.ring_splits(n), label="query chunk lengths"))
    key_chunks = _chunk_bounds(data.draw(s.ring_splits(n), label="key chunk lengths"))
    q, k, v, mask = s.make_inputs(case, torch.float64)
    geometry = geometry_of(case)
    common = dict(is_causal=case.is_causal)
    out, lse = partial_attention(q, k, v, geometry, case.sparse_config, key_padding_mask=mask, **common)
    outs, lses = [], []
    for q0, q1 in query_chunks:
        merged = _empty_partial(q[:, q0:q1])
        for k0, k1 in key_chunks:
            chunk_mask = None if mask is None else mask[:, k0:k1]
            partial = partial_attention(
                q[:, q0:q1],
                k[:, k0:k1],
                v[:, k0:k1],
                geometry,
                case.sparse_config,
                query_start=q0,
                key_start=k0,
                key_padding_mask=chunk_mask,
                **common,
            )
            merged = merge_partials(*merged, *partial)
        outs.append(merged[0])
        lses.append(merged[1])
    context = f"{case.describe()}, query chunks {query_chunks}, key chunks {key_chunks}"
    empty = torch.isneginf(lse)
    assert_same("lse", torch.cat(lses, dim=2), lse, context, empty)
    assert_same("out", torch.cat(outs, dim=1), out, context, empty)


def test_a_key_chunk_without_allowed_keys_gives_an_empty_partial_that_changes_nothing():
    case = s.AttentionCase(
        s.Shape(1, 10, 2, 2, 4),
        DilationConfig((10,), (1,), "split"),
        SparsePatternConfig(pattern_type="dense"),
        True,
        None,
        3,
    )
    q, k, v, _ = s.make_inputs(case, torch.float64)
    geometry = geometry_of(case)
    out, lse = partial_attention(q, k, v, geometry, case.sparse_config, is_causal=True)
    early = partial_attention(q, k[:, :5], v[:, :5], geometry, case.sparse_config, is_causal=True)
    late = partial_attention(q, k[:, 5:], v[:, 5:], geometry, case.sparse_config, key_start=5, is_causal=True)
    # Causal: queries 0..4 see none of keys 5..9.
    assert bool(torch.isneginf(late[1][:, :, :5]).all())
    assert bool((late[0][:, :5] == 0).all())
    merged_out, merged_lse = merge_partials(*early, *late)
    assert_same("lse", merged_lse, lse, "causal, keys split at 5")
    assert_same("out", merged_out, out, "causal, keys split at 5")
    # An empty partial leaves the other one bit for bit.
    assert torch.equal(merged_out[:, :5], early[0][:, :5])
    assert torch.equal(merged_lse[:, :, :5], early[1][:, :, :5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merging_two_empty_partials_is_empty(dtype):
    out = torch.zeros(2, 3, 4, 5, dtype=dtype)
    lse = torch.full((2, 4, 3), float("-inf"), dtype=dtype)
    merged_out, merged_lse = merge_partials(out, lse, out.clone(), lse.clone())
    assert bool((merged_out == 0).all()) and not bool(merged_out.isnan().any())
    assert bool(torch.isneginf(merged_lse).all())


# --------------------------------------------------------------------------------------------
# (e) empty rows: out exactly 0, lse exactly -inf, never NaN
# --------------------------------------------------------------------------------------------


def _assert_empty_rows(out, lse, weights, empty_rows):
    assert not bool(out.isnan().any()) and not bool(lse.isnan().any()) and not bool(weights.isnan().any())
    assert bool(torch.isneginf(lse).eq(empty_rows).all())
    assert bool((out.transpose(1, 2)[empty_rows] == 0).all())
    assert bool((weights[empty_rows] == 0).all())
    assert bool(torch.isfinite(lse[~empty_rows]).all())


@pytest.mark.parametrize("compute_dtype", [torch.float64, None], ids=["float64", "input-dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_padded_keys_give_empty_rows(compute_dtype, dtype):
    case = s.AttentionCase(
        s.Shape(2, 9, 4, 2, 4),
        DilationConfig((4, 9), (1, 2), "split"),
        SparsePatternConfig(pattern_type="local_window", block_size=2, local_window_size=4),
        False,
        torch.tensor([[True] * 9, [False] * 8 + [True]]),
        11,
    )
    q, k, v, mask = s.make_inputs(case, dtype)
    module = BlockSparseRingDilatedAttention(**s.module_kwargs(case), compute_dtype=compute_dtype)
    out, weights, lse = module(q, k, v, key_padding_mask=mask, return_attention_weights=True, return_lse=True)
    shape = case.shape
    counts = torch.tensor(
        [
            brute_force.multiplicity(
                shape.seq_len, shape.num_heads, case.dilation, case.sparse_config, False, padded.tolist()
            )
            for padded in mask
        ]
    )
    empty_rows = counts.sum(-1) == 0
    assert bool(empty_rows[0].all())  # every key of batch element 0 is padding
    # Batch element 1: query 8 of branch 0 (segment [8, 9)) sees only the padded key 8, and each
    # head of branch 1 (rate 2, two heads) leaves the other offset's positions on no lattice.
    assert int(empty_rows[1].sum()) == 2 + 4 + 5
    _assert_empty_rows(out, lse, weights, empty_rows)


@pytest.mark.parametrize("compute_dtype", [torch.float64, None], ids=["float64", "input-dtype"])
def test_positions_on_no_lattice_give_empty_rows(compute_dtype):
    # One head, rate 3: only positions with u % 3 == 0 are on the head's lattice (H_g < r).
    case = s.AttentionCase(
        s.Shape(1, 11, 1, 1, 4),
        DilationConfig((6,), (3,), "split"),
        SparsePatternConfig(pattern_type="dense"),
        False,
        None,
        2,
    )
    q, k, v, _ = s.make_inputs(case, torch.float32)
    module = BlockSparseRingDilatedAttention(**s.module_kwargs(case), compute_dtype=compute_dtype)
    out, weights, lse = module(q, k, v, return_attention_weights=True, return_lse=True)
    on_lattice = torch.tensor([(i % 6) % 3 == 0 for i in range(11)])
    _assert_empty_rows(out, lse, weights, ~on_lattice.view(1, 1, 11))


def test_custom_layout_with_an_empty_block_row_gives_empty_rows():
    layout = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    case = s.AttentionCase(
        s.Shape(1, 6, 1, 1, 2),
        DilationConfig((6,), (1,), "split"),
        SparsePatternConfig(pattern_type="custom", block_size=2, block_layout=layout),
        False,
        None,
        4,
    )
    q, k, v, _ = s.make_inputs(case, torch.float64)
    out, lse, weights = run_reference(case, q, k, v, None)
    empty = torch.tensor([False, False, True, True, False, False]).view(1, 1, 6)
    _assert_empty_rows(out, lse, weights, empty)


@given(case=s.attention_cases(max_seq_len=24))
def test_weights_rows_sum_to_one_or_zero(case):
    q, k, v, mask = s.make_inputs(case, torch.float64)
    _, lse, weights = run_reference(case, q, k, v, mask)
    sums = weights.sum(-1)
    expected = torch.where(torch.isneginf(lse), 0.0, 1.0).to(torch.float64)
    assert_same("row sums", sums, expected, case.describe())
    assert bool((weights >= 0).all())


# --------------------------------------------------------------------------------------------
# (f) compute_dtype=None: the input dtype, near the float64 result
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(case=s.attention_cases(max_seq_len=32))
def test_input_dtype_mode_runs_in_the_input_dtype_near_float64(dtype, case):
    q, k, v, mask = s.make_inputs(case, dtype)
    low = reference_module(case, compute_dtype=None)
    out, lse = low(q, k, v, is_causal=case.is_causal, key_padding_mask=mask, return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    out64, lse64 = reference_module(case)(q, k, v, is_causal=case.is_causal, key_padding_mask=mask, return_lse=True)
    # Baseline for docs/numerics.md's budget: the same computation in the input dtype by another
    # route, keys split in two halves and merged, as a ring would.
    geometry, n = geometry_of(case), case.shape.seq_len
    halves = []
    for k0, k1 in ((0, n // 2), (n // 2, n)):
        halves.append(
            partial_attention(
                q,
                k[:, k0:k1],
                v[:, k0:k1],
                geometry,
                case.sparse_config,
                key_start=k0,
                is_causal=case.is_causal,
                key_padding_mask=None if mask is None else mask[:, k0:k1],
                compute_dtype=None,
            )
        )
    other_out, other_lse = merge_partials(*halves[0], *halves[1])
    empty = torch.isneginf(lse64)
    context = f"{case.describe()}, dtype {dtype}"
    assert_within_budget(
        compare("out", out, out64, other_out, dtype, empty=empty.transpose(1, 2).unsqueeze(-1)), context
    )
    assert_within_budget(compare("lse", lse, lse64, other_lse, dtype, empty=empty, empty_value=float("-inf")), context)


# --------------------------------------------------------------------------------------------
# (g) the weights' budget: what they inherit from lse, and no more
# --------------------------------------------------------------------------------------------


@given(case=s.attention_cases(max_seq_len=24), data=st.data())
def test_weights_budget_covers_an_lse_within_budget_and_catches_a_wrong_normalisation(case, data):
    """Weights exp(s - lse') from an lse' off by its whole budget pass; weights off by 0.1% fail."""
    from reference import weights_inherited_budget

    q, k, v, mask = s.make_inputs(case, torch.float32)
    call = dict(is_causal=case.is_causal, key_padding_mask=mask, return_attention_weights=True, return_lse=True)
    _, probs64, lse64 = reference_module(case)(q, k, v, **call)
    _, probs32, lse32 = reference_module(case, compute_dtype=None)(q, k, v, **call)
    empty = torch.isneginf(lse64)
    lse_verdict = compare("lse", lse32, lse64, lse32, torch.float32, empty=empty, empty_value=float("-inf"))
    assert lse_verdict.passed, lse_verdict.describe()
    if not bool((probs64 > 0).any()):
        return
    inherited = weights_inherited_budget(lse_verdict, probs64)
    # A path whose lse sits a whole budget off (either side) computes p * exp(-shift).
    shift = data.draw(st.sampled_from([-1.0, 1.0]), label="sign") * lse_verdict.budget
    shifted = (probs64 * torch.exp(torch.tensor(-shift, dtype=torch.float64))).to(torch.float32)
    verdict = compare(
        "weights", shifted, probs64, probs32, torch.float32, empty=empty.unsqueeze(-1), inherited=inherited
    )
    assert_within_budget(verdict, case.describe())
    # The old V2's kind of bug (a normalisation off by a factor) stays far outside the budget.
    wrong = (probs64 * 1.001).to(torch.float32)
    verdict = compare("weights", wrong, probs64, probs32, torch.float32, empty=empty.unsqueeze(-1), inherited=inherited)
    assert not verdict.passed, f"a 0.1% wrong normalisation passed: {verdict.describe()}; {case.describe()}"
