"""The ring schedule (docs/semantics.md section 5): which (query chunk, key chunk) pairs share an allowed pair.

A ring splits the sequence into ``P`` contiguous chunks; chunk ``c`` holds global positions
``[offsets[c], offsets[c + 1])`` (prefix sums of the chunk lengths). Rank ``r`` keeps query
chunk ``r`` and, at step ``s = 0..P-1``, holds key/value chunk ``(r - s) mod P``. The schedule
asks ``reference.semantics`` (the block tables restricted to the two chunks) whether a chunk
pair has any allowed pair, so that

- a step whose pair has none computes nothing;
- a key/value chunk travels only as far as the farthest rank that still needs it: chunk ``c``
  is sent at transfers ``1..chunk_last_step[c]`` (transfer ``t`` moves it from rank
  ``c + t - 1`` to rank ``c + t``, mod P), so transfers stop after ``last_step``;
- when every segment of every branch lies inside one chunk, no pair of different chunks is
  active and nothing is sent at all.

Key padding is data, not configuration, so it does not enter the schedule (a padded pair
merely computes an empty partial).

Zigzag (``zigzag_schedule``): for causal models the contiguous split gives the last rank the most
work and the first almost none. The sequence is instead cut into ``2P`` near-equal contiguous
pieces and rank ``r`` holds pieces ``r`` and ``2P - 1 - r`` (one early, one late), in that order
in its local rows; a rank's "chunk" is then its pair of pieces, which travels around the ring as
one unit, and a step computes the active (query piece, key piece) pairs of the two ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .config import SparsePatternConfig
from .semantics import AttentionGeometry, block_tables


@dataclass(frozen=True)
class RingSchedule:
    """Which chunk pairs are active, and what the ring computes and sends at every step."""

    chunk_lengths: tuple[int, ...]
    # active[i][j]: query chunk i and key chunk j share at least one allowed (query, key) pair.
    active: tuple[tuple[bool, ...], ...]
    # pieces[c]: the global (start, stop) ranges chunk c holds, in the order of its local rows
    # (one range for a contiguous ring, two for zigzag).
    pieces: tuple[tuple[tuple[int, int], ...], ...]
    # piece_pairs[i][j]: the (query piece, key piece) indices (into pieces[i], pieces[j]) that
    # share an allowed pair; active[i][j] is whether there is any.
    piece_pairs: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    layout: str = "contiguous"

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Global start of every chunk, and the sequence length last: (P + 1,)."""
        bounds = [0]
        for length in self.chunk_lengths:
            bounds.append(bounds[-1] + length)
        return tuple(bounds)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """The global [start, stop) of a contiguous ring's chunk (a zigzag chunk has two: ``pieces``)."""
        if self.layout != "contiguous":
            raise ValueError(f"chunk_range is for contiguous rings; this one is {self.layout!r}: use pieces[{chunk}]")
        return self.offsets[chunk], self.offsets[chunk + 1]

    def local_piece_range(self, chunk: int, piece: int) -> tuple[int, int]:
        """Where piece ``piece`` of chunk ``chunk`` sits in that chunk's local rows: [start, stop)."""
        start = sum(b - a for a, b in self.pieces[chunk][:piece])
        a, b = self.pieces[chunk][piece]
        return start, start + b - a

    def chunk_at(self, rank: int, step: int) -> int:
        """The key/value chunk rank ``rank`` holds at step ``step``: (rank - step) mod P."""
        return (rank - step) % self.num_chunks

    def computes(self, rank: int, step: int) -> bool:
        """Whether ``rank`` computes a partial at ``step``."""
        return self.active[rank][self.chunk_at(rank, step)]

    def compute_steps(self, rank: int) -> tuple[int, ...]:
        """The steps at which ``rank`` computes, ascending."""
        return tuple(s for s in range(self.num_chunks) if self.computes(rank, s))

    def step_pairs(self, step: int) -> tuple[tuple[int, int], ...]:
        """(query chunk, key chunk) pairs computed at ``step``, one per computing rank."""
        return tuple((r, self.chunk_at(r, step)) for r in range(self.num_chunks) if self.computes(r, step))

    @property
    def chunk_last_step(self) -> tuple[int, ...]:
        """For every key chunk, the last step at which some rank needs it (0: only its own rank, or none)."""
        P = self.num_chunks
        return tuple(max((s for s in range(P) if self.active[(c + s) % P][c]), default=0) for c in range(P))

    @property
    def last_step(self) -> int:
        """The last step at which any rank needs a chunk it has not seen; no transfer after it."""
        return max(self.chunk_last_step, default=0)

    def travels(self, chunk: int, transfer: int) -> bool:
        """Whether ``chunk`` is sent at transfer ``transfer`` (1-based: it arrives for that step)."""
        return 1 <= transfer <= self.chunk_last_step[chunk]

    def transfers(self, step: int) -> tuple[tuple[int, int, int], ...]:
        """(source rank, destination rank, chunk) of every send that delivers a chunk for ``step``."""
        P = self.num_chunks
        if step < 1:
            return ()
        return tuple(((c + step - 1) % P, (c + step) % P, c) for c in range(P) if self.travels(c, step))

    def receives(self, rank: int, step: int) -> bool:
        """Whether ``rank`` receives the chunk it holds at ``step`` from ``rank - 1``."""
        return self.travels(self.chunk_at(rank, step), step)

    def sends(self, rank: int, step: int) -> bool:
        """Whether ``rank`` sends the chunk it holds at ``step - 1`` to ``rank + 1`` for ``step``."""
        return self.travels(self.chunk_at(rank, step - 1), step)

    def step_bytes(self, bytes_per_token: int) -> tuple[int, ...]:
        """Bytes sent (all ranks together) to deliver each step's chunks, steps 0..P-1 (step 0: 0)."""
        return tuple(
            sum(self.chunk_lengths[c] for _, _, c in self.transfers(s)) * bytes_per_token
            for s in range(self.num_chunks)
        )

    def total_bytes(self, bytes_per_token: int) -> int:
        return sum(self.step_bytes(bytes_per_token))


