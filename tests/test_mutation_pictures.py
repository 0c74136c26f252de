"""reference/pictures.py at its edges: the argument checks, the multiplicity cells, padded keys, the marker parser.

tests/test_docs.py checks the pictures of docs/semantics.md and the lattice cells; these pin what
no doc picture reaches (found by ``make mutation``, experiments/mutation.py): each picture
function refuses a bad head, branch, offset, block count or padded key with the bound named and
accepts the values at the bounds; a pair picture draws a multiplicity of 9 as "9" and of 10 as
"+", and its padded keys are those of dense_multiplicity's own mask; the marker parser reports
the line of each malformed marker and parses an empty picture and one ending the text.
"""

from __future__ import annotations

import pytest
import torch

from reference import AttentionGeometry, DilationConfig, SparsePatternConfig, block_table, dense_multiplicity, pictures

DENSE = SparsePatternConfig(pattern_type="dense")


def _pair_rows(picture: str) -> list[tuple[list[str], int]]:
    """(cells, total) of each query row of a pair_picture."""
    rows = []
    for line in picture.split("\n")[2:]:
        cells, total = line.split("|")
        rows.append((cells.split()[1:], int(total)))
    return rows


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_layout_picture_refuses_a_block_count_that_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"num_blocks must be an int >= 1, got"):
        pictures.layout_picture(None, bad)


def test_layout_picture_of_one_block():
    assert pictures.layout_picture(None, 1) == "qb\\kb 0\n0     #"
    assert pictures.layout_picture(None, 1, is_causal=True) == "qb\\kb 0\n0     #"


@pytest.mark.parametrize("bad", [-1, 3, True, 1.0])
def test_pair_picture_refuses_a_head_outside_range_num_heads(bad):
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 3\), got"):
        pictures.pair_picture([4], [1], 8, 3, bad)


@pytest.mark.parametrize("bad", [(-1,), (8,), (True,), (1.0,), (2, 8)])
def test_pair_picture_refuses_padded_keys_outside_the_sequence(bad):
    with pytest.raises(ValueError, match=r"padded_keys must be positions in \[0, 8\), got"):
        pictures.pair_picture([4], [1], 8, 2, 0, padded_keys=bad)


@pytest.mark.parametrize("head", [0, 2])
@pytest.mark.parametrize("padded", [(), (0,), (7,), (0, 3, 7)])
def test_pair_picture_counts_are_dense_multiplicity_with_the_padding_mask(head, padded):
    """Cells and totals of every row against dense_multiplicity under a (1, N) mask of the padded keys."""
    segments, rates, seq_len, heads = [4, 8], [1, 2], 8, 3
    geometry = AttentionGeometry(DilationConfig(tuple(segments), tuple(rates), "all"), seq_len, heads)
    mask = torch.zeros(1, seq_len, dtype=torch.bool)
    mask[0, list(padded)] = True
    counts = dense_multiplicity(geometry, DENSE, True, mask)[0, head]
    drawn = pictures.pair_picture(segments, rates, seq_len, heads, head, "all", None, True, padded)
    rows = _pair_rows(drawn)
    assert len(rows) == seq_len
    for i, (cells, total) in enumerate(rows):
        assert cells == ["." if int(c) == 0 else str(int(c)) for c in counts[i]], f"row {i}"
        assert total == int(counts[i].sum())
        assert all(cells[j] == "." for j in padded)
    if padded:  # the padding changed the picture
        assert drawn != pictures.pair_picture(segments, rates, seq_len, heads, head, "all", None, True)


@pytest.mark.parametrize("branches, cell", [(9, "9"), (10, "+"), (11, "+")])
def test_pair_picture_draws_multiplicities_from_10_as_plus(branches, cell):
    """Every branch of rate 1 over the whole sequence allows every pair: the multiplicity is the branch count."""
    rows = _pair_rows(pictures.pair_picture([4] * branches, [1] * branches, 4, 1, 0, head_mode="all"))
    assert rows == [([cell] * 4, 4 * branches)] * 4


@pytest.mark.parametrize("bad", [-1, 2, True, 1.0])
def test_block_table_picture_refuses_a_branch_outside_the_geometry(bad):
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 2\), got"):
        pictures.block_table_picture([4, 8], [1, 2], 8, 2, None, bad, 0)


def test_block_table_picture_refuses_an_offset_of_no_head_and_draws_the_last_branch():
    with pytest.raises(ValueError, match=r"offset must be one of branch 1's offsets"):
        pictures.block_table_picture([4, 8], [1, 2], 8, 2, None, 1, 1)  # branch 1 has one head, offset 0
    drawn = pictures.block_table_picture([4, 8], [1, 2], 8, 2, None, 1, 0)
    geometry = AttentionGeometry(DilationConfig((4, 8), (1, 2), "split"), 8, 2)
    table = block_table(geometry, DENSE, 1, 0, False)
    assert drawn.split("\n")[0] == f"branch 1, offset 0, head 1, stride 2, block size {table.block_size}"
    assert drawn.split("\n")[2].split() == ["[0,", "8)", "0", "0", "2", "4", "6", "0", "(0", "2", "4", "6)"]


