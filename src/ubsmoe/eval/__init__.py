"""Evaluation: commonsense accuracy by greedy generation (the paper's protocol) and by
log-likelihood choice scoring (lm-evaluation-harness style)."""

from ubsmoe.eval.commonsense import (
    ANSWER_PATTERNS,
    PROTOCOLS,
    RESPONSE_PREFIX,
    choice_logprobs,
    evaluate_task,
    extract_answer,
    generate_responses,
    generation_accuracy,
    generation_predictions,
    loglik_accuracy,
    subsample,
)

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
