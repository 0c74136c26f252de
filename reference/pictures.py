"""Text pictures of the semantics, drawn by asking ``reference.semantics`` (docs/semantics.md).

Nothing here decides which pairs attend: every mark comes from ``AttentionGeometry`` /
``BranchGeometry`` (heads, offsets, lattices), ``layout_mask``, ``block_table`` or
``dense_multiplicity``. The pictures in docs/semantics.md sit between two markers, the opening
one naming the call that draws them::

    <!-- picture: lattice_picture(segment_lengths=[6], dilation_rates=[2], seq_len=12, num_heads=4) -->
    ```text
    ...
    ```
    <!-- /picture -->

and this module keeps them current::

    python -m reference.pictures --check docs/semantics.md   # exit 1 if a picture is stale
    python -m reference.pictures --write docs/semantics.md   # regenerate them in place
    python -m reference.pictures --show "layout_picture(sparse_config={'pattern_type': 'dense'}, num_blocks=4)"
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DilationConfig, SparsePatternConfig
from .semantics import AttentionGeometry, block_table, dense_multiplicity, layout_mask


def _geometry(segment_lengths, dilation_rates, seq_len: int, num_heads: int, head_mode: str) -> AttentionGeometry:
    return AttentionGeometry(
        DilationConfig(tuple(segment_lengths), tuple(dilation_rates), head_mode), seq_len, num_heads
    )


def _heads_text(heads: range) -> str:
    return f"head {heads.start}" if len(heads) == 1 else f"heads {heads.start}-{heads.stop - 1}"


def _grid(corner: str, column_labels, rows) -> str:
    """A table of right-aligned cells: ``rows`` is a list of (label, cells, separators, suffix).

    ``separators[c]`` is the character drawn before column c ('|' at a segment start, else ' ').
    """
    cells_all = [str(c) for c in column_labels] + [cell for _, cells, _, _ in rows for cell in cells]
    width = max(len(c) for c in cells_all)
    label_width = max([len(corner)] + [len(label) for label, _, _, _ in rows])
    lines = [corner.ljust(label_width) + "".join(" " + str(c).rjust(width) for c in column_labels)]
    for label, cells, separators, suffix in rows:
        body = "".join(sep + cell.rjust(width) for sep, cell in zip(separators, cells))
        lines.append((label.ljust(label_width) + body + suffix).rstrip())
    return "\n".join(lines)


def lattice_picture(segment_lengths, dilation_rates, seq_len: int, num_heads: int, head_mode: str = "split") -> str:
    """A row per (branch, head), a column per position: the compacted index t where the position is
    on the head's lattice in that branch, '.' where it is not; '|' marks a segment start.

    A head that does not belong to a branch has no row in it (head_mode "split").
    """
    geometry = _geometry(segment_lengths, dilation_rates, seq_len, num_heads, head_mode)
    lines = []
    for geo in geometry.branches:
        starts = {geo.segment_bounds(s)[0] for s in range(geo.num_segments)} - {0}
        separators = ["|" if p in starts else " " for p in range(seq_len)]
        rows = []
        for head in geo.heads:
            offset = geo.offset_of(head)
            cells = ["."] * seq_len
            for segment in range(geo.num_segments):
                for t, position in enumerate(geo.lattice_positions(segment, offset).tolist()):
                    cells[position] = str(t)
            rows.append((f"head {head} o={offset}", cells, separators, ""))
        title = f"branch {geo.branch}: segment {geo.segment_length}, rate {geo.dilation_rate}, {_heads_text(geo.heads)}"
        lines.append(title + "\n" + _grid("position", range(seq_len), rows))
    return "\n\n".join(lines)


def layout_picture(sparse_config: SparsePatternConfig | None, num_blocks: int, is_causal: bool = False) -> str:
    """The block layout of one lattice with ``num_blocks`` blocks: '#' where (qb, kb) is active, '.' not."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    config = sparse_config if sparse_config is not None else SparsePatternConfig(pattern_type="dense")
    mask = layout_mask(config, num_blocks, is_causal)
    rows = [
        (str(qb), ["#" if bool(allowed) else "." for allowed in mask[qb]], [" "] * num_blocks, "")
        for qb in range(num_blocks)
    ]
    return _grid("qb\\kb", range(num_blocks), rows)


