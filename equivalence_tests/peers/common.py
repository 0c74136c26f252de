"""What both peers share: the checks of what a plain dilated attention supports, and version lookup."""

from __future__ import annotations

from importlib import metadata


def distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def require_plain_dilated_attention(config, peer: str, head_mode: str) -> None:
    """Raise NotImplementedError, naming the feature, for a drawn configuration ``peer`` cannot run.

    Both peers compute plain dilated attention (docs/semantics.md section 3, layout "dense") of
    one sequence in one process, with as many key/value heads as query heads and one way of
    giving heads to branches (``head_mode``; with one branch both modes are the same).
    """
    case = config.case
    if case.sparse_config.pattern_type != "dense":
        raise NotImplementedError(
            f"{peer} computes plain dilated attention: block layout {case.sparse_config.pattern_type!r} "
            "is not supported (only 'dense')"
        )
    if config.ring_chunk_lengths is not None:
        raise NotImplementedError(f"{peer} has no ring split")
    if case.shape.num_kv_heads != case.shape.num_heads:
        raise NotImplementedError(f"{peer} takes k and v with as many heads as q (no grouped-query attention)")
    if case.dilation.num_branches > 1 and case.dilation.head_mode != head_mode:
        raise NotImplementedError(
            f"{peer} gives heads to branches as head_mode {head_mode!r} (with more than one branch, "
            f"head_mode {case.dilation.head_mode!r} is another computation)"
        )
