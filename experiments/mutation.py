"""Mutation score of the fast tests (``make mutation``): cosmic-ray's mutants, each run against the tests of its module.

Not part of ``make test``: a full run takes hours on 2 cores. The settings live in pyproject.toml's
``[tool.cosmic-ray]``: the operator filter (cosmic-ray's ``filters.operators-filter`` keys), the
per-mutant timeout and, in ``[tool.cosmic-ray.modules]``, each mutated module with the fast test files
that cover it (tests with their own definition of the semantics first, tests/test_mutation_*.py last).

For every module: cosmic-ray enumerates the mutants (``cosmic_ray.commands.init`` into a session
database under --sessions, which ``cr-report`` reads), the operator filter marks the excluded ones
skipped, and each remaining mutant is applied to a scratch copy of the tree (never this one: other
work goes on here) and the module's tests run with ``pytest -x``. The tests run in a child forked from
this process, which has imported torch, pytest and hypothesis once but never the project: each child
imports the mutated module fresh (no bytecode is written). A non-zero exit or the timeout kills the
mutant, as cosmic-ray's own runner counts it. Hypothesis draws the examples of the chosen profile
(HYPOTHESIS_PROFILE, ``ci``: derandomized) without its shrink phase: a failure stops the run as soon
as an example fails.

A surviving mutant that no test can kill (it computes the same results, or only the time or memory
differs, which tests never assert) is listed in ``EQUIVALENT`` below with the reason, as is every
mutant inside a type annotation (never evaluated here); every other survivor counts against the score:

    score = (killed + timeout) / (mutants run - equivalent)

given separately for the modules run in full and for those of which --sample or --budget ran a share.
Results go to --out (experiments/results/mutation.json), one entry per module with the sha256 of the
source it mutated; a run over some modules keeps the other modules' entries (under a lock, so runs
over different modules may share one record; an entry is marked stale when its source has changed
since); "not_in_config" names every module of reference/ and optimized/ that the config leaves
out, with the reason from ``NOT_MUTATED``. --survivors-only re-runs just the previous survivors of
an unchanged module (after new tests were added; the tests that killed the others are unchanged);
--reclassify rewrites the record after an entry was added to ``EQUIVALENT``.

    python -m experiments.mutation                                   # every module of the config
    python -m experiments.mutation --modules reference/merge.py --budget 1800
    python -m experiments.mutation --modules reference/semantics.py --survivors-only
    python -m experiments.mutation --modules optimized/triton_backend.py --sample 20
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import tomllib
import torch

from experiments import cli
from experiments.env import environment

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "experiments" / "results" / "mutation.json"
DEFAULT_SESSIONS = ROOT / "build" / "mutation"
# What the scratch copy leaves out: nothing a test of the fast selection reads.
COPY_IGNORED = (
    ".git",
    ".venv",
    "build",
    "__pycache__",
    "*.egg-info",
    ".hypothesis",
    ".benchmarks",
    "notebooks",
    "*.ncu-rep",
    ".ipynb_checkpoints",
)
NEW_TESTS_PREFIX = "tests/test_mutation_"
# The packages whose every module the record accounts for: mutated (in [tool.cosmic-ray.modules]) or
# named in the record's "not_in_config" with the reason below ("not in the config" where none is given).
MUTATED_PACKAGES = ("reference", "optimized")
NOT_MUTATED = {
    "reference/__init__.py": "imports, aliases and __all__ only: cosmic-ray generates no mutant",
    "optimized/__init__.py": "imports, aliases and __all__ only: cosmic-ray generates no mutant",
}


@dataclasses.dataclass(frozen=True)
class Equivalent:
    """A mutant that computes what the original computes, with the reason (matched on module, operator and line)."""

    module: str
    operator: str  # cosmic-ray's operator name
    original: str  # the mutated source line, stripped
    mutated: str  # the line after the mutation, stripped
    reason: str


def _same(module: str, reason: str, *mutants: tuple[str, str, str]) -> tuple[Equivalent, ...]:
    """Equivalent mutants of ``module`` sharing one reason: (operator without "core/", original, mutated)."""
    return tuple(Equivalent(module, f"core/{op}", original, mutated, reason) for op, original, mutated in mutants)


ANNOTATION = (
    "a type annotation: the module has `from __future__ import annotations`, so it is a string nothing evaluates"
)
CACHE = (
    "a cache of a pure function of hashable arguments whose callers copy or only read the result: "
    "without it, or with another size, every call returns equal values"
)
ONE_DIMENSIONAL = "a cumulative sum over a 1-D tensor: dimension -1 is dimension 0"
SQUARE = (
    "shape[1] and shape[-1] equal shape[0] wherever they are read: a layout that is not square was refused before "
    "(earlier in the same condition, or by SparsePatternConfig)"
)

LATTICE = (
    "for an offset below the rate (head_offset's range, where the count's definition holds) segment_length - offset "
    "> -rate, so the ceiling is >= 0 and a floor of -1 never binds"
)
EMPTY_RANGE = "range(-1) and range(0) are both empty, and equal"
UNIQUE_ORDER = (
    "the later stable sorts order the entries by (lattice, key block, query block), unique per entry: the order of "
    "ties the first sort leaves is overwritten"
)
CHUNK_CLAMP = (
    "a first or stop point clamped to -1 instead of 0 lies before the lattice either way: the block ranges gain no "
    "block id >= 0, so the same rows and key blocks are listed"
)
LENGTH_CLAMP = (
    "segment length - offset + rate - 1 >= 0 for every offset below the rate; a length of -1 (offsets >= rate) fails "
    "length > 0 as 0 does, and its block count (0, or -1 for blocks of 1) equals no kept segment's"
)
KEPT_LENGTH = "q_stop > q_first already needs a query point, hence a lattice of length >= 1"
KEPT_QUERY = (
    "a segment with no query block in the chunk (q_stop == q_first) has no row and no entry in that empty range"
)
GROUP_ORDER = (
    "the segments before the last all have the full length, so at most two block counts occur (the full one at "
    "segments 0..S-2, the last one's at S-1): first and last occurrences order them alike"
)
EMPTY_LATTICE = (
    "lattice lengths never grow along the segments (full ones, then a shorter last one), so after an empty lattice "
    "every later one is empty too; an empty lattice adds nothing to the counts"
)

LENGTH = 'length = torch.clamp(torch.div(seg_stop - seg_start - offset + rate - 1, rate, rounding_mode="floor"), min=0)'
TUNING = (
    "performance-only: a constant of the row grouping's cost model; every grouping gives the same attention "
    "(tests/test_mutation_blocks.py checks the search at set overheads) and experiments/ab_row_groups.py measures "
    "the speed"
)
SAME_AXIS = "inserting the size-1 axis at 2 or at 3 of (B, n, 1, b) gives the same (B, n, 1, 1, b)"
MERGE_SLICE = (
    "performance-only: the untracked merge runs a slice of queries at a time and merges every query on its own, so "
    "the slice length changes the peak memory only"
)
ASSEMBLY = (
    "performance-only: the choice between assembling in place piece by piece and out of place in one concatenation "
    "(and between the sliced and the whole merge); both give the same values and gradients, only the peak memory "
    "differs, which experiments/memory.py measures (tests measure no memory, by the team's rule)"
)
ONE_PART = (
    "one part through merge_all takes merge_all's own shortcut for one partial (and the float64 round trip of the "
    "part is exact); index -1 of one part is index 0"
)
TRITON_INSTALLED = (
    "unreachable where the suite runs: `make install` installs triton (the gpu extra), so the import never fails "
    "and the handler's exception type is never consulted"
)
GRAD_FACT = (
    "needs_grad changes only flex's reasons, auto never considers flex (AUTO_PREFERENCE is triton, torch) and an "
    "explicit name comes back unchanged: the name returned is the same either way"
)

TRITON_IMPORT = "except ImportError as error:  # pragma: no cover - exercised only where triton is not installed"
RESOLVE = (
    "def resolve_backend(backend: str, device, *, sparse_config=None, head_dim=None, dtype=None, needs_grad=False) "
    "-> str:"
)
BUCKET = "bucket = torch.where(counts > 0, torch.floor(torch.log2(counts.clamp(min=1).double())).long(), -1)"
EMPTY_LABEL = (
    "rows without key blocks keep a bucket of their own: -2 (like -1) is the label of no row with a key block, and "
    "the logarithm clamped at 0 instead of 1 is read only where counts > 0"
)
BEST = 'best = [(0.0, 0)] + [(float("inf"), 0)] * (len(cuts) - 1)'  # optimized/blocks.py, the cover search
# The Triton kernels read a record's first column, the lattice start, at meta + 0.
LATTICE_COLUMN = "the column is 0 (LATTICE_START = 0 in WorkItem and WeightBlock): meta - 0 is meta + 0"
TRITON_ITEM_START = "lattice_start = tl.load(meta + ITEM_LATTICE_START)"
TRITON_WEIGHT_START = "lattice_start = tl.load(meta + WEIGHT_LATTICE_START)"
RING_LAST_STEP = "return max(self.chunk_last_step, default=0)"
WEIGHTS_STEP = "step = max(1, work_size // max(1, batch * nh))"
WEIGHTS_DEFINITION = (
    "def attention_weights(q, k, key_padding_mask, lse, plan: CallPlan, work_size: int = 4096) -> "
    "SparseAttentionWeights:"
)
WEIGHTS_COO = (
    'return torch.sparse_coo_tensor(indices, values.reshape(-1), self["shape"], check_invariants=False).coalesce()'
)

ROWS_PER_GROUP = "return max(1, work_size // max(1, batch * num_heads))"
MAX_COUNT = "max_count = int(count.max()) if count.numel() else 0"
GROUP_RANGES = "ranges = tuple(row_groups(table, group, blocks_per_row=batch * len(table.heads)))"
TORCH_PARTIAL_FORWARD = "def partial_forward(q, k, v, key_padding_mask, plan: CallPlan, work_size: int = 4096):"
KEEP = "keep = q_valid.reshape(-1).nonzero().squeeze(1)"
STATIC_METHOD = (
    "torch looks forward and backward up on the class (Function.apply: cls.forward; the graph node: "
    "_forward_cls.backward), where a function without @staticmethod is the same plain function, called with "
    "the same arguments"
)
DENSE_LOGITS = "logits = (scores + torch.log(counts.to(dtype))).masked_fill(row_empty, 0.0)"
MODULE_RESULTS = "return results[0] if len(results) == 1 else results"
RING_RESULTS = "return result.results[0] if len(result.results) == 1 else result.results"
ZERO_TIE = "out = out + sum(t.sum() for t in (q, k, v)).to(out.dtype) * 0.0"
KV_ACCUMULATE = "self.dkdv(launch, dk, dv, accumulate=not single_kv_writer and index > 0)"
SINGLE_KV_WRITER = "single_kv_writer = len(kv_rounds) == 1 and len(kv_rounds[0]) == 1 and _distinct(kv_launches)"

EQUIVALENT: tuple[Equivalent, ...] = (
    *_same(
        "optimized/triton_backend.py",
        TRITON_INSTALLED,
        (
            "ExceptionReplacer",
            "except ImportError as error:  # pragma: no cover - triton is a dependency of the gpu extra",
            "except CosmicRayTestingException as error:  # pragma: no cover - triton is a dependency of the gpu extra",
        ),
    ),
    *_same(
        "optimized/blocks.py",
        EMPTY_LABEL,
        ("ReplaceUnaryOperator_USub_Invert", BUCKET, BUCKET.replace("long(), -1)", "long(), ~1)")),
        ("NumberReplacer", BUCKET, BUCKET.replace("long(), -1)", "long(), - 2)")),
        ("NumberReplacer", BUCKET, BUCKET.replace("clamp(min=1)", "clamp(min= 0)")),
    ),
    *_same(
        "optimized/blocks.py",
        TUNING,
        ("NumberReplacer", "STEP_OVERHEAD_BLOCKS = 256", "STEP_OVERHEAD_BLOCKS = 257"),
        ("NumberReplacer", "STEP_OVERHEAD_BLOCKS = 256", "STEP_OVERHEAD_BLOCKS = 255"),
    ),
    *_same(
        "optimized/blocks.py",
        SAME_AXIS,
        (
            "NumberReplacer",
            "allowed = gather_key_padding(key_padding_mask, k_index, k_valid).unsqueeze(2).unsqueeze(3)",
            "allowed = gather_key_padding(key_padding_mask, k_index, k_valid).unsqueeze(2).unsqueeze( 2)",
        ),
    ),
    *_same(
        "optimized/blocks.py",
        MERGE_SLICE,
        ("NumberReplacer", "MERGE_QUERIES = 4096", "MERGE_QUERIES = 4097"),
        ("NumberReplacer", "MERGE_QUERIES = 4096", "MERGE_QUERIES = 4095"),
    ),
    *_same(
        "optimized/blocks.py",
        ASSEMBLY,
        ("ReplaceUnaryOperator_Delete_Not", "if not tracked:", "if  tracked:"),
        ("AddNot", "if not tracked:", "if not not tracked:"),
        ("ReplaceAndWithOr", "tracked = torch.is_grad_enabled() and any(", "tracked = torch.is_grad_enabled() or any("),
        (
            "ReplaceOrWithAnd",
            "piece[2].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
            "piece[2].requires_grad and piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
        ),
        (
            "NumberReplacer",
            "piece[2].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
            "piece[ 3].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
        ),
        (
            "NumberReplacer",
            "piece[2].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
            "piece[ 1].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
        ),
        (
            "NumberReplacer",
            "piece[2].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces",
            "piece[2].requires_grad or piece[ 2].requires_grad for pieces in self.layers.values() for piece in pieces",
        ),
        ("AddNot", "if tracked:", "if not tracked:"),
    ),
    *_same(
        "optimized/blocks.py",
        ONE_PART,
        ("NumberReplacer", "if len(parts) == 1:", "if len(parts) == 0:"),
        ("NumberReplacer", "return parts[0]", "return parts[ -1]"),
    ),
    *_same(
        "optimized/dispatch.py",
        TRITON_INSTALLED,
        (
            "ExceptionReplacer",
            TRITON_IMPORT,
            TRITON_IMPORT.replace("ImportError", "CosmicRayTestingException"),
        ),
    ),
    *_same(
        "optimized/dispatch.py",
        GRAD_FACT,
        (
            "ReplaceFalseWithTrue",
            RESOLVE,
            RESOLVE.replace("needs_grad=False", "needs_grad=True"),
        ),
    ),
    *_same(
        "reference/semantics.py",
        LATTICE,
        (
            "NumberReplacer",
            "return max(0, cdiv(segment_length - offset, dilation_rate))",
            "return max( -1, cdiv(segment_length - offset, dilation_rate))",
        ),
    ),
    *_same(
        "reference/semantics.py",
        EMPTY_RANGE,
        (
            "NumberReplacer",
            "return range(members[0], members[-1] + 1) if members else range(0)",
            "return range(members[0], members[-1] + 1) if members else range( -1)",
        ),
    ),
    *_same(
        "reference/semantics.py",
        CACHE,
        ("RemoveDecorator", "@functools.lru_cache(maxsize=256)", ""),
        ("RemoveDecorator", "@functools.lru_cache(maxsize=256)", ""),
        ("RemoveDecorator", "@functools.lru_cache(maxsize=1024)", ""),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 257)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 255)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 257)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 255)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=1024)", "@functools.lru_cache(maxsize= 1025)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=1024)", "@functools.lru_cache(maxsize= 1023)"),
    ),
    *_same(
        "reference/semantics.py",
        SQUARE,
        ("NumberReplacer", "if layout.shape[0] < nb:", "if layout.shape[ 1] < nb:"),
        ("NumberReplacer", "if layout.shape[0] < nb:", "if layout.shape[ -1] < nb:"),
    ),
    *_same(
        "reference/semantics.py",
        ONE_DIMENSIONAL,
        ("NumberReplacer", "row_ptr[1:] = torch.cumsum(counts, 0)", "row_ptr[1:] = torch.cumsum(counts, -1)"),
        ("NumberReplacer", "row_ptr[1:] = torch.cumsum(row_counts, 0)", "row_ptr[1:] = torch.cumsum(row_counts, -1)"),
    ),
    *_same(
        "reference/semantics.py",
        UNIQUE_ORDER,
        (
            "ReplaceTrueWithFalse",
            "order = torch.sort(table.query_block[rows], stable=True).indices",
            "order = torch.sort(table.query_block[rows], stable=False).indices",
        ),
    ),
    *_same(
        "reference/semantics.py",
        CHUNK_CLAMP,
        (
            "NumberReplacer",
            'first_t = torch.clamp(torch.div(lo - lattice_start + stride - 1, stride, rounding_mode="floor"), min=0)',
            'first_t = torch.clamp(torch.div(lo - lattice_start + stride - 1, stride, rounding_mode="floor"), min= -1)',
        ),
        (
            "NumberReplacer",
            'torch.clamp(torch.div(hi - lattice_start + stride - 1, stride, rounding_mode="floor"), min=0),',
            'torch.clamp(torch.div(hi - lattice_start + stride - 1, stride, rounding_mode="floor"), min= -1),',
        ),
    ),
    *_same(
        "reference/semantics.py",
        LENGTH_CLAMP,
        (
            "NumberReplacer",
            LENGTH,
            LENGTH.replace("min=0)", "min= -1)"),
        ),
    ),
    *_same(
        "reference/semantics.py",
        KEPT_LENGTH,
        (
            "ReplaceComparisonOperator_Gt_GtE",
            "kept = (length > 0) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
            "kept = (length >= 0) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
        ),
        (
            "NumberReplacer",
            "kept = (length > 0) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
            "kept = (length > -1) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
        ),
    ),
    *_same(
        "reference/semantics.py",
        KEPT_QUERY,
        (
            "ReplaceComparisonOperator_Gt_GtE",
            "kept = (length > 0) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
            "kept = (length > 0) & (q_stop >= q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)",
        ),
    ),
    *_same(
        "reference/semantics.py",
        GROUP_ORDER,
        (
            "NumberReplacer",
            "for nb in sorted(set(num_blocks[kept].tolist()), key=lambda n: int((num_blocks == n).nonzero()[0])):",
            "for nb in sorted(set(num_blocks[kept].tolist()), key=lambda n: int((num_blocks == n).nonzero()[ -1])):",
        ),
    ),
    *_same(
        "reference/semantics.py",
        EMPTY_LATTICE,
        ("NumberReplacer", "if length == 0:", "if length == -1:"),
        ("ReplaceContinueWithBreak", "continue", "break"),
    ),
    *_same(
        "optimized/blocks.py",
        "every cover's cost starts from best[0]'s: a constant added to every candidate, whose costs are exact integers "
        "in floating point, never changes the cheapest",
        ("NumberReplacer", BEST, BEST.replace("[(0.0, 0)]", "[( 1.0, 0)]")),
        ("NumberReplacer", BEST, BEST.replace("[(0.0, 0)]", "[( -1.0, 0)]")),
    ),
    *_same(
        "optimized/blocks.py",
        "the walk back through best stops at index 0, so best[0]'s start index is never read",
        ("NumberReplacer", BEST, BEST.replace("[(0.0, 0)]", "[(0.0, 1)]")),
        ("NumberReplacer", BEST, BEST.replace("[(0.0, 0)]", "[(0.0, -1)]")),
    ),
    *_same(
        "optimized/blocks.py",
        "a placeholder (inf, start) is overwritten for every index >= 1 before it is read",
        ("NumberReplacer", BEST, BEST.replace('[(float("inf"), 0)]', '[(float("inf"), 1)]')),
        ("NumberReplacer", BEST, BEST.replace('[(float("inf"), 0)]', '[(float("inf"), -1)]')),
    ),
    *_same(
        "optimized/blocks.py",
        "entries of best past the last cut are never written or read",
        ("ReplaceBinaryOperator_Sub_Add", BEST, BEST.replace("(len(cuts) - 1)", "(len(cuts) + 1)")),
        ("NumberReplacer", BEST, BEST.replace("(len(cuts) - 1)", "(len(cuts) - 0)")),
    ),
    *_same(
        "reference/config.py",
        SQUARE,
        (
            "NumberReplacer",
            "if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[0] == 0:",
            "if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[ 1] == 0:",
        ),
        (
            "NumberReplacer",
            "if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[0] == 0:",
            "if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[ -1] == 0:",
        ),
        (
            "NumberReplacer",
            'object.__setattr__(self, "layout_fingerprint", f"{layout.shape[0]}:{digest}")',
            'object.__setattr__(self, "layout_fingerprint", f"{layout.shape[ 1]}:{digest}")',
        ),
        (
            "NumberReplacer",
            'object.__setattr__(self, "layout_fingerprint", f"{layout.shape[0]}:{digest}")',
            'object.__setattr__(self, "layout_fingerprint", f"{layout.shape[ -1]}:{digest}")',
        ),
    ),
    *_same(
        "reference/config.py",
        "sparsity_ratio <= 1 is validated, so 1 / ratio >= 1 and round(1 / ratio) >= 1: a floor of 0 never binds",
        (
            "NumberReplacer",
            "return max(1, round(1.0 / float(self.sparsity_ratio)))",
            "return max( 0, round(1.0 / float(self.sparsity_ratio)))",
        ),
    ),
    *_same(
        "reference/merge.py",
        "one partial through the general merge: its weight exp(lse - lse) is exactly 1 (an empty row's out is 0), "
        "the total 1 and lse + log(1) = lse, so the same tensors come back",
        ("NumberReplacer", "if len(outs) == 1:", "if len(outs) == 0:"),
    ),
    *_same(
        "reference/merge.py",
        "the shortcut is taken for a list of one partial, where index -1 is index 0",
        ("NumberReplacer", "return outs[0], lses[0]", "return outs[ -1], lses[0]"),
        ("NumberReplacer", "return outs[0], lses[0]", "return outs[0], lses[ -1]"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: a threshold of the 'auto' read variant, from the H200 A/B (experiments/NOTES_gpu.md); every "
        "variant computes the same attention (tests/test_triton_backend.py::test_kernel_variants_match_reference) and "
        "tests/test_mutation_triton.py checks that each launch reads as the variant picked names",
        (
            "NumberReplacer",
            "AUTO_RUNS_MIN_RUN = 3.0  # ... at which v3 beat v2 (local_window: ~5; dilated_sparse / random: ~1-2)",
            "AUTO_RUNS_MIN_RUN = 2.0  # ... at which v3 beat v2 (local_window: ~5; dilated_sparse / random: ~1-2)",
        ),
        (
            "NumberReplacer",
            "AUTO_TMA_MIN_RUN = 8.0  # mean full blocks per run at which v3tma beat v3 (dense: 16 blocks per row)",
            "AUTO_TMA_MIN_RUN = 7.0  # mean full blocks per run at which v3tma beat v3 (dense: 16 blocks per row)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only on the H200: float32 then gets the half-precision tiles ((128, 64), 4 or 8 warps, 3 "
        "stages) and half precision the float32 one; any tile computes the same attention (tests/"
        "test_triton_backend.py::test_sub_tiles_and_padded_head_dim) and these compile, for sm_90 with triton 3.9 "
        "(forward kernel, every mask on, run and TMA reads), to at most 229,888 bytes of shared memory (float32, "
        "D = 128) of the 232,448 a block may use; a GPU with less shared memory per block would refuse that launch",
        ("AddNot", "if dtype == torch.float32:", "if not dtype == torch.float32:"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the first sort only groups the entries: all full (or all masked) entries of one row share one key, so the "
        "stable sort keeps each group contiguous and in ascending key blocks whatever the keys of other rows; the "
        "runs are found within a row's full entries, the chosen one is the first longest in that order, and the "
        "second stable sort by (row, category) puts the rows in order: the same entry order, run_block and run_count",
        (
            "ReplaceBinaryOperator_Mul_Div",
            "first = torch.sort(entry_row * 2 + (~full).long(), stable=True).indices",
            "first = torch.sort(entry_row / 2 + (~full).long(), stable=True).indices",
        ),
        (  # keys 2r (full) and 2r - 1 (masked): still one key per group of a row, the masked group first
            "ReplaceBinaryOperator_Add_Sub",
            "first = torch.sort(entry_row * 2 + (~full).long(), stable=True).indices",
            "first = torch.sort(entry_row * 2 - (~full).long(), stable=True).indices",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "every row's query block holds a point of the query chunk (reference.semantics.block_table keeps the rows "
        "q_first..q_stop only) and that point lies in the row's zone (from its block's first point, or the segment's "
        "start, to its last point + stride, within the segment): each zone's length inside the chunk is >= 1, so "
        "the clamp at 0 (or -1) never binds",
        ("NumberReplacer", "min=0,", "min= -1,"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the fill of k's padded head-dim columns meets q's, loaded as 0.0 under the same d_ok mask: each score "
        "gains 0 * 1.0 = 0 per padded column",
        (
            "NumberReplacer",
            "k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)",
            "k = tl.load(k_ptrs, mask=d_ok[None, :], other= 1.0)",
        ),
        (
            "NumberReplacer",
            "k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=d_ok[None, :], other=0.0)",
            "k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=d_ok[None, :], other= 1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "v's fill lands in the padded head-dim columns of acc only (v never enters the scores), and out is stored "
        "under o_mask = q_ok & d_ok, which leaves those columns unwritten",
        (
            "NumberReplacer",
            "v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)",
            "v = tl.load(v_ptrs, mask=d_ok[None, :], other= 1.0)",
        ),
        (
            "NumberReplacer",
            "v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=d_ok[None, :], other=0.0)",
            "v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=d_ok[None, :], other= 1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "q's fill: lanes outside q_ok are rows no store writes (out and lse are stored under q_ok), each row's "
        "softmax its own; in padded head-dim columns it meets k's zero fill (every k load fills them with 0.0, and "
        "a tensor descriptor's reads past HEAD_DIM give 0): -1 * 0 = 0",
        (
            "NumberReplacer",
            "q = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)",
            "q = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other= -1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the fill of the slots past the row's list is never picked: step // N_SUB < full_stop - list_start, a slot "
        "loaded under the mask, and the where zeroes every other slot before the sum",
        (
            "NumberReplacer",
            "row_blocks = tl.load(KeyBlock + list_start + slots, mask=slots < full_stop - list_start, other=0)",
            "row_blocks = tl.load(KeyBlock + list_start + slots, mask=slots < full_stop - list_start, other= -1)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the tensor descriptors (v3tma) are read only at full blocks, whose every point t lies in [first_t, stop_t), "
        "at [t - first_t] from row0 = the row of first_t: a first_t up to two lattice points lower (still >= 0), or "
        "a larger row count, moves the descriptor's start and bound but no read, which lands on the same row of k "
        "and v and never reaches the bound (the interpreter runs v3tma: tests/test_triton_backend.py::"
        "test_kernel_variants_match_reference)",
        (
            "ReplaceBinaryOperator_Add_Sub",
            "first_t = tl.maximum((k_lo - lattice_start + stride - 1) // stride, 0)",
            "first_t = tl.maximum((k_lo - lattice_start - stride - 1) // stride, 0)",
        ),
        (
            "ReplaceBinaryOperator_Sub_Add",
            "rows = tl.maximum(stop_t - first_t, 1)",
            "rows = tl.maximum(stop_t + first_t, 1)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "both sides of the static loop run for every gap and store the same constants (out 0, lse -inf): swapping "
        "which side runs first stores the same values at the same positions",
        ("ReplaceComparisonOperator_Eq_NotEq", "if side == 0:", "if side != 0:"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "idx_g is read only by the two stores masked with g_ok: a lane where g_ok is false stores nothing, whatever "
        "index (0 or -1) it holds",
        (
            "NumberReplacer",
            "idx_g = tl.where(g_ok, pos_g - q_lo, 0).to(tl.int64)",
            "idx_g = tl.where(g_ok, pos_g - q_lo, -1).to(tl.int64)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the strides returned without a mask are never read: the kernels read KPM and its strides only under "
        "HAS_PADDING, which is False then",
        (
            "NumberReplacer",
            "return like, 0, 0, False  # never read: HAS_PADDING is False",
            "return like, -1, 0, False  # never read: HAS_PADDING is False",
        ),
        (
            "NumberReplacer",
            "return like, 0, 0, False  # never read: HAS_PADDING is False",
            "return like, 0, -1, False  # never read: HAS_PADDING is False",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        LATTICE_COLUMN,
        ("ReplaceBinaryOperator_Add_Sub", TRITON_ITEM_START, TRITON_ITEM_START.replace(" + ", " - ")),
        ("ReplaceBinaryOperator_Add_Sub", TRITON_WEIGHT_START, TRITON_WEIGHT_START.replace(" + ", " - ")),
    ),
    *_same(
        "optimized/triton_backward.py",
        LATTICE_COLUMN,
        ("ReplaceBinaryOperator_Add_Sub", TRITON_ITEM_START, TRITON_ITEM_START.replace(" + ", " - ")),
    ),
    *_same(
        "optimized/triton_backward.py",
        "the fill is loaded only on lanes where k_ok is false, and k_ok & (padded == 0) stays false there whatever "
        "the fill",
        (
            "NumberReplacer",
            "padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other=1)",
            "padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other= 2)",
        ),
    ),
    *_same(
        "optimized/triton_backward.py",
        "the fill lands on lanes outside q_mask, which the store under the same mask never writes",
        (
            "NumberReplacer",
            "dq += tl.load(dq_ptrs, mask=q_mask, other=0.0)",
            "dq += tl.load(dq_ptrs, mask=q_mask, other= 1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backward.py",
        "the tile of Triton's interpreter (TRITON_INTERPRET=1, the only case that returns it), which runs each "
        "program as Python and drops num_warps and num_stages (triton.runtime.interpreter.GridExecutor passes the "
        "kernel only its own arguments)",
        ("NumberReplacer", "tile = KernelTile(32, 32, 4, 1)", "tile = KernelTile(32, 32, 4, 2)"),
    ),
    *_same(
        "optimized/triton_backward.py",
        "performance-only: the warps of the GPU tile at block_d = 128 (4 or 8, both powers of two Triton compiles; "
        "tests/test_mutation_triton.py checks every default tile), and any tile computes the same gradients",
        ("ReplaceComparisonOperator_GtE_Gt", "warps = 8 if block_d >= 128 else 4", "warps = 8 if block_d > 128 else 4"),
    ),
    *_same(
        "optimized/triton_backward.py",
        "torch looks forward and backward up on the class (Function.apply: cls.forward; the graph node: "
        "_forward_cls.backward), where a function without @staticmethod is the same plain function, called with "
        "the same arguments",
        ("RemoveDecorator", "@staticmethod", ""),
    ),
    *_same(
        "reference/ring_schedule.py",
        "chunk_last_step has one entry per chunk and every schedule has a chunk (ring_schedule and zigzag_schedule "
        "refuse an empty chunk list), so max never falls back to its default",
        ("NumberReplacer", RING_LAST_STEP, RING_LAST_STEP.replace("default=0", "default= 1")),
        ("NumberReplacer", RING_LAST_STEP, RING_LAST_STEP.replace("default=0", "default= -1")),
    ),
    *_same(
        "reference/ring_schedule.py",
        "at step 0 the comprehension below is empty anyway: travels(c, 0) is false for every chunk (a transfer "
        "counts from 1), so returning early at step < 0 only gives the same () by another way",
        ("NumberReplacer", "if step < 1:", "if step < 0:"),
        ("ReplaceComparisonOperator_Lt_LtE", "if step < 1:", "if step <= 0:"),
    ),
    *_same(
        "reference/ring_schedule.py",
        "a shortcut: an empty query or key range holds no block pair, so block_tables below answers False too "
        "(tests/test_ring.py::test_pair_is_active_rejects_empty_chunks_and_later_keys_under_causal asks both ways)",
        ("ReplaceComparisonOperator_LtE_Lt", "if q1 <= q0 or k1 <= k0:", "if q1 < q0 or k1 <= k0:"),
        ("ReplaceComparisonOperator_LtE_Lt", "if q1 <= q0 or k1 <= k0:", "if q1 <= q0 or k1 < k0:"),
        ("ReplaceOrWithAnd", "if q1 <= q0 or k1 <= k0:", "if q1 <= q0 and k1 <= k0:"),
    ),
    *_same(
        "optimized/weights.py",
        "a policy value: the size above which to_dense asks for allow_large; no result depends on it, and "
        "tests/test_mutation_weights.py checks the rule at whatever value it has",
        ("NumberReplacer", "DENSE_ELEMENT_LIMIT = 1 << 28", "DENSE_ELEMENT_LIMIT = 2 << 28"),
        ("NumberReplacer", "DENSE_ELEMENT_LIMIT = 1 << 28", "DENSE_ELEMENT_LIMIT = 1 << 29"),
        ("NumberReplacer", "DENSE_ELEMENT_LIMIT = 1 << 28", "DENSE_ELEMENT_LIMIT = 1 << 27"),
    ),
    *_same(
        "optimized/weights.py",
        "performance-only: how many entries one slice takes (>= 1 either way; batch * nh >= 1, so max(0, x) is x); "
        "tests/test_mutation_weights.py checks that slices of one entry give the same weights as one slice",
        ("NumberReplacer", WEIGHTS_STEP, WEIGHTS_STEP.replace("max(1, work_size", "max( 2, work_size")),
        ("NumberReplacer", WEIGHTS_STEP, WEIGHTS_STEP.replace("max(1, batch", "max( 2, batch")),
        ("NumberReplacer", WEIGHTS_STEP, WEIGHTS_STEP.replace("max(1, batch", "max( 0, batch")),
        ("NumberReplacer", WEIGHTS_DEFINITION, WEIGHTS_DEFINITION.replace("= 4096", "= 4097")),
        ("NumberReplacer", WEIGHTS_DEFINITION, WEIGHTS_DEFINITION.replace("= 4096", "= 4095")),
    ),
    *_same(
        "optimized/weights.py",
        "an empty table gives an empty loop (range(0, 0)) and adds nothing: skipping it only saves its device copy",
        ("NumberReplacer", "if table.nnz == 0:", "if table.nnz == -1:"),
    ),
    *_same(
        "optimized/weights.py",
        "check_invariants only validates the indices (in range, by construction here) at a cost; the tensor is "
        "the same",
        (
            "ReplaceFalseWithTrue",
            WEIGHTS_COO,
            WEIGHTS_COO.replace("check_invariants=False", "check_invariants=True"),
        ),
    ),
    *_same(
        "reference/ring_schedule.py",
        CACHE,
        ("RemoveDecorator", "@functools.lru_cache(maxsize=256)", ""),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 257)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 255)"),
    ),
    *_same(
        "optimized/triton_backward.py",
        "a placeholder: without padding (the only case that runs this line) _gradient_terms gets MASKED = "
        "HAS_PADDING = False, a compile-time constant, and never reads its allowed argument",
        ("NumberReplacer", "key_ok = n_off >= 0", "key_ok = n_off >= 1"),
        ("NumberReplacer", "key_ok = n_off >= 0", "key_ok = n_off >= -1"),
        ("ReplaceComparisonOperator_GtE_Gt", "key_ok = n_off >= 0", "key_ok = n_off > 0"),
        ("ReplaceComparisonOperator_GtE_Lt", "key_ok = n_off >= 0", "key_ok = n_off < 0"),
        ("ReplaceComparisonOperator_GtE_LtE", "key_ok = n_off >= 0", "key_ok = n_off <= 0"),
        ("ReplaceComparisonOperator_GtE_Eq", "key_ok = n_off >= 0", "key_ok = n_off == 0"),
        ("ReplaceComparisonOperator_GtE_NotEq", "key_ok = n_off >= 0", "key_ok = n_off != 0"),
    ),
    *_same(
        "optimized/triton_backward.py",
        "performance-only: the software pipeline depth of the dq tile at D >= 128 changes when loads are issued, "
        "not what is computed (the interpreter ignores stages; on a GPU a depth beyond its shared memory would "
        "refuse to launch, which no CPU test can see: the H200 sweep of experiments/tune_backward.py picks it)",
        (
            "NumberReplacer",
            "dq = KernelTile(128, 64, 8, 3) if block_d >= 128 else KernelTile(64, 64, 4, 3)",
            "dq = KernelTile(128, 64, 8, 4) if block_d >= 128 else KernelTile(64, 64, 4, 3)",
        ),
    ),
    *_same(
        "optimized/triton_backward.py",
        "where the launches add up (not single_kv_writer) dk and dv start as zero-filled float32 buffers: the first "
        "launch adding what it finds gives x + 0 = x, what storing x gives; only one load more",
        (
            "NumberReplacer",
            KV_ACCUMULATE,
            KV_ACCUMULATE.replace("index > 0", "index > -1"),
        ),
    ),
    *_same(
        "optimized/triton_backward.py",
        "memory-only: single_kv_writer only picks between writing dk, dv in place in k's dtype and a zero-filled "
        "float32 buffer cast to k's dtype at the end. Where the mutant clears it (one step) the launches still "
        "write each element once, x + 0 = x, and the one cast rounds as the kernel's store does; where it sets it "
        "(two steps) _distinct still holds over all their launches: no two launches write one kv head, none adds up",
        ("NumberReplacer", SINGLE_KV_WRITER, SINGLE_KV_WRITER.replace("len(kv_rounds) == 1", "len(kv_rounds) == 2")),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: a threshold of the 'auto' read variant (as AUTO_RUNS_MIN_RUN's own mutants): a launch "
        "whose mean run is exactly the threshold reads by pointer runs or from its list, with the same attention",
        (
            "ReplaceComparisonOperator_GtE_Gt",
            "if launch.mean_run >= AUTO_RUNS_MIN_RUN:",
            "if launch.mean_run > AUTO_RUNS_MIN_RUN:",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: the table cache's byte bound; a table rebuilt after eviction equals the cached one, and "
        "tests/test_mutation_triton.py checks that the cache keeps to whatever bound is set",
        ("NumberReplacer", "TABLE_CACHE_BYTES = 512 << 20", "TABLE_CACHE_BYTES = 513 << 20"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: whether a row list of 257 listed blocks sits in registers (a 512-slot list) or is "
        "loaded per step; both index modes compute the same attention (tests/test_triton_backend.py::"
        "test_kernel_variants_match_reference), only registers and speed differ",
        ("NumberReplacer", "MAX_REGISTER_ENTRIES = 256", "MAX_REGISTER_ENTRIES = 257"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: another of the tile sweep's half-precision tiles (experiments/NOTES_gpu.md, Version 1) "
        "at some head dims; each has power-of-two sides dividing the block and warps Triton compiles "
        "(tests/test_mutation_triton.py), fits the H200's shared memory (at most 131,080 of 232,448 bytes, "
        "compiled for sm_90 with triton 3.9) and computes the same attention",
        ("AddNot", "if block_d >= 256:", "if not block_d >= 256:"),
        ("ReplaceComparisonOperator_GtE_Lt", "if block_d >= 128:", "if block_d < 128:"),
        (
            "NumberReplacer",
            "return TileConfig(min(block_size, 128), min(block_size, 64), 8, 3)",
            "return TileConfig(min(block_size, 128), min(block_size, 64), 8, 2)",
        ),
        # D = 256 then takes the (128, 64) 8-warp tile, as under `not block_d >= 256`.
        ("NumberReplacer", "if block_d >= 256:", "if block_d >= 257:"),
        ("AddNot", "if block_d >= 128:", "if not block_d >= 128:"),  # the same tiles as `block_d < 128`
        (  # one stage less than a tile that fits: less shared memory
            "NumberReplacer",
            "return TileConfig(min(block_size, 128), min(block_size, 64), 4, 3)",
            "return TileConfig(min(block_size, 128), min(block_size, 64), 4, 2)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the tile of Triton's interpreter (TRITON_INTERPRET=1, the only case that returns it), which runs each "
        "program as Python and drops num_warps and num_stages (triton.runtime.interpreter.GridExecutor passes the "
        "kernel only its own arguments)",
        (
            "NumberReplacer",
            "return TileConfig(min(block_size, 64), min(block_size, 64), 4, 1)",
            "return TileConfig(min(block_size, 64), min(block_size, 64), 4, 2)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: the pipeline depth of the GPU tile for float32 (and half precision at D = 256) changes "
        "when loads are issued, not what is computed (the interpreter drops num_stages). Not compiled with 3 "
        "stages on the H200; its buffers at D = 256 (q 64 x 256, a k or v step 32 x 256, float32) have the bytes "
        "of the (128, 64) 3-stage tile at D = 128 that float32 compiled to 229,888 of the 232,448 bytes a block "
        "may use (the `dtype == torch.float32` entry above); the same line for half precision at D = 256 holds "
        "half those bytes",
        (
            "NumberReplacer",
            "return TileConfig(min(block_size, 64), min(block_size, 32), 4, 2)",
            "return TileConfig(min(block_size, 64), min(block_size, 32), 4, 3)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: the launch order of the work items (which item_order sets: longest_first and by_lattice "
        "give the same items in another order); each item's programs write only their own (row block, head) "
        "points, disjoint from every other item of the launch, so the order of items with equal counts changes no "
        "value",
        (
            "ReplaceTrueWithFalse",
            "items = items[torch.sort(counts, descending=True, stable=True).indices]",
            "items = items[torch.sort(counts, descending=True, stable=False).indices]",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "a scatter over a 1-D tensor: dimension -1 is dimension 0",
        (
            "NumberReplacer",
            "head_of_run = torch.zeros(runs, dtype=torch.long).scatter_reduce(\n"
            '0, run_id, torch.arange(n), reduce="amin", include_self=False',
            "head_of_run = torch.zeros(runs, dtype=torch.long).scatter_reduce("
            ' -1, run_id, torch.arange(n), reduce="amin", include_self=False',
        ),
        (
            "NumberReplacer",
            'longest = torch.zeros(rows, dtype=torch.long).scatter_reduce(0, run_row, length, reduce="amax", '
            "include_self=True)",
            'longest = torch.zeros(rows, dtype=torch.long).scatter_reduce( -1, run_row, length, reduce="amax", '
            "include_self=True)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "chosen starts at runs, above every run index (0..runs - 1): including it in the minimum changes no row "
        "that a candidate reaches, and scatter_reduce leaves the rows no candidate reaches at runs either way",
        (
            "ReplaceTrueWithFalse",
            '0, run_row[candidate], torch.arange(runs)[candidate], reduce="amin", include_self=True',
            '0, run_row[candidate], torch.arange(runs)[candidate], reduce="amin", include_self=False',
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "run_block of a row without a run goes with run_count 0, and the kernels read run_block only to place the "
        "pointers (or descriptor offsets) of a run loop of run_count steps: none, so nothing is loaded from them",
        (
            "NumberReplacer",
            "run_block = torch.where(has_run, kb_s[head_of_run[chosen_safe]], 0)",
            "run_block = torch.where(has_run, kb_s[head_of_run[chosen_safe]], 1)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "with 3 for masked entries, row r's masked entries get the key 3r + 3 of row r + 1's run entries, which "
        "follow them in the (row-sorted) first order: the stable sort gives the same order",
        (
            "NumberReplacer",
            "category = torch.where(in_run, 0, torch.where(full_s, 1, 2))",
            "category = torch.where(in_run, 0, torch.where(full_s, 1, 3))",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "a shortcut: with entries but no full one the general path finds one run per entry, each of length 0 "
        "(bincount counts full ones only), so no candidate: run_block and run_count stay 0, every entry gets "
        "category 2 and the stable second sort keeps the (row-sorted) first order",
        ("ReplaceOrWithAnd", "if n == 0 or not bool(full_s.any()):", "if n == 0 and not bool(full_s.any()):"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "a placeholder: the HEAD column of every record is overwritten with the table's heads two lines below "
        "(per_head[:, :, WorkItem.HEAD], or WeightBlock.HEAD for the weights, = torch.arange(...))",
        ("NumberReplacer", "head=0,  # set per head below", "head= 1,  # set per head below"),
        ("NumberReplacer", "head=0,", "head= 1,"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "a run of masked entries has length 0 (bincount counts full ones only); with length > -1 a row without full "
        "blocks picks one as its run: run_count stays 0, and run_block is read only by a run loop of run_count "
        "steps (none), so the tables and results are the same",
        (
            "NumberReplacer",
            "candidate = (length == longest[run_row]) & (length > 0)",
            "candidate = (length == longest[run_row]) & (length > -1)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "with -1 for the run, row r's run entries get the key 3r - 1 of row r - 1's masked entries, which precede "
        "them in the (row-sorted) first order: the stable sort gives the same order",
        (
            "NumberReplacer",
            "category = torch.where(in_run, 0, torch.where(full_s, 1, 2))",
            "category = torch.where(in_run, -1, torch.where(full_s, 1, 2))",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "mean_run of a launch without full blocks is read only by _auto_variant, where 0 and -1 both lie below "
        "every threshold (v2 either way)",
        (
            "NumberReplacer",
            "mean_run = float(run_count[has_full].double().mean()) if bool(has_full.any()) else 0.0",
            "mean_run = float(run_count[has_full].double().mean()) if bool(has_full.any()) else -1.0",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "stop_t is read only by rows = max(stop_t - first_t, 1); a floor of 1 instead of 0 changes stop_t only "
        "where the lattice starts at or after the key chunk's end, where first_t is 0 and rows is 1 either way",
        (
            "NumberReplacer",
            "stop_t = tl.minimum(tl.maximum((k_hi - lattice_start + stride - 1) // stride, 0), lattice_len)",
            "stop_t = tl.minimum(tl.maximum((k_hi - lattice_start + stride - 1) // stride, 1), lattice_len)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the slots past the row's list are loaded but never picked (the loop picks slots below full_stop - "
        "list_start), so the attention is the same; the wider mask may read past the end of KeyBlock, which no "
        "test can see (the interpreter reads host memory; on a GPU it is an out-of-bounds read of an int32 list)",
        (
            "ReplaceBinaryOperator_Sub_Add",
            "row_blocks = tl.load(KeyBlock + list_start + slots, mask=slots < full_stop - list_start, other=0)",
            "row_blocks = tl.load(KeyBlock + list_start + slots, mask=slots < full_stop + list_start, other=0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "idx_k of a lane where k_ok is false is read only by loads masked with k_ok (k, v, the padding mask)",
        (
            "NumberReplacer",
            "idx_k = tl.where(k_ok, pos_k - k_lo, 0).to(tl.int64)",
            "idx_k = tl.where(k_ok, pos_k - k_lo, 1).to(tl.int64)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "idx_q of a lane where q_ok is false is read only by loads and stores masked with q_ok (q; the old out and "
        "lse, out and lse)",
        (
            "NumberReplacer",
            "idx_q = tl.where(q_ok, pos_q - q_shift, 0).to(tl.int64)",
            "idx_q = tl.where(q_ok, pos_q - q_shift, -1).to(tl.int64)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "m_new is -inf only where m_i and every score of the row are -inf: exp2(-inf - c) = 0 for any finite shift "
        "c, so alpha and p are 0 with a shift of 1 as with 0",
        (
            "NumberReplacer",
            'm_shift = tl.where(m_new == float("-inf"), 0.0, m_new)',
            'm_shift = tl.where(m_new == float("-inf"), 1.0, m_new)',
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "where top is -inf both lse are -inf: exp(-inf - c) = 0 for any finite shift c, the total is 0 and the "
        "merged lse -inf, out 0; elsewhere the shift is top",
        (
            "NumberReplacer",
            'top_shift = tl.where(top == float("-inf"), 0.0, top)',
            'top_shift = tl.where(top == float("-inf"), -1.0, top)',
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the inner fallback is taken only where some is false, where the outer where gives -inf",
        (
            "NumberReplacer",
            'lse = tl.where(some, top_shift + tl.log(tl.where(some, total, 1.0)), float("-inf"))',
            'lse = tl.where(some, top_shift + tl.log(tl.where(some, total, 2.0)), float("-inf"))',
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "an inner fallback taken only where the outer where picks its own constant (nonempty or some false: 0 for "
        "the inverse, -inf for lse); the other branch is computed and dropped",
        (
            "NumberReplacer",
            "inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)",
            "inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 0.0), 0.0)",
        ),
        (
            "NumberReplacer",
            "lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, "
            'float("-inf"))',
            "lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 2.0))) * 0.6931471805599453, "
            'float("-inf"))',
        ),
        (
            "NumberReplacer",
            "inv_total = tl.where(some, 1.0 / tl.where(some, total, 1.0), 0.0)",
            "inv_total = tl.where(some, 1.0 / tl.where(some, total, 0.0), 0.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the masked key blocks' fills: a key outside k_ok gets the score -inf from allowed (p = 0, and 0 * -1 = 0 "
        "in p @ v); in padded head-dim columns k meets q's zero fill and v feeds only acc columns the store "
        "(o_mask = q_ok & d_ok) leaves out",
        (
            "NumberReplacer",
            "k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)",
            "k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=kv_mask, other= -1.0)",
        ),
        (
            "NumberReplacer",
            "v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)",
            "v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=kv_mask, other= -1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the fill is loaded only on lanes where k_ok is false, and k_ok & (padded == 0) stays false there whatever "
        "the fill",
        (
            "NumberReplacer",
            "padded = tl.load(KPM + kpm_base + idx_k * stride_mn, mask=k_ok, other=1)",
            "padded = tl.load(KPM + kpm_base + idx_k * stride_mn, mask=k_ok, other= 2)",
        ),
        (
            "NumberReplacer",
            "padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other=1)",
            "padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other= 2)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "side 2 of a static range of 3 takes the else branch: side 1 again, the same constants stored at the same "
        "positions a second time",
        ("NumberReplacer", "for side in tl.static_range(2):", "for side in tl.static_range( 3):"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "idx_q of a lane where q_ok is false is read only by the weights kernel's loads of q and lse, both masked "
        "with q_ok (the probabilities are stored by i, not idx_q)",
        (
            "NumberReplacer",
            "idx_q = tl.where(q_ok, pos_q - q_lo, 0).to(tl.int64)",
            "idx_q = tl.where(q_ok, pos_q - q_lo, 1).to(tl.int64)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the fill replaces lse = -inf, the lse (from the same call's forward) of a row that no key of the plan is "
        "allowed for: allowed is false on that whole row, so its probabilities are 0 whatever the fill; it only "
        "keeps exp away from inf",
        (
            "NumberReplacer",
            'lse = tl.where(lse == float("-inf"), 0.0, lse)',
            'lse = tl.where(lse == float("-inf"), 1.0, lse)',
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "side 1's positions (lattice_start - gap, the segment's points before the lattice) are the same for every "
        "row and hold this head's empty constants (out 0, lse -inf) in any case: with t_q != 0 every program of "
        "the lattice (BLOCK_M >= 16 rows, so some t_q != 0 in each) stores those same constants there instead of "
        "the first row alone, in the first launch, before any merge",
        (
            "ReplaceComparisonOperator_Eq_NotEq",
            "first_row = t_q == 0  # the lattice's first point (one row of one program)",
            "first_row = t_q != 0  # the lattice's first point (one row of one program)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "old_out's fill lands on lanes outside o_mask (each row's merge its own), which the store under the same "
        "mask never writes",
        (
            "NumberReplacer",
            "old_out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)",
            "old_out = tl.load(o_ptrs, mask=o_mask, other= -1.0).to(tl.float32)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the weights kernel's fills of q and k: in padded head-dim columns they meet the other's zeros (0 * 1.0 = "
        "0), and rows or keys off the lattice or outside the chunks get probability 0 from allowed",
        ("NumberReplacer", "other=0.0,", "other= 1.0,"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the lse fill of rows outside the lattice or query chunk is dropped: allowed is false on those rows, "
        "whose probabilities are 0",
        (
            "NumberReplacer",
            "lse = tl.load(Lse + (batch * num_heads + head) * num_queries + idx_q, mask=q_ok, other=0.0)",
            "lse = tl.load(Lse + (batch * num_heads + head) * num_queries + idx_q, mask=q_ok, other= -1.0)",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the PAD column of a weights record is read by nothing (the kernel reads the WEIGHT_* columns, the host "
        "QUERY_BLOCK, KEY_BLOCK, HEAD and BRANCH)",
        ("NumberReplacer", "pad=0,  # head: set per head below", "pad= 1,  # head: set per head below"),
        ("NumberReplacer", "pad=0,  # head: set per head below", "pad= -1,  # head: set per head below"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "the weights kernel has no loop to pipeline: num_stages 0, 1 or 2 compiles to the same program on a GPU "
        "(each accepted), and the interpreter drops it",
        ("NumberReplacer", "num_stages=1,", "num_stages= 2,"),
        ("NumberReplacer", "num_stages=1,", "num_stages= 0,"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "next_power_of_2 of 0 is 0 and of 1 is 1, both below the floor of 16: MAX_ENTRIES is the same",
        (
            "NumberReplacer",
            "MAX_ENTRIES=max(16, triton.next_power_of_2(max(1, listed))),",
            "MAX_ENTRIES=max(16, triton.next_power_of_2(max( 0, listed))),",
        ),
    ),
    *_same(
        "optimized/triton_backend.py",
        "a table without entries adds (0, 8) records and (0, b) positions of the same dtypes, so skipping it or "
        "not gives the same concatenation, and when every table is empty the same shapes as the explicit empty one",
        ("NumberReplacer", "if table.nnz == 0:", "if table.nnz == -1:"),
    ),
    *_same(
        "optimized/triton_backend.py",
        "performance-only: the weights kernel's query tile (16 or 64 rows, either dividing the block) in the "
        "interpreter and on a GPU; each program computes its own tile's probabilities, the same for any tile",
        (
            "AddNot",
            "tile_m = min(b, 16 if _interpreting() else 64)",
            "tile_m = min(b, 16 if not _interpreting() else 64)",
        ),
    ),
    *_same(
        "optimized/torch_backend.py",
        "batch * num_heads >= 1 wherever rows_per_group is called (validate_qkv refuses empty tensors, and every "
        "table has at least one head), so max(0, x) is x",
        ("NumberReplacer", ROWS_PER_GROUP, ROWS_PER_GROUP.replace("max(1, batch", "max( 0, batch")),
    ),
    *_same(
        "optimized/torch_backend.py",
        "the fallback for no rows is never read: _key_steps gets the rows of row_groups's ranges, each non-empty "
        "(its cuts strictly increase and range(start, stop, group) starts below stop), so count.numel() >= 1",
        ("NumberReplacer", MAX_COUNT, MAX_COUNT.replace("else 0", "else 1")),
        ("NumberReplacer", MAX_COUNT, MAX_COUNT.replace("else 0", "else -1")),
    ),
    *_same(
        "optimized/torch_backend.py",
        CACHE,
        ("RemoveDecorator", "@functools.lru_cache(maxsize=256)", ""),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 257)"),
        ("NumberReplacer", "@functools.lru_cache(maxsize=256)", "@functools.lru_cache(maxsize= 255)"),
    ),
    *_same(
        "optimized/torch_backend.py",
        "performance-only: how rows are grouped (blocks_per_row weighs the cost model of optimized.blocks.row_groups; "
        "work_size caps a group's score blocks). Each row's online softmax walks its own key blocks in the same "
        "order whatever its group (a masked step adds exactly 0 and rescales by exactly 1), so the forward is "
        "bitwise the same; the backward's float64 sums over entries only take their terms in another order "
        "(tests/test_torch_backend.py::test_work_size_does_not_change_the_result; tests/test_mutation_blocks.py "
        "checks the grouping's own definition)",
        ("ReplaceBinaryOperator_Mul_Div", GROUP_RANGES, GROUP_RANGES.replace("batch * len", "batch / len")),
        ("NumberReplacer", TORCH_PARTIAL_FORWARD, TORCH_PARTIAL_FORWARD.replace("= 4096", "= 4097")),
        ("NumberReplacer", TORCH_PARTIAL_FORWARD, TORCH_PARTIAL_FORWARD.replace("= 4096", "= 4095")),
    ),
    *_same(
        "optimized/torch_backend.py",
        "nonzero() of the flat q_valid is (K, 1): squeeze(0) leaves it (K, 1) (or makes it (1,)), and every use "
        "(indexing out, lse and q_index, the collector's slots) flattens it in the same order: the same slots and "
        "values",
        ("NumberReplacer", KEEP, KEEP.replace("squeeze(1)", "squeeze( 0)")),
    ),
    *_same(
        "optimized/torch_backend.py",
        "never taken: every row of a table holds a query point of the chunk (reference.semantics.block_table keeps "
        "the query blocks q_first..q_stop only), so keep is never empty",
        ("NumberReplacer", "if keep.numel() == 0:", "if keep.numel() == -1:"),
        ("ReplaceContinueWithBreak", "continue", "break"),
    ),
    *_same(
        "optimized/torch_backend.py",
        STATIC_METHOD,
        ("RemoveDecorator", "@staticmethod", ""),
    ),
    *_same(
        "optimized/torch_backend.py",
        "without an input that requires grad, or under no_grad, _BlockSparseAttention.apply runs the same _forward "
        "and records no graph: the same tensors come back, only what ctx holds differs",
        (
            "ReplaceAndWithOr",
            "if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):",
            "if torch.is_grad_enabled() or any(t.requires_grad for t in (q, k, v)):",
        ),
    ),
    *_same(
        "reference/dense.py",
        "the fill only keeps logsumexp finite on rows without keys: their lse is overwritten with -inf and their "
        "probabilities with 0 afterwards, and masked_fill passes no gradient to the entries it replaces, so any "
        "finite fill gives the same results and gradients",
        ("NumberReplacer", DENSE_LOGITS, DENSE_LOGITS.replace("row_empty, 0.0)", "row_empty, 1.0)")),
        ("NumberReplacer", DENSE_LOGITS, DENSE_LOGITS.replace("row_empty, 0.0)", "row_empty, -1.0)")),
    ),
    *_same(
        "reference/dense.py",
        "taken for a tuple of one result, where index -1 is index 0",
        (
            "NumberReplacer",
            "return results[0] if len(results) == 1 else results",
            "return results[ -1] if len(results) == 1 else results",
        ),
    ),
    *_same(
        "optimized/module.py",
        "performance-only: the default work_size bounds the torch backend's extra memory; every work_size gives the "
        "same attention (the grouping of rows changes the speed, and only the order of the backward's float64 sums; "
        "tests/test_torch_backend.py::test_work_size_does_not_change_the_result)",
        ("NumberReplacer", "work_size: int = 4096,", "work_size: int = 4097,"),
        ("NumberReplacer", "work_size: int = 4096,", "work_size: int = 4095,"),
    ),
    *_same(
        "optimized/module.py",
        "taken for a tuple of one result, where index -1 is index 0",
        ("NumberReplacer", MODULE_RESULTS, MODULE_RESULTS.replace("results[0]", "results[ -1]")),
        ("NumberReplacer", RING_RESULTS, RING_RESULTS.replace("results[0]", "results[ -1]")),
    ),
    *_same(
        "optimized/module.py",
        "out is the constant 0 on this line and the sum finite or not alike: 0 - 0 * s equals 0 + 0 * s (NaN for a "
        "non-finite s either way), and the gradients are zeros of the other sign, equal to them",
        ("ReplaceBinaryOperator_Add_Sub", ZERO_TIE, ZERO_TIE.replace("out + sum", "out - sum")),
    ),
    *_same(
        "reference/pictures.py",
        "the segments tile [0, N) in order: every segment's stop but the last is the next one's start, and the last "
        "stop is N, past the columns; so the stops other than 0 mark the same columns as the starts other than 0",
        (
            "NumberReplacer",
            "starts = {geo.segment_bounds(s)[0] for s in range(geo.num_segments)} - {0}",
            "starts = {geo.segment_bounds(s)[ 1] for s in range(geo.num_segments)} - {0}",
        ),
        (
            "NumberReplacer",
            "starts = {geo.segment_bounds(s)[0] for s in range(geo.num_segments)} - {0}",
            "starts = {geo.segment_bounds(s)[ -1] for s in range(geo.num_segments)} - {0}",
        ),
    ),
    *_same(
        "reference/pictures.py",
        "the padding mask has one batch row and the picture reads row 0 of dense_multiplicity's result: index -1 of "
        "one row is index 0, and a second, unpadded row is computed but never read",
        (
            "NumberReplacer",
            "mask = torch.zeros(1, seq_len, dtype=torch.bool)",
            "mask = torch.zeros( 2, seq_len, dtype=torch.bool)",
        ),
        ("NumberReplacer", "mask[0, list(padded_keys)] = True", "mask[ -1, list(padded_keys)] = True"),
        (
            "NumberReplacer",
            "counts = dense_multiplicity(geometry, config, is_causal, mask)[0, head]",
            "counts = dense_multiplicity(geometry, config, is_causal, mask)[ -1, head]",
        ),
    ),
    *_same(
        "optimized/graphs.py",
        "memory-only: how many captured graphs stay cached; a graph captured again replays the same values bit for "
        "bit (tests/test_mutation_graphs.py checks the least-recently-used bound at a set size)",
        ("NumberReplacer", "GRAPH_CACHE_SIZE = 8", "GRAPH_CACHE_SIZE = 9"),
        ("NumberReplacer", "GRAPH_CACHE_SIZE = 8", "GRAPH_CACHE_SIZE = 7"),
    ),
    *_same(
        "optimized/graphs.py",
        "performance-only: above the size a call runs eagerly, which gives the replay's values bit for bit "
        "(tests/test_cuda_graphs.py::test_large_inputs_run_eagerly; tests/test_mutation_graphs.py checks the "
        "boundary at a set size)",
        ("NumberReplacer", "GRAPH_MAX_ELEMENTS = 1 << 24", "GRAPH_MAX_ELEMENTS = 2 << 24"),
        ("NumberReplacer", "GRAPH_MAX_ELEMENTS = 1 << 24", "GRAPH_MAX_ELEMENTS = 1 << 25"),
        ("NumberReplacer", "GRAPH_MAX_ELEMENTS = 1 << 24", "GRAPH_MAX_ELEMENTS = 1 << 23"),
    ),
    *_same(
        "optimized/graphs.py",
        "performance-only: one torch._foreach_copy_ launch or one copy_ per input writes the same values into the "
        "static inputs",
        ("AddNot", 'if hasattr(torch, "_foreach_copy_"):', 'if not hasattr(torch, "_foreach_copy_"):'),
    ),
    *_same(
        "optimized/graphs.py",
        "unreachable where the suite runs: the torch it installs has torch._foreach_copy_, so the loop for older "
        "torch never runs",
        ("ZeroIterationForLoop", "for s, g in pairs:", "for s, g in []:"),
    ),
    *_same(
        "optimized/graphs.py",
        "q and k are on one device (reference/inputs.py refuses k, v off q's device before any backend runs), so "
        "the streams are those of the same device",
        (
            "NumberReplacer",
            "side = torch.cuda.Stream(device=inputs[0].device)",
            "side = torch.cuda.Stream(device=inputs[ 1].device)",
        ),
        (
            "NumberReplacer",
            "side.wait_stream(torch.cuda.current_stream(inputs[0].device))",
            "side.wait_stream(torch.cuda.current_stream(inputs[ 1].device))",
        ),
        (
            "NumberReplacer",
            "torch.cuda.current_stream(inputs[0].device).wait_stream(side)",
            "torch.cuda.current_stream(inputs[ 1].device).wait_stream(side)",
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "a policy value: the score count above which the eager (CPU) path refuses a table; no result depends on it, "
        "and tests/test_mutation_flex.py checks the rule at its boundary at a set value",
        ("NumberReplacer", "EAGER_SCORE_LIMIT = 1 << 27", "EAGER_SCORE_LIMIT = 2 << 27"),
        ("NumberReplacer", "EAGER_SCORE_LIMIT = 1 << 27", "EAGER_SCORE_LIMIT = 1 << 28"),
        ("NumberReplacer", "EAGER_SCORE_LIMIT = 1 << 27", "EAGER_SCORE_LIMIT = 1 << 26"),
    ),
    *_same(
        "optimized/flex_backend.py",
        "a policy value: how many recompilations dynamo may make before it raises (instead of falling back to "
        "eager flex); no result depends on it, and tests/test_mutation_flex.py checks that a CUDA call runs under "
        "max(RECOMPILE_LIMIT, dynamo's own) with failing on the limit",
        ("NumberReplacer", "RECOMPILE_LIMIT = 64", "RECOMPILE_LIMIT = 65"),
        ("NumberReplacer", "RECOMPILE_LIMIT = 64", "RECOMPILE_LIMIT = 63"),
    ),
    *_same(
        "optimized/flex_backend.py",
        "unreachable where the suite runs: the torch it installs has flex_attention.AuxRequest, so the call of "
        "older torch (return_lse=True) never runs",
        (
            "ReplaceTrueWithFalse",
            "return function(query, key, value, block_mask=block_mask, scale=scale, kernel_options=options, "
            "return_lse=True)",
            "return function(query, key, value, block_mask=block_mask, scale=scale, kernel_options=options, "
            "return_lse=False)",
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "heads_per_batch is read only together with key_ok, and the one caller passing key_ok (_table_partial) "
        "passes heads_per_batch too: the default is never read",
        (
            "NumberReplacer",
            "def mask_mod(self, key_ok=None, heads_per_batch: int = 1):",
            "def mask_mod(self, key_ok=None, heads_per_batch: int = 0):",
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "a cumulative sum or scatter over a 1-D tensor: dimension -1 is dimension 0",
        (
            "NumberReplacer",
            "first_row = torch.cumsum(rows_per_lattice, 0) - rows_per_lattice",
            "first_row = torch.cumsum(rows_per_lattice, -1) - rows_per_lattice",
        ),
        (
            "NumberReplacer",
            'key_first = torch.full((num_lattices,), big).scatter_reduce(0, entry_lattice, table.key_block, "amin")',
            'key_first = torch.full((num_lattices,), big).scatter_reduce( -1, entry_lattice, table.key_block, "amin")',
        ),
        (
            "NumberReplacer",
            'key_last = torch.full((num_lattices,), -1).scatter_reduce(0, entry_lattice, table.key_block, "amax")',
            'key_last = torch.full((num_lattices,), -1).scatter_reduce( -1, entry_lattice, table.key_block, "amax")',
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "a lattice's key span only bounds which key slots exist; only blocks listed in the table are allowed "
        "(block_allowed off CUDA, the BlockMask's lists on CUDA): a span one block wider, or slots given to a "
        "lattice without key blocks (key_first then wraps around in int64, but every slot's position is still "
        "checked against the key chunk, so indices stay in range and the slots an interval), add only key slots "
        "that no listed block allows, so every row's allowed keys, out and lse are the same; only memory differs",
        (
            "ReplaceUnaryOperator_USub_UAdd",
            'key_last = torch.full((num_lattices,), -1).scatter_reduce(0, entry_lattice, table.key_block, "amax")',
            'key_last = torch.full((num_lattices,), +1).scatter_reduce(0, entry_lattice, table.key_block, "amax")',
        ),
        ("NumberReplacer", "has_keys = key_last >= 0", "has_keys = key_last >= -1"),
    ),
    *_same(
        "optimized/flex_backend.py",
        "argmax of a row without a valid key slot (all zeros) is 0, the value the where gives such a row",
        (
            "NumberReplacer",
            "kv_lo = torch.where(valid_keys > 0, k_valid.to(torch.int8).argmax(1), torch.zeros_like(valid_keys))",
            "kv_lo = torch.where(valid_keys > -1, k_valid.to(torch.int8).argmax(1), torch.zeros_like(valid_keys))",
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "nonzero() of a 1-D tensor is (P, 1): squeeze(0) leaves (P, 1) where P > 1, and every reader flattens it "
        "in the same order (keep // lq and keep % lq are viewed as (1, -1, 1); keep_index reaches the "
        "PartialCollector, whose slots are reshaped to 1-D)",
        (
            "NumberReplacer",
            "keep = q_valid.reshape(-1).nonzero().squeeze(1)",
            "keep = q_valid.reshape(-1).nonzero().squeeze( 0)",
        ),
    ),
    *_same(
        "optimized/flex_backend.py",
        "inserting the size-1 axis at 1 or at 2 of (S, 1, L) gives the same (S, 1, 1, L)",
        (
            "NumberReplacer",
            "gathered = x[batch_index.view(1, batch, 1, 1), index.unsqueeze(1).unsqueeze(1), heads.view(1, 1, nh, 1)]",
            "gathered = x[batch_index.view(1, batch, 1, 1), index.unsqueeze(1).unsqueeze( 2), heads.view(1, 1, nh, 1)]",
        ),
    ),
    *_same(
        "optimized/triton_backward.py",
        "performance-only: the row term is summed per query point, slice by slice; slices of 2**15 points give every "
        "point the same sum as slices of 2**16 (only the temporaries' size changes)",
        ("NumberReplacer", "ROW_TERM_SLICE = 1 << 16", "ROW_TERM_SLICE = 1 << 15"),
    ),
    *_same(
        "optimized/triton_backward.py",
        "q and dO loaded at masked query slots (row 0) meet lse = +inf there, so P = dS = 0 and they add nothing; "
        "their head-dim padding columns meet k's and v's zero columns in every dot product and reach only dk/dv "
        "columns that are never stored",
        (
            "ReplaceBinaryOperator_BitAnd_BitOr",
            "q_mask = q_ok[:, None] & d_ok[None, :]",
            "q_mask = q_ok[:, None] | d_ok[None, :]",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "torch looks forward and backward up on the class (Function.apply: cls.forward; the graph node: "
        "_forward_cls.backward), where a function without @staticmethod is the same plain function, called with "
        "the same arguments",
        ("RemoveDecorator", "@staticmethod", ""),
    ),
    *_same(
        "optimized/ring.py",
        "performance-only: the shortcut for one chunk that covers every row; the general path writes the same part "
        "into zeros of the same shape and dtype, so the same gradient comes back",
        (
            "NumberReplacer",
            "if list(chunks) == [(0, like.shape[1])]:",
            "if list(chunks) == [( 1, like.shape[1])]:",
        ),
        (
            "NumberReplacer",
            "if list(chunks) == [(0, like.shape[1])]:",
            "if list(chunks) == [(0, like.shape[ 2])]:",
        ),
        (
            "NumberReplacer",
            "if list(chunks) == [(0, like.shape[1])]:",
            "if list(chunks) == [(0, like.shape[ 0])]:",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "needs_input_grad has one flag per forward input (q, k, v, the mask, the ring); the sums are zipped with "
        "the three gradients of q, k and v, so a fourth entry is never read",
        (
            "NumberReplacer",
            "sums = [{} if need else None for need in ctx.needs_input_grad[:3]]",
            "sums = [{} if need else None for need in ctx.needs_input_grad[: 4]]",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "a part that is None and a part of zeros add the same: _add skips a None part of dq, the dk/dv accumulator "
        "adds only parts that are not None, a gradient still None at the end becomes zeros where it is needed, and "
        "a part of an input that needs no gradient is dropped (needs)",
        (
            "AddNot",
            "if leaf.requires_grad and grad is None:",
            "if not leaf.requires_grad and grad is None:",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "every leaf asked for reaches the recomputed step partial's graph (its scores read q and k, its out reads "
        "v, whatever the masks), so torch.autograd.grad finds no unused input and allow_unused changes nothing",
        (
            "ReplaceTrueWithFalse",
            "computed = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))",
            "computed = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=False))",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "over steps 0..P-1 the condition fails only at step P-1, where step + 1 is P: both branches pick index P, "
        "and step - 1 < P holds at every step, picking step + 1",
        (
            "ReplaceBinaryOperator_Add_Sub",
            "stats_bytes[step + 1 if step + 1 < P else P] += _nbytes(sends)",
            "stats_bytes[step + 1 if step - 1 < P else P] += _nbytes(sends)",
        ),
    ),
    *_same(
        "optimized/ring.py",
        "the shortcut is taken for a list of one piece, where index -1 is index 0",
        ("NumberReplacer", "return pieces[0]", "return pieces[ -1]"),
    ),
    *_same(
        "optimized/ring.py",
        "a marker no fingerprint equals: _fingerprint is >= 0 (63 bits), and the rank that sends the marker and the "
        "exchange that looks for it read the same constant, so -1 and -2 mark the same ranks",
        (
            "NumberReplacer",
            "INVALID_FINGERPRINT = -1  # sent by a rank whose own inputs failed validation",
            "INVALID_FINGERPRINT = - 2  # sent by a rank whose own inputs failed validation",
        ),
        (
            "ReplaceUnaryOperator_USub_Invert",
            "INVALID_FINGERPRINT = -1  # sent by a rank whose own inputs failed validation",
            "INVALID_FINGERPRINT = ~1  # sent by a rank whose own inputs failed validation",
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    modules: dict[str, tuple[str, ...]]  # module -> test files, in the order pytest runs them
    exclude_operators: tuple[str, ...]  # regular expressions, cosmic-ray's operators-filter
    timeout: float  # seconds per mutant at least
    timeout_factor: float  # and at least this many times the module's unmutated run


def load_settings(pyproject: Path = ROOT / "pyproject.toml") -> Settings:
    with open(pyproject, "rb") as handle:
        table = tomllib.load(handle)["tool"]["cosmic-ray"]
    return Settings(
        modules={module: tuple(tests) for module, tests in table["modules"].items()},
        exclude_operators=tuple(table.get("filters", {}).get("operators-filter", {}).get("exclude-operators", ())),
        timeout=float(table.get("timeout", 120.0)),
        timeout_factor=float(table.get("timeout-factor", 5.0)),
    )


def parse_args(argv, settings: Settings):
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "--modules",
        nargs="+",
        metavar="MODULE",
        default=list(settings.modules),
        help="modules to mutate, as named in [tool.cosmic-ray.modules] (default: all of them)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file of the results (merged per module)")
    parser.add_argument(
        "--sessions",
        default=str(DEFAULT_SESSIONS),
        help="folder for cosmic-ray's session databases (cr-report reads them)",
    )
    parser.add_argument(
        "--budget",
        type=cli.positive_float,
        default=None,
        help="seconds for the whole run; mutants not reached are recorded as not run",
    )
    parser.add_argument(
        "--sample",
        type=cli.positive_int,
        default=1,
        help="run every SAMPLE-th mutant of each module in source order (1: all); the others are recorded as left out",
    )
    parser.add_argument(
        "--reclassify",
        action="store_true",
        help="run nothing: rewrite --out with the survivors marked by the EQUIVALENT list as it is now",
    )
    parser.add_argument(
        "--survivors-only",
        action="store_true",
        help="run only the mutants that survived the recorded run of each (unchanged) module",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in settings.modules]
    if unknown:
        parser.error(
            f"argument --modules: not in [tool.cosmic-ray.modules] of pyproject.toml: {unknown} "
            f"(known: {list(settings.modules)})"
        )
    return args


# --------------------------------------------------------------------------------------------
# Running tests in a forked child
# --------------------------------------------------------------------------------------------


class _NoShrink:
    """pytest plugin: after conftest.py loaded the profile, the same profile without the shrink phase."""

    def pytest_configure(self, config):
        from hypothesis import Phase, settings

        base = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
        phases = tuple(p for p in base.phases if p not in (Phase.shrink, Phase.explain))
        settings.register_profile("mutation", parent=base, phases=phases)
        settings.load_profile("mutation")


def run_tests(tests: tuple[str, ...], timeout: float, log_path: Path) -> tuple[str, float, str | None]:
    """('passed' | 'failed' | 'timeout', seconds, first failing test) of ``pytest -x tests`` in a forked child."""
    import pytest

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: its own process group (a timeout kills all of it), output to the log
        code = 3
        try:
            os.setsid()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = int(pytest.main(["-x", "-q", *tests], plugins=[_NoShrink()]))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet its own group
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start, None
        time.sleep(0.02)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) == 0:
        return "passed", seconds, None
    text = log_path.read_text(errors="replace")
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)
    return "failed", seconds, failed.group(1) if failed else text.strip().splitlines()[-1:][0] if text.strip() else None


# --------------------------------------------------------------------------------------------
# One module
# --------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_mutation(source: str, mutated: str) -> tuple[str, str]:
    """(original text, mutated text) of the lines a mutation changes, stripped, blank lines left out."""
    before, after = source.split("\n"), mutated.split("\n")
    text = lambda lines: "\n".join(x.strip() for x in lines if x.strip())  # noqa: E731
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
        if tag != "equal":
            return text(before[i1:i2]), text(after[j1:j2])
    return "", ""


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of every annotation, if the module postpones their evaluation."""
    tree = ast.parse(source)
    postponed = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )
    if not postponed:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            found += [a.annotation for a in arguments if a.annotation is not None]
            found += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in found]


