"""Every picture of the sweeps and notebooks (matplotlib is imported only here and only when drawing).

Each function returns its axes or figure, so a notebook shows it and a CLI saves it with
``save_figure``. The numbers drawn come from the measuring and counting modules; nothing is
computed here but the fitted slopes shown in the legends (``experiments.analysis``).
"""

from __future__ import annotations

import math

from .analysis import fit_loglog_slope, series
from .lattices import allowed_pairs, lattice_membership

_METHOD_STYLE = {
    "dense_nxn": dict(color="black", marker="s"),
    "sdpa": dict(color="tab:gray", marker="D"),
    "reference": dict(color="tab:red", marker="^"),
    "optimized": dict(color="tab:blue", marker="o"),
    "optimized+weights": dict(marker="."),
}


def save_figure(figure, path: str, dpi: int = 120) -> None:
    """Write ``figure`` to ``path`` (tight bounding box) and close it: the CLIs draw without a display."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)


def use_file_backend() -> None:
    """Select matplotlib's Agg backend (files only): a CLI may run where no display exists."""
    import matplotlib

    matplotlib.use("Agg")


def _finish_axes(ax, title: str | None):
    """Grid, legend outside the plot on the right, optional title: the look of every plot here."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_peaks(
    rows,
    ax=None,
    value: str = "peak_bytes",
    min_fit_seq_len: int = 0,
    title: str | None = None,
    show_nxn: bool = True,
    methods=None,
    fit_last: int | None = None,
):
    """Log-log plot of ``value`` (bytes) against N, one line per (method, pattern), fitted slope in the legend."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5))
    for (method, pattern), (ns, vs) in series(rows, value).items():
        if methods is not None and method not in methods:
            continue
        fit_ns = [n for n in ns if n >= min_fit_seq_len]
        fit_vs = [v for n, v in zip(ns, vs) if n >= min_fit_seq_len]
        if fit_last:
            fit_ns, fit_vs = fit_ns[-fit_last:], fit_vs[-fit_last:]
        slope = fit_loglog_slope(fit_ns, fit_vs)
        label = method if pattern is None else f"{method} [{pattern}]"
        label += ": one point" if math.isnan(slope) else f": slope {slope:.2f}"
        style = dict(_METHOD_STYLE.get(method, {}))
        if method == "optimized" and pattern != "dilated_sparse":
            style.update(alpha=0.35)  # all patterns give the same forward memory; one stands out
        ax.loglog(ns, [v / 2**20 for v in vs], label=label, **style)
    if show_nxn:
        nxn = {}
        for row in rows:
            nxn[row["seq_len"]] = row["nxn_bytes"]
        ns = sorted(nxn)
        ax.loglog(ns, [nxn[n] / 2**20 for n in ns], "k--", lw=1, label="analytic: one B·H·N·N tensor (slope 2)")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("MiB")
    return _finish_axes(ax, title)


