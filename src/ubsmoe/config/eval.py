"""Config sections of evaluation and logging: :class:`EvalConfig`, :class:`LogConfig`."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from ubsmoe.config.choices import EVAL_PROTOCOLS, EVAL_TOP_K, TEXT_METRICS
from ubsmoe.errors import bad_value as _bad
from ubsmoe.errors import raise_if_any


@dataclass
class EvalConfig:
    """Evaluation of the global model per budget level.

    Attributes:
        protocols: ``generation`` (greedy decoding, first answer token extracted,
            the paper's protocol), ``loglik`` (log-likelihood choice scoring) and/or
            ``loss`` (mean next-token loss of the reference response given its
            prompt, nats per token, lower is better; :mod:`ubsmoe.eval.loss`).
            Default: ``generation`` and ``loglik``.
        examples_per_task: test examples scored per task, a fixed seeded subset
            (0: the whole test set).
        max_new_tokens: generation length for the generation protocol (a row
            also stops once its answer is found).
        batch_size: examples per evaluation batch.
        every_rounds: also evaluate every N rounds (0: only after the last round).
        before_training: also evaluate every budget level once before the first
            round (round 0: the base model with the initial adapters), so the run
            shows what fine-tuning changed per level (``summary.json``
            ``initial_accuracy``, round-0 rows in ``metrics.jsonl``, the printed
            "round 0 -> final" table). Default false; the embedded default run sets it.
        pg_probe_examples: training examples in the fixed probe batch of the
            PG-alignment diagnostic, run every round for methods with a
            pseudo-gradient at each budget level's K (0: off).
        top_k: the K each budget level is evaluated at, one set of rows per entry:
            ``budget`` (level j at its own K_j, and rank methods at rank r_j: the
            papers' protocol, for every method) and/or ``native`` (every level at
            the model's top-k, still at rank r_j); each row carries its
            ``top_k_mode``.
        text_metric: the value a free-text task reports in a row's ``per_task``:
            ``rouge_l`` (ROUGE-L F) or ``bertscore_f1``; both are in
            ``per_task_metrics`` when computed.
        bertscore_model: BERTScore's scoring model, a hub name or a local folder
            with model and tokenizer (``bert_score`` ``model_type``); empty:
            BERTScore off (stated in the summary). Not loadable: BERTScore is
            skipped and ``summary.json`` says why.
        bertscore_num_layers: the layer BERTScore reads; 0: bert-score's own
            choice for a known ``bertscore_model`` (required for a local folder).
        utilization: also measure expert utilization at each level's evaluation K
            over the scored test records (the same tokens for every method; entropy
            and Gini in each eval row's ``utilization``, :mod:`ubsmoe.eval.utilization`).
    """

    protocols: list[str] = field(default_factory=lambda: ["generation", "loglik"])
    top_k: list[str] = field(default_factory=lambda: ["budget"])
    examples_per_task: int = 0
    max_new_tokens: int = 16
    batch_size: int = 16
    every_rounds: int = 0
    before_training: bool = False
    pg_probe_examples: int = 8
    text_metric: str = "rouge_l"
    bertscore_model: str = "roberta-large"
    bertscore_num_layers: int = 0
    utilization: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.text_metric not in TEXT_METRICS:
            errors.append(_bad("eval.text_metric", self.text_metric, f"one of {', '.join(TEXT_METRICS)}"))
        if self.bertscore_num_layers < 0:
            errors.append(_bad("eval.bertscore_num_layers", self.bertscore_num_layers, "an integer >= 0"))
        if not self.protocols or any(p not in EVAL_PROTOCOLS for p in self.protocols):
            errors.append(
                _bad("eval.protocols", self.protocols, f"a non-empty list from {', '.join(EVAL_PROTOCOLS)}")
            )
        if (not self.top_k or any(m not in EVAL_TOP_K for m in self.top_k)
                or len(set(self.top_k)) != len(self.top_k)):
            errors.append(_bad("eval.top_k", self.top_k,
                               f"a non-empty list of distinct values from {', '.join(EVAL_TOP_K)}"))
        if self.examples_per_task < 0:
            errors.append(_bad("eval.examples_per_task", self.examples_per_task, "an integer >= 0"))
        if self.max_new_tokens < 1:
            errors.append(_bad("eval.max_new_tokens", self.max_new_tokens, "an integer >= 1"))
        if self.batch_size < 1:
            errors.append(_bad("eval.batch_size", self.batch_size, "an integer >= 1"))
        if self.every_rounds < 0:
            errors.append(_bad("eval.every_rounds", self.every_rounds, "an integer >= 0"))
        if not isinstance(self.before_training, bool):
            errors.append(_bad("eval.before_training", self.before_training, "true or false"))
        if self.pg_probe_examples < 0:
            errors.append(_bad("eval.pg_probe_examples", self.pg_probe_examples, "an integer >= 0"))
        raise_if_any(errors)


@dataclass
class LogConfig:
    """Where a run's per-round scalars go besides ``metrics.jsonl`` (see :mod:`ubsmoe.tracking`).

    Attributes:
        tensorboard: write TensorBoard event files of every numeric scalar in each
            metrics.jsonl record to ``run_dir/tensorboard/`` (docs page "Logging").
        wandb: also log the same scalars to Weights & Biases
            (``wandb.init(project=..., dir=run dir, config=resolved config)``; a
            resume continues the same W&B run). True without the ``wandb`` package
            is a config error (``pip install wandb``).
        wandb_project: the W&B project name.

    Raises:
        ConfigError: ``wandb`` true without the ``wandb`` package, or an empty project.
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ubsmoe"

    def __post_init__(self) -> None:
        errors = []
        if self.wandb and importlib.util.find_spec("wandb") is None:
            errors.append("log.wandb=true needs `pip install wandb`")
        if not self.wandb_project.strip():
            errors.append(_bad("log.wandb_project", self.wandb_project, "a non-empty W&B project name"))
        raise_if_any(errors)


