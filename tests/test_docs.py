"""docs/semantics.md and docs/numerics.md say what the code computes.

- every picture in docs/semantics.md is what reference/pictures.py draws from reference.semantics now;
- every worked example's numbers are recomputed here from reference.semantics (and
  reference.verification), and the docs are checked to state those same numbers;
- every relative link in docs/*.md resolves; ``python -m reference.pictures --check`` fails on a
  stale picture and ``--write`` repairs it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from reference import (
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    active_block_count,
    active_pair_count,
    compare,
    dense_multiplicity,
    pictures,
)
from reference import (
    BlockSparseRingDilatedAttention as Reference,
)
from reference.ring_schedule import ring_schedule
from reference.semantics import branch_heads

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SEMANTICS = DOCS / "semantics.md"
DENSE = SparsePatternConfig(pattern_type="dense")


def states(doc: str, *phrases: str) -> None:
    """The doc states each phrase (whitespace, including line breaks, compared as single spaces)."""
    text = " ".join((DOCS / doc).read_text(encoding="utf-8").split())
    for phrase in phrases:
        assert phrase in text, f"docs/{doc} no longer states {phrase!r}"


def geometry(segments, rates, seq_len, heads, head_mode="split") -> AttentionGeometry:
    return AttentionGeometry(DilationConfig(tuple(segments), tuple(rates), head_mode), seq_len, heads)


def keys_of(counts: torch.Tensor, head: int, query: int) -> list[int]:
    """Keys with a nonzero multiplicity in one row of dense_multiplicity's (B, H, N, N) result."""
    return counts[0, head, query].nonzero().flatten().tolist()


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def test_pictures_in_semantics_md_are_current():
    text = SEMANTICS.read_text(encoding="utf-8")
    markers = pictures.find_markers(text, str(SEMANTICS))
    assert len(markers) >= 10, f"expected the doc's pictures, found {len(markers)} markers"
    stale = pictures.stale_pictures(text, str(SEMANTICS))
    assert not stale, "stale pictures (run: python -m reference.pictures --write docs/semantics.md): " + ", ".join(
        f"line {marker.line}" for marker, _ in stale
    )


@pytest.mark.parametrize("head_mode", ["split", "all"])
@pytest.mark.parametrize(
    "segments, rates, seq_len, heads",
    [([6], [2], 12, 4), ([4, 12], [1, 2], 12, 4), ([8], [4], 8, 5), ([5, 3], [2, 3], 11, 3)],
)
def test_lattice_picture_cells_agree_with_compacted_index(segments, rates, seq_len, heads, head_mode):
    """Each cell of lattice_picture holds t from BranchGeometry.compacted_index, '.' off the lattice."""
    drawn = pictures.lattice_picture(segments, rates, seq_len, heads, head_mode)
    rows = {}
    branch = None
    for line in drawn.split("\n"):
        if line.startswith("branch "):
            branch = int(line.split(":")[0].split()[1])
        elif line.startswith("head "):
            label, cells = line[: line.index("=") + 2], line[line.index("=") + 2 :]
            rows[(branch, int(label.split()[1]))] = cells.replace("|", " ").split()
    geo_all = geometry(segments, rates, seq_len, heads, head_mode)
    expected_rows = 0
    positions = torch.arange(seq_len)
    for geo in geo_all.branches:
        for head in geo.heads:
            on, t = geo.compacted_index(positions, head)
            expected = [str(int(t[p])) if bool(on[p]) else "." for p in range(seq_len)]
            assert rows[(geo.branch, head)] == expected, f"branch {geo.branch}, head {head}"
            expected_rows += 1
    assert len(rows) == expected_rows


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 1
# --------------------------------------------------------------------------------------------


