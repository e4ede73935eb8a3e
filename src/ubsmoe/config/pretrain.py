"""Settings of ``ubsmoe pretrain`` (the testbed base): :class:`PretrainConfig`, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ubsmoe.errors import ConfigError


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (CLI: ``ubsmoe pretrain``).

    Attributes:
        out: output folder (the Hugging Face checkpoint; the resumable state lives in
            its ``.pretrain_checkpoint`` sub-folder until the run finishes).
        steps: optimizer steps.
        seed: seed of the initial weights, the held-out split and the data order.
        hidden_size, num_layers, num_heads: transformer width, depth, attention heads
            (``hidden_size`` divisible by ``num_heads``).
        expert_size: each expert's intermediate width (OLMoE ``intermediate_size``).
        num_experts, top_k: experts per layer and experts per token in training
            (OLMoE-1B-7B: 64 and 8, so K = 1, 2, 4, 8 are the paper's budget levels).
        vocab_size: target vocabulary of the locally trained BPE tokenizer.
        seq_len: tokens per training sequence.
        batch_size: sequences per optimizer step.
        lr: peak AdamW learning rate (linear warm-up over ``warmup_steps``, then
            cosine decay to ``lr / 10``).
        warmup_steps: warm-up steps (clipped to ``steps``).
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm.
        aux_loss_coef: OLMoE's ``router_aux_loss_coef`` (weight of the
            load-balancing loss; OLMoE-1B-7B uses 0.01).
        initializer_range: std of the random initial weights.
        threads: torch CPU threads (bitwise determinism holds for a fixed count; the
            run uses ``torch.use_deterministic_algorithms``).
        data_path: commonsense data folder (empty: resolved as the project does,
            :func:`~ubsmoe.data.commonsense.resolve_data_dir`).
        text_dir: optional folder of plain ``.txt`` files added to the training text.
        hf_dataset: optional Hugging Face dataset whose ``hf_column`` of split
            ``hf_split`` is added to the training text (needs the hub or its cache).
        heldout_fraction: share of the eligible records held out, in (0, 0.5].
        finetune_seeds: seeds whose fine-tuning samples are excluded from the corpus.
        finetune_examples: size of each excluded fine-tuning sample (the embedded
            default's ``data.train_examples``); 0 excludes every training record.
        checkpoint_every: steps between resumable checkpoints (0: only at the end).
        eval_batch_size: held-out sequences per forward pass.
    """

    out: str = ""
    steps: int = 1000
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    expert_size: int = 32
    num_experts: int = 64
    top_k: int = 8
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    initializer_range: float = 0.02
    threads: int = 2
    data_path: str = ""
    text_dir: str = ""
    hf_dataset: str = ""
    hf_split: str = "train"
    hf_column: str = "text"
    heldout_fraction: float = 0.05
    finetune_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    finetune_examples: int = 2000
    checkpoint_every: int = 100
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        errors = []

        def positive(name: str) -> None:
            """Record an error unless field ``name`` is an integer >= 1."""
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}: got {value!r}, expected an integer >= 1")

        for name in ("steps", "hidden_size", "num_layers", "num_heads", "expert_size", "num_experts",
                     "top_k", "vocab_size", "seq_len", "batch_size", "threads", "eval_batch_size"):
            positive(name)
        if not self.out:
            errors.append("out: got '', expected an output folder")
        if isinstance(self.hidden_size, int) and isinstance(self.num_heads, int) and self.num_heads > 0 \
                and self.hidden_size % self.num_heads:
            errors.append(f"hidden_size: got {self.hidden_size}, expected a multiple of num_heads "
                          f"({self.num_heads})")
        if isinstance(self.top_k, int) and isinstance(self.num_experts, int) \
                and not 1 <= self.top_k <= self.num_experts:
            errors.append(f"top_k: got {self.top_k!r}, expected an integer in [1, num_experts]")
        if isinstance(self.vocab_size, int) and self.vocab_size < 300:
            errors.append(f"vocab_size: got {self.vocab_size}, expected >= 300 (256 bytes + specials)")
        for name in ("lr", "grad_clip", "initializer_range"):
            if not getattr(self, name) > 0:
                errors.append(f"{name}: got {getattr(self, name)!r}, expected a number > 0")
        for name in ("aux_loss_coef", "weight_decay"):
            if not getattr(self, name) >= 0:
                errors.append(f"{name}: got {getattr(self, name)!r}, expected a number >= 0")
        for name in ("warmup_steps", "checkpoint_every", "finetune_examples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                errors.append(f"{name}: got {getattr(self, name)!r}, expected an integer >= 0")
        if not 0 < self.heldout_fraction <= 0.5:
            errors.append(f"heldout_fraction: got {self.heldout_fraction!r}, expected a number in (0, 0.5]")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.finetune_seeds):
            errors.append(f"finetune_seeds: got {self.finetune_seeds!r}, expected a list of integers")
        if errors:
            raise ConfigError("\n".join(errors))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (all but ``out``)."""
        return {k: v for k, v in asdict(self).items() if k != "out"}



def config_from_options(**options: Any) -> PretrainConfig:
    """A :class:`PretrainConfig` from CLI options (None values keep the defaults).

    Raises:
        ConfigError: an unknown option name or an invalid value.
    """
    names = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"pretrain: unknown setting(s) {', '.join(unknown)}")
    return PretrainConfig(**{k: v for k, v in options.items() if v is not None})
