"""Evaluation: commonsense accuracy by greedy generation (the paper's protocol) and by
log-likelihood choice scoring (lm-evaluation-harness style); held-out next-token loss of
the reference response (:mod:`ubsmoe.eval.loss`)."""

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
from ubsmoe.eval.loss import evaluate_loss, loss_stats, response_nll

__all__ = [
    "ANSWER_PATTERNS",
    "PROTOCOLS",
    "RESPONSE_PREFIX",
    "choice_logprobs",
    "evaluate_loss",
    "evaluate_task",
    "extract_answer",
    "generate_responses",
    "generation_accuracy",
    "generation_predictions",
    "loglik_accuracy",
    "loss_stats",
    "response_nll",
    "subsample",
]
