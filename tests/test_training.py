"""experiments/training.py: the recall task is what it says, the dilated model learns it, bad settings are named.

Small sizes only (the whole file runs in seconds on two CPU cores); the learning curves at full size
are the notebook's and the committed GPU run's (notebooks/training.ipynb).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import training
from experiments.training import RecallTask, TrainingConfig, make_batch


def brute_force_answers(task: RecallTask, tokens: torch.Tensor) -> list[list[int]]:
    """For each sequence, the value of every query's key, read from the tokens alone by scanning them."""
    answers = []
    for row in tokens.tolist():
        facts: dict[int, set[int]] = {}
        for token in row:
            if task.fact_offset <= token < task.query_offset:
                key, value = divmod(token - task.fact_offset, task.num_values)
                facts.setdefault(key, set()).add(value)
        assert all(len(values) == 1 for values in facts.values()), "a key is bound to two values"
        queries = [row[p] - task.query_offset for p in task.query_positions.tolist()]
        answers.append([next(iter(facts[key])) for key in queries])
    return answers


@pytest.mark.parametrize(
    "task",
    [
        RecallTask(seq_len=256, num_pairs=4, num_keys=8, num_values=8, num_queries=4),
        RecallTask(
            seq_len=300,
            num_pairs=9,
            num_keys=9,
            num_values=3,
            num_queries=5,
            query_stride=3,
            slot_length=20,
            fact_length=1,
        ),
    ],
)
def test_batch_answers_are_recoverable_from_the_tokens(task):
    batch = make_batch(task, 16, torch.Generator().manual_seed(1))
    assert batch.tokens.shape == (16, task.seq_len) and batch.labels.shape == (16, task.num_queries)
    assert batch.labels.tolist() == brute_force_answers(task, batch.tokens)
    tokens = batch.tokens
    # Every fact is a whole run of fact_length equal tokens inside one slot after the question.
    is_fact = (tokens >= task.fact_offset) & (tokens < task.query_offset)
    assert int(is_fact.sum()) == 16 * task.num_pairs * task.fact_length
    starts = batch.fact_positions
    assert int(starts.min()) >= task.first_slot * task.slot_length > int(task.query_positions.max())
    assert torch.equal(starts // task.slot_length, (starts + task.fact_length - 1) // task.slot_length)
    for i in range(task.fact_length):
        assert bool(is_fact.gather(1, starts + i).all())
        assert torch.equal(tokens.gather(1, starts + i), tokens.gather(1, starts))
    # Queries exactly at the query positions, filler everywhere else.
    is_query = tokens >= task.query_offset
    assert bool(is_query[:, task.query_positions].all()) and int(is_query.sum()) == 16 * task.num_queries
    assert bool((tokens[~is_fact & ~is_query] < task.num_filler).all())
    assert int(tokens.max()) < task.vocab_size


def test_batches_are_reproducible_and_vary():
    task = RecallTask(seq_len=256, num_pairs=4, num_keys=8, num_values=8, num_queries=4)
    first = make_batch(task, 4, torch.Generator().manual_seed(3))
    again = make_batch(task, 4, torch.Generator().manual_seed(3))
    other = make_batch(task, 4, torch.Generator().manual_seed(4))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.tokens, other.tokens)


# A task small enough to learn in seconds: 64 tokens, 2 facts, 4 values (chance loss log 4 = 1.39).
SMALL = dict(seq_len=64, num_pairs=2, num_keys=4, num_values=4, num_queries=2, slot_length=16)


def small_config(**changes) -> TrainingConfig:
    # One layer and two heads suffice: facts are runs of 8 tokens and the queries stand 8 apart, so head 0
    # (offset 0 of the rate-8 branch) reaches every fact from every query; the rest only costs time.
    settings = dict(
        SMALL,
        segment_lengths=(16, 64),
        embed_dim=32,
        num_heads=2,
        num_layers=1,
        steps=60,
        batch_size=16,
        eval_every=60,
        eval_sequences=64,
        learning_rate=1e-2,
        warmup_steps=5,
    )
    return training.preset("tiny", **{**settings, **changes})