def pair_picture(
    segment_lengths,
    dilation_rates,
    seq_len: int,
    num_heads: int,
    head: int,
    head_mode: str = "split",
    sparse_config: SparsePatternConfig | None = None,
    is_causal: bool = False,
    padded_keys=(),
) -> str:
    """Query rows, key columns of one head: in how many branches key j is allowed for query i
    ('.' for none); after '|' the row's total, the number of terms in its softmax (0: empty row).

    ``padded_keys``: positions marked True in a (1, N) key_padding_mask.
    """
    geometry = _geometry(segment_lengths, dilation_rates, seq_len, num_heads, head_mode)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < num_heads:
        raise ValueError(f"head must be an int in [0, {num_heads}), got {head!r}")
    config = sparse_config if sparse_config is not None else SparsePatternConfig(pattern_type="dense")
    mask = None
    if any(isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < seq_len for j in padded_keys):
        raise ValueError(f"padded_keys must be positions in [0, {seq_len}), got {padded_keys!r}")
    if padded_keys:
        mask = torch.zeros(1, seq_len, dtype=torch.bool)
        mask[0, list(padded_keys)] = True
    counts = dense_multiplicity(geometry, config, is_causal, mask)[0, head]
    rows = []
    for i in range(seq_len):
        cells = ["." if int(c) == 0 else (str(int(c)) if int(c) < 10 else "+") for c in counts[i]]
        rows.append((str(i), cells, [" "] * seq_len, f" | {int(counts[i].sum())}"))
    return f"head {head} (rows: query i, columns: key j)\n" + _grid("i\\j", range(seq_len), rows)


def block_table_picture(
    segment_lengths,
    dilation_rates,
    seq_len: int,
    num_heads: int,
    sparse_config: SparsePatternConfig | None,
    branch: int,
    offset: int,
    head_mode: str = "split",
    is_causal: bool = False,
) -> str:
    """The rows of one (branch, offset) block table: each query block's positions and its key blocks."""
    geometry = _geometry(segment_lengths, dilation_rates, seq_len, num_heads, head_mode)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < len(geometry.branches):
        raise ValueError(f"branch must be an int in [0, {len(geometry.branches)}), got {branch!r}")
    if offset not in geometry.branches[branch].offsets:
        raise ValueError(
            f"offset must be one of branch {branch}'s offsets {geometry.branches[branch].offsets}, got {offset!r}"
        )
    config = sparse_config if sparse_config is not None else SparsePatternConfig(pattern_type="dense")
    table = block_table(geometry, config, branch, offset, is_causal)
    b = table.block_size
    lines = [
        f"branch {table.branch}, offset {table.offset}, {_heads_text(table.heads)}, "
        f"stride {table.stride}, block size {b}",
        "segment   qb  positions of qb  key blocks (their positions)",
    ]
    for n in range(table.num_rows):
        start, length = int(table.lattice_start[n]), int(table.lattice_length[n])

        def positions(block: int) -> str:
            # Block kb of the row's lattice holds its points t = kb*b .. kb*b + b - 1 (fewer at its end).
            return " ".join(str(start + table.stride * t) for t in range(block * b, min((block + 1) * b, length)))

        qb = int(table.query_block[n])
        keys = table.key_block[int(table.row_ptr[n]) : int(table.row_ptr[n + 1])].tolist()
        segment = f"[{int(table.segment_start[n])}, {int(table.segment_stop[n])})"
        key_text = ", ".join(f"{kb} ({positions(kb)})" for kb in keys) or "none"
        lines.append(f"{segment:<9} {qb:>2}  {positions(qb):<15}  {key_text}")
    return "\n".join(lines)


PICTURES = {
    "lattice_picture": lattice_picture,
    "layout_picture": layout_picture,
    "pair_picture": pair_picture,
    "block_table_picture": block_table_picture,
}


# --------------------------------------------------------------------------------------------
# Markers in markdown
# --------------------------------------------------------------------------------------------


class PictureError(ValueError):
    """A marker that cannot be drawn: unknown function, non-literal argument, unclosed marker."""


OPEN = re.compile(r"^<!-- picture: (?P<call>.*) -->$")
CLOSE = "<!-- /picture -->"


def _to_config(value):
    if value is None or isinstance(value, SparsePatternConfig):
        return value
    if not isinstance(value, dict):
        raise PictureError(f"sparse_config must be a dict of SparsePatternConfig fields or None, got {value!r}")
    fields = dict(value)
    try:
        if "block_layout" in fields:
            fields["block_layout"] = torch.tensor(fields["block_layout"], dtype=torch.bool)
        return SparsePatternConfig(**fields)
    except (TypeError, ValueError) as error:
        raise PictureError(f"sparse_config={value!r} is not a valid SparsePatternConfig: {error}") from None