def test_a_sparse_config_that_is_not_a_valid_config_is_a_picture_error():
    with pytest.raises(pictures.PictureError, match="not a valid SparsePatternConfig"):  # an unknown field
        pictures.draw("layout_picture(sparse_config={'no_such_field': 1}, num_blocks=2)")
    with pytest.raises(pictures.PictureError, match="not a valid SparsePatternConfig"):  # a value refused
        pictures.draw("layout_picture(sparse_config={'pattern_type': 'no_such_pattern'}, num_blocks=2)")
    with pytest.raises(pictures.PictureError, match="not a call expression"):
        pictures.draw("layout_picture(")
    with pytest.raises(pictures.PictureError, match=r"expected name\(arguments\)"):
        pictures.draw("pictures.layout_picture(sparse_config=None, num_blocks=2)")
    with pytest.raises(pictures.PictureError, match=r"expected name\(arguments\)"):
        pictures.draw("layout_picture")


def test_markers_are_frozen():
    marker = pictures.find_markers("<!-- picture: f() -->\nbody\n<!-- /picture -->")[0]
    with pytest.raises(AttributeError):
        marker.line = 2


def test_find_markers_parses_an_empty_picture_and_one_that_ends_the_text():
    text = "<!-- picture: a() -->\n<!-- /picture -->\nbetween\n<!-- picture: b() -->\nx\n<!-- /picture -->"
    assert pictures.find_markers(text) == [
        pictures.Marker("a()", 1, 2, ""),
        pictures.Marker("b()", 4, 6, "x"),
    ]
    # A closing marker right after the one that closes: the second has no opening marker (line 3).
    with pytest.raises(pictures.PictureError, match=r"^doc.md:3: <!-- /picture --> without an opening marker$"):
        pictures.find_markers("<!-- picture: a() -->\n<!-- /picture -->\n<!-- /picture -->", "doc.md")


@pytest.mark.parametrize(
    "text, message",
    [
        ("a\nb\n<!-- /picture -->\n", r"^doc.md:3: <!-- /picture --> without an opening marker$"),
        (
            "a\n<!-- picture: a() -->\nx\n<!-- picture: b() -->\n<!-- /picture -->",
            r"^doc.md:4: a picture marker opens before line 2's closes$",
        ),
        ("a\nb\n<!-- picture: a() -->\nx\n", r"^doc.md:3: picture marker is never closed by <!-- /picture -->$"),
    ],
)
def test_find_markers_names_the_line_of_a_malformed_marker(text, message):
    with pytest.raises(pictures.PictureError, match=message):
        pictures.find_markers(text, "doc.md")


def test_regenerate_and_stale_pictures_name_the_marker_line_of_a_call_that_fails():
    text = (
        "title\n\n<!-- picture: layout_picture(sparse_config=None, num_blocks=0) -->\n```text\n```\n<!-- /picture -->"
    )
    for function in (pictures.regenerate, pictures.stale_pictures):
        with pytest.raises(pictures.PictureError, match=r"^doc.md:3: 'layout_picture\(.*num_blocks must be an int"):
            function(text, "doc.md")


LAYOUT_CALL = "layout_picture(sparse_config={'pattern_type': 'local_window', 'local_window_size': 1}, num_blocks=4)"


def _doc(picture_body: str) -> str:
    return f"# title\n<!-- picture: {LAYOUT_CALL} -->\n{picture_body}\n<!-- /picture -->\nend\n"


def test_show_prints_one_picture_and_takes_no_paths(tmp_path, capsys):
    assert pictures.main(["--show", LAYOUT_CALL]) == 0
    assert capsys.readouterr().out == pictures.draw(LAYOUT_CALL) + "\n"
    with pytest.raises(SystemExit) as refused:
        pictures.main(["--show", LAYOUT_CALL, str(tmp_path / "a.md")])
    assert refused.value.code == 2 and "--show takes no file paths" in capsys.readouterr().err


def test_a_mode_is_required(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(_doc(pictures.fenced(pictures.draw(LAYOUT_CALL))), encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        pictures.main([str(doc)])
    assert refused.value.code == 2 and "one of the arguments --check --write --show is required" in (
        capsys.readouterr().err
    )


def test_write_redraws_every_file_and_says_which_changed(tmp_path, capsys):
    fresh = pictures.fenced(pictures.draw(LAYOUT_CALL))
    stale, current = tmp_path / "stale.md", tmp_path / "current.md"
    stale.write_text(_doc(fresh.replace("#", ".", 1)), encoding="utf-8")
    current.write_text(_doc(fresh), encoding="utf-8")
    assert pictures.main(["--write", str(stale), str(current)]) == 0
    assert capsys.readouterr().out.split("\n") == [
        f"{stale}: 1 pictures, rewritten",
        f"{current}: 1 pictures, already current",
        "",
    ]
    assert stale.read_text(encoding="utf-8") == current.read_text(encoding="utf-8") == _doc(fresh)


def test_check_reports_each_stale_picture_with_one_line_of_context(tmp_path, capsys):
    fresh = pictures.fenced(pictures.draw(LAYOUT_CALL))
    lines = fresh.split("\n")  # ```text, the header, rows 0..3, ```
    changed = lines[4].replace("#", ".", 1)  # row 2
    stale, current = tmp_path / "stale.md", tmp_path / "current.md"
    stale.write_text(_doc("\n".join(lines[:4] + [changed] + lines[5:])), encoding="utf-8")
    current.write_text(_doc(fresh), encoding="utf-8")
    assert pictures.main(["--check", str(current), str(stale)]) == 1
    assert capsys.readouterr().out.split("\n") == [
        f"{current}: 1 pictures, all current",
        f"{stale}:2: stale picture {LAYOUT_CALL}",
        "--- in the file",
        "+++ drawn now",
        "@@ -4,3 +4,3 @@",
        " " + lines[3],
        "-" + changed,
        "+" + lines[4],
        " " + lines[5],
        f"run: python -m reference.pictures --write {current} {stale}",
        "",
    ]
