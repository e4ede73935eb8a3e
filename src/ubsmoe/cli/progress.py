"""Live progress of a run on the console: rounds, client replies, loss and ETA (rich)."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ubsmoe.cli.app import console


def eta_seconds(round_seconds: list[float], rounds_done: int, total_rounds: int) -> float | None:
    """Estimated seconds until the run's last round ends, from the rounds timed so far.

    The mean duration of the timed rounds times the rounds left; the first timed
    round is left out once a later one is timed (it carries the workers' start-up
    and model building).

    Args:
        round_seconds: wall seconds of each round this process has seen end, in order.
        rounds_done: rounds completed (including those before a resume).
        total_rounds: the run's ``fl.rounds``.

    Returns:
        Seconds (0.0 when every round is done), or None before any round is timed.

    Raises:
        ValueError: a negative round time or count.
    """
    if rounds_done < 0 or total_rounds < 0 or any(t < 0 for t in round_seconds):
        raise ValueError(f"eta_seconds: got round_seconds={round_seconds}, rounds_done={rounds_done}, "
                         f"total_rounds={total_rounds}; expected values >= 0")
    left = max(total_rounds - rounds_done, 0)
    if left == 0:
        return 0.0
    if not round_seconds:
        return None
    timed = round_seconds[1:] if len(round_seconds) > 1 else round_seconds
    return sum(timed) / len(timed) * left


def format_duration(seconds: float | None) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"42s"``; ``"?"`` for None."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def dp_text(info: dict[str, Any]) -> str:
    """``", DP epsilon 2.41 (round 0.87), SNR 0.0031"`` from a ``round_end`` event ("" without DP).

    Epsilon None (no noise) reads ``inf``; the SNR is left out when the round has none.
    """
    if "epsilon" not in info:
        return ""

    def num(x: float | None) -> str:
        """A number for the display, ``inf`` for None (an unbounded epsilon)."""
        return "inf" if x is None else f"{x:.3g}"

    snr = f", SNR {info['snr']:.2g}" if info.get("snr") is not None else ""
    return f", DP epsilon {num(info['epsilon'])} (round {num(info.get('epsilon_round'))}){snr}"


class RunDisplay:
    """Live progress of a run (rounds, client replies, loss, ETA) with rich.

    Called with the ServerApp's progress events as :func:`ubsmoe.fl.simulation.run_federated`
    reads them: ``round_start`` {round, clients}, ``client_done``, ``aggregate``,
    ``round_end`` {round, loss, and under DP epsilon, epsilon_round, snr}, ``evaluate_before`` {round: 0},
    ``client_failed`` {round, client, reason} and
    ``round_retry`` / ``round_failed`` {round, message, replies, needed}, each printed
    as one line. The rounds line shows the last train loss and the run's ETA
    (:func:`eta_seconds` over the rounds timed so far) and, under DP, the privacy
    spent so far (cumulative epsilon); the clients line shows the round's clients
    done out of those sampled.
    """

    def __init__(self, rounds: int) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.total = rounds
        self.done = 0
        self.loss: float | None = None
        self.epsilon: float | None = None  # cumulative DP epsilon (None: DP off or no noise)
        self.round_seconds: list[float] = []
        self._round_start: float | None = None
        self.rounds = self.progress.add_task("rounds", total=rounds)
        self.clients = self.progress.add_task("clients", total=1, visible=False)

    def resumed_at(self, rounds_done: int) -> None:
        """Mark ``rounds_done`` rounds as done before this process started (``--resume``)."""
        self.done = rounds_done
        self.progress.update(self.rounds, completed=rounds_done, description=self.rounds_text())

    def rounds_text(self) -> str:
        """The rounds line: ``rounds | loss 6.5533 | eps 2.41 | ETA 1m05s`` (eps under DP only)."""
        loss = f" | loss {self.loss:.4f}" if self.loss is not None else ""
        if self.epsilon is not None:
            loss += f" | eps {self.epsilon:.3g}"
        return f"rounds{loss} | ETA {format_duration(eta_seconds(self.round_seconds, self.done, self.total))}"

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "round_start":
            self._round_start = time.monotonic()
            p.reset(self.clients, total=info["clients"], visible=True,
                    description=f"round {info['round']}: clients done")
        elif event == "client_done":
            p.advance(self.clients)
        elif event == "evaluate_before":  # eval.before_training: round 0 before the first round
            p.console.print("round 0: evaluating every level before fine-tuning", highlight=False)
        elif event == "aggregate":
            p.update(self.clients, description=f"round {info['round']}: aggregate + evaluate")
        elif event == "round_end":
            if self._round_start is not None:
                self.round_seconds.append(time.monotonic() - self._round_start)
            self.done = int(info["round"])
            self.loss = float(info["loss"])
            self.epsilon = info.get("epsilon")
            p.update(self.rounds, completed=self.done, description=self.rounds_text())
            p.console.print(f"round {info['round']}: train loss {info['loss']:.4f}{dp_text(info)}",
                            highlight=False)
        elif event == "client_failed":  # one line per client left out of a round
            p.advance(self.clients)
            p.console.print(f"round {info['round']}: client {info['client']} left out: {info['reason']}",
                            highlight=False, soft_wrap=True)
        elif event in ("round_retry", "round_failed"):  # the clients' reasons are printed above
            p.console.print(f"round {info['round']}: {info['replies']} good replies, {info['needed']} "
                            f"needed; {'retrying the round' if event == 'round_retry' else 'no retries left'}",
                            highlight=False, soft_wrap=True)

