"""The distributed ring over real gloo process groups (CPU), spawned as child processes.

One spawn of 4 processes runs every scenario: process groups of 2, 3 and 4 ranks are subgroups of
it (the 3-rank group is global ranks 1..3, so group ranks differ from global ranks). Each child
computes its own rows (and gradients, weights, bytes sent) and saves them; the test process holds
them against the float64 reference. A second spawn checks that a rank raising mid-ring makes the
others raise within the process group's short timeout instead of hanging.

Children write their results to files and exit with os._exit (no teardown that could hang); the
parent joins them with a timeout and terminates any left.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optimized
from equivalence_tests.helpers import differentiable_reference
from equivalence_tests.strategies import AttentionCase, Shape
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig, assert_within_budget, compare
from reference import BlockSparseRingDilatedAttention as ReferenceAttention
from reference.ring_schedule import ring_schedule, zigzag_pieces, zigzag_schedule
from reference.verification import K_GRADIENT, K_OUTPUT

WORLD = 4
TIMEOUT_S = 60  # the gloo timeout of the main run: generous, since 4 processes share 2 cores
FAULT_TIMEOUT_S = 5  # the short gloo timeout of the ring in the fault run
JOIN_TIMEOUT_S = 150


@dataclass(frozen=True)
class Scenario:
    name: str
    ranks: tuple[int, ...]  # global ranks of the process group
    chunks: tuple[int, ...]  # tokens per group rank
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    sparse_config: SparsePatternConfig
    head_mode: str = "split"
    batch: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    is_causal: bool = False
    padding: bool = True
    gradients: bool = True
    weights: bool = False
    lse_gradient: bool = False  # the loss also reads lse (its gradient flows through the ring too)
    seed: int = 0
    backend: str = "torch"
    ring_layout: str = "contiguous"  # "zigzag": chunks must be reference.zigzag_pieces' per-rank totals

    @property
    def seq_len(self) -> int:
        return sum(self.chunks)

    def rows(self, group_rank: int) -> tuple[int, int]:
        start = sum(self.chunks[:group_rank])
        return start, start + self.chunks[group_rank]

    def row_index(self, group_rank: int) -> torch.Tensor:
        """The global rows a group rank holds, in its local order."""
        if self.ring_layout == "zigzag":
            ranges = zigzag_pieces(self.seq_len, len(self.ranks))[group_rank]
        else:
            ranges = (self.rows(group_rank),)
        return torch.cat([torch.arange(a, b) for a, b in ranges])

    def schedule(self):
        geometry = AttentionGeometry(
            DilationConfig(self.segment_lengths, self.dilation_rates, self.head_mode), self.seq_len, self.num_heads
        )
        if self.ring_layout == "zigzag":
            return zigzag_schedule(geometry, self.sparse_config, self.is_causal, len(self.ranks))
        return ring_schedule(geometry, self.sparse_config, self.is_causal, self.chunks)

    def module_kwargs(self) -> dict:
        return dict(
            segment_lengths=list(self.segment_lengths),
            dilation_rates=list(self.dilation_rates),
            sparse_config=self.sparse_config,
            head_mode=self.head_mode,
        )

    def case(self, mask) -> AttentionCase:
        shape = Shape(self.batch, self.seq_len, self.num_heads, self.num_kv_heads, self.head_dim)
        dilation = DilationConfig(self.segment_lengths, self.dilation_rates, self.head_mode)
        return AttentionCase(shape, dilation, self.sparse_config, self.is_causal, mask, self.seed)

    def inputs(self):
        """Fresh random full-sequence q, k, v, key padding mask, upstream gradients of out and lse (float32)."""
        generator = torch.Generator().manual_seed(self.seed)
        B, N, D = self.batch, self.seq_len, self.head_dim
        q = torch.randn(B, N, self.num_heads, D, generator=generator)
        k = torch.randn(B, N, self.num_kv_heads, D, generator=generator)
        v = torch.randn(B, N, self.num_kv_heads, D, generator=generator)
        mask = (torch.rand(B, N, generator=generator) < 0.25) if self.padding else None
        grad_out = torch.randn(B, N, self.num_heads, D, generator=generator)
        grad_lse = torch.randn(B, self.num_heads, N, generator=generator) if self.lse_gradient else None
        return q, k, v, mask, (grad_out, grad_lse)


def _loss(out, lse, grads, rows=slice(None)):
    """<out, grad_out> (+ <lse, grad_lse> over non-empty rows) for this rank's rows."""
    grad_out, grad_lse = grads
    loss = (out * grad_out[:, rows]).sum()
    if grad_lse is not None:
        loss = loss + (lse.masked_fill(torch.isneginf(lse), 0.0) * grad_lse[:, :, rows]).sum()
    return loss


