"""GPU benchmark of the triton path against its peers, in one process (experiments/NOTES_gpu.md).

    PYTHONPATH=. python3 -m experiments.bench_gpu --out DIR [--budget-s 420] [--only tiles,main,flexorig,huge]
    PYTHONPATH=. python3 -m experiments.bench_gpu --out DIR --only ab   # kernel variants x tiles, one process

Measures (triton.testing.do_bench medians, bf16, B = 1) forward time, TFLOP/s on active blocks
(4 x active pairs x D, pairs from reference.semantics.active_pair_count) and peak memory above
the inputs for: our triton path graphed and eager; FlexAttention (compiled) on the identical
layout in compacted coordinates (kernel only: the lattices are gathered outside the timing, every
active block is a full block, so no mask_mod runs); FlexAttention with the dilated mask written
in original coordinates; the gather + SDPA (flash) dilated peer; dense SDPA; a bf16 8192^3
matmul (the ceiling). Writes bench_gpu.json (after every configuration, so a timeout keeps what
was measured) and bench_gpu.png under --out.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from experiments import cli, plots
from optimized import BlockSparseRingDilatedAttention, graphs, triton_backend
from optimized.plan import CallPlan
from reference.config import PATTERN_TYPES, DilationConfig, SparsePatternConfig
from reference.semantics import AttentionGeometry, active_pair_count, layout_mask

GIB = 1 << 30
BLOCK = 128
DILATIONS = {
    64: dict(heads=12, segments=(2048, 4096, 8192), rates=(1, 2, 4)),
    128: dict(heads=16, segments=(2048, 4096, 8192, 16384), rates=(1, 2, 4, 8)),
}


def pattern_configs(block=BLOCK):
    layout = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.25
    return {
        "dense": SparsePatternConfig(pattern_type="dense", block_size=block),
        "local_window": SparsePatternConfig(pattern_type="local_window", block_size=block, local_window_size=512),
        "global_local": SparsePatternConfig(
            pattern_type="global_local", block_size=block, local_window_size=512, global_tokens=128
        ),
        "dilated_sparse": SparsePatternConfig(pattern_type="dilated_sparse", block_size=block, sparsity_ratio=0.25),
        "random": SparsePatternConfig(pattern_type="random", block_size=block, sparsity_ratio=0.1, seed=0),
        "custom": SparsePatternConfig(pattern_type="custom", block_size=block, block_layout=layout),
    }


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def bench(fn, warmup=25, rep=100):
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_extra(fn) -> int:
    """Bytes allocated by one call above what was allocated before it (its outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del result
    return int(extra)


def randn(*shape, dtype=torch.bfloat16):
    t = torch.empty(*shape, dtype=dtype, device="cuda")
    t.normal_()  # in place: no float32 temporary
    return t


def tflops(pairs, head_dim, ms):
    return 4.0 * pairs * head_dim / (ms * 1e-3) / 1e12


class Recorder:
    def __init__(self, out_dir, name="bench_gpu.json"):
        self.path = os.path.join(out_dir, name)
        self.data = {
            "info": {},
            "ceilings": {},
            "tiles": {},
            "rows": [],
            "flex_original": [],
            "huge": {},
            "errors": [],
            "ab": [],
        }

    def save(self):
        with open(self.path, "w") as handle:
            json.dump(self.data, handle, indent=1, default=str)

    def error(self, where, exc):
        text = f"{where}: {type(exc).__name__}: {str(exc)[:400]}"
        print("ERROR", text, flush=True)
        self.data["errors"].append(text)
        self.save()


def attempt(recorder, where, fn, default=None):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        recorder.error(where, exc)
        if os.environ.get("BENCH_TRACE"):
            traceback.print_exc()
        torch.cuda.empty_cache()
        return default


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def gather_sdpa(q, k, v, geometry):
    """Dilated attention by gather + SDPA (flash) + scatter, heads split in groups (dense layout)."""
    B, N, H, D = q.shape
    out = torch.zeros_like(q)
    out_view = None
    for geo in geometry.branches:
        w, r = geo.segment_length, geo.dilation_rate
        nseg = N // w
        for o in geo.offsets:
            hs = geo.heads_with_offset(o)
            nh = len(hs)

            def lattice(x):
                lat = x[:, :, hs.start : hs.stop].reshape(B, nseg, w, nh, D)[:, :, o::r]
                return lat.permute(0, 1, 3, 2, 4).reshape(B * nseg, nh, -1, D)

            result = F.scaled_dot_product_attention(lattice(q), lattice(k), lattice(v))
            L = result.shape[2]
            out_view = out.view(B, nseg, w, H, D)
            out_view[:, :, o::r, hs.start : hs.stop] = result.reshape(B, nseg, nh, L, D).permute(0, 1, 3, 2, 4)
    return out


def compacted_flex_inputs(q, k, v, geometry, config, block_masks=None):
    """Per lattice length L: (Q, K, V) of shape (lattices, 1, L, D) and a BlockMask of the layout.

    ``block_masks``: the masks of an earlier call on the same shapes (a cached BlockMask: then only
    the gathers run).
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, N, H, D = q.shape
    groups = {}
    for geo in geometry.branches:
        w, r = geo.segment_length, geo.dilation_rate
        nseg = N // w
        for h in geo.heads:
            o = geo.offset_of(h)
            pick = lambda x: x[:, :, h].reshape(B, nseg, w, D)[:, :, o::r].reshape(B * nseg, -1, D)  # noqa: E731
            ql, kl, vl = pick(q), pick(k), pick(v)
            groups.setdefault(ql.shape[1], []).append((ql, kl, vl))
    calls = []
    for index, (L, parts) in enumerate(groups.items()):
        Q, K, V = (torch.cat([p[i] for p in parts]).unsqueeze(1).contiguous() for i in range(3))
        if block_masks is not None:
            calls.append((Q, K, V, block_masks[index]))
            continue
        nb = math.ceil(L / config.block_size)
        layout = layout_mask(config, nb, False)
        counts = layout.sum(1).to(torch.int32)
        order = torch.argsort((~layout).to(torch.int32), dim=1, stable=True).to(torch.int32)
        dev = lambda t: t.view(1, 1, *t.shape).cuda()  # noqa: E731
        # Every active block is full (non-causal, L a multiple of the block): no mask_mod runs.
        mask = BlockMask.from_kv_blocks(
            dev(torch.zeros_like(counts)), dev(order), dev(counts), dev(order), BLOCK_SIZE=config.block_size
        )
        calls.append((Q, K, V, mask))
    return calls


_compiled = {}


def compiled_flex():
    if "flex" not in _compiled:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["flex"]


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def measure_ceiling(rec):
    a, b = randn(8192, 8192), randn(8192, 8192)
    ms = bench(lambda: a @ b)
    rec.data["ceilings"]["matmul_bf16_8192_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    x = randn(1 << 28)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    rec.data["ceilings"]["copy_tb_s"] = 2 * x.numel() * 2 / (ms * 1e-3) / 1e12
    del a, b, x, y
    rec.save()
    print("ceilings", rec.data["ceilings"], flush=True)


TILE_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
}


def sweep_tiles(rec, N=65536):
    """Pick the kernel tile per head dim on the dense and local_window layouts at 64K."""
    best = {}
    for D, spec in DILATIONS.items():
        H = spec["heads"]
        q, k, v = randn(1, N, H, D), randn(1, N, H, D), randn(1, N, H, D)
        geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), N, H)
        scores = {}
        for cand in TILE_CANDIDATES[D]:
            tile = triton_backend.TileConfig(*cand)
            total = 0.0
            for name in ("dense", "local_window"):
                config = pattern_configs()[name]
                plan = CallPlan.whole(geometry, config, False, D**-0.5)
                pairs = active_pair_count(geometry, config)
                fn = lambda: triton_backend.partial_forward(q, k, v, None, plan, tile=tile)  # noqa: E731
                ms = attempt(rec, f"tile {cand} D={D} {name}", lambda: bench(fn, 10, 50))
                if ms is None:
                    total = float("inf")
                    break
                rec.data["tiles"].setdefault(f"D{D}", []).append(
                    {"tile": cand, "pattern": name, "ms": ms, "tflops": tflops(pairs, D, ms)}
                )
                total += ms
            scores[cand] = total
        best[D] = min(scores, key=scores.get)
        rec.data["tiles"][f"best_D{D}"] = best[D]
        rec.save()
        print(f"tiles D={D}:", {str(c): round(s, 4) for c, s in scores.items()}, "best", best[D], flush=True)
        del q, k, v
    original = triton_backend.default_tile

    def tuned(block_size, block_d, dtype):
        cand = best.get(block_d)
        if cand is not None and dtype != torch.float32 and block_size == BLOCK:
            return triton_backend.TileConfig(*cand)
        return original(block_size, block_d, dtype)

    triton_backend.default_tile = tuned


AB_TILES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
}
AB_PATTERNS = ("dense", "local_window", "dilated_sparse", "random")


def ab_candidates(D):
    """The kernel choices of the A/B: each read variant at the default tile, item order and index mode;
    v3 at the other tiles (with AB_TILES=1 in the environment); the other item order and index mode
    on v2 and v3."""
    cands = [dict(variant=variant) for variant in triton_backend.VARIANTS]
    if os.environ.get("AB_TILES"):
        cands += [dict(variant="v3", tile=tile) for tile in AB_TILES[D][1:]]
    other_order = next(o for o in triton_backend.ITEM_ORDERS if o != triton_backend.item_order())
    other_index = next(i for i in triton_backend.INDEX_MODES if i != triton_backend.index_mode())
    cands += [dict(variant=variant, order=other_order) for variant in ("v2", "v3")]
    cands += [dict(variant=variant, index=other_index) for variant in ("v2", "v3")]
    return cands


def ab_label(cand):
    parts = [cand["variant"]]
    if cand.get("tile"):
        parts.append("x".join(map(str, cand["tile"])))
    parts += [cand[key] for key in ("order", "index") if cand.get(key)]
    return "+".join(parts)


def parse_choice(label):
    """The inverse of ab_label: "v3+by_lattice+load" -> dict(variant="v3", order="by_lattice", index="load")."""
    variant, *rest = label.split("+")
    cand = {"variant": variant}
    for part in rest:
        if part in triton_backend.ITEM_ORDERS:
            cand["order"] = part
        elif part in triton_backend.INDEX_MODES:
            cand["index"] = part
        else:
            cand["tile"] = tuple(int(x) for x in part.split("x"))
    return cand


def run_choice(q, k, v, plan, cand):
    tile = triton_backend.TileConfig(*cand["tile"]) if cand.get("tile") else None
    return triton_backend.partial_forward(
        q, k, v, None, plan, tile=tile, variant=cand["variant"], order=cand.get("order"), index=cand.get("index")
    )


def measure_ab(rec, deadline, Ns=(65536, 1 << 20)):
    """Kernel choices (ab_candidates) eager, in one process, with flex and the gather + SDPA peer.

    Each choice is first checked against v2 at the default tile on the same inputs (bf16: max |diff|
    of out, and lse -inf patterns identical), then timed.
    """
    for N in Ns:
        for D in (64, 128):
            if time.time() > deadline:
                rec.data["errors"].append(f"ab skipped D={D} N={N}: time budget")
                continue
            spec = DILATIONS[D]
            H = spec["heads"]
            torch.cuda.empty_cache()
            q, k, v = randn(1, N, H, D), randn(1, N, H, D), randn(1, N, H, D)
            geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), N, H)
            dense_pairs = active_pair_count(geometry, pattern_configs()["dense"])
            ms = attempt(rec, f"ab gather_sdpa D={D} N={N}", lambda: bench(lambda: gather_sdpa(q, k, v, geometry)))
            if ms is not None:
                rec.data["ab"].append(
                    {
                        "D": D,
                        "N": N,
                        "pattern": "dense",
                        "method": "gather_sdpa",
                        "ms": ms,
                        "tflops": tflops(dense_pairs, D, ms),
                    }
                )
            for name in AB_PATTERNS:
                if time.time() > deadline:
                    break
                config = pattern_configs()[name]
                pairs = active_pair_count(geometry, config)
                plan = CallPlan.whole(geometry, config, False, D**-0.5)
                with torch.no_grad():
                    ref_out, ref_lse = triton_backend.partial_forward(q, k, v, None, plan, variant="v2")
                calls = attempt(
                    rec, f"ab flex inputs D={D} N={N} {name}", lambda: compacted_flex_inputs(q, k, v, geometry, config)
                )
                if calls:
                    flex = compiled_flex()
                    ms = attempt(
                        rec,
                        f"ab flex D={D} N={N} {name}",
                        lambda: bench(lambda: [flex(Q, K, V, block_mask=m, scale=D**-0.5) for Q, K, V, m in calls]),
                    )
                    if ms is not None:
                        rec.data["ab"].append(
                            {
                                "D": D,
                                "N": N,
                                "pattern": name,
                                "method": "flex_compacted",
                                "ms": ms,
                                "tflops": tflops(pairs, D, ms),
                            }
                        )
                    del calls
                for cand in ab_candidates(D):
                    label = ab_label(cand)

                    def call():
                        return run_choice(q, k, v, plan, cand)

                    def check():
                        out, lse = call()
                        diff = float((out.float() - ref_out.float()).abs().max())
                        same_empty = bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)))
                        return diff, same_empty and bool(torch.isfinite(out).all())

                    verdict = attempt(rec, f"ab check {label} D={D} N={N} {name}", check)
                    if verdict is None:
                        continue
                    ms = attempt(rec, f"ab {label} D={D} N={N} {name}", lambda: bench(call, 10, 60))
                    if ms is None:
                        continue
                    rec.data["ab"].append(
                        {
                            "D": D,
                            "N": N,
                            "pattern": name,
                            "method": f"triton_{label}",
                            "choice": cand,
                            "ms": ms,
                            "tflops": tflops(pairs, D, ms),
                            "max_abs_diff_vs_v2": verdict[0],
                            "finite_same_empty": verdict[1],
                        }
                    )
                rec.save()
                del ref_out, ref_lse
                print(
                    f"ab D={D} N={N} {name}: "
                    + ", ".join(
                        f"{r['method']} {r['ms']:.3f}"
                        for r in rec.data["ab"]
                        if r["D"] == D and r["N"] == N and r["pattern"] == name
                    ),
                    flush=True,
                )
            del q, k, v


def summarize_ab(rec):
    rows = rec.data["ab"]
    if not rows:
        return
    ceiling = rec.data["ceilings"].get("matmul_bf16_8192_tflops", float("nan"))
    print(f"\nA/B (eager, bf16, block {BLOCK}); ceiling {ceiling:.0f} TF; ms; best = fastest kernel choice")
    print(
        f"{'D':>4} {'N':>8} {'pattern':>15} {'flex':>7} {'auto':>7} {'v2':>7} {'v3':>7} {'v3tma':>7} {'best':>7} "
        f"{'%mm':>5} {'xflex':>6} {'xpeer':>6} {'maxdiff':>8}  best choice"
    )
    for D in (64, 128):
        for N in sorted({r["N"] for r in rows if r["D"] == D}):
            peer = next((r for r in rows if r["D"] == D and r["N"] == N and r["method"] == "gather_sdpa"), None)
            for name in AB_PATTERNS:
                here = [r for r in rows if r["D"] == D and r["N"] == N and r["pattern"] == name]
                ours = [r for r in here if r["method"].startswith("triton_")]
                if not ours:
                    continue
                flex = next((r for r in here if r["method"] == "flex_compacted"), None)
                by = {r["method"]: r for r in ours}
                cell = lambda r: f"{r['ms']:.3f}" if r else "-"  # noqa: E731
                best = min(ours, key=lambda r: r["ms"])
                xflex = f"{flex['ms'] / best['ms']:.2f}" if flex else "-"
                xpeer = f"{peer['ms'] / best['ms']:.2f}" if (peer and name == "dense") else "-"
                print(
                    f"{D:>4} {N:>8} {name:>15} {cell(flex):>7} {cell(by.get('triton_auto')):>7} "
                    f"{cell(by.get('triton_v2')):>7} "
                    f"{cell(by.get('triton_v3')):>7} {cell(by.get('triton_v3tma')):>7} {best['ms']:>7.3f} "
                    f"{100 * best['tflops'] / ceiling:>5.1f} {xflex:>6} {xpeer:>6} "
                    f"{max(r['max_abs_diff_vs_v2'] for r in ours):>8.1e}  {best['method'][7:]}"
                )
            if peer:
                print(f"{D:>4} {N:>8} {'gather_sdpa':>15} {peer['ms']:>7.3f}")


def measure_main(rec, D, Ns, patterns, deadline, flex_max_n=1 << 20):
    spec = DILATIONS[D]
    H = spec["heads"]
    configs = pattern_configs()
    for N in Ns:
        if time.time() > deadline:
            rec.data["errors"].append(f"skipped D={D} N={N}: time budget")
            continue
        torch.cuda.empty_cache()
        q, k, v = randn(1, N, H, D), randn(1, N, H, D), randn(1, N, H, D)
        qkv_out_bytes = 4 * q.numel() * q.element_size()
        geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), N, H)
        base = {"D": D, "H": H, "N": N, "qkv_out_bytes": qkv_out_bytes}
        dense_pairs = active_pair_count(geometry, configs["dense"])
        # Peers that do not depend on the block layout.
        ms = attempt(rec, f"gather_sdpa D={D} N={N}", lambda: bench(lambda: gather_sdpa(q, k, v, geometry)))
        if ms is not None:
            peak = attempt(rec, "gather_sdpa peak", lambda: peak_extra(lambda: gather_sdpa(q, k, v, geometry)))
            rec.data["rows"].append(
                dict(
                    base,
                    method="gather_sdpa",
                    pattern="dense",
                    ms=ms,
                    tflops=tflops(dense_pairs, D, ms),
                    peak_extra=peak,
                )
            )
        if N <= 65536:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            ms = attempt(
                rec, f"dense_sdpa D={D} N={N}", lambda: bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
            )
            if ms is not None:
                rec.data["rows"].append(
                    dict(base, method="dense_sdpa", pattern="full", ms=ms, tflops=tflops(H * N * N, D, ms))
                )
            del qt, kt, vt
        for name in patterns:
            if time.time() > deadline:
                rec.data["errors"].append(f"skipped D={D} N={N} {name}: time budget")
                break
            config = configs[name]
            pairs = active_pair_count(geometry, config)
            row = dict(base, pattern=name, active_pairs=pairs)
            for graphed in (False, True):
                module = BlockSparseRingDilatedAttention(
                    spec["segments"], spec["rates"], config, backend="triton", use_cuda_graphs=graphed
                )
                method = "triton_graphed" if graphed else "triton_eager"

                def call():
                    with torch.no_grad():
                        return module(q, k, v)

                ms = attempt(rec, f"{method} D={D} N={N} {name}", lambda: bench(call))
                if ms is None:
                    continue
                peak = attempt(rec, f"{method} peak", lambda: peak_extra(call))
                rec.data["rows"].append(dict(row, method=method, ms=ms, tflops=tflops(pairs, D, ms), peak_extra=peak))
            if N <= 8192:
                # Graph replay with copy-in: alternate two input sets, so no call repeats the last tensors.
                module = BlockSparseRingDilatedAttention(
                    spec["segments"], spec["rates"], config, backend="triton", use_cuda_graphs=True
                )
                sets = [(q, k, v), (q.clone(), k.clone(), v.clone())]
                turn = [0]

                def alternate():
                    turn[0] ^= 1
                    with torch.no_grad():
                        return module(*sets[turn[0]])

                ms = attempt(rec, f"graphed copy-in D={D} N={N} {name}", lambda: bench(alternate))
                if ms is not None:
                    rec.data["rows"].append(
                        dict(row, method="triton_graphed_copyin", ms=ms, tflops=tflops(pairs, D, ms))
                    )
                del sets
            graphs.clear_graphs()
            if N <= flex_max_n:
                calls = attempt(
                    rec, f"flex inputs D={D} N={N} {name}", lambda: compacted_flex_inputs(q, k, v, geometry, config)
                )
                if calls:
                    flex = compiled_flex()
                    scale = D**-0.5

                    def run_flex():
                        return [flex(Q, K, V, block_mask=m, scale=scale) for Q, K, V, m in calls]

                    ms = attempt(rec, f"flex D={D} N={N} {name}", lambda: bench(run_flex))
                    if ms is not None:
                        rec.data["rows"].append(dict(row, method="flex_compacted", ms=ms, tflops=tflops(pairs, D, ms)))
                del calls
            printable = [
                r for r in rec.data["rows"] if r.get("N") == N and r.get("D") == D and r.get("pattern") == name
            ]
            print(
                f"D={D} N={N} {name}: "
                + ", ".join(f"{r['method']} {r['ms']:.3f}ms {r['tflops']:.0f}TF" for r in printable),
                flush=True,
            )
            rec.save()
        del q, k, v
        torch.cuda.empty_cache()


def measure_flex_original(rec, deadline, Ns=(8192, 32768, 65536)):
    """FlexAttention with the dilated mask in original coordinates, as a user would write it (D=64)."""
    from torch.nn.attention.flex_attention import create_block_mask

    D, spec = 64, DILATIONS[64]
    H = spec["heads"]
    for name in ("dense", "local_window"):
        config = pattern_configs()[name]
        for N in Ns:
            if time.time() > deadline:
                break
            geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), N, H)
            seg = torch.tensor(
                [geometry.branches[g].segment_length for g in range(3) for _ in geometry.branches[g].heads]
            )
            rate = torch.tensor(
                [geometry.branches[g].dilation_rate for g in range(3) for _ in geometry.branches[g].heads]
            )
            off = torch.tensor([geo.offset_of(h) for geo in geometry.branches for h in geo.heads])
            seg, rate, off = seg.cuda(), rate.cuda(), off.cuda()
            nb = math.ceil(int((seg // rate).max()) / BLOCK)
            layout = layout_mask(config, nb, False).cuda()

            def mask_mod(b, h, q_idx, kv_idx):
                w, r, o = seg[h], rate[h], off[h]
                uq, uk = q_idx % w, kv_idx % w
                same = (q_idx // w) == (kv_idx // w)
                on = ((uq % r) == o) & ((uk % r) == o)
                tq = torch.clamp((uq - o) // r, min=0) // BLOCK
                tk = torch.clamp((uk - o) // r, min=0) // BLOCK
                return same & on & layout[tq, tk]

            t0 = time.time()
            mask = attempt(
                rec,
                f"create_block_mask N={N} {name}",
                lambda: create_block_mask(mask_mod, None, H, N, N, device="cuda", BLOCK_SIZE=BLOCK, _compile=True),
            )
            build_s = time.time() - t0
            entry = {"N": N, "pattern": name, "create_block_mask_s": build_s}
            if mask is None:
                entry["failed"] = rec.data["errors"][-1]
                rec.data["flex_original"].append(entry)
                rec.save()
                break
            q, k, v = (randn(1, H, N, D) for _ in range(3))
            flex = compiled_flex()
            ms = attempt(rec, f"flex original N={N} {name}", lambda: bench(lambda: flex(q, k, v, block_mask=mask)))
            pairs = active_pair_count(geometry, config)
            entry.update(ms=ms, tflops=None if ms is None else tflops(pairs, D, ms))
            rec.data["flex_original"].append(entry)
            rec.save()
            print("flex original", entry, flush=True)
            del q, k, v, mask
            torch.cuda.empty_cache()


def measure_huge(rec, N=1 << 24, H=12, D=64):
    """One forward at 16M tokens, graphs off: time and peak memory against the bytes of q, k, v, out."""
    graphs.clear_graphs()
    torch.cuda.empty_cache()
    spec = DILATIONS[64]
    config = pattern_configs()["dense"]
    q, k, v = randn(1, N, H, D), randn(1, N, H, D), randn(1, N, H, D)
    module = BlockSparseRingDilatedAttention(
        spec["segments"], spec["rates"], config, backend="triton", use_cuda_graphs=False
    )
    geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), N, H)
    t0 = time.time()
    plan = CallPlan.whole(geometry, config, False, D**-0.5)
    triton_backend.device_tables(plan, q.device)
    tables_s = time.time() - t0
    pairs = active_pair_count(geometry, config)
    qkv_out = 4 * q.numel() * q.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            out = module(q, k, v)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
        del out
    peak = torch.cuda.max_memory_allocated()
    rec.data["huge"] = {
        "N": N,
        "H": H,
        "D": D,
        "pattern": "dense",
        "ms": times,
        "tflops": tflops(pairs, D, min(times)),
        "peak_bytes": peak,
        "qkv_out_bytes": qkv_out,
        "peak_over_qkv_out": peak / qkv_out,
        "table_build_s": tables_s,
        "graphs": False,
    }
    rec.save()
    print("huge", rec.data["huge"], flush=True)


def plot(rec, out_dir):
    plots.use_file_backend()
    figure = plots.plot_bench_gpu(
        rec.data["rows"],
        rec.data["ceilings"].get("matmul_bf16_8192_tflops"),
        {D: spec["heads"] for D, spec in DILATIONS.items()},
        BLOCK,
    )
    plots.save_figure(figure, os.path.join(out_dir, "bench_gpu.png"), dpi=110)


def summarize(rec):
    rows = rec.data["rows"]
    ceiling = rec.data["ceilings"].get("matmul_bf16_8192_tflops", float("nan"))
    print(
        f"\nceiling matmul {ceiling:.0f} TF; tiles {rec.data['tiles'].get('best_D64')} / "
        f"{rec.data['tiles'].get('best_D128')}"
    )
    for r in rows:
        if r["method"] == "triton_graphed_copyin":
            print(f"graphed copy-in D={r['D']} N={r['N']} {r['pattern']}: {r['ms']:.4f} ms")
    print(
        f"{'D':>4} {'N':>8} {'pattern':>15} {'graphed':>9} {'eager':>9} {'flex':>9} {'TF':>5} {'%mm':>5} "
        f"{'xflex':>6} {'peer':>9} {'xpeer':>6}"
    )
    for D in (64, 128):
        for N in sorted({r["N"] for r in rows if r["D"] == D}):
            pick = lambda m, p: next(
                (
                    r
                    for r in rows
                    if r["D"] == D
                    and r["N"] == N
                    and r["method"] == m  # noqa: E731
                    and r["pattern"] == p
                ),
                None,
            )
            peer = pick("gather_sdpa", "dense")
            for pattern in pattern_configs():
                g, e, f = (
                    pick("triton_graphed", pattern),
                    pick("triton_eager", pattern),
                    pick("flex_compacted", pattern),
                )
                if not (g or e):
                    continue
                best = g or e
                ms = lambda r: f"{r['ms']:.3f}" if r else "-"  # noqa: E731
                xflex = f"{f['ms'] / best['ms']:.2f}" if f else "-"
                xpeer = f"{peer['ms'] / best['ms']:.2f}" if (peer and pattern == "dense") else "-"
                print(
                    f"{D:>4} {N:>8} {pattern:>15} {ms(g):>9} {ms(e):>9} {ms(f):>9} {best['tflops']:>5.0f} "
                    f"{100 * best['tflops'] / ceiling:>5.1f} {xflex:>6} "
                    f"{ms(peer) if pattern == 'dense' else '':>9} {xpeer:>6}"
                )
    if rec.data["huge"]:
        h = rec.data["huge"]
        print(f"16M: {h['ms']} ms, peak/qkvo {h['peak_over_qkv_out']:.4f}")
    for e in rec.data["errors"]:
        print("error:", e[:200])


PARTS = ("tiles", "main", "flexorig", "huge", "ab")


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "experiments/results"),
        help="folder for bench_gpu.json and .png (default $OUT or experiments/results)",
    )
    parser.add_argument(
        "--budget-s",
        type=cli.positive_float,
        default=420.0,
        help="seconds after which remaining configurations are skipped",
    )
    parser.add_argument(
        "--only",
        type=cli.comma_list(choices=PARTS),
        default="tiles,main,flexorig,huge",
        help=f"parts to run, comma-separated: {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--ns",
        type=cli.comma_list(item=cli.positive_int),
        default="8192,65536,1048576",
        help="sequence lengths of the main part",
    )
    parser.add_argument(
        "--patterns",
        type=cli.comma_list(choices=PATTERN_TYPES),
        default=",".join(pattern_configs()),
        help="layouts of the main part",
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_output_stem(parser, os.path.join(args.out, "bench_gpu.json"), "--out")
    cli.require_cuda(parser, "experiments.bench_gpu")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    rec = Recorder(args.out)
    import triton

    rec.data["info"] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rec.save()
    parts, Ns, patterns = args.only, args.ns, args.patterns
    attempt(rec, "ceiling", lambda: measure_ceiling(rec))
    if "ab" in parts:
        attempt(rec, "ab", lambda: measure_ab(rec, deadline - 20))
    if "tiles" in parts:
        attempt(rec, "tiles", lambda: sweep_tiles(rec))
    if "main" in parts:
        for N in Ns:  # both head dims at each N before the next N: a short budget still covers both
            for D in (64, 128):
                attempt(rec, f"main D={D} N={N}", lambda: measure_main(rec, D, [N], patterns, deadline - 50))
    if "huge" in parts:
        attempt(rec, "huge", lambda: measure_huge(rec))
    if "flexorig" in parts:
        attempt(rec, "flex original", lambda: measure_flex_original(rec, deadline))
    rec.data["info"]["elapsed_s"] = time.time() - start
    rec.save()
    if rec.data["rows"]:
        attempt(rec, "plot", lambda: plot(rec, args.out))
        summarize(rec)
    summarize_ab(rec)


if __name__ == "__main__":
    main()
