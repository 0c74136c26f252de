"""Views of the dilation lattices and allowed pairs for the patterns notebook, read from reference.semantics only
(docs/semantics.md section 2: heads, offsets and lattices)."""

from __future__ import annotations

import torch

from reference import AttentionGeometry, SparsePatternConfig


def lattice_membership(geometry: AttentionGeometry) -> torch.Tensor:
    """(G, H, N) int: the lattice offset + 1 where position i is on head h's lattice in branch g, else 0.

    A head outside branch g (head_mode "split") has no lattice there: its row stays 0.
    """
    n = geometry.seq_len
    positions = torch.arange(n)
    member = torch.zeros(len(geometry.branches), geometry.num_heads, n, dtype=torch.long)
    for geo in geometry.branches:
        for head in geo.heads:
            on_lattice, _ = geo.compacted_index(positions, head)
            member[geo.branch, head] = on_lattice.long() * (geo.offset_of(head) + 1)
    return member


def head_table(geometry: AttentionGeometry) -> list[dict]:
    """Per (branch, head): segment length, rate, offset and lattice length of the first segment."""
    rows = []
    for geo in geometry.branches:
        for head in geo.heads:
            offset = geo.offset_of(head)
            rows.append(
                {
                    "branch": geo.branch,
                    "head": head,
                    "segment_length": geo.segment_length,
                    "dilation_rate": geo.dilation_rate,
                    "offset": offset,
                    "lattice_length": geo.lattice_length(0, offset),
                }
            )
    return rows


def allowed_pairs(geometry: AttentionGeometry, config: SparsePatternConfig, head: int, is_causal: bool = False):
    """(N, N) int: how many branches let query i of ``head`` attend to key j (small N only)."""
    from reference import dense_multiplicity

    return dense_multiplicity(geometry, config, is_causal)[0, head]