SCENARIOS = (
    # Two ranks, a segment that spans both chunks, padding, weights.
    Scenario(
        "two_ranks",
        (0, 1),
        (14, 15),
        (8, 16),
        (1, 2),
        SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.5, block_size=4),
        weights=True,
    ),
    # Three ranks that are global ranks 1..3, uneven chunks shorter than a block, causal, head_mode "all".
    Scenario(
        "three_ranks_causal",
        (1, 2, 3),
        (5, 2, 22),
        (6, 29),
        (1, 3),
        SparsePatternConfig(pattern_type="local_window", local_window_size=12, block_size=3),
        head_mode="all",
        is_causal=True,
        weights=True,
        seed=1,
    ),
    # Four ranks, grouped-query heads, a random layout.
    Scenario(
        "four_ranks",
        (0, 1, 2, 3),
        (3, 9, 1, 11),
        (5, 24),
        (1, 3),
        SparsePatternConfig(pattern_type="random", sparsity_ratio=0.4, block_size=2, seed=7),
        num_heads=6,
        num_kv_heads=3,
        lse_gradient=True,
        seed=2,
    ),
    # Zigzag: rank r holds pieces r and 7 - r of 8 pieces of 5 tokens; causal, a branch over the whole
    # sequence, padding, grouped-query heads, lse in the loss.
    Scenario(
        "zigzag_four_ranks_causal",
        (0, 1, 2, 3),
        (10, 10, 10, 10),
        (8, 40),
        (1, 2),
        SparsePatternConfig(pattern_type="local_window", local_window_size=8, block_size=2),
        num_heads=4,
        num_kv_heads=2,
        is_causal=True,
        lse_gradient=True,
        seed=6,
        ring_layout="zigzag",
    ),
    # Every segment inside one chunk: nothing may be sent, forward or backward.
    Scenario(
        "segments_fit_chunks",
        (0, 1, 2, 3),
        (8, 8, 16, 8),
        (4, 8),
        (1, 2),
        SparsePatternConfig(pattern_type="dense", block_size=2),
        seed=3,
    ),
)
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    # The triton backend through the distributed ring (the interpreter on the CPU): each pair merged into
    # the rank's accumulator by the kernel, gradients through the triton backward; head_mode "all" merges
    # branches into the same accumulator, causal with uneven chunks, padding, grouped-query heads.
    SCENARIOS += (
        # Zigzag: each rank holds two pieces of 16 tokens (reference.zigzag_pieces(96, 3)), causal with a
        # segment over the whole sequence, so pieces of every rank meet pieces of every other.
        Scenario(
            "zigzag_triton_causal",
            (0, 1, 3),
            (32, 32, 32),
            (32, 96),
            (1, 2),
            SparsePatternConfig(pattern_type="dense", block_size=16),
            head_dim=16,
            is_causal=True,
            seed=5,
            backend="triton",
            ring_layout="zigzag",
        ),
        Scenario(
            "three_ranks_triton",
            (0, 2, 3),
            (21, 16, 27),
            (16, 64),
            (1, 2),
            SparsePatternConfig(pattern_type="local_window", local_window_size=32, block_size=16),
            head_mode="all",
            head_dim=16,
            is_causal=True,
            lse_gradient=True,
            seed=4,
            backend="triton",
        ),
    )
    # Forward only (no autograd): the kernel merges each ring step's piece pairs into the rank's accumulator
    # in one launch per head layer; zigzag's two query pieces per rank take one launch each.
    SCENARIOS += tuple(
        replace(scenario, name=f"{scenario.name}_forward", gradients=False)
        for scenario in SCENARIOS
        if scenario.backend == "triton"
    )
MISMATCH_RANKS = (0, 1, 2)  # rank 1 passes other dilation rates; rank 2 another head dim


def _mismatch_module(global_rank: int, group):
    rates = [1, 3] if global_rank == 1 else [1, 2]
    return optimized.BlockSparseRingDilatedAttention(
        [4, 8], rates, SparsePatternConfig(pattern_type="dense", block_size=2), backend="torch", process_group=group
    )


