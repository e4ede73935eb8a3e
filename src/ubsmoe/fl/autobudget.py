"""Clients that choose their own budget level (``budget=auto``) and the simulated fleet's clock.

A ``budget=auto`` client (``fl.budget_pattern=auto``, or a SuperNode declaring
``budget=auto``) starts at the lowest level of ``fl.budgets``. In its first round it
*calibrates*: it times ``fl.calibration_steps`` optimizer steps at each level's K_j
(and LoRA rank r_j) on its own data, and takes each level's peak memory from the
memory planner (:func:`ubsmoe.metrics.plan.level_memory`; the CPU has no per-level
peak counter, so the planned figure is used everywhere; on CUDA the measured peak of
the timed steps is recorded beside it). After training it predicts each level's
local-round time, ``steps x step time_j``, and reports the largest level j with

    predicted_j <= fl.round_deadline_s x (1 - fl.deadline_margin)   and   memory_j <= cap

(cap: ``fl.client_memory_gib`` in simulation, ``memory-gib=`` on a node, else the
device's free memory plus the lowest level's planned bytes, which the process already
holds). ``fl.deadline_margin`` is the share of the deadline kept for upload and
evaluation. No level fits: the lowest. The reported level applies from the client's
next round: the server must know a level before it sends that level's adapters.
Every later round compares its real local-round time with the prediction for the
level it trained at; a miss by more than ``fl.remeasure_fraction`` of the prediction
makes it calibrate again, so a device that became busy steps down and one that
became free steps up.

For the rank methods (every level at one K) the levels differ in step time by less
than the noise (under 13% measured), so their measured step times are pooled (the
median) and the deadline either admits every level or none: they choose by memory.

A simulated fleet (``fl.client_speed``) charges a client with speed factor s
``s x`` its measured compute time (training plus any calibration) on a simulated
clock, reported as the reply metric ``sim_s``; nothing sleeps. Tests pass a
:data:`StepCost` (a fixed cost model) instead of timing real steps, so their clock
is deterministic. ``fl.step_cost=flops`` does the same in a run: simulated compute =
the step's training FLOPs / ``fl.sim_flops_per_s`` (an assumed device throughput) x
the speed factor (:func:`flops_step_cost`), because on a loaded shared CPU the
measured effect of K on step time drowns in noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ubsmoe.budgets import top_k_for_budget
from ubsmoe.config import RunConfig
from ubsmoe.fl.client_runtime import ClientRuntime
from ubsmoe.fl.train import batch_indices, client_seed, local_train, make_batches
from ubsmoe.methods import ClientUpdate, Method
from ubsmoe.metrics.flops import training_flops_per_token
from ubsmoe.metrics.model_shape import model_shape_from_config, with_lora_experts
from ubsmoe.metrics.plan import GIB, free_memory, level_memory
from ubsmoe.models import set_top_k, smoe_layers
from ubsmoe.models.adapters import set_lora_rank
from ubsmoe.models.architecture import olmoe_config

# (level index, K_j, rank r_j) -> seconds per optimizer step at speed 1 (an injected cost model).
StepCost = Callable[[int, int, int], float]
# Metric keys of a reply (floats; per-level keys end in ".<level>").
SIM_S, SPEED, COMPUTE_S = "sim_s", "speed", "compute_s"
AUTO_BUDGET, AUTO_TARGET_S, AUTO_CAP_GIB = "auto_budget", "auto_target_s", "auto_cap_gib"
AUTO_PRED_S, AUTO_MEM_GIB, AUTO_CALIBRATED = "auto_pred_s.", "auto_mem_gib.", "auto_calibrated"
AUTO_MISS = "auto_miss"


@dataclass(frozen=True)
class Level:
    """One budget level as a client trains it: beta, K_j, LoRA rank and alpha."""

    beta: float
    top_k: int
    rank: int
    alpha: float


def level_table(cfg: RunConfig, method: Method, k_max: int) -> list[Level]:
    """The levels of ``fl.budgets`` as the server sends them (K from ``train.top_k``, rank from the method).

    Args:
        cfg: the run config.
        method: the run's method (its ``client_top_k`` and ``client_lora``).
        k_max: the model's native top-k (1 for a dense backbone).
    """
    out = []
    for j, beta in enumerate(cfg.fl.budgets):
        k = method.client_top_k(top_k_for_budget(beta, k_max, cfg.model.k_min), k_max, cfg.train.top_k)
        rank, alpha = method.client_lora(j, cfg.model.lora_rank, cfg.model.lora_alpha)
        out.append(Level(beta, k, rank, alpha))
    return out


def flops_step_cost(cfg: RunConfig) -> StepCost:
    """The deterministic cost model of ``fl.step_cost=flops``: seconds per optimizer step at speed 1.

    ``seconds(K, r) = train.batch_size x data.max_length x F(K, r) / fl.sim_flops_per_s``
    with ``F`` the training FLOPs per token at K experts and LoRA rank r
    (:func:`~ubsmoe.metrics.flops.training_flops_per_token`: forward + backward,
    frozen weights' input gradients included, attention scores over
    ``data.max_length``). The step's tokens are the padded upper bound (every
    sequence at ``data.max_length``), so the cost is the same for every batch.

    Raises:
        ValueError: the model has no readable OLMoE config.
    """
    shape = with_lora_experts(model_shape_from_config(olmoe_config(cfg.model).to_dict(), cfg.model.name),
                              cfg.model.lora_experts, cfg.model.lora_experts_top_k)
    tokens = cfg.train.batch_size * cfg.data.max_length
    seq, router = cfg.data.max_length, cfg.model.router_trainable

    def cost(level: int, top_k: int, rank: int) -> float:
        """Simulated seconds of one local step at level ``level`` (K ``top_k``, rank ``rank``): FLOPs / assumed FLOP/s."""
        k = min(max(top_k, 1), shape.num_routed) if shape.routed else 1
        flops = training_flops_per_token(shape, k, rank, seq, router_trainable=router)["total"]
        return tokens * flops / cfg.fl.sim_flops_per_s
    return cost


def choose_level(predicted_s: list[float], memory: list[float], target_s: float,
                 cap: float | None) -> tuple[int, str]:
    """The largest level whose predicted round time fits ``target_s`` and whose memory fits ``cap``.

    Args:
        predicted_s: predicted local-round seconds per level (simulated clock).
        memory: planned peak bytes per level.
        target_s: ``fl.round_deadline_s x (1 - fl.deadline_margin)``; 0: no time target.
        cap: bytes the client may use; None: no cap.

    Returns:
        ``(level index, reason)``: the reason names what excluded the next level up
        (or that the top level fits, or that none fits and the lowest is used).
    """
    def excluded(j: int) -> str:
        """Why level ``j`` is out: over the time target, over the memory cap (empty when it fits)."""
        why = []
        if target_s > 0 and predicted_s[j] > target_s:
            why.append(f"predicted {predicted_s[j]:.3g} s > target {target_s:.3g} s")
        if cap is not None and memory[j] > cap:
            why.append(f"planned {memory[j] / GIB:.3g} GiB > cap {cap / GIB:.3g} GiB")
        return " and ".join(why)

    fits = [j for j in range(len(predicted_s)) if not excluded(j)]
    if not fits:
        return 0, f"no level fits (lowest: {excluded(0)}); the lowest level"
    j = max(fits)
    if j == len(predicted_s) - 1:
        return j, "the top level fits" + (f" (predicted {predicted_s[j]:.3g} s <= target {target_s:.3g} s)"
                                          if target_s > 0 else "")
    return j, f"the next level up does not fit: {excluded(j + 1)}"


@dataclass
class AutoState:
    """What a ``budget=auto`` client keeps between rounds (JSON-ready; a node keeps it in ``Context.state``).

    Attributes:
        step_s: simulated seconds per optimizer step at each level (speed included).
        memory: planned peak bytes per level.
        level: the level reported last (the one the server sends next), 0-based.
        calibrations: how often the client calibrated.
        measured_peak: CUDA only: measured peak bytes of the timed steps per level.
    """

    step_s: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    level: int = 0
    calibrations: int = 0
    measured_peak: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The state as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoState:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def _time_levels(runtime: ClientRuntime, client_id: int, round_idx: int, levels: list[Level],
                 steps: int) -> tuple[list[float], list[float], float]:
    """Time ``steps`` real optimizer steps at each level: (median seconds per step, CUDA peaks, total s).

    One untimed warm-up step comes first (first-call allocations and kernel choices);
    its time is still part of the returned total (it is compute the client spent).

    Each step is a fresh :func:`~ubsmoe.fl.train.local_train` call on one batch of the
    client's data (its own seed), so the round's training later starts from the
    server's adapters as usual (``train_round`` reloads every trainable tensor).
    """
    cfg, model = runtime.cfg, runtime.model
    examples = runtime.examples(client_id)
    seed = client_seed(cfg.train.seed + 7, client_id, round_idx)
    batches = make_batches(examples, batch_indices(len(examples), cfg.train.batch_size, 1, steps, seed),
                           runtime.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    times, peaks, total = [], [], 0.0
    start = time.perf_counter()
    set_top_k(model, levels[0].top_k)
    local_train(model, batches[:1], runtime.method, cfg.train, levels[0].top_k)  # warm-up, untimed
    total += time.perf_counter() - start
    for level in levels:
        set_lora_rank(model, level.rank, level.alpha, seed=cfg.train.seed + 1)
        set_top_k(model, level.top_k)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        per_step = []
        for batch in batches:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            local_train(model, [batch], runtime.method, cfg.train, level.top_k)
            if cuda:
                torch.cuda.synchronize(device)
            per_step.append(time.perf_counter() - start)
        for layer in smoe_layers(model):
            layer.reset_stats()
        times.append(statistics.median(per_step))
        total += sum(per_step)
        if cuda:
            peaks.append(float(torch.cuda.max_memory_allocated(device)))
    return times, peaks, total


def calibrate(runtime: ClientRuntime, client_id: int, round_idx: int, levels: list[Level], speed: float,
              state: AutoState, step_cost: StepCost | None = None) -> float:
    """Measure each level's step time (x ``speed``) and planned memory into ``state``.

    Args:
        runtime: the client's runtime (its model, method and data).
        client_id, round_idx: the client and round (seed the timed batches).
        levels: :func:`level_table`.
        speed: the client's speed factor this round (1 on a real device).
        state: updated in place (``step_s``, ``memory``, ``calibrations``).
        step_cost: a cost model to use instead of timing real steps (tests).

    Returns:
        The compute seconds the calibration took (at speed 1; the caller charges it).
    """
    steps = runtime.cfg.fl.calibration_steps
    if step_cost is not None:
        raw = [step_cost(j, lv.top_k, lv.rank) for j, lv in enumerate(levels)]
        spent = steps * sum(raw)
    else:
        raw, state.measured_peak, spent = _time_levels(runtime, client_id, round_idx, levels, steps)
    if len({lv.top_k for lv in levels}) == 1:  # rank methods: differences are noise; pool them
        raw = [statistics.median(raw)] * len(raw)
    state.step_s = [speed * t for t in raw]
    state.memory = [float(m) for m in level_memory(runtime.cfg)]
    state.calibrations += 1
    return spent


def _level_of(levels: list[Level], task: dict[str, Any], hint: int) -> int:
    """The level a task trains at: ``hint`` when its K and rank match, else the first that does."""
    rank = task.get("lora_rank")
    match = [j for j, lv in enumerate(levels)
             if lv.top_k == task["top_k"] and (rank is None or lv.rank == rank)]
    return hint if hint in match else (match[0] if match else 0)


def fleet_round(runtime: ClientRuntime, task: dict[str, Any], state: AutoState | None, *, auto: bool,
                cap_bytes: int | None = None,
                step_cost: StepCost | None = None) -> tuple[ClientUpdate, AutoState | None]:
    """Train one round as a fleet member: charge the simulated clock and, if ``auto``, choose a level.

    Args:
        runtime: the client's runtime.
        task: the server's instruction (keyword arguments of
            :meth:`~ubsmoe.fl.client_runtime.ClientRuntime.train_round`).
        state: the client's :class:`AutoState` from its last round (None: first round).
        auto: the client chooses its level (``budget=auto``).
        cap_bytes: its memory cap (None: ``fl.client_memory_gib``, else free memory).
        step_cost: a cost model instead of measured time (tests): compute seconds
            are ``steps x step_cost(level, K, rank)``. None: :func:`flops_step_cost`
            with ``fl.step_cost=flops``, else the measured time.

    Returns:
        ``(update, state)``: the update's metrics gain ``sim_s`` (simulated seconds:
        speed x (training + calibration compute)), ``speed`` and ``compute_s``; with
        ``auto`` also ``auto_budget`` (the level for the next round), per-level
        ``auto_pred_s.<j>`` / ``auto_mem_gib.<j>``, ``auto_target_s``,
        ``auto_cap_gib`` (0: none), ``auto_calibrated`` (1 when it calibrated this
        round) and ``auto_miss`` (real / predicted time of this round's level).
    """
    cfg = runtime.cfg
    if step_cost is None and cfg.fl.step_cost == "flops":
        step_cost = flops_step_cost(cfg)
    cid, r = task["client_id"], task["round_idx"]
    speed = cfg.fl.fleet_speed(cid, r)
    k_max = max((m.max_top_k for m in smoe_layers(runtime.model)), default=1)
    levels = level_table(cfg, runtime.method, k_max)
    spent = 0.0
    calibrated = False
    if auto and (state is None or not state.step_s):
        state = state or AutoState()
        spent += calibrate(runtime, cid, r, levels, speed, state, step_cost)
        calibrated = True
    now = _level_of(levels, task, state.level if state else 0)
    runtime.examples(cid)  # tokenize the partition first (cached): not part of the round's compute
    update = runtime.train_round(**task)
    steps = update.metrics["steps"]
    lv = levels[now]
    train_s = steps * step_cost(now, lv.top_k, lv.rank) if step_cost else update.metrics["train_s"]
    metrics = {SPEED: speed, COMPUTE_S: train_s}
    if auto:
        predicted = steps * state.step_s[now]
        miss = speed * train_s / predicted if predicted > 0 else 1.0
        metrics[AUTO_MISS] = miss
        if not calibrated and abs(miss - 1.0) > cfg.fl.remeasure_fraction:
            spent += calibrate(runtime, cid, r, levels, speed, state, step_cost)
            calibrated = True
        if cap_bytes is None:
            cap_bytes = cfg.fl.fleet_memory_bytes(cid, r)
        if cap_bytes is None and not cfg.fl.simulated_fleet:
            device = next(runtime.model.parameters()).device
            cap_bytes = free_memory(device) + int(state.memory[0])
        target = cfg.fl.round_deadline_s * (1.0 - cfg.fl.deadline_margin)
        pred = [steps * s for s in state.step_s]
        state.level, _ = choose_level(pred, state.memory, target, cap_bytes)
        metrics.update({AUTO_BUDGET: levels[state.level].beta, AUTO_TARGET_S: target,
                        AUTO_CAP_GIB: (cap_bytes or 0) / GIB, AUTO_CALIBRATED: float(calibrated),
                        **{f"{AUTO_PRED_S}{j}": p for j, p in enumerate(pred)},
                        **{f"{AUTO_MEM_GIB}{j}": m / GIB for j, m in enumerate(state.memory)}})
    metrics[COMPUTE_S] = train_s + spent
    metrics[SIM_S] = speed * (train_s + spent)
    update.metrics.update(metrics)
    return update, state


def reason_from_metrics(metrics: dict[str, float], num_levels: int) -> str:
    """The reason of a reply's level choice, rebuilt from its ``auto_*`` metrics (:func:`choose_level`)."""
    pred = [metrics[f"{AUTO_PRED_S}{j}"] for j in range(num_levels)]
    mem = [metrics[f"{AUTO_MEM_GIB}{j}"] * GIB for j in range(num_levels)]
    cap = metrics.get(AUTO_CAP_GIB, 0.0)
    return choose_level(pred, mem, metrics.get(AUTO_TARGET_S, 0.0), cap * GIB if cap > 0 else None)[1]
