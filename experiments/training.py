"""A small model of block-sparse dilated attention layers learning associative recall over thousands of tokens,
beside the same model with dense attention.

    python -m experiments.training --preset tiny                 # seconds on a CPU (the notebook's live run)
    python -m experiments.training --preset cpu --out experiments/results/training/recall_cpu.json  # N = 1024
    python -m experiments.training --preset gpu --log-every 50 \\
        --out experiments/results/training/recall_h200.json       # N = 8192 on the GPU, the committed run
    python -m experiments.training --preset gpu --seq-len 32768 --steps 30 --curriculum-lengths --log-every 10 \\
        --out experiments/results/training/throughput_32k_h200.json   # tokens/s at 32K (too short to learn)

The task (``RecallTask``, bidirectional like a question-answering reader): a question block, then a
long context. The question is ``num_queries`` query tokens, one every ``query_stride`` positions from
position 0 (filler between them), each naming a key. The context, mostly random filler, holds
``num_pairs`` facts, each binding a distinct key to a random value: a fact is a run of
``fact_length`` copies of one token, at a random place in its own slot of ``slot_length`` tokens.
At each query position the model must output the value of the key it names (cross-entropy there
only; chance = 1 / num_values). Facts lie on average about N / 2 tokens from the question.

The model (``RecallModel``): token embedding (no position embedding: the task is content-based), pre-LN
blocks of attention + MLP, a final LayerNorm and a linear read-out at the query positions. The
attention is ``optimized.BlockSparseRingMultiheadDilatedAttention`` ("dilated") or the same projections
around ``torch.nn.functional.scaled_dot_product_attention`` over the whole sequence ("dense").

How the presets fit the task to dilated attention (docs/semantics.md sections 2 and 3):
- Branches: a local one (segment = slot length, rate 1) and a global one (segment >= N, rate r = 8),
  every head in both (``head_mode="all"``). In the global branch a head sees only the positions of its
  own residue class mod r (its offset); with 2 heads the offsets are 0 and 1.
- Facts are runs of r tokens, so every fact has a copy in every residue class, and the queries stand r
  apart from position 0, so all of them are in class 0: head 0 reaches every fact from every query in
  one hop, and every query's gradient trains that head. (Single-token facts need a first layer that
  spreads each fact over its slot, a two-hop circuit this small model did not find within a few
  hundred steps; consecutive queries would each need a different head.)
- Block layout ``global_local``: in every lattice the first block (there: the question) attends to every
  block and every block attends to it; the others see a local window. The question tokens are the
  global tokens, the Longformer recipe for question answering. At N = 16K with blocks of 64 (the gpu
  preset's blocks) a global-branch lattice has 32 x 32 blocks, of which 154 are computed.

``train(config)`` trains one model and returns a ``TrainingResult`` (loss curve, held-out accuracy,
tokens per second of the training steps, peak memory on CUDA, the backend that ran, the environment);
``train_both`` trains the dilated and the dense model on the same batches. A model that does not fit
on the GPU is recorded with ``status="out_of_memory"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("dilated", "dense")
DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "training")


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _require_positive_float(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def _require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallTask:
    """Associative recall over ``seq_len`` tokens: the question first, the facts after it (see the module doc).

    Token ids: ``[0, num_filler)`` filler; then one fact token per (key, value); then one query token
    per key. ``vocab_size`` counts them all.
    """

    seq_len: int = 1024
    num_pairs: int = 6
    num_keys: int = 8
    num_values: int = 8
    num_queries: int = 8
    query_stride: int = 8
    slot_length: int = 32
    fact_length: int = 8
    num_filler: int = 8

    def __post_init__(self) -> None:
        for name, minimum in (
            ("seq_len", 2),
            ("num_pairs", 1),
            ("num_keys", 1),
            ("num_values", 2),
            ("num_queries", 1),
            ("query_stride", 1),
            ("slot_length", 1),
            ("fact_length", 1),
            ("num_filler", 1),
        ):
            _require_int(name, getattr(self, name), minimum)
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} must be <= num_keys={self.num_keys} (keys are distinct)")
        if self.fact_length > self.slot_length:
            raise ValueError(f"fact_length={self.fact_length} must be <= slot_length={self.slot_length}")
        if self.num_pairs > self.num_slots:
            raise ValueError(
                f"num_pairs={self.num_pairs} facts need as many slots of slot_length={self.slot_length} after the "
                f"question ({self.num_queries} queries every {self.query_stride} tokens), but seq_len={self.seq_len} "
                f"holds {max(self.num_slots, 0)}"
            )

    @property
    def question_length(self) -> int:
        """Tokens from the first query to the last one."""
        return (self.num_queries - 1) * self.query_stride + 1

    @property
    def first_slot(self) -> int:
        """Slots are aligned to multiples of slot_length; the first that lies wholly after the question."""
        return -(-self.question_length // self.slot_length)

    @property
    def num_slots(self) -> int:
        """Slots that may hold a fact (each holds at most one)."""
        return self.seq_len // self.slot_length - self.first_slot

    @property
    def fact_offset(self) -> int:
        return self.num_filler

    @property
    def query_offset(self) -> int:
        return self.num_filler + self.num_keys * self.num_values

    @property
    def vocab_size(self) -> int:
        return self.query_offset + self.num_keys

    def fact_token(self, key, value):
        return self.fact_offset + key * self.num_values + value

    def query_token(self, key):
        return self.query_offset + key

    @property
    def query_positions(self) -> torch.Tensor:
        """(num_queries,) int64: 0, query_stride, 2 * query_stride, ..."""
        return torch.arange(self.num_queries) * self.query_stride


@dataclass(frozen=True)
class RecallBatch:
    tokens: torch.Tensor  # (B, N) int64
    labels: torch.Tensor  # (B, num_queries) int64: the value asked for at each query position
    fact_positions: torch.Tensor  # (B, num_pairs) int64: where each fact's run starts

    def to(self, device) -> RecallBatch:
        return RecallBatch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels, self.fact_positions)))


def make_batch(task: RecallTask, batch_size: int, generator: torch.Generator) -> RecallBatch:
    """``batch_size`` random sequences of ``task`` drawn (on the CPU) from ``generator``."""
    _require_int("batch_size", batch_size, 1)
    b, n, q = batch_size, task.seq_len, task.num_queries
    tokens = torch.randint(task.num_filler, (b, n), generator=generator)
    # Distinct keys and distinct slots per row: the first num_pairs of a random permutation.
    keys = torch.rand(b, task.num_keys, generator=generator).argsort(dim=1)[:, : task.num_pairs]
    values = torch.randint(task.num_values, (b, task.num_pairs), generator=generator)
    slots = task.first_slot + torch.rand(b, task.num_slots, generator=generator).argsort(dim=1)[:, : task.num_pairs]
    starts = torch.randint(task.slot_length - task.fact_length + 1, (b, task.num_pairs), generator=generator)
    positions = slots * task.slot_length + starts
    for i in range(task.fact_length):  # a fact is a run of fact_length copies of its token
        tokens.scatter_(1, positions + i, task.fact_token(keys, values))
    asked = torch.randint(task.num_pairs, (b, q), generator=generator)
    tokens[:, task.query_positions] = task.query_token(keys.gather(1, asked))
    return RecallBatch(tokens, values.gather(1, asked), positions)


def mean_query_distance(task: RecallTask, batch: RecallBatch) -> float:
    """Mean distance in tokens from a query to the start of a fact (all queries, all facts of the batch)."""
    queries = task.query_positions.to(batch.fact_positions.device)
    return float((batch.fact_positions[:, :, None] - queries[None, None, :]).double().mean())


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class DenseMultiheadAttention(nn.Module):
    """The projections of ``BlockSparseRingMultiheadDilatedAttention`` (sub-LN included) around
    ``scaled_dot_product_attention`` over the whole sequence: the dense baseline, same parameters."""

    def __init__(self, embed_dim: int, num_heads: int, layer_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))
        self.norm = nn.LayerNorm(embed_dim) if layer_norm else None
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_normal_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query, key, value):
        batch, seq_len, dim = query.shape
        heads = lambda x: x.reshape(batch, seq_len, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, seq_len, dim)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), None


class Block(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, attention: nn.Module, embed_dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.attention = attention
        self.mlp_norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_ratio * embed_dim), nn.GELU(), nn.Linear(mlp_ratio * embed_dim, embed_dim)
        )

    def forward(self, x):
        h = self.attention_norm(x)
        x = x + self.attention(h, h, h)[0]  # bidirectional: the answer to a query lies after it
        return x + self.mlp(self.mlp_norm(x))


class RecallModel(nn.Module):
    """Embedding, ``num_layers`` blocks, final LayerNorm, read-out of the value logits at the query positions."""

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.task.vocab_size, config.embed_dim)
        self.blocks = nn.ModuleList(
            Block(make_attention(config), config.embed_dim, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.embed_dim)
        self.readout = nn.Linear(config.embed_dim, config.task.num_values)
        self.register_buffer("query_positions", config.task.query_positions, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids -> (B, num_queries, num_values) logits at the query positions."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x[:, self.query_positions]))

    def backends_used(self) -> list[str | None]:
        """The backend each dilated attention layer ran on its last call (None for dense layers)."""
        return [
            getattr(block.attention.attention, "last_backend", None) if hasattr(block.attention, "attention") else None
            for block in self.blocks
        ]


def make_attention(config: TrainingConfig) -> nn.Module:
    if config.attention == "dense":
        return DenseMultiheadAttention(config.embed_dim, config.num_heads)
    from optimized import BlockSparseRingMultiheadDilatedAttention

    return BlockSparseRingMultiheadDilatedAttention(
        config.embed_dim,
        config.num_heads,
        config.segment_lengths,
        config.dilation_rates,
        sparse_config=config.sparse_config(),
        head_mode=config.head_mode,
        backend=config.backend,
        work_size=config.work_size,
    )


# ------------------------------------------------------------------------------------------------
# The configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run depends on. ``segment_lengths`` entries >= seq_len act as seq_len."""

    task: RecallTask = field(default_factory=RecallTask)
    attention: str = "dilated"
    # Model
    embed_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    mlp_ratio: int = 2
    segment_lengths: tuple[int, ...] = (32, 1024)
    dilation_rates: tuple[int, ...] = (1, 8)
    head_mode: str = "all"
    pattern: str = "global_local"
    block_size: int = 16
    local_window_size: int = 32  # global_local / local_window: blocks within local_window_size // (2 b) of the diagonal
    global_tokens: int = 16  # global_local: the first ceil(global_tokens / b) blocks of every lattice are global
    sparsity_ratio: float = 0.5  # dilated_sparse / random
    backend: str = "auto"
    work_size: int = 4096
    # Optimisation
    steps: int = 400
    # A length curriculum: the first curriculum_steps steps at each of these shorter lengths in turn, the rest at
    # task.seq_len. The model has no position embedding and its segments cap at the sequence, so what it learns
    # on short sequences (which query token matches which fact token) carries over to long ones, where a fact is
    # too small a share of a near-uniform attention at the start for its gradient to stand out.
    curriculum_lengths: tuple[int, ...] = ()
    curriculum_steps: int = 0
    batch_size: int = 16
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64
    seed: int = 0
    # Where
    device: str = "cpu"
    dtype: str = "float32"
    # The first steps (allocation, autotuning, compilation) are left out of the tokens per second.
    untimed_steps: int = 3

    def __post_init__(self) -> None:
        from optimized import BACKENDS
        from reference.config import HEAD_MODES, PATTERN_TYPES, DilationConfig

        if not isinstance(self.task, RecallTask):
            raise TypeError(f"task must be a RecallTask, got {type(self.task).__name__}")
        _require_choice("attention", self.attention, ATTENTIONS)
        for name, minimum in (
            ("embed_dim", 1),
            ("num_heads", 1),
            ("num_layers", 1),
            ("mlp_ratio", 1),
            ("block_size", 1),
            ("local_window_size", 0),
            ("global_tokens", 0),
            ("work_size", 1),
            ("steps", 1),
            ("curriculum_steps", 0),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("eval_every", 1),
            ("eval_sequences", 1),
            ("seed", 0),
            ("untimed_steps", 0),
        ):
            _require_int(name, getattr(self, name), minimum)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        _require_positive_float("learning_rate", self.learning_rate)
        _require_positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _require_positive_float("grad_clip", self.grad_clip)
        _require_positive_float("sparsity_ratio", self.sparsity_ratio)
        _require_choice("head_mode", self.head_mode, HEAD_MODES)
        _require_choice("pattern", self.pattern, tuple(p for p in PATTERN_TYPES if p != "custom"))
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("device", self.device, DEVICES)
        _require_choice("dtype", self.dtype, DTYPES)
        for name in ("segment_lengths", "dilation_rates"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
        try:
            dilation = DilationConfig(self.segment_lengths, self.dilation_rates, self.head_mode)
            if self.head_mode == "split" and self.num_heads < len(self.segment_lengths):
                raise ValueError(f"head_mode 'split' needs num_heads >= {len(self.segment_lengths)} branches")
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"head_mode={self.head_mode!r}, num_heads={self.num_heads}: {error}"
            ) from None
        del dilation
        self.sparse_config()  # its own errors name its fields
        self._check_curriculum()

    def _check_curriculum(self) -> None:
        lengths = self.curriculum_lengths
        if not isinstance(lengths, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            raise TypeError(f"curriculum_lengths must be a tuple of ints, got {lengths!r}")
        if list(lengths) != sorted(set(lengths)) or (lengths and lengths[-1] >= self.task.seq_len):
            raise ValueError(
                f"curriculum_lengths={lengths} must increase strictly and stay below seq_len={self.task.seq_len}"
            )
        if lengths and self.curriculum_steps < 1:
            raise ValueError(f"curriculum_steps={self.curriculum_steps} must be >= 1 when curriculum_lengths={lengths}")
        if self.curriculum_end >= self.steps:
            raise ValueError(
                f"curriculum_steps={self.curriculum_steps} x {len(lengths)} curriculum lengths must leave steps at "
                f"seq_len={self.task.seq_len}, but steps={self.steps}"
            )
        for length in lengths:
            try:
                dataclasses.replace(self.task, seq_len=length)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"curriculum_lengths={lengths}: the task at {length} tokens does not fit: {error}"
                ) from None

    @property
    def curriculum_end(self) -> int:
        """The first step (from 0) at the task's own length."""
        return self.curriculum_steps * len(self.curriculum_lengths)

    def task_at(self, step: int) -> RecallTask:
        """The task trained on at ``step`` (from 0): a curriculum length first, then the task itself."""
        if step >= self.curriculum_end:
            return self.task
        return dataclasses.replace(self.task, seq_len=self.curriculum_lengths[step // self.curriculum_steps])

    def sparse_config(self):
        from reference.config import SparsePatternConfig

        return SparsePatternConfig(
            pattern_type=self.pattern,
            sparsity_ratio=float(self.sparsity_ratio),
            block_size=self.block_size,
            local_window_size=self.local_window_size,
            global_tokens=self.global_tokens,
        )

    def replace(self, **changes) -> TrainingConfig:
        """A copy with ``changes``; task fields (seq_len, num_pairs, ...) may be given here too."""
        task_fields = {f.name for f in dataclasses.fields(RecallTask)}
        task_changes = {k: changes.pop(k) for k in list(changes) if k in task_fields}
        if task_changes:
            changes["task"] = dataclasses.replace(self.task, **task_changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["segment_lengths"] = list(self.segment_lengths)
        record["dilation_rates"] = list(self.dilation_rates)
        record["curriculum_lengths"] = list(self.curriculum_lengths)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> TrainingConfig:
        record = dict(record)
        record["task"] = RecallTask(**record["task"])
        record["segment_lengths"] = tuple(record["segment_lengths"])
        record["dilation_rates"] = tuple(record["dilation_rates"])
        record["curriculum_lengths"] = tuple(record.get("curriculum_lengths", ()))  # absent from older files
        return cls(**record)


def preset(name: str, **changes) -> TrainingConfig:
    """A named size, with ``changes`` applied (task fields too).

    tiny: the notebook's live run on a CPU: N = 128, 4 keys and values, 60 steps (seconds).
    cpu: N = 1024, 8 keys and values, 400 steps (half an hour on two busy CPU cores).
    gpu: N = 8192 on one GPU in bfloat16 autocast, 3000 steps: facts thousands of tokens from the question; the
    first 2100 steps are a length curriculum (700 each at N = 1024, 2048, 4096).
    """
    presets = {
        "tiny": TrainingConfig(
            task=RecallTask(seq_len=128, num_pairs=3, num_keys=4, num_values=4, num_queries=4, slot_length=16),
            embed_dim=32,
            num_heads=2,
            segment_lengths=(16, 128),
            steps=60,
            batch_size=16,
            learning_rate=1e-2,
            warmup_steps=5,
            eval_every=20,
        ),
        "cpu": TrainingConfig(),
        "gpu": TrainingConfig(
            task=RecallTask(seq_len=8192, num_pairs=8, num_keys=8, num_values=8, num_queries=16, slot_length=64),
            embed_dim=128,
            segment_lengths=(128, 8192),
            block_size=64,
            local_window_size=128,
            global_tokens=64,
            steps=3000,
            # Trained at 8192 from the start, neither model left chance in 3000 steps (runs 14 and 15).
            curriculum_lengths=(1024, 2048, 4096),
            curriculum_steps=700,
            batch_size=8,
            learning_rate=5e-3,
            warmup_steps=30,
            eval_every=100,
            eval_sequences=64,
            device="cuda",
            dtype="bfloat16",
            untimed_steps=10,
        ),
    }
    if name not in presets:
        raise ValueError(f"preset must be one of {tuple(presets)}, got {name!r}")
    return presets[name].replace(**changes)


PRESETS = ("tiny", "cpu", "gpu")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingResult:
    config: dict
    status: str  # "ok", or "out_of_memory" (nothing measured)
    steps: list[int]
    losses: list[float]
    eval_steps: list[int]
    eval_losses: list[float]
    eval_accuracies: list[float]
    final_accuracy: float | None
    chance_accuracy: float
    tokens_per_second: float | None  # steps at task.seq_len (forward, backward, optimizer) after the untimed ones
    median_step_seconds: float | None
    train_seconds: float | None
    peak_memory_bytes: int | None  # CUDA max_memory_allocated over the run; None on the CPU (not measured)
    parameters: int
    backends_used: list
    mean_query_distance: float | None  # tokens from a query to a fact, over the first batch at task.seq_len
    environment: dict
    error: str | None = None

    @property
    def attention(self) -> str:
        return self.config["attention"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> TrainingResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def _device(config: TrainingConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        from .cli import cuda_missing_reason

        raise ValueError(f"device='cuda': no CUDA device here ({cuda_missing_reason()}); use device='cpu'")
    return torch.device(config.device)


def _learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: RecallModel, batches, config: TrainingConfig, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over ``batches`` (already on ``device``)."""
    model.eval()
    losses, correct, total = [], 0, 0
    for batch in batches:
        with _autocast(config, device):
            logits = model(batch.tokens)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten()).item())
        correct += int((logits.argmax(-1) == batch.labels).sum())
        total += batch.labels.numel()
    model.train()
    return statistics.fmean(losses), correct / total


def _autocast(config: TrainingConfig, device: torch.device):
    if config.dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _eval_batches(config: TrainingConfig, device: torch.device) -> list[RecallBatch]:
    # Its own seed: the held-out sequences are the same for every model and never trained on
    # (a repeat of a training sequence is vanishingly unlikely at these sizes).
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    batches, left = [], config.eval_sequences
    while left > 0:
        size = min(left, config.batch_size)
        batches.append(make_batch(config.task, size, generator).to(device))
        left -= size
    return batches


def train(config: TrainingConfig, progress=None) -> TrainingResult:
    """Train ``config``'s model from scratch on fresh batches; ``progress(step, loss)`` is called after each step.

    Raises torch.cuda.OutOfMemoryError when the model does not fit (``train_both`` records it).
    """
    from .env import environment

    device = _device(config)
    torch.manual_seed(config.seed)
    model = RecallModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    data = torch.Generator().manual_seed(config.seed)  # the same batches for every model of one seed
    eval_batches = _eval_batches(config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, losses, step_seconds = [], [], []
    eval_steps, eval_losses, eval_accuracies = [], [], []
    distance = None
    start = time.perf_counter()
    for step in range(config.steps):
        task = config.task_at(step)
        batch = make_batch(task, config.batch_size, data)
        if distance is None and task is config.task:
            distance = mean_query_distance(config.task, batch)
        batch = batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        _synchronize(device)
        tick = time.perf_counter()
        with _autocast(config, device):
            logits = model(batch.tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()  # synchronizes
        _synchronize(device)
        step_seconds.append(time.perf_counter() - tick)
        steps.append(step + 1)
        losses.append(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"the {config.attention} model's loss is {value} at step {step + 1}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            eval_loss, accuracy = evaluate(model, eval_batches, config, device)
            eval_steps.append(step + 1)
            eval_losses.append(eval_loss)
            eval_accuracies.append(accuracy)
        if progress is not None:
            progress(step + 1, value)
    train_seconds = time.perf_counter() - start
    # Only steps at the task's own length count, less the first ones there (allocation, compilation, tuning).
    at_length = step_seconds[config.curriculum_end :]
    timed = at_length[config.untimed_steps :] or at_length
    tokens = config.batch_size * config.task.seq_len
    return TrainingResult(
        config=config.to_dict(),
        status="ok",
        steps=steps,
        losses=losses,
        eval_steps=eval_steps,
        eval_losses=eval_losses,
        eval_accuracies=eval_accuracies,
        final_accuracy=eval_accuracies[-1],
        chance_accuracy=1.0 / config.task.num_values,
        tokens_per_second=tokens * len(timed) / sum(timed),
        median_step_seconds=statistics.median(timed),
        train_seconds=train_seconds,
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        parameters=sum(p.numel() for p in model.parameters()),
        backends_used=model.backends_used(),
        mean_query_distance=distance,
        environment=environment(device),
    )


def _out_of_memory_result(config: TrainingConfig, error: Exception) -> TrainingResult:
    from .env import environment

    return TrainingResult(
        config=config.to_dict(),
        status="out_of_memory",
        steps=[],
        losses=[],
        eval_steps=[],
        eval_losses=[],
        eval_accuracies=[],
        final_accuracy=None,
        chance_accuracy=1.0 / config.task.num_values,
        tokens_per_second=None,
        median_step_seconds=None,
        train_seconds=None,
        peak_memory_bytes=None,
        parameters=0,
        backends_used=[],
        mean_query_distance=None,
        environment=environment(config.device),
        error=str(error).splitlines()[0],
    )


def train_both(config: TrainingConfig, attentions=ATTENTIONS, progress=None) -> list[TrainingResult]:
    """``config`` trained once per attention in ``attentions`` (same seed, same batches).

    On CUDA a model that runs out of memory is recorded with ``status="out_of_memory"`` instead of raising.
    """
    results = []
    for attention in attentions:
        run = config.replace(attention=attention)
        callback = None if progress is None else (lambda step, loss, name=attention: progress(name, step, loss))
        try:
            results.append(train(run, callback))
        except torch.cuda.OutOfMemoryError as error:
            results.append(_out_of_memory_result(run, error))
        finally:
            if run.device == "cuda":
                torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------
# Result files, tables and plots
# ------------------------------------------------------------------------------------------------


def save(path: str, results) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"task": "associative_recall", "results": [r.to_dict() for r in results]}, handle, indent=1)


def load(path: str) -> list[TrainingResult]:
    with open(path) as handle:
        document = json.load(handle)
    return [TrainingResult.from_dict(record) for record in document["results"]]


def load_committed(results_dir: str = RESULTS_DIR) -> dict[str, list[TrainingResult]]:
    """{file name: results} of every result file under ``results_dir`` (empty when there is none)."""
    import glob

    return {os.path.basename(path): load(path) for path in sorted(glob.glob(os.path.join(results_dir, "*.json")))}


def summary_rows(results) -> list[dict]:
    rows = []
    for r in results:
        config = r.config
        rows.append(
            {
                "attention": r.attention,
                "status": r.status,
                "N": config["task"]["seq_len"],
                "backend": ",".join(sorted({b for b in r.backends_used if b})) or "sdpa",
                "device": r.environment.get("device_name"),
                "steps": len(r.steps),
                "final_loss": r.losses[-1] if r.losses else None,
                "accuracy": r.final_accuracy,
                "chance": r.chance_accuracy,
                "tokens_per_s": None if r.tokens_per_second is None else round(r.tokens_per_second),
                "peak_GiB": None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30,
                "fact_query_distance": r.mean_query_distance,
            }
        )
    return rows


def format_summary(results) -> str:
    from .tables import format_table

    return format_table(summary_rows(results), floats=".4g")


def _smooth(values, window: int):
    if window <= 1 or len(values) < window:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_STYLE = {"dilated": dict(color="tab:blue"), "dense": dict(color="tab:gray")}


def plot_results(results, title: str | None = None, smooth: int | None = None):
    """Training loss (left) and held-out accuracy (right) against step for each model; returns the figure."""
    import matplotlib.pyplot as plt

    figure, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    chance_loss = None
    for r in results:
        if r.status != "ok":
            loss_ax.plot([], [], label=f"{r.attention}: {r.status}", **_STYLE.get(r.attention, {}))
            continue
        window = smooth if smooth is not None else max(1, len(r.losses) // 30)
        label = f"{r.attention} ({r.tokens_per_second:,.0f} tok/s)"
        loss_ax.plot(r.steps, r.losses, alpha=0.25, **_STYLE.get(r.attention, {}))
        loss_ax.plot(r.steps, _smooth(r.losses, window), label=label, **_STYLE.get(r.attention, {}))
        accuracy_ax.plot(r.eval_steps, r.eval_accuracies, marker="o", label=r.attention, **_STYLE.get(r.attention, {}))
        chance_loss = math.log(1.0 / r.chance_accuracy)
        chance = r.chance_accuracy
        curriculum_end = TrainingConfig.from_dict(r.config).curriculum_end
    if chance_loss is not None and curriculum_end:
        for ax in (loss_ax, accuracy_ax):
            ax.axvline(curriculum_end + 0.5, color="tab:green", linestyle="--", linewidth=1, label="full length from")
    if chance_loss is not None:
        loss_ax.axhline(chance_loss, color="black", linestyle=":", linewidth=1, label="chance (log V)")
        accuracy_ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance (1/V)")
    loss_ax.set(xlabel="step", ylabel="training loss (cross-entropy)")
    accuracy_ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, accuracy_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def describe(results) -> str:
    """One line naming the run: N, model size, dilation, pattern, device."""
    config = results[0].config
    env = results[0].environment
    lengths = config.get("curriculum_lengths") or []
    curriculum = f" after {config['curriculum_steps']} steps at each of N={lengths}," if lengths else ""
    return (
        f"associative recall, N={config['task']['seq_len']},{curriculum} {config['task']['num_pairs']} facts, "
        f"{config['num_layers']} layers x d={config['embed_dim']}, segments {list(config['segment_lengths'])} "
        f"rates {list(config['dilation_rates'])}, {config['pattern']} blocks of {config['block_size']}, "
        f"{config['dtype']}, {env.get('device_name')}"
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from optimized import BACKENDS
    from reference.config import HEAD_MODES, PATTERN_TYPES

    from . import cli

    parser = cli.parser_for(__doc__)
    parser.usage = "python -m experiments.training [options]"  # the full list is in --help
    parser.add_argument("--preset", choices=PRESETS, default="cpu", help="the sizes to start from (default cpu)")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=ATTENTIONS,
        default=list(ATTENTIONS),
        help="which attention to train (default both, dilated first)",
    )
    parser.add_argument("--device", choices=DEVICES, help="default: the preset's")
    parser.add_argument("--dtype", choices=DTYPES, help="bfloat16 = autocast; default: the preset's")
    parser.add_argument("--backend", choices=list(BACKENDS), help="the dilated model's backend (default auto)")
    group = parser.add_argument_group("task (default: the preset's)")
    for name in (
        "seq-len",
        "num-pairs",
        "num-keys",
        "num-values",
        "num-queries",
        "slot-length",
        "fact-length",
        "query-stride",
    ):
        group.add_argument(f"--{name}", type=cli.positive_int)
    group = parser.add_argument_group("model (default: the preset's)")
    for name in ("embed-dim", "num-heads", "num-layers", "block-size"):
        group.add_argument(f"--{name}", type=cli.positive_int)
    group.add_argument(
        "--segments",
        nargs="+",
        type=cli.positive_int,
        dest="segment_lengths",
        help="segment lengths; a length >= the sequence acts as the whole sequence",
    )
    group.add_argument(
        "--rates",
        nargs="+",
        type=cli.positive_int,
        dest="dilation_rates",
        help="dilation rates, one per segment length",
    )
    group.add_argument("--head-mode", choices=list(HEAD_MODES))
    group.add_argument("--pattern", choices=[p for p in PATTERN_TYPES if p != "custom"])
    group.add_argument("--sparsity-ratio", type=cli.positive_float)
    group.add_argument("--local-window-size", type=cli.non_negative_int)
    group.add_argument("--global-tokens", type=cli.non_negative_int)
    group = parser.add_argument_group("optimisation (default: the preset's)")
    for name in ("steps", "batch-size", "eval-every"):
        group.add_argument(f"--{name}", type=cli.positive_int)
    group.add_argument(
        "--curriculum-lengths",
        nargs="*",
        type=cli.positive_int,
        help="shorter sequence lengths trained first, in order (none: no curriculum)",
    )
    group.add_argument("--curriculum-steps", type=cli.non_negative_int, help="steps at each curriculum length")
    group.add_argument("--learning-rate", type=cli.positive_float)
    group.add_argument("--seed", type=cli.non_negative_int)
    parser.add_argument("--out", help="write the results as JSON here (e.g. experiments/results/training/x.json)")
    parser.add_argument("--plot", help="save the loss curves as an image here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--log-every",
        type=cli.positive_int,
        help="print the loss every this many steps (instead of a progress bar; for logs)",
    )
    return parser


_OPTION_OF_FIELD = {  # the option that sets a config field, for error messages
    "segment_lengths": "--segments",
    "dilation_rates": "--rates",
}


def config_from_args(parser: argparse.ArgumentParser, args) -> TrainingConfig:
    """The preset with the given options applied, or ``parser.error`` naming the option that does not fit."""
    from . import cli

    cli.check_device(parser, args.device or preset(args.preset).device)
    changes = {}
    task_fields = {f.name for f in dataclasses.fields(RecallTask)}
    config_fields = {f.name for f in dataclasses.fields(TrainingConfig)} | task_fields
    for name, value in vars(args).items():
        if name in config_fields and value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    if "seq_len" in changes and "segment_lengths" not in changes:
        # The preset's last segment spans its whole sequence; keep it spanning the new one.
        base = preset(args.preset)
        segments = list(base.segment_lengths)
        if segments[-1] >= base.task.seq_len:
            segments[-1] = max(segments[-1], changes["seq_len"])
            changes["segment_lengths"] = tuple(segments)
    try:
        return preset(args.preset, **changes)
    except (TypeError, ValueError) as error:
        message = str(error)
        field_name = message.split(" ", 1)[0].split("=", 1)[0]
        option = _OPTION_OF_FIELD.get(field_name, "--" + field_name.replace("_", "-"))
        if field_name not in config_fields:
            option = "options"
        parser.error(f"{option}: {message}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    from . import cli

    cli.check_output_stem(parser, args.out, "--out")
    cli.check_output_stem(parser, args.plot, "--plot")
    bar = None
    if args.log_every is None and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=config.steps * len(args.models), unit="step")

    def progress(name, step, loss):
        if bar is not None:
            bar.set_description(f"{name} loss {loss:.3f}")
            bar.update(1)
        elif args.log_every is not None and (step % args.log_every == 0 or step == config.steps):
            print(f"{name} step {step} loss {loss:.4f}", flush=True)

    results = train_both(config, args.models, progress)
    if bar is not None:
        bar.close()
    print(describe(results))
    print(format_summary(results))
    if args.out:
        save(args.out, results)
        print(f"wrote {args.out}")
    if args.plot:
        from .plots import save_figure, use_file_backend

        use_file_backend()
        save_figure(plot_results(results, describe(results)), args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