def draw(call: str) -> str:
    """Draw the picture of a marker's call, e.g. ``"layout_picture(sparse_config=None, num_blocks=3)"``.

    Arguments must be Python literals; a ``sparse_config`` dict becomes a SparsePatternConfig (a
    ``block_layout`` list of lists becomes a bool tensor).
    """
    try:
        tree = ast.parse(call.strip(), mode="eval").body
    except SyntaxError as error:
        raise PictureError(f"not a call expression: {call!r} ({error.msg})") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise PictureError(f"expected name(arguments), got {call!r}")
    name = tree.func.id
    if name not in PICTURES:
        raise PictureError(f"unknown picture function {name!r} in {call!r}; known: {sorted(PICTURES)}")
    try:
        args = [ast.literal_eval(node) for node in tree.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}
    except ValueError:
        raise PictureError(f"arguments must be Python literals in {call!r}") from None
    if None in kwargs:
        raise PictureError(f"**kwargs are not allowed in {call!r}")
    if "sparse_config" in kwargs:
        kwargs["sparse_config"] = _to_config(kwargs["sparse_config"])
    try:
        return PICTURES[name](*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise PictureError(f"{call!r} failed: {error}") from None


def fenced(picture: str) -> str:
    return f"```text\n{picture}\n```"


@dataclass(frozen=True)
class Marker:
    call: str
    line: int  # 1-based line of the opening marker
    close_line: int  # 1-based line of the closing marker
    body: str  # the text between the two markers, without their newlines


def find_markers(text: str, source: str = "<text>") -> list[Marker]:
    lines = text.split("\n")
    markers, index = [], 0
    while index < len(lines):
        match = OPEN.match(lines[index].strip())
        if match is None:
            if lines[index].strip() == CLOSE:
                raise PictureError(f"{source}:{index + 1}: {CLOSE} without an opening marker")
            index += 1
            continue
        stop = index + 1
        while stop < len(lines) and lines[stop].strip() != CLOSE:
            if OPEN.match(lines[stop].strip()):
                raise PictureError(f"{source}:{stop + 1}: a picture marker opens before line {index + 1}'s closes")
            stop += 1
        if stop == len(lines):
            raise PictureError(f"{source}:{index + 1}: picture marker is never closed by {CLOSE}")
        markers.append(Marker(match["call"], index + 1, stop + 1, "\n".join(lines[index + 1 : stop])))
        index = stop + 1
    return markers


def regenerate(text: str, source: str = "<text>") -> str:
    """``text`` with every picture between markers drawn afresh."""
    lines = text.split("\n")
    out, copied = [], 0
    for marker in find_markers(text, source):
        out.extend(lines[copied : marker.line])  # up to and including the opening marker
        try:
            out.append(fenced(draw(marker.call)))
        except PictureError as error:
            raise PictureError(f"{source}:{marker.line}: {error}") from None
        copied = marker.close_line - 1  # the closing marker is copied with what follows
    out.extend(lines[copied:])
    return "\n".join(out)


def stale_pictures(text: str, source: str = "<text>") -> list[tuple[Marker, str]]:
    """(marker, fresh body) of every picture whose text differs from what the package draws now."""
    stale = []
    for marker in find_markers(text, source):
        try:
            fresh = fenced(draw(marker.call))
        except PictureError as error:
            raise PictureError(f"{source}:{marker.line}: {error}") from None
        if marker.body != fresh:
            stale.append((marker, fresh))
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reference.pictures",
        description="Check or regenerate the text pictures between '<!-- picture: CALL -->' and "
        f"'{CLOSE}' markers in markdown files; the pictures are drawn by reference.semantics.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if any picture differs from a fresh drawing")
    mode.add_argument("--write", action="store_true", help="redraw every picture in place")
    mode.add_argument(
        "--show",
        metavar="CALL",
        help='print one picture, e.g. "layout_picture(sparse_config=None, num_blocks=3)"; '
        f"functions: {', '.join(PICTURES)}",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="markdown files (with --check / --write)")
    args = parser.parse_args(argv)
    try:
        if args.show is not None:
            if args.paths:
                parser.error("--show takes no file paths")
            print(draw(args.show))
            return 0
        if not args.paths:
            parser.error("--check and --write need at least one markdown file")
        status = 0
        for path in args.paths:
            if not path.is_file():
                parser.error(f"no such file: {path}")
            text = path.read_text(encoding="utf-8")
            if args.write:
                fresh = regenerate(text, str(path))
                if fresh != text:
                    path.write_text(fresh, encoding="utf-8")
                print(
                    f"{path}: {len(find_markers(fresh, str(path)))} pictures, "
                    f"{'rewritten' if fresh != text else 'already current'}"
                )
                continue
            stale = stale_pictures(text, str(path))
            for marker, fresh in stale:
                status = 1
                diff = difflib.unified_diff(
                    marker.body.split("\n"), fresh.split("\n"), "in the file", "drawn now", lineterm="", n=1
                )
                print(f"{path}:{marker.line}: stale picture {marker.call}\n" + "\n".join(diff))
            if not stale:
                print(f"{path}: {len(find_markers(text, str(path)))} pictures, all current")
        if status:
            print(f"run: python -m reference.pictures --write {' '.join(map(str, args.paths))}")
        return status
    except PictureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