def listed_reason(module: str, operator: str, original: str, mutated: str) -> str | None:
    for entry in EQUIVALENT:
        if (entry.module, entry.operator, entry.original, entry.mutated) == (module, operator, original, mutated):
            return entry.reason
    return None


def equivalent_reason(module: str, operator: str, original: str, mutated: str, position, annotations) -> str | None:
    reason = listed_reason(module, operator, original, mutated)
    if reason is None and any(start <= tuple(position) < end for start, end in annotations):
        reason = ANNOTATION
    return reason


def reclassify(module: str, entry: dict) -> None:
    """Survivors marked by the EQUIVALENT list as it is now (a reason added later needs no new run)."""
    for survivor in entry["survivors"]:
        if survivor.get("reason") == ANNOTATION:
            continue
        reason = listed_reason(module, survivor["operator"], survivor["original"], survivor["mutated"])
        if reason is None:
            survivor["status"] = "survived"
            survivor.pop("reason", None)
        else:
            survivor.update(status="equivalent", reason=reason)
    for status in ("survived", "equivalent"):
        entry["counts"][status] = sum(survivor["status"] == status for survivor in entry["survivors"])


def mutate_module(
    module: str,
    tests: tuple[str, ...],
    settings: Settings,
    sessions: Path,
    deadline: float | None,
    only: set[tuple[int, str, str, str]] | None,
    log,
    sample: int = 1,
) -> dict:
    """Mutate ``module`` (relative to the current directory, the scratch copy) and run ``tests`` per mutant."""
    from cosmic_ray.commands import init as init_session
    from cosmic_ray.mutating import mutate_code, use_mutation
    from cosmic_ray.plugins import get_operator
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    path = Path(module)
    source = path.read_text()
    annotations = annotation_spans(source)
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir="."))
    baseline, baseline_seconds, failing = run_tests(tests, 3600.0, logs / "baseline.log")
    if baseline != "passed":
        tail = "\n".join((logs / "baseline.log").read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{module}: the tests fail without a mutation ({failing}):\n{tail}")
    timeout = max(settings.timeout, settings.timeout_factor * baseline_seconds)
    log(f"{module}: unmutated tests pass in {baseline_seconds:.1f} s; timeout per mutant {timeout:.0f} s")

    excluded = (
        re.compile("|".join(f"(?:{e})" for e in settings.exclude_operators)) if settings.exclude_operators else None
    )
    session = sessions / (module.replace("/", "_").removesuffix(".py") + ".sqlite")
    session.parent.mkdir(parents=True, exist_ok=True)
    log(f"{module}: cosmic-ray session {session} (cr-report reads it)")
    counts = dict(
        generated=0,
        filtered=0,
        killed=0,
        timeout=0,
        survived=0,
        equivalent=0,
        no_mutation=0,
        not_run=0,
        skipped_as_killed_before=0,
        sampled_out=0,
    )
    killed_by: dict[str, int] = {}
    candidates = 0
    survivors, new_test_kills, equivalent_killed = [], [], []
    started = time.monotonic()
    with use_db(str(session), WorkDB.Mode.create) as db:
        init_session([path], db, {})
        items = sorted(
            db.pending_work_items,
            key=lambda w: (tuple(w.mutations[0].start_pos), w.mutations[0].operator_name, w.mutations[0].occurrence),
        )
        counts["generated"] = len(items)
        for item in items:
            spec = item.mutations[0]
            name = spec.operator_name
            if excluded is not None and excluded.match(name):
                db.set_result(item.job_id, WorkResult(output="Filtered operator", worker_outcome=WorkerOutcome.SKIPPED))
                counts["filtered"] += 1
                continue
            candidates += 1  # mutants past the filter, in source order: --sample keeps the 1st, (1 + sample)th, ...
            if (candidates - 1) % sample:
                counts["sampled_out"] += 1
                continue
            operator = get_operator(name)(**(spec.operator_args or {}))
            mutated = mutate_code(source, operator, spec.occurrence)
            if mutated is None:
                counts["no_mutation"] += 1
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.NO_TEST))
                continue
            original_text, mutated_text = describe_mutation(source, mutated)
            line = spec.start_pos[0]
            record = dict(
                file=module,
                line=line,
                operator=name,
                occurrence=spec.occurrence,
                original=original_text,
                mutated=mutated_text,
            )
            if only is not None and (line, name, original_text, mutated_text) not in only:
                counts["skipped_as_killed_before"] += 1
                continue
            if deadline is not None and time.time() > deadline:
                counts["not_run"] += 1
                continue
            with use_mutation(path, operator, spec.occurrence):
                outcome, seconds, failing = run_tests(tests, timeout, logs / "mutant.log")
            reason = equivalent_reason(module, name, original_text, mutated_text, spec.start_pos, annotations)
            if outcome == "passed":
                db.set_result(
                    item.job_id,
                    WorkResult(
                        worker_outcome=WorkerOutcome.NORMAL,
                        test_outcome=TestOutcome.SURVIVED,
                        output="",
                        diff=mutated_text,
                    ),
                )
                if reason is None:
                    counts["survived"] += 1
                    survivors.append({**record, "status": "survived"})
                    log(f"  SURVIVED {module}:{line} {name}: {original_text!r} -> {mutated_text!r}")
                else:
                    counts["equivalent"] += 1
                    survivors.append({**record, "status": "equivalent", "reason": reason})
            else:
                db.set_result(
                    item.job_id,
                    WorkResult(
                        worker_outcome=WorkerOutcome.NORMAL,
                        test_outcome=TestOutcome.KILLED,
                        output=failing or outcome,
                        diff=mutated_text,
                    ),
                )
                counts["killed" if outcome == "failed" else "timeout"] += 1
                test_file = (failing or "timeout").split("::")[0]
                killed_by[test_file] = killed_by.get(test_file, 0) + 1
                if test_file.startswith(NEW_TESTS_PREFIX):
                    new_test_kills.append({**record, "status": "killed", "killed_by": failing})
                if reason is not None:
                    equivalent_killed.append({**record, "killed_by": failing or outcome})
    assert path.read_text() == source, f"{module} was not restored after mutation"
    shutil.rmtree(logs, ignore_errors=True)
    return dict(
        sha256=hashlib.sha256(source.encode()).hexdigest(),
        tests=list(tests),
        counts=counts,
        baseline_seconds=round(baseline_seconds, 2),
        timeout_seconds=round(timeout, 1),
        seconds=round(time.monotonic() - started, 1),
        killed_by=dict(sorted(killed_by.items())),
        survivors=survivors,
        killed_by_new_tests=new_test_kills,
        listed_equivalent_but_killed=equivalent_killed,
    )


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def merge_survivors_only(previous: dict, rerun: dict) -> dict:
    """A --survivors-only rerun folded into the recorded full run of the same source."""
    merged = dict(previous)
    counts = dict(previous["counts"])
    rerun_counts = rerun["counts"]
    for key in ("survived", "equivalent"):
        counts[key] = rerun_counts[key]
    # A rerun tries only the recorded survivors: the mutants the full run never reached (past its --budget)
    # stay unrun, and survivors the rerun did not reach join them.
    counts["not_run"] = previous["counts"]["not_run"] + rerun_counts["not_run"]
    counts["killed"] = previous["counts"]["killed"] + rerun_counts["killed"]
    counts["timeout"] = previous["counts"]["timeout"] + rerun_counts["timeout"]
    killed_by = dict(previous.get("killed_by", {}))
    for test_file, n in rerun["killed_by"].items():
        killed_by[test_file] = killed_by.get(test_file, 0) + n
    kept_new = [m for m in previous.get("killed_by_new_tests", [])]
    merged.update(
        tests=rerun["tests"],
        counts=counts,
        killed_by=dict(sorted(killed_by.items())),
        survivors=rerun["survivors"],
        killed_by_new_tests=kept_new + rerun["killed_by_new_tests"],
        listed_equivalent_but_killed=rerun["listed_equivalent_but_killed"],
        seconds=round(previous.get("seconds", 0.0) + rerun["seconds"], 1),
        reruns=previous.get("reruns", [])
        + [dict(utc_time=rerun["utc_time"], seconds=rerun["seconds"], counts=rerun_counts, tests=rerun["tests"])],
    )
    return merged