def _run_scenario(scenario: Scenario, group, group_rank: int) -> dict:
    q, k, v, mask, grad_out = scenario.inputs()
    rows = scenario.row_index(group_rank)
    module = optimized.BlockSparseRingDilatedAttention(
        **scenario.module_kwargs(), backend=scenario.backend, process_group=group, ring_layout=scenario.ring_layout
    )
    leaves = [t[:, rows].clone().requires_grad_(scenario.gradients) for t in (q, k, v)]
    local_mask = None if mask is None else mask[:, rows].clone()
    results = module(
        *leaves,
        is_causal=scenario.is_causal,
        key_padding_mask=local_mask,
        return_attention_weights=scenario.weights,
        return_lse=True,
    )
    out, lse = results[0], results[-1]
    record = {"rows": rows.tolist(), "out": out.detach().clone(), "lse": lse.detach().clone()}
    if scenario.weights:
        record["weights"] = results[1].to_dense()
    if scenario.gradients:
        _loss(out, lse, grad_out, rows).backward()
        record["grads"] = [leaf.grad.clone() for leaf in leaves]
    stats = module.ring_stats
    record.update(
        forward_bytes=list(stats.forward_bytes),
        backward_bytes=list(stats.backward_bytes),
        weights_bytes=list(stats.weights_bytes),
        computed_steps=list(stats.computed_steps),
    )
    gathered = [None] * len(scenario.ranks)
    dist.all_gather_object(gathered, out.detach(), group=group)
    if group_rank == 0:
        record["gathered_out"] = torch.cat(gathered, dim=1)
    return record


def _main_worker(rank: int, init_file: str, result_dir: str) -> None:
    results = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        # Every rank creates every group, in the same order (new_group is collective).
        groups = {sc.name: dist.new_group(list(sc.ranks)) for sc in SCENARIOS}
        mismatch_group = dist.new_group(list(MISMATCH_RANKS))
        for scenario in SCENARIOS:
            if rank in scenario.ranks:
                try:
                    results[scenario.name] = _run_scenario(scenario, groups[scenario.name], scenario.ranks.index(rank))
                except Exception as error:  # recorded, the parent reports it
                    results[scenario.name] = {"error": type(error).__name__, "message": traceback.format_exc()}
        if rank in MISMATCH_RANKS:
            module = _mismatch_module(rank, mismatch_group)
            head_dim = 6 if rank == 2 else 8
            q = torch.randn(1, 8, 2, head_dim)
            try:
                module(q, q[:, :, :1], q[:, :, :1])
                results["mismatch"] = {"error": None}
            except Exception as error:
                results["mismatch"] = {"error": type(error).__name__, "message": str(error)}
            # Rank 0 holds no token: it rejects its input, and the others must raise rather than wait for it.
            module = _mismatch_module(0, mismatch_group)
            q = torch.randn(1, 0 if rank == 0 else 8, 2, 8)
            try:
                module(q, q[:, :, :1], q[:, :, :1])
                results["empty_chunk"] = {"error": None}
            except Exception as error:
                results["empty_chunk"] = {"error": type(error).__name__, "message": str(error)}
    except Exception:
        results["worker"] = {"error": "worker", "message": traceback.format_exc()}
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    os._exit(0)


def _fault_worker(rank: int, init_file: str, result_dir: str) -> None:
    results = {}
    started = time.monotonic()
    try:
        # A long timeout to start (children may start seconds apart on a busy machine), a short one for the ring.
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=3,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        group = dist.new_group([0, 1, 2], timeout=datetime.timedelta(seconds=FAULT_TIMEOUT_S))
        scenario = SCENARIOS[0]
        q, k, v, mask, _ = scenario.inputs()
        chunks = (10, 9, 10)
        start = sum(chunks[:rank])
        rows = slice(start, start + chunks[rank])
        module = optimized.BlockSparseRingDilatedAttention(
            [29],
            [1],
            SparsePatternConfig(pattern_type="dense", block_size=4),
            backend="torch",
            process_group=group,
        )
        if rank == 1:
            from optimized import dispatch

            def failing_partial(*args, **kwargs):
                raise RuntimeError("injected failure of rank 1")

            dispatch.REGISTRY["torch"].forward_partial = failing_partial  # the ring calls the chosen backend
        try:
            module(q[:, rows], k[:, rows], v[:, rows], key_padding_mask=mask[:, rows])
            results["error"] = None
        except Exception as error:
            results["error"] = type(error).__name__
            results["message"] = str(error)
        results["seconds"] = time.monotonic() - started
    except Exception:
        results["error"] = "worker"
        results["message"] = traceback.format_exc()
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    if rank == 1:
        # Stay alive with the sockets open: the others must give up by the timeout, not by a closed socket.
        time.sleep(4 * FAULT_TIMEOUT_S)
    os._exit(0)