def _check_chunk_lengths(chunk_lengths, seq_len: int) -> tuple[int, ...]:
    lengths = tuple(chunk_lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths):
        raise ValueError(f"chunk_lengths must be a non-empty sequence of ints >= 0, got {chunk_lengths!r}")
    if sum(lengths) != seq_len:
        raise ValueError(f"chunk_lengths {lengths} sum to {sum(lengths)}, but the sequence has N={seq_len}")
    return lengths


def pair_is_active(
    geometry: AttentionGeometry,
    config: SparsePatternConfig,
    is_causal: bool,
    query_range: tuple[int, int],
    key_range: tuple[int, int],
) -> bool:
    """Whether the query chunk and the key chunk share at least one allowed pair (padding aside).

    Exact for the chunks of a ring (equal query and key chunkings): a block pair kept by a table
    restricted to both chunks holds an allowed point pair, except, under causal, when the key
    chunk starts at or after the query chunk's end; the diagonal chunk always holds (p, p).
    """
    (q0, q1), (k0, k1) = query_range, key_range
    if q1 <= q0 or k1 <= k0:
        return False
    if is_causal and k0 >= q1:
        return False
    return any(table.nnz > 0 for table in block_tables(geometry, config, is_causal, query_range, key_range))


def _schedule_of_pieces(geometry, config, is_causal, pieces, layout: str) -> RingSchedule:
    """The schedule of a ring whose chunk c holds the global ranges ``pieces[c]``."""
    piece_pairs = tuple(
        tuple(
            tuple(
                (a, b)
                for a, query_piece in enumerate(query_pieces)
                for b, key_piece in enumerate(key_pieces)
                if pair_is_active(geometry, config, is_causal, query_piece, key_piece)
            )
            for key_pieces in pieces
        )
        for query_pieces in pieces
    )
    return RingSchedule(
        chunk_lengths=tuple(sum(b - a for a, b in chunk) for chunk in pieces),
        active=tuple(tuple(bool(pairs) for pairs in row) for row in piece_pairs),
        pieces=pieces,
        piece_pairs=piece_pairs,
        layout=layout,
    )


@functools.lru_cache(maxsize=256)
def _ring_schedule_cached(geometry, config, is_causal, chunk_lengths) -> RingSchedule:
    bounds = [0]
    for length in chunk_lengths:
        bounds.append(bounds[-1] + length)
    pieces = tuple(((bounds[c], bounds[c + 1]),) for c in range(len(chunk_lengths)))
    return _schedule_of_pieces(geometry, config, is_causal, pieces, "contiguous")


def zigzag_pieces(seq_len: int, world_size: int) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """Rank r's two global ranges under the zigzag layout: pieces r and 2P - 1 - r of 2P near-equal pieces.

    The first ``seq_len % 2P`` pieces are one token longer. A caller of a zigzag ring passes, on rank
    r, its rows of the first range followed by those of the second.
    """
    for name, value, least in (("seq_len", seq_len, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    count = 2 * world_size
    base, extra = divmod(seq_len, count)
    bounds = [0]
    for piece in range(count):
        bounds.append(bounds[-1] + base + (1 if piece < extra else 0))
    piece = lambda i: (bounds[i], bounds[i + 1])  # noqa: E731
    return tuple((piece(r), piece(count - 1 - r)) for r in range(world_size))


@functools.lru_cache(maxsize=256)
def zigzag_schedule(geometry: AttentionGeometry, config: SparsePatternConfig, is_causal: bool, world_size: int):
    """The schedule of a zigzag ring of ``world_size`` ranks over the whole sequence (see the module docstring)."""
    pieces = zigzag_pieces(geometry.seq_len, world_size)
    return _schedule_of_pieces(geometry, config, bool(is_causal), pieces, "zigzag")


def ring_schedule(
    geometry: AttentionGeometry,
    config: SparsePatternConfig,
    is_causal: bool,
    chunk_lengths,
) -> RingSchedule:
    """The schedule of a ring over contiguous chunks of ``chunk_lengths`` tokens (zero-length allowed)."""
    lengths = _check_chunk_lengths(chunk_lengths, geometry.seq_len)
    return _ring_schedule_cached(geometry, config, bool(is_causal), lengths)