def test_dilated_model_learns_the_small_task(monkeypatch):
    # The environment record runs collect_env's subprocesses (seconds); it is not what is tested here.
    monkeypatch.setattr("experiments.env.environment", lambda device=None: {"device_type": str(device)})
    result = training.train(small_config())
    assert result.status == "ok" and result.backends_used == ["torch"]
    chance_loss = math.log(SMALL["num_values"])
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    # Below chance, which needs the value of the named key from another part of the sequence.
    assert last < first - 0.3 and last < chance_loss - 0.3, (first, last, result.losses)
    assert result.final_accuracy > 2 * result.chance_accuracy, result.eval_accuracies
    assert result.tokens_per_second > 0 and result.peak_memory_bytes is None


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(num_heads=5), "num_heads"),
        (dict(attention="sparse"), "attention"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(steps=0), "steps"),
        (dict(backend="cuda"), "backend"),
        (dict(pattern="custom"), "pattern"),
        (dict(segment_lengths=(16,)), "segment_lengths"),
        (dict(block_size=0), "block_size"),
        (dict(num_pairs=5), "num_pairs"),
        (dict(fact_length=20), "fact_length"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_settings_raise_naming_the_setting(changes, named):
    with pytest.raises((TypeError, ValueError), match=named):
        small_config(**changes)


def test_cli_errors_name_the_option(capsys, monkeypatch):
    cases = [
        (["--num-pairs", "100"], "--num-pairs"),
        (["--rates", "1"], "--segments"),
        (["--steps", "0"], "--steps"),
        (["--models", "sparse"], "--models"),
    ]
    for argv, option in cases:
        with pytest.raises(SystemExit) as exit_info:
            training.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error:" in error and option in error, error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        training.main(["--device", "cuda"])
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_cli_writes_results_that_load_back(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.env.environment", lambda device=None: {"device_type": str(device), "torch": "x"})
    out = tmp_path / "results" / "run.json"
    argv = ["--preset", "tiny", "--seq-len", "64", "--num-pairs", "2", "--num-queries", "2", "--slot-length", "16"]
    argv += ["--segments", "16", "64", "--steps", "2", "--eval-every", "2", "--quiet", "--out", str(out)]
    assert training.main(argv) == 0
    document = json.loads(out.read_text())
    results = training.load(str(out))
    assert [r.attention for r in results] == ["dilated", "dense"]
    assert [r["config"]["attention"] for r in document["results"]] == ["dilated", "dense"]
    assert all(len(r.losses) == 2 and r.environment["device_type"] == "cpu" for r in results)
    config = TrainingConfig.from_dict(results[0].config)
    assert config.task.seq_len == 64 and config.segment_lengths == (16, 64)


def test_a_curriculum_trains_the_shorter_lengths_first_and_times_only_the_full_length(monkeypatch):
    monkeypatch.setattr("experiments.env.environment", lambda device=None: {"device_type": str(device)})
    config = small_config(curriculum_lengths=(48, 56), curriculum_steps=2, steps=7, eval_every=3, untimed_steps=1)
    assert config.curriculum_end == 4
    assert [config.task_at(step).seq_len for step in range(7)] == [48, 48, 56, 56, 64, 64, 64]
    assert config.task_at(5) is config.task and config.task_at(0).num_pairs == config.task.num_pairs
    drawn = []
    real_make_batch = training.make_batch

    def recording_make_batch(task, batch_size, generator):
        drawn.append(task.seq_len)
        return real_make_batch(task, batch_size, generator)

    monkeypatch.setattr(training, "make_batch", recording_make_batch)
    clock = iter(range(1000))  # each perf_counter call one second later: every step "takes" 1 s
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    result = training.train(config)
    eval_draws = -(-config.eval_sequences // config.batch_size)  # the held-out batches, drawn first
    assert drawn == [64] * eval_draws + [48, 48, 56, 56, 64, 64, 64]
    assert result.eval_steps == [3, 6, 7]
    # Two timed steps at N = 64 (the first one there is untimed), each one second.
    assert result.tokens_per_second == pytest.approx(config.batch_size * 64)
    assert result.mean_query_distance > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(curriculum_lengths=(48, 32), curriculum_steps=1), "curriculum_lengths=.*increase"),
        (dict(curriculum_lengths=(32, 32), curriculum_steps=1), "curriculum_lengths=.*increase"),
        (dict(curriculum_lengths=(64,), curriculum_steps=1), "curriculum_lengths=.*below seq_len=64"),
        (dict(curriculum_lengths=(48,), curriculum_steps=0), "curriculum_steps=0 must be >= 1"),
        (dict(curriculum_lengths=(48, 56), curriculum_steps=30), "curriculum_steps=30 x 2 .* steps=60"),
        (dict(curriculum_lengths=(16,), curriculum_steps=1), "curriculum_lengths=.*at 16 tokens.*num_pairs"),
        (dict(curriculum_lengths=[48], curriculum_steps=1), "curriculum_lengths must be a tuple"),
    ],
)
def test_bad_curricula_are_named(changes, message):
    with pytest.raises((TypeError, ValueError), match=message):
        small_config(**changes)


def test_a_curriculum_survives_the_record_and_older_records_load():
    config = small_config(curriculum_lengths=(48,), curriculum_steps=5)
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    older = config.replace(curriculum_lengths=(), curriculum_steps=0).to_dict()
    del older["curriculum_lengths"], older["curriculum_steps"]
    assert TrainingConfig.from_dict(older).curriculum_end == 0


def test_the_cli_takes_a_curriculum_and_names_it_when_it_does_not_fit(capsys):
    parser = training.build_parser()
    argv = ["--preset", "tiny", "--curriculum-lengths", "80", "96", "--curriculum-steps", "10"]
    config = training.config_from_args(parser, parser.parse_args(argv))
    assert config.curriculum_lengths == (80, 96) and config.curriculum_end == 20
    with pytest.raises(SystemExit):
        training.config_from_args(parser, parser.parse_args(argv[:4] + ["--curriculum-steps", "60"]))
    assert "--curriculum-steps: curriculum_steps=60" in capsys.readouterr().err


def test_every_preset_and_the_documented_throughput_command_are_valid():
    for name in training.PRESETS:
        config = training.preset(name)
        assert config.curriculum_end < config.steps
    parser = training.build_parser()
    argv = ["--preset", "gpu", "--seq-len", "32768", "--steps", "30", "--curriculum-lengths", "--device", "cpu"]
    config = training.config_from_args(parser, parser.parse_args(argv))
    assert config.curriculum_lengths == () and config.steps == 30 and config.segment_lengths[-1] == 32768