def _spawn(target, world_size: int, tmp_path, wait_for=None) -> dict[int, dict]:
    """Start ``world_size`` spawned children, join them with a timeout, return their saved results.

    ``wait_for``: ranks that must finish (default all); the others are terminated once those are done.
    """
    context = mp.get_context("spawn")
    init_file = str(tmp_path / "init")
    processes = [
        context.Process(target=target, args=(rank, init_file, str(tmp_path)), daemon=True) for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    wait_for = range(world_size) if wait_for is None else wait_for
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        for rank in wait_for:
            processes[rank].join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank in wait_for if processes[rank].is_alive()]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s (a ring hung)"
    return {
        rank: torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for rank in range(world_size)
        if (tmp_path / f"rank{rank}.pt").exists()
    }


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    results = _spawn(_main_worker, WORLD, tmp_path_factory.mktemp("ring"))
    for rank, result in results.items():
        assert "worker" not in result, f"rank {rank} failed:\n{result['worker']['message']}"
    return results


def _scenario_records(ring_results, scenario: Scenario) -> list[dict]:
    records = []
    for global_rank in scenario.ranks:
        record = ring_results[global_rank][scenario.name]
        assert "error" not in record, f"{scenario.name}, rank {global_rank}:\n{record['message']}"
        records.append(record)
    return records


def _references(scenario: Scenario):
    q, k, v, mask, _ = scenario.inputs()
    call = dict(is_causal=scenario.is_causal, key_padding_mask=mask, return_lse=True, return_attention_weights=True)
    out64, weights64, lse64 = ReferenceAttention(**scenario.module_kwargs())(q, k, v, **call)
    out32, weights32, lse32 = ReferenceAttention(**scenario.module_kwargs(), compute_dtype=None)(q, k, v, **call)
    return (out64, lse64, weights64), (out32, lse32, weights32)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda sc: sc.name)
def test_every_rank_matches_the_reference(ring_results, scenario):
    records = _scenario_records(ring_results, scenario)
    (out64, lse64, weights64), (out32, lse32, weights32) = _references(scenario)
    for group_rank, record in enumerate(records):
        rows = scenario.row_index(group_rank)
        assert record["rows"] == rows.tolist()
        empty = torch.isneginf(lse64[:, :, rows])
        context = f"{scenario}, group rank {group_rank}"
        assert_within_budget(
            compare(
                "out",
                record["out"],
                out64[:, rows],
                out32[:, rows],
                torch.float32,
                K_OUTPUT,
                empty=empty.transpose(1, 2).unsqueeze(-1),
            ),
            context,
        )
        assert_within_budget(
            compare(
                "lse",
                record["lse"],
                lse64[:, :, rows],
                lse32[:, :, rows],
                torch.float32,
                K_OUTPUT,
                empty=empty,
                empty_value=float("-inf"),
            ),
            context,
        )
        if scenario.weights:
            # Global coordinates, this rank's query rows only: other rows are exactly zero.
            weights = record["weights"]
            assert weights.shape == weights64.shape, context
            assert_within_budget(
                compare(
                    "weights",
                    weights[:, :, rows],
                    weights64[:, :, rows],
                    weights32[:, :, rows],
                    torch.float32,
                ),
                context,
            )
            others = torch.ones(scenario.seq_len, dtype=torch.bool)
            others[rows] = False
            assert not bool(weights[:, :, others].any()), f"weights outside this rank's rows; {context}"
    gathered = records[0]["gathered_out"]  # the ranks' rows in rank order
    order = torch.cat([scenario.row_index(r) for r in range(len(scenario.ranks))])
    empty = torch.isneginf(lse64[:, :, order]).transpose(1, 2).unsqueeze(-1)
    assert_within_budget(
        compare("gathered out", gathered, out64[:, order], out32[:, order], torch.float32, K_OUTPUT, empty=empty),
        f"{scenario}, gathered on group rank 0",
    )