def score(counts: dict) -> float | None:
    killed = counts["killed"] + counts["timeout"]
    denominator = killed + counts["survived"]
    return round(killed / denominator, 4) if denominator else None


def write_record(out: Path, ran: dict, settings: Settings, environment: dict, reclassify_all: bool = False) -> dict:
    """Write ``ran`` (module -> entry) into ``out``, keeping the other modules' entries that ``out`` holds now.

    Under a lock, re-reading the file: runs over different modules may write to one record side by side.
    Survivors are classified by this process's EQUIVALENT list in ``ran``'s modules only (every module
    with ``reclassify_all``): a run that started before entries were added for another module must not
    undo them.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives outside the results folder, whose every file is a result (experiments/results/INDEX.md).
    lock_path = Path(tempfile.gettempdir()) / f"mutation-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        modules = json.loads(out.read_text()).get("modules", {}) if out.exists() else {}
        modules.update(ran)
        record = _record(modules, settings, environment, set(modules) if reclassify_all else set(ran))
        out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def not_in_config(settings: Settings, root: Path = ROOT) -> dict[str, str]:
    """Every module of MUTATED_PACKAGES that the config leaves out -> why (NOT_MUTATED, or "not in the config")."""
    found = sorted(
        path.relative_to(root).as_posix() for package in MUTATED_PACKAGES for path in (root / package).rglob("*.py")
    )
    return {module: NOT_MUTATED.get(module, "not in the config") for module in found if module not in settings.modules}


def _tool() -> str:
    """The mutation tool and its version (--reclassify rewrites a record without it installed)."""
    try:
        return f"cosmic-ray {metadata.version('cosmic-ray')}"
    except metadata.PackageNotFoundError:
        return "cosmic-ray (not installed where this record was last written)"


def _record(modules: dict, settings: Settings, environment: dict, reclassified: set) -> dict:
    for module, entry in modules.items():
        current = ROOT / module
        entry["stale"] = not current.exists() or sha256(current) != entry["sha256"]
        entry.pop("session", None)  # a path on the machine that ran it (the log names it)
        if module in reclassified:
            reclassify(module, entry)
        entry["score"] = score(entry["counts"])
    keys = ("generated", "filtered", "killed", "timeout", "survived", "equivalent", "no_mutation", "not_run")
    keys += ("sampled_out",)
    # Modules run in full, and modules of which --sample or --budget ran a share: two scores, never mixed.
    partial = {m for m, e in modules.items() if e["counts"].get("sampled_out") or e["counts"]["not_run"]}
    full = {key: sum(e["counts"].get(key, 0) for m, e in modules.items() if m not in partial) for key in keys}
    share = {key: sum(e["counts"].get(key, 0) for m, e in modules.items() if m in partial) for key in keys}
    not_run = {m: "not in this record's runs" for m in settings.modules if m not in modules}
    for module, entry in modules.items():
        left_out = []
        if entry["counts"].get("sampled_out"):
            left_out.append(f"{entry['counts']['sampled_out']} mutants left out by --sample {entry.get('sample')}")
        if entry["counts"]["not_run"]:
            left_out.append(f"{entry['counts']['not_run']} mutants past the --budget")
        if left_out:
            not_run[module] = "; ".join(left_out)
    record = {
        "tool": _tool(),
        "command": "make mutation  (python -m experiments.mutation)",
        "score_definition": "(killed + timeout) / (killed + timeout + survived); equivalent mutants left out",
        "score_of_full_runs": score(full),
        "modules_run_in_full": sorted(m for m in modules if m not in partial),
        "score_of_partial_runs": score(share),
        "modules_run_in_part": sorted(partial),
        "counts_of_full_runs": full,
        "counts_of_partial_runs": share,
        "operators_excluded": list(settings.exclude_operators),
        "hypothesis_profile": os.environ.get("HYPOTHESIS_PROFILE", "ci") + " without the shrink phase",
        "environment": environment,
        "not_run": not_run,
        "not_in_config": not_in_config(settings),
        "modules": modules,
    }
    return record


def main(argv=None) -> int:
    settings = load_settings()
    args = parse_args(argv, settings)
    out, sessions = Path(args.out).resolve(), Path(args.sessions).resolve()
    previous = json.loads(out.read_text()) if out.exists() else {}
    modules = dict(previous.get("modules", {}))
    ran = {}
    if args.reclassify:
        record = write_record(out, ran, settings, previous.get("environment", {}), reclassify_all=True)
        print(f"score {record['score_of_full_runs']} over the modules run in full; written to {out}")
        return 0
    only = {}
    if args.survivors_only:
        for module in args.modules:
            entry = modules.get(module)
            if entry is None or entry["sha256"] != sha256(ROOT / module):
                raise SystemExit(
                    f"--survivors-only: no record of {module} for its current source; run it in full first"
                )
            # the source is unchanged (its sha256 above), so a line number still names one mutant
            only[module] = {(s["line"], s["operator"], s["original"], s["mutated"]) for s in entry["survivors"]}
    deadline = time.time() + args.budget if args.budget else None

    # One thread per child, on a machine of two cores; the interpreter runs the Triton kernels on the
    # CPU, as in `make test`; no bytecode, so that a child compiles the mutated source it reads.
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.dont_write_bytecode = True
    import hypothesis  # noqa: F401  (imported once here, not in every child)
    import pytest  # noqa: F401

    environment_record = environment("cpu")
    # A kill by SIGTERM still removes the scratch copy (the finally below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="mutation-"))
    try:
        shutil.copytree(ROOT, workdir / "tree", ignore=shutil.ignore_patterns(*COPY_IGNORED), symlinks=True)
        os.chdir(workdir / "tree")
        sys.path[:] = [str(workdir / "tree")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("reference", "optimized", "tests"))
        assert not loaded, f"project modules imported before forking (children would not see mutants): {loaded}"
        print(f"mutating a copy in {workdir / 'tree'}; torch {torch.__version__}", flush=True)
        for module in args.modules:
            tests = settings.modules[module]
            print(f"{module}: tests {' '.join(tests)}", flush=True)
            entry = mutate_module(
                module,
                tests,
                settings,
                sessions,
                deadline,
                only.get(module),
                lambda text: print(text, flush=True),
                sample=args.sample,
            )
            entry["sample"] = args.sample
            entry["utc_time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            if args.survivors_only:
                entry = merge_survivors_only(modules[module], entry)
            modules[module] = ran[module] = entry
            record = write_record(out, ran, settings, environment_record)
            c = entry["counts"]
            print(
                f"{module}: score {entry['score']}  killed {c['killed']} timeout {c['timeout']} survived "
                f"{c['survived']} equivalent {c['equivalent']} not run {c['not_run']} ({entry['seconds']:.0f} s)",
                flush=True,
            )
    finally:
        os.chdir(ROOT)
        shutil.rmtree(workdir, ignore_errors=True)
    record = write_record(out, ran, settings, environment_record)
    print(f"score {record['score_of_full_runs']} over the modules run in full; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