def test_section1_grouped_query_heads():
    """H = 8, H_kv = 2: heads 0-3 read key/value head 0, heads 4-7 key/value head 1."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 8, 3, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, 4, 2, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    attn = Reference([4], [1])
    grouped = attn(q, k, v)
    kv_of_head = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.equal(grouped, attn(q, k[:, :, kv_of_head], v[:, :, kv_of_head]))
    # A different assignment changes the result: the check above can fail.
    assert not torch.allclose(grouped, attn(q, k[:, :, kv_of_head.flip(0)], v[:, :, kv_of_head.flip(0)]))
    states(
        "semantics.md", "With `H = 8`, `H_kv = 2`, heads 0-3 read key/value head 0 and heads 4-7 read key/value head 1"
    )


def test_section1_layout_option_is_documented():
    states(
        "semantics.md",
        '| `"bnhd"` (default) | `(B, N, H, D)` | `(B, N, H_kv, D)` |',
        '| `"bhnd"` | `(B, H, N, D)` | `(B, H_kv, N, D)` |',
        "`lse` is `(B, H, N)`, `key_padding_mask` is `(B, N)`",
    )


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 2
# --------------------------------------------------------------------------------------------


def test_section2_segment_longer_than_n_and_head_runs():
    (geo,) = geometry([64], [1], 12, 1).branches
    assert geo.num_segments == 1 and geo.segment_bounds(0) == (0, 12)
    assert [list(branch_heads(5, 2, "split", g)) for g in range(2)] == [[0, 1, 2], [3, 4]]
    states(
        "semantics.md",
        "`segment_lengths=[64]` on `N = 12` gives one segment `[0, 12)`",
        "`H = 5`, `G = 2` gives heads 0-2 and heads 3-4",
    )


def test_section2_example_one_branch():
    geo_all = geometry([6], [2], 12, 4)
    (geo,) = geo_all.branches
    assert [geo.offset_of(h) for h in range(4)] == [0, 0, 1, 1]
    assert geo.lattice_positions(0, 0).tolist() == [0, 2, 4]
    assert geo.lattice_positions(1, 0).tolist() == [6, 8, 10]
    on, t = geo.compacted_index(torch.tensor([9]), head=2)
    assert bool(on) and int(t) == 1
    assert not bool(geo.compacted_index(torch.tensor([9]), head=0)[0])
    counts = dense_multiplicity(geo_all, DENSE)
    causal = dense_multiplicity(geo_all, DENSE, is_causal=True)
    assert keys_of(counts, 0, 8) == [6, 8, 10]
    assert keys_of(causal, 0, 8) == [6, 8]
    assert keys_of(counts, 2, 8) == []
    states(
        "semantics.md",
        "so heads 0 and 1 have offset 0 and heads 2 and 3 have offset 1",
        "Head 0's lattices are positions 0, 2, 4 (segment `[0, 6)`) and 6, 8, 10 (segment `[6, 12)`)",
        "Position 9 is in segment 1 with `u = 3`; `3 mod 2 = 1`, so it is on the lattice of heads 2 and 3 "
        "with `t = (3 - 1) / 2 = 1`",
        "query 8 of head 0 attends keys 6, 8 and 10; with `is_causal`, keys 6 and 8",
        "Query 8 of head 2 attends nothing",
    )


def test_section2_split_against_all():
    split, every = geometry([4, 12], [1, 2], 12, 4, "split"), geometry([4, 12], [1, 2], 12, 4, "all")
    assert [geo.heads for geo in split.branches] == [range(0, 2), range(2, 4)]
    assert [split.branches[1].offset_of(h) for h in (2, 3)] == [0, 1]
    assert [geo.heads for geo in every.branches] == [range(0, 4), range(0, 4)]
    assert [every.branches[1].offset_of(h) for h in range(4)] == [0, 0, 1, 1]
    states(
        "semantics.md",
        "branch 0 has heads 0-1 and branch 1 has heads 2-3; in branch 1, `H_g = 2` gives runs of 1, so "
        "head 2 has offset 0 and head 3 offset 1",
        "in branch 1, `H_g = 4` gives runs of 2, so heads 0-1 have offset 0 and heads 2-3 offset 1",
    )


def test_section2_offset_with_no_head():
    (geo,) = geometry([8], [4], 8, 5).branches
    assert [geo.offset_of(h) for h in range(5)] == [0, 0, 1, 1, 2]
    covered = {p for o in geo.offsets for p in geo.lattice_positions(0, o).tolist()}
    assert sorted(set(range(8)) - covered) == [3, 7]
    states(
        "semantics.md",
        "the runs have 2 heads, the offsets are 0, 0, 1, 1, 2",
        "(positions 3 and 7 below)",
        "No head has offset 3, so positions 3 and 7 are on no lattice",
    )


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 3
# --------------------------------------------------------------------------------------------


def test_section3_layout_parameters():
    assert SparsePatternConfig(pattern_type="local_window", block_size=2, local_window_size=8).local_radius_blocks == 2
    glocal = SparsePatternConfig(pattern_type="global_local", block_size=2, local_window_size=4, global_tokens=2)
    assert glocal.local_radius_blocks == 1 and glocal.global_blocks == 1
    assert SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.25, block_size=2).dilated_stride == 4
    states(
        "semantics.md",
        "(radius `8 // 4 = 2` blocks)",
        "`local_window_size=4` (radius 1), `global_tokens=2` (`ng = 1`)",
        "`sparsity_ratio=0.25` (`s = 4`)",
    )


LOCAL = SparsePatternConfig(pattern_type="local_window", block_size=2, local_window_size=4)


def test_section3_blocks_back_to_positions():
    geo_all = geometry([16], [2], 20, 2)
    (geo,) = geo_all.branches
    assert LOCAL.local_radius_blocks == 1
    assert [geo.offset_of(h) for h in range(2)] == [0, 1]
    assert geo.lattice_positions(0, 0).tolist() == list(range(0, 16, 2))
    assert geo.lattice_positions(1, 0).tolist() == [16, 18]
    assert (geo.lattice_length(0, 0), geo.lattice_length(1, 0)) == (8, 2)
    assert geo.lattice_positions(0, 1).tolist() == list(range(1, 16, 2))
    assert geo.lattice_positions(1, 1).tolist() == [17, 19]
    counts = dense_multiplicity(geo_all, LOCAL)
    causal = dense_multiplicity(geo_all, LOCAL, is_causal=True)
    assert keys_of(counts, 0, 8) == [4, 6, 8, 10, 12, 14]
    assert keys_of(causal, 0, 8) == [4, 6, 8]
    assert active_block_count(geo_all, LOCAL) == 22
    assert active_pair_count(geo_all, LOCAL) == 88 == int(counts.sum())
    states(
        "semantics.md",
        "Segment `[0, 16)` holds the lattice 0, 2, ..., 14 (`L = 8`, `nb = 4`); the short segment "
        "`[16, 20)` holds 16, 18 (`L = 2`, `nb = 1`)",
        "Query 8 has `t = 4`, block 2, so it attends key blocks 1-3: keys 4, 6, 8, 10, 12, 14",
        "in its own block, `t <= 4`: keys 4, 6, 8",
        "Head 1 (offset 1) has the same table on 1, 3, ..., 15 and 17, 19",
        "22 active blocks and 88 allowed (head, query, key) pairs",
    )


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 4
# --------------------------------------------------------------------------------------------


def test_section4_key_counted_in_two_branches():
    counts = dense_multiplicity(geometry([4, 12], [1, 2], 12, 4, "all"), DENSE)[0, 0]
    row = {j: int(c) for j, c in enumerate(counts[2]) if c}
    assert row == {0: 2, 1: 1, 2: 2, 3: 1, 4: 1, 6: 1, 8: 1, 10: 1}
    assert int(counts[2].sum()) == 10 and int(counts[1].sum()) == 4
    states(
        "semantics.md",
        "branch 0 gives keys 0, 1, 2, 3, branch 1 gives keys 0, 2, 4, 6, 8, 10. Keys 0 and 2 count twice, "
        "so row 2 has 10 terms",
        "`lse_2 = log(2 e^{s_2,0} + e^{s_2,1} + 2 e^{s_2,2} + e^{s_2,3} + e^{s_2,4} + e^{s_2,6} + e^{s_2,8} "
        "+ e^{s_2,10})`",
        "Query 1 is on head 0's lattice in branch 0 only: 4 terms",
    )


def _empty_queries(counts: torch.Tensor, head: int) -> list[int]:
    return (counts[0, head].sum(-1) == 0).nonzero().flatten().tolist()


def test_section4_empty_rows():
    geo_all = geometry([6], [2], 12, 4)
    counts = dense_multiplicity(geo_all, DENSE)
    assert [_empty_queries(counts, h) for h in range(4)] == [[1, 3, 5, 7, 9, 11]] * 2 + [[0, 2, 4, 6, 8, 10]] * 2
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, [6, 8, 10]] = True
    padded = dense_multiplicity(geo_all, DENSE, key_padding_mask=mask)
    assert sorted(set(_empty_queries(padded, 0)) - set(_empty_queries(counts, 0))) == [6, 8, 10]
    custom = SparsePatternConfig(
        pattern_type="custom", block_size=2, block_layout=torch.tensor([[False, False], [True, True]])
    )
    custom_counts = dense_multiplicity(geometry([4], [1], 4, 1), custom)
    assert _empty_queries(custom_counts, 0) == [0, 1]
    assert keys_of(custom_counts, 0, 2) == keys_of(custom_counts, 0, 3) == [0, 1, 2, 3]
    # The reference gives these rows out = 0 and lse = -inf exactly.
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, 4, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    out, lse = Reference([6], [2])(q, k, v, key_padding_mask=mask, return_lse=True)
    assert torch.isneginf(lse[0, 0, [1, 6, 8, 10]]).all() and bool((out[0, [1, 6, 8, 10], 0] == 0).all())
    assert torch.isfinite(lse[0, 0, [0, 2, 4]]).all()
    states(
        "semantics.md",
        "the odd queries of heads 0 and 1 and the even queries of heads 2 and 3",
        "with `key_padding_mask` marking keys 6, 8 and 10, queries 6, 8 and 10 of head 0 are empty",
        "`[[False, False], [True, True]]` with `b = 2` on one branch (segment 4, rate 1) leaves queries 0 and 1 "
        "empty, while queries 2 and 3 attend keys 0-3",
    )


# --------------------------------------------------------------------------------------------
# docs/semantics.md sections 5 and 6
# --------------------------------------------------------------------------------------------


def test_section5_ring_example():
    geo_all = geometry([6], [2], 12, 4)
    apart = ring_schedule(geo_all, DENSE, False, (6, 6))
    assert apart.active == ((True, False), (False, True)) and apart.total_bytes(1) == 0
    cut = ring_schedule(geo_all, DENSE, False, (5, 7))
    assert cut.active[1][0] and cut.chunk_last_step == (1, 1)
    cross = dense_multiplicity(geo_all, DENSE, query_range=(5, 12), key_range=(0, 5))
    needed = {k for h in range(4) for k in keys_of(cross, h, 0)}  # query 5 is row 0 of the chunk
    assert sorted(needed) == [1, 3]
    states(
        "semantics.md",
        "chunks `[6, 6]` share no pair, so nothing is sent",
        "chunks `[5, 7]` cut segment `[0, 6)`, query 5 in chunk 1 needs keys 1 and 3 from chunk 0, and each "
        "chunk is sent once",
    )


def test_section6_storage_example():
    geo_all = geometry([16], [2], 20, 2)
    blocks = active_block_count(geo_all, LOCAL)
    b = LOCAL.block_size
    assert (blocks, blocks * b * b, 2 * 20 * 20) == (22, 88, 800)
    states("semantics.md", "22 blocks of 4 values, 88 per batch element", "`H * N * N = 800`")


# --------------------------------------------------------------------------------------------
# docs/numerics.md
# --------------------------------------------------------------------------------------------


def test_numerics_worked_budget_and_eps():
    reference64 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    reference_lowp = reference64 + torch.tensor([3e-7, 0.0], dtype=torch.float64)
    verdict = compare("out", reference64, reference64, reference_lowp, torch.float32)
    assert verdict.budget == pytest.approx(1.077e-6, rel=5e-4)
    assert [f"{torch.finfo(t).eps:.2e}" for t in (torch.float32, torch.float16, torch.bfloat16)] == [
        "1.19e-07",
        "9.77e-04",
        "7.81e-03",
    ]
    states(
        "numerics.md",
        "1.19e-7 for float32, 9.77e-4 for float16, 7.81e-3 for bfloat16",
        "`2 * 3e-7 + 2 * 1.19e-7 * 2.0 = 1.077e-6`",
        "`k = 2` for `out` and `lse`, `k = 3` for the gradients",
    )


# --------------------------------------------------------------------------------------------
# Links and citations
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_resolve_and_nothing_cites_the_outside_contract(doc):
    text = (DOCS / doc).read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert targets, f"docs/{doc} has no relative link to check"
    for target in targets:
        path = (DOCS / target.split("#")[0]).resolve()
        assert path.exists(), f"docs/{doc} links to {target}, which does not exist"
    assert "SPEC" not in text, f"docs/{doc} cites the contract outside the repository"


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_check_fails_on_a_stale_picture_and_write_repairs_it(tmp_path, capsys):
    original = SEMANTICS.read_text(encoding="utf-8")
    marker = pictures.find_markers(original)[3]
    altered_body = marker.body.replace("#", ".", 1) if "#" in marker.body else marker.body.replace("0", "9", 1)
    assert altered_body != marker.body
    copy = tmp_path / "semantics.md"
    copy.write_text(original.replace(marker.body, altered_body, 1), encoding="utf-8")

    assert pictures.main(["--check", str(copy)]) == 1
    report = capsys.readouterr().out
    assert f"{copy}:{marker.line}: stale picture" in report and "--write" in report

    assert pictures.main(["--write", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == original
    assert pictures.main(["--check", str(copy)]) == 0


def test_command_line_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        pictures.main(["--help"])
    assert help_exit.value.code == 0 and "--check" in capsys.readouterr().out

    bad = tmp_path / "bad.md"
    bad.write_text("text\n<!-- picture: no_such_picture(seq_len=3) -->\n```text\n```\n<!-- /picture -->\n")
    assert pictures.main(["--check", str(bad)]) == 2
    assert "bad.md:2" in (err := capsys.readouterr().err) and "unknown picture function 'no_such_picture'" in err

    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text("<!-- picture: layout_picture(sparse_config=None, num_blocks=2) -->\n```text\n```\n")
    assert pictures.main(["--write", str(unclosed)]) == 2
    assert "never closed" in capsys.readouterr().err

    with pytest.raises(pictures.PictureError, match="literals"):
        pictures.draw("layout_picture(sparse_config=None, num_blocks=len('ab'))")
    with pytest.raises(pictures.PictureError, match="num_blocks|argument"):
        pictures.draw("layout_picture(sparse_config=None)")
    with pytest.raises(SystemExit) as missing:
        pictures.main(["--check", str(tmp_path / "missing.md")])
    assert missing.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pictures.main(["--check"])
