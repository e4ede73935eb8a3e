"""Evaluation: commonsense accuracy by greedy generation (the paper's protocol) and by
log-likelihood choice scoring (lm-evaluation-harness style)."""

from ubsmoe.eval.commonsense import (
    ANSWER_PATTERNS,
    PROTOCOLS,
    evaluate_task,
    extract_answer,
    generate_responses,
    generation_accuracy,
    generation_predictions,
    subsample,
)
from ubsmoe.eval.loglik import RESPONSE_PREFIX, choice_logprobs, loglik_accuracy

__all__ = [
    "ANSWER_PATTERNS",
    "PROTOCOLS",
    "RESPONSE_PREFIX",
    "choice_logprobs",
    "evaluate_task",
    "extract_answer",
    "generate_responses",
    "generation_accuracy",
    "generation_predictions",
    "loglik_accuracy",
    "subsample",
]