@pytest.mark.parametrize("scenario", [sc for sc in SCENARIOS if sc.gradients], ids=lambda sc: sc.name)
def test_gradients_through_the_ring_match_the_reference(ring_results, scenario):
    records = _scenario_records(ring_results, scenario)
    q, k, v, mask, grad_out = scenario.inputs()
    case = scenario.case(mask)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = differentiable_reference(*leaves, case, mask)
        _loss(out, lse, [None if g is None else g.to(dtype) for g in grad_out]).backward()
        grads[dtype] = [leaf.grad for leaf in leaves]
    for group_rank, record in enumerate(records):
        rows = scenario.row_index(group_rank)
        for name, got, g64, g32 in zip(("dq", "dk", "dv"), record["grads"], grads[torch.float64], grads[torch.float32]):
            verdict = compare(name, got, g64[:, rows], g32[:, rows], torch.float32, K_GRADIENT)
            assert_within_budget(verdict, f"{scenario}, group rank {group_rank}")


def _bytes_per_token(scenario: Scenario, element_size: int, with_v: bool = True) -> int:
    per_tensor = scenario.num_kv_heads * scenario.head_dim * element_size
    mask = 1 if scenario.padding else 0  # the mask travels as one byte per (batch, token)
    return scenario.batch * ((2 if with_v else 1) * per_tensor + mask)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda sc: sc.name)
def test_bytes_sent_per_step_match_the_schedule(ring_results, scenario):
    records = _scenario_records(ring_results, scenario)
    schedule = scenario.schedule()
    P = len(scenario.chunks)
    summed = lambda key: [sum(r[key][s] for r in records) for s in range(len(records[0][key]))]  # noqa: E731

    assert summed("forward_bytes") == list(schedule.step_bytes(_bytes_per_token(scenario, 4)))
    for group_rank, record in enumerate(records):
        assert tuple(record["computed_steps"]) == schedule.compute_steps(group_rank)
    if scenario.weights:
        assert summed("weights_bytes") == list(schedule.step_bytes(_bytes_per_token(scenario, 4, with_v=False)))
    if scenario.gradients:
        # Backward: k, v (and mask) again, plus float32 dk/dv accumulators behind them, plus their return home.
        accumulator = scenario.batch * 2 * scenario.num_kv_heads * scenario.head_dim * 4
        per_step = schedule.step_bytes(_bytes_per_token(scenario, 4) + accumulator)
        returned = sum(schedule.chunk_lengths[c] * accumulator for c in range(P) if schedule.chunk_last_step[c] > 0)
        assert summed("backward_bytes") == [*per_step, returned]
    if scenario.name == "segments_fit_chunks":
        assert schedule.last_step == 0
        assert all(sum(r[key]) == 0 for r in records for key in ("forward_bytes", "backward_bytes"))
    else:
        assert sum(summed("forward_bytes")) > 0, "this scenario needs chunks of other ranks"


def test_configuration_mismatch_raises_on_every_rank(ring_results):
    for rank in MISMATCH_RANKS:
        record = ring_results[rank]["mismatch"]
        assert record["error"] == "ValueError", f"rank {rank}: {record}"
        assert "same configuration" in record["message"], record["message"]


def test_a_rank_rejecting_its_input_makes_every_rank_raise(ring_results):
    assert ring_results[0]["empty_chunk"]["error"] == "ValueError"
    assert "at least one token" in ring_results[0]["empty_chunk"]["message"]
    for rank in MISMATCH_RANKS[1:]:
        record = ring_results[rank]["empty_chunk"]
        assert record["error"] == "ValueError" and "rank(s) [0] rejected" in record["message"], f"rank {rank}: {record}"


def test_rank_failing_mid_ring_makes_the_others_raise(tmp_path):
    results = _spawn(_fault_worker, 3, tmp_path, wait_for=(0, 2))
    assert results[1]["error"] == "RuntimeError" and "injected" in results[1]["message"], results[1]
    for rank in (0, 2):
        assert results[rank]["error"] == "RuntimeError", f"rank {rank}: {results[rank]}"
        assert "ring: rank" in results[rank]["message"], results[rank]["message"]


def test_process_group_rejects_an_in_process_ring_too():
    with pytest.raises(ValueError, match="not both"):
        optimized.BlockSparseRingDilatedAttention([4], [1], backend="torch", ring_size=2, process_group=object())
    with pytest.raises(ValueError, match="not both"):
        optimized.BlockSparseRingDilatedAttention([4], [1], ring_chunk_lengths=[2, 2], process_group=object())


def test_zigzag_refuses_sparse_weights_before_any_communication():
    module = optimized.BlockSparseRingDilatedAttention([4], [1], process_group=object(), ring_layout="zigzag")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="return_attention_weights=True with ring_layout='zigzag'"):
        module(q, q, q, return_attention_weights=True)