def plot_throughput(rows, ax=None, title: str | None = None):
    """Useful TFLOP/s against N, one line per (method, pattern)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    for (method, pattern), (ns, vs) in series(rows, "useful_tflops").items():
        label = method if pattern is None else f"{method} [{pattern}]"
        ax.semilogx(ns, vs, label=label, **_METHOD_STYLE.get(method, {}))
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("useful TFLOP/s (4 x allowed pairs x D / time)")
    return _finish_axes(ax, title)


def plot_layouts(setting, patterns, num_blocks: int, is_causal: bool = False):
    """One picture per pattern: the (query block, key block) layout of a lattice with ``num_blocks`` blocks."""
    import matplotlib.pyplot as plt

    from reference import layout_mask

    from .settings import pattern_config

    columns = min(3, len(patterns))
    rows = -(-len(patterns) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax, pattern in zip(axes.flat, patterns):
        mask = layout_mask(pattern_config(pattern, setting), num_blocks, is_causal)
        ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{pattern}: {int(mask.sum())}/{num_blocks * num_blocks} blocks", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    for ax in list(axes.flat)[len(patterns) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_lattices(geometry, title: str = ""):
    """Per branch: which positions (columns) are on each head's lattice (rows), colored by offset."""
    import matplotlib.pyplot as plt

    member = lattice_membership(geometry)
    branches = geometry.branches
    fig, axes = plt.subplots(
        len(branches), 1, figsize=(10, 1.0 + 0.35 * geometry.num_heads * len(branches)), squeeze=False
    )
    top = int(member.max()) or 1
    for ax, geo in zip(axes[:, 0], branches):
        ax.imshow(member[geo.branch].numpy(), cmap="viridis", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
        for boundary in range(geo.segment_length, geometry.seq_len, geo.segment_length):
            ax.axvline(boundary - 0.5, color="red", lw=1)
        ax.set_ylabel("head")
        ax.set_yticks(range(geometry.num_heads))
        ax.set_title(
            f"branch {geo.branch}: segment {geo.segment_length}, rate {geo.dilation_rate}, "
            f"heads {geo.heads.start}..{geo.heads.stop - 1} (color = offset + 1; red = segment edge)",
            fontsize=9,
        )
    axes[-1, 0].set_xlabel("position")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_views(geometry, config, heads, is_causal: bool = False):
    """Which keys each query sees, for a few heads (color = number of branches allowing the pair)."""
    import matplotlib.pyplot as plt

    counts = [allowed_pairs(geometry, config, head, is_causal) for head in heads]
    top = max(int(c.max()) for c in counts) or 1
    fig, axes = plt.subplots(1, len(heads), figsize=(3.3 * len(heads), 3.4), squeeze=False)
    for ax, head, count in zip(axes[0], heads, counts):
        ax.imshow(count.numpy(), cmap="magma_r", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(f"head {head}: {int((count > 0).sum())} pairs", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.tight_layout()
    return fig


def plot_schedule(schedule, token_bytes: int, title: str = ""):
    """Three panels: active (query chunk, key chunk) pairs; what each rank does at each step; MiB per step."""
    import matplotlib.pyplot as plt
    import numpy as np

    P = schedule.num_chunks
    fig, (pairs_ax, steps_ax, bytes_ax) = plt.subplots(1, 3, figsize=(15, 4))
    pairs_ax.imshow(np.array(schedule.active, dtype=float), cmap="Blues", vmin=0, vmax=1)
    pairs_ax.set_title("active chunk pairs", fontsize=9)
    pairs_ax.set_xlabel("key chunk")
    pairs_ax.set_ylabel("query chunk (rank)")

    # 2 = computes, 1 = holds the chunk without computing (it only forwards it), 0 = idle.
    grid = np.zeros((P, P))
    for rank in range(P):
        for step in range(P):
            received = step == 0 or schedule.receives(rank, step)
            grid[rank, step] = 2 if schedule.computes(rank, step) else (1 if received else 0)
    steps_ax.imshow(grid, cmap="Greens", vmin=0, vmax=2)
    for rank in range(P):
        for step in range(P):
            steps_ax.text(step, rank, str(schedule.chunk_at(rank, step)), ha="center", va="center", fontsize=7)
            if step >= 1 and schedule.receives(rank, step):
                steps_ax.plot(step - 0.4, rank - 0.3, marker=">", color="tab:red", ms=4)
    steps_ax.set_title("rank x step: key chunk held (dark = computes, > = received)", fontsize=9)
    steps_ax.set_xlabel("step")
    steps_ax.set_ylabel("rank")

    step_bytes = schedule.step_bytes(token_bytes)
    bytes_ax.bar(range(P), [b / 2**20 for b in step_bytes], color="tab:orange")
    bytes_ax.set_title(f"MiB sent per step (total {sum(step_bytes) / 2**20:.0f} MiB)", fontsize=9)
    bytes_ax.set_xlabel("step")
    bytes_ax.set_ylabel("MiB, all ranks")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ring_sweep(rows, ax=None):
    """Bytes sent against P, relative to the naive ring, one line per (dilation, pattern, causal)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    lines: dict = {}
    for row in sorted(rows, key=lambda r: r["parts"]):
        key = (row["dilation"], row["pattern"], row["is_causal"])
        xs, ys = lines.setdefault(key, ([], []))
        xs.append(row["parts"])
        ys.append(row["sent_over_naive"])
    for (dilation, pattern, causal), (xs, ys) in lines.items():
        label = f"{dilation} {pattern}{' causal' if causal else ''}"
        ax.plot(xs, ys, marker="o", ls="--" if causal else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ring size P (equal chunks)")
    ax.set_ylabel("bytes sent / naive ring's bytes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_bench_gpu(rows, ceiling_tflops: float | None, heads_by_head_dim: dict, block: int):
    """experiments/bench_gpu.py's rows: TFLOP/s on active blocks against N, one panel per head dim, our graphed
    path, flex on the compacted layout and the gather + SDPA peer; the matmul ceiling and the target as lines."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(heads_by_head_dim), figsize=(13, 5), squeeze=False)
    for ax, (D, heads) in zip(axes[0], sorted(heads_by_head_dim.items())):
        for method, style in (("triton_graphed", "-o"), ("flex_compacted", "--s"), ("gather_sdpa", ":^")):
            for pattern in sorted({r["pattern"] for r in rows if r["D"] == D}):
                pts = sorted(
                    (r["N"], r["tflops"])
                    for r in rows
                    if r["D"] == D and r["method"] == method and r["pattern"] == pattern
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{method} {pattern}")
        if ceiling_tflops:
            ax.axhline(ceiling_tflops, color="k", lw=0.8)
            # the targets: 60% of the matmul rate at D = 128, 50% at D = 64
            ax.axhline(ceiling_tflops * (0.6 if D == 128 else 0.5), color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("TFLOP/s on active blocks")
        ax.set_title(f"D={D}, H={heads}, bf16, block {block}")
        ax.legend(fontsize=6)
    return fig
