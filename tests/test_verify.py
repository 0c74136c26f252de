"""``python -m equivalence_tests.verify``: it passes the project's own module, finds planted bugs with a
minimal counterexample in the right feature area, reports what a target does not support, and has a
well-behaved command line. Small example budgets: the whole file runs in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import optimized
import reference
from equivalence_tests import verify
from equivalence_tests.peers import own
from reference.semantics import AttentionGeometry, dense_multiplicity

# Small cases: the planted bugs show at a handful of tokens, and every area stays fast.
SMALL = dict(max_seq_len=16, max_heads=4, max_head_dim=8, examples=12)
PLAIN = dict(patterns=("dense",), gqa=False, ring=False, gradients=False)


def _own_module(config):
    return optimized.BlockSparseRingDilatedAttention(
        **config.module_kwargs(), backend="torch", ring_chunk_lengths=config.ring_chunk_lengths
    )


# --------------------------------------------------------------------------------------------
# Planted bugs: each target is right except for one thing
# --------------------------------------------------------------------------------------------


def wrong_scale_factory(config):
    """Scores scaled by 1 / D instead of D ** -0.5 (the same only at D = 1)."""
    module = _own_module(config)
    return lambda q, k, v, is_causal=False, key_padding_mask=None: module(
        q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, scale=1.0 / q.shape[-1]
    )


def padding_ignored_factory(config):
    module = _own_module(config)
    return lambda q, k, v, is_causal=False, key_padding_mask=None: module(q, k, v, is_causal=is_causal)


def causal_off_by_one_factory(config):
    """The reference's allowed pairs, except that a causal query also sees the next key (j <= i + 1)."""
    kwargs = config.module_kwargs()

    def attention(q, k, v, is_causal=False, key_padding_mask=None):
        n, heads = q.shape[1], q.shape[2]
        geometry = AttentionGeometry(config.case.dilation, n, heads)
        counts = dense_multiplicity(geometry, kwargs["sparse_config"], is_causal, key_padding_mask)
        if is_causal:
            uncausal = dense_multiplicity(geometry, kwargs["sparse_config"], False, key_padding_mask)
            next_key = torch.ones(n, n, dtype=torch.bool).triu(1).tril(1)
            counts = counts + uncausal * next_key
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.repeat_interleave(heads // k.shape[2], 2).double())
        logits = scores * q.shape[-1] ** -0.5 + torch.log(counts.double())
        empty = (counts.sum(-1) == 0).unsqueeze(-1)
        lse = torch.logsumexp(logits.masked_fill(empty, 0.0), -1)
        probs = torch.exp(logits - lse.unsqueeze(-1)).masked_fill(empty, 0.0)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(heads // v.shape[2], 2).double())
        return out.to(q.dtype)

    return attention


def no_gqa_factory(config):
    if config.case.shape.num_kv_heads != config.case.shape.num_heads:
        raise NotImplementedError("this target has no grouped-query heads")
    return own.torch_factory(config)


# --------------------------------------------------------------------------------------------
# The own module passes
# --------------------------------------------------------------------------------------------


def test_own_module_passes_every_area():
    report = verify.verify(own.torch_factory, verify.VerifyOptions(**{**SMALL, "examples": 4}))
    names = [area.name for area in report.areas]
    assert names[:6] == [f"pattern {p}" for p in reference.PATTERN_TYPES]
    assert {
        "head_mode split",
        "head_mode all",
        "causal",
        "key padding",
        "grouped-query heads",
        "ring split",
        "gradients",
        "combined",
    } <= set(names)
    for area in report.areas:
        assert area.status == "pass", (area.name, area.counterexample)
        assert area.judged > 0 and area.passed == area.judged, area
        assert area.worst_error_over_budget <= 1.0
    assert report.passed


def test_reference_against_itself_is_exact():
    """The reference as a target: every error 0 (the harness adds nothing of its own)."""

    def reference_factory(config):
        module = reference.BlockSparseRingDilatedAttention(**config.module_kwargs(), compute_dtype=None)
        return lambda q, k, v, is_causal=False, key_padding_mask=None: module(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, return_lse=True
        )

    options = verify.VerifyOptions(**{**SMALL, "examples": 4}, ring=False, dtype=torch.float64)
    report = verify.verify(reference_factory, options)
    assert report.passed
    assert all(area.worst_ulps == 0.0 for area in report.areas), [(a.name, a.worst_ulps) for a in report.areas]


# --------------------------------------------------------------------------------------------
# Planted bugs are found, in their area, with a minimal counterexample
# --------------------------------------------------------------------------------------------


def _fields(area):
    return area.counterexample["fields"]


def test_wrong_scale_fails_everywhere_with_a_minimal_example():
    report = verify.verify(wrong_scale_factory, verify.VerifyOptions(**SMALL, **PLAIN, padding=False))
    assert not report.passed
    assert all(area.status == "fail" for area in report.areas), [a.summary() for a in report.areas]
    fields = _fields(report.area("pattern dense"))
    # Shrunk: one batch, one head; the bug needs D >= 2 and two keys in some row.
    assert fields["shape"]["batch"] == 1 and fields["shape"]["num_heads"] == 1
    assert fields["shape"]["head_dim"] == 2 and fields["shape"]["seq_len"] == 2
    difference = report.area("pattern dense").counterexample["differences"][0]
    assert difference["quantity"] == "out" and difference["error"] > difference["budget"]
    assert difference["heads"] == [0] and difference["positions_by_head"]["0"]


def test_ignored_padding_fails_only_where_keys_are_padded():
    report = verify.verify(padding_ignored_factory, verify.VerifyOptions(**SMALL, **PLAIN))
    statuses = {area.name: area.status for area in report.areas}
    assert statuses["key padding"] == "fail" and statuses["combined"] == "fail"
    assert {statuses[name] for name in ("pattern dense", "head_mode split", "head_mode all", "causal")} == {"pass"}
    fields = _fields(report.area("key padding"))
    assert fields["key_padding_mask"] is not None and any(any(row) for row in fields["key_padding_mask"])
    assert fields["shape"]["seq_len"] <= 2 and fields["shape"]["num_heads"] == 1
    assert "differences" in report.area("key padding").counterexample


def test_causal_off_by_one_fails_only_in_causal_areas():
    report = verify.verify(causal_off_by_one_factory, verify.VerifyOptions(**SMALL, **PLAIN, padding=False))
    statuses = {area.name: area.status for area in report.areas}
    assert statuses["causal"] == "fail" and statuses["combined"] == "fail"
    assert {statuses[name] for name in ("pattern dense", "head_mode split", "head_mode all")} == {"pass"}
    example = report.area("causal").counterexample
    assert example["fields"]["is_causal"] is True
    assert example["fields"]["shape"]["seq_len"] == 2  # query 0 must not see key 1
    difference = example["differences"][0]
    assert difference["positions_by_head"] == {"0": [0]}
    assert difference["worst"]["at"]["position"] == 0


def test_an_unsupported_configuration_is_reported_not_failed():
    options = verify.VerifyOptions(**{**SMALL, "examples": 6}, patterns=("dense",), ring=False, gradients=False)
    report = verify.verify(no_gqa_factory, options)
    gqa = report.area("grouped-query heads")
    assert gqa.status == "unsupported" and gqa.judged == 0
    assert gqa.unsupported == {"NotImplementedError: this target has no grouped-query heads": gqa.examples}
    assert gqa.summary() == "unsupported: NotImplementedError: this target has no grouped-query heads"
    assert report.area("combined").status == "pass"  # judged where H_kv = H, unsupported elsewhere
    assert report.passed


def test_a_target_returning_something_else_fails_with_a_reason():
    config = verify.VerifyCase("x", _case(), torch.float32, "cpu")
    outcome = verify.judge(lambda config: lambda q, k, v, **kwargs: "not a tensor", config)
    assert outcome.status == "fail" and "returned str" in outcome.message
    outcome = verify.judge(lambda config: lambda q, k, v, **kwargs: q.double(), config)
    assert outcome.status == "fail" and "out dtype" in outcome.verdicts


def _case():
    from equivalence_tests import strategies as s

    return s.AttentionCase(
        s.Shape(1, 8, 2, 2, 4),
        reference.DilationConfig((4,), (2,), "split"),
        reference.SparsePatternConfig(pattern_type="dense"),
        False,
        None,
        5,
    )


def test_float64_budget_counts_the_references_own_error():
    """In float64 the budget holds the reference's float32 error scaled to float64's eps, added twice."""
    ref64 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ref32 = torch.tensor([1.0 + 2**-20, 2.0], dtype=torch.float64)
    baseline = verify.float64_baseline(ref64, ref32)
    estimate = 2**-20 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    assert float((baseline - ref64).abs().max()) == pytest.approx(estimate)
    verdict = verify.judge_quantity("x", ref64 + 2 * estimate, ref64, baseline, torch.float64, k=2.0)
    assert verdict.budget == pytest.approx(3 * estimate + 2 * torch.finfo(torch.float64).eps * 2.0)
    assert verdict.passed
    assert not verify.judge_quantity("x", ref64 + 4 * estimate, ref64, baseline, torch.float64, k=2.0).passed


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_help_exits_zero():
    result = subprocess.run(
        [sys.executable, "-m", "equivalence_tests.verify", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TARGET" in result.stdout and "--examples" in result.stdout and "--json" in result.stdout


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["--dtype", "float8"], "--dtype"),
        (["--patterns", "dense,bogus"], "--patterns"),
        (["--head-modes", "some"], "--head-modes"),
        (["--examples", "0"], "--examples"),
        (["--seed", "-1"], "--seed"),
        (["--max-seq-len", "x"], "--max-seq-len"),
        (["--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_options_give_one_argparse_error_naming_the_option(arguments, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main(["equivalence_tests.peers.own:factory", *arguments])
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error_line.startswith("python -m equivalence_tests.verify: error:") and named in error_line


@pytest.mark.parametrize(
    "target, says",
    [
        ("no_colon", "package.module:factory"),
        ("no_such_module_here:factory", "cannot import"),
        ("equivalence_tests.peers.own:no_such_factory", "has no attribute"),
    ],
)
def test_bad_target_is_an_argparse_error(target, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main([target])
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "TARGET" in error_line and says in error_line


def test_cli_exit_status_table_and_json(tmp_path, monkeypatch, capsys):
    planted = types.ModuleType("planted_bugs")
    planted.wrong_scale = wrong_scale_factory
    monkeypatch.setitem(sys.modules, "planted_bugs", planted)
    small = [
        "--patterns",
        "dense",
        "--no-gqa",
        "--no-ring",
        "--no-gradients",
        "--no-padding",
        "--examples",
        "5",
        "--max-seq-len",
        "12",
        "--max-heads",
        "3",
        "--max-head-dim",
        "4",
        "--no-progress",
    ]

    assert verify.main(["equivalence_tests.peers.own:torch_factory", *small, "--json", str(tmp_path / "own.json")]) == 0
    printed = capsys.readouterr().out
    assert "pattern dense" in printed and "all areas pass" in printed
    saved = json.loads((tmp_path / "own.json").read_text())
    assert saved["passed"] is True and saved["options"]["dtype"] == "float32"
    assert [area["status"] for area in saved["areas"]] == ["pass"] * len(saved["areas"])

    assert verify.main(["planted_bugs:wrong_scale", *small, "--json", str(tmp_path / "bug.json")]) == 1
    printed = capsys.readouterr().out
    assert ": minimal counterexample" in printed and "worst at" in printed and "FAILED" in printed
    saved = json.loads((tmp_path / "bug.json").read_text())
    assert saved["passed"] is False
    failed = [area for area in saved["areas"] if area["status"] == "fail"]
    assert failed and all(area["counterexample"]["shapes"]["q"] == [1, 2, 1, 2] for area in failed)
