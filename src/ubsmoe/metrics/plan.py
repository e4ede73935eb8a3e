"""What a run will need before it starts: parameters, memory per process, FLOPs, disk.

:func:`plan` builds the configured model on the meta device (shapes only, nothing
allocated; presets and full architectures alike, see
:func:`~ubsmoe.models.build.random_olmoe`), patches it exactly as a run does
(attention LoRA, per-expert LoRA, the method's own trainable tensors) and counts:

- parameters: total, and activated per budget level (:mod:`ubsmoe.metrics.flops`
  conventions: every parameter except the experts a token does not use);
- memory per process, in bytes:

  - base weights: frozen parameters x the dtype's size (``model.dtype``);
  - adapters: trainable parameters (LoRA factors, phi, a trainable router) x 4
    (float32), at the largest LoRA rank any budget level trains at;
  - gradients: the same size as the adapters (float32);
  - optimizer: Adam's two float32 states per trainable parameter, 8 bytes each;
  - activations (training): with micro-batch ``b = train.batch_size /
    train.grad_accumulation_steps`` and ``T = data.max_length``, every sequence
    padded to ``T`` (an upper bound), K = the largest level's K, d = the dtype's
    size::

        b * T * [ L * (8 H + K (2 H + 3 I + 2 r)) * d  +  L * 4 E  +  V * (d + 8) ]

    per layer and token: attention saves the norm output, q, k, v, the SDPA output
    and o_proj's input plus the residual stream (about 8 H); the MoE block saves,
    per routed row (K per token), the gathered input and the down projection's
    output (2 H), the gate/up output and the GLU output (3 I) and two ``r``-wide
    LoRA activations; the router saves its float32 logits (4 E bytes). The LM head
    keeps the logits in the dtype plus two float32 copies for the loss (``V (d +
    8)`` bytes). The planned figure is this times ``ACTIVATION_PEAK_FACTOR`` (2):
    during the backward pass the gradients of a layer's activations coexist with
    them, and forward temporaries come and go; on CPU ``medium`` (float32, 16 x 256,
    K = 8) the tensors autograd actually saves were 296 KB per token (the formula
    says 350 KB) while the peak RSS above weights, adapters and Adam was 2.3x the
    saved tensors (docs/gpu.md, "Planning a run"). Assumes no activation checkpointing; with
    ``train.activation_checkpointing`` only the layer inputs (``L H d`` per token)
    plus one layer's activations are kept;
  - evaluation (server): ``eval.batch_size`` sequences of ``T +
    eval.max_new_tokens`` tokens, KV cache ``2 L H d`` plus float32 logits ``4 V``
    per token;

- processes: the server process (the driver: aggregation and evaluation, one model)
  and the simulation workers running at once, each holding one client model:
  ``min(clients per round, floor(GPUs / fl.client_gpus))`` with GPUs reserved per
  client, else ``min(clients per round, floor(CPUs / fl.client_cpus))``;
- training FLOPs per round: for each participating client, tokens per round (steps
  x micro-batches x ``b * T``, steps = ``ceil(examples / batch_size) *
  local_epochs`` capped by ``train.max_local_steps``, examples =
  ``data.train_examples / fl.num_clients``) x training FLOPs per token at its
  level's K and rank (:func:`~ubsmoe.metrics.flops.training_flops_per_token`);
- disk: checkpoint bytes (global adapters, float32) x ``fl.keep_checkpoints``
  (default 2), plus the final adapter export.

:func:`check_plan` is the pre-flight of ``ubsmoe run``: it stops a run whose
processes need more than 90% of the free memory of the device they share;
:func:`check_resources` stops one whose simulated clients cannot be placed on this
machine (``fl.client_cpus``, ``fl.client_gpus``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any

import psutil
import torch

from ubsmoe.budgets import assign_budgets, top_k_for_budget
from ubsmoe.config import RunConfig
from ubsmoe.errors import ConfigError
from ubsmoe.methods import get_method_class
from ubsmoe.metrics.flops import param_counts, training_flops_per_token
from ubsmoe.metrics.model_shape import model_shape_from_config, with_lora_experts
from ubsmoe.models.adapters import set_lora_rank
from ubsmoe.models.architecture import olmoe_config
from ubsmoe.models.build import prepare_model, random_olmoe
from ubsmoe.models.devices import resolve_device, resolve_dtype
from ubsmoe.models.patching import distinct_numel

GIB = 1024 ** 3
# Peak training activations / activations saved for backward (see the module docstring).
ACTIVATION_PEAK_FACTOR = 2.0
# Share of a device's free memory a run may plan to use.
FREE_MEMORY_SHARE = 0.9


class PlanError(RuntimeError):
    """The run does not fit its device; the message is one line naming the setting to change."""


def _device_name(cfg: RunConfig) -> tuple[str, torch.device]:
    """The run's device as a label and a torch device, without requiring it to be visible.

    ``auto`` resolves on this machine; an explicit ``cuda``/``cuda:N`` is kept even
    when no CUDA device is visible (planning a GPU run from a CPU box).
    """
    name = cfg.model.device
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        return name, torch.device("cuda", index)
    dev = resolve_device(name)
    return str(dev), dev


def _meta_model(cfg: RunConfig):
    """The run's patched model on the meta device and its method (shapes only)."""
    _, device = _device_name(cfg)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = random_olmoe(cfg.model, None, None, None, seed=cfg.train.seed, device="meta", dtype=dtype)
    model = prepare_model(model, cfg.model, cfg.train.seed)
    method = get_method_class(cfg.method)(cfg.method_config)
    method.set_lora_scale(cfg.model.lora_scale_rule, cfg.model.lora_scale)
    method.prepare_model(model)
    return model, method, dtype


def _split(model) -> tuple[int, int, int]:
    """``(frozen params, frozen bytes, trainable params)`` of a (meta) model."""
    # LoRA experts' shared MLP weights are stride-0 views: counted once, as stored.
    frozen = sum(distinct_numel(p) for p in model.parameters() if not p.requires_grad)
    frozen_bytes = sum(distinct_numel(p) * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, frozen_bytes, trainable


def _workers(cfg: RunConfig, clients_per_round: int, gpus: int) -> dict[str, Any]:
    """Simulation workers running at once and what limits them."""
    client_gpus = cfg.fl.client_gpus
    cpus = os.cpu_count() or 1
    if client_gpus > 0:
        slots = math.floor(max(gpus, 1) / client_gpus)
        limit = f"{max(gpus, 1)} GPU(s) / fl.client_gpus={client_gpus:g}"
    else:
        slots = math.floor(cpus / cfg.fl.client_cpus)
        limit = f"{cpus} CPUs / fl.client_cpus={cfg.fl.client_cpus:g}"
    return {"at_once": max(1, min(clients_per_round, slots)), "limited_by": limit,
            "client_gpus": client_gpus, "client_cpus": cfg.fl.client_cpus}


def activation_bytes(shape, batch: int, seq_len: int, top_k: int, lora_rank: int,
                     dtype_bytes: int, checkpointing: bool = False) -> int:
    """Peak training activation bytes: saved-for-backward formula x ``ACTIVATION_PEAK_FACTOR``.

    The formula is in the module docstring.

    Args:
        shape: :class:`~ubsmoe.metrics.model_shape.ModelShape` of an MoE model.
        batch: sequences per micro-batch.
        seq_len: tokens per sequence (padded length).
        top_k: experts per token.
        lora_rank: r of the LoRA pairs.
        dtype_bytes: bytes per activation element (the model dtype).
        checkpointing: activation checkpointing per decoder layer.

    Returns:
        Bytes.
    """
    h, i, L, E, V = (shape.hidden_size, shape.intermediate_size, shape.num_layers,
                     max(shape.num_routed, 1), shape.vocab_size)
    per_layer = (8 * h + top_k * (2 * h + 3 * i + 2 * lora_rank)) * dtype_bytes + 4 * E
    head = V * (dtype_bytes + 8)
    tokens = batch * seq_len
    if checkpointing:
        saved = tokens * (L * h * dtype_bytes + per_layer + head)
    else:
        saved = tokens * (L * per_layer + head)
    return int(ACTIVATION_PEAK_FACTOR * saved)


def plan(cfg: RunConfig) -> dict[str, Any]:
    """The run's sizes, memory per process, processes, FLOPs per round and disk.

    Args:
        cfg: the run config (``model.device`` may name a CUDA device this machine
            does not have: the plan is computed for it anyway).

    Returns:
        JSON-ready dict: ``model`` (name, init, device, dtype), ``params`` (total,
        trainable, ``per_budget`` rows with beta, K, rank, activated parameters,
        FLOPs per token and per round), ``memory`` (bytes: ``client_process`` and
        ``server_process`` broken down, ``device_total`` for the concurrent
        processes), ``processes``, ``flops_per_round``, ``disk`` and ``assumptions``.

    Raises:
        ValueError: the model has no readable OLMoE config.
    """
    label, device = _device_name(cfg)
    model, method, dtype = _meta_model(cfg)
    shape = with_lora_experts(model_shape_from_config(olmoe_config(cfg.model).to_dict(), cfg.model.name),
                              cfg.model.lora_experts, cfg.model.lora_experts_top_k)
    d = torch.finfo(dtype).bits // 8
    k_max = shape.top_k or 1  # a dense backbone: one MLP per token, every level at K = 1 (LoRA experts: K_max)
    levels = []
    for j, beta in enumerate(cfg.fl.budgets):
        rank, alpha = method.client_lora(j, cfg.model.lora_rank, cfg.model.lora_alpha)
        k = method.client_top_k(top_k_for_budget(beta, k_max, cfg.model.k_min), k_max)
        levels.append({"beta": beta, "top_k": k, "lora_rank": rank, "lora_alpha": alpha})
    # Trainable tensors at the largest rank a level trains at (rank methods differ per level).
    top = max(levels, key=lambda r: r["lora_rank"])
    set_lora_rank(model, top["lora_rank"], top["lora_alpha"], seed=cfg.train.seed + 1)
    frozen, frozen_bytes, trainable = _split(model)
    global_rank, global_alpha = method.global_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
    set_lora_rank(model, global_rank, global_alpha, seed=cfg.train.seed + 1)
    global_trainable = _split(model)[2]

    accumulation = cfg.train.grad_accumulation_steps
    checkpointing = cfg.train.activation_checkpointing
    micro = max(1, math.ceil(cfg.train.batch_size / accumulation))
    seq = cfg.data.max_length
    k_top = max(r["top_k"] for r in levels)
    act = activation_bytes(shape, micro, seq, k_top, top["lora_rank"], d, checkpointing)
    adapters = 4 * trainable
    client = {"base_weights": frozen_bytes, "adapters": adapters, "gradients": adapters,
              "optimizer": 2 * adapters, "activations": act}
    client["total"] = sum(client.values())
    eval_tokens = cfg.eval.batch_size * (seq + cfg.eval.max_new_tokens)
    eval_act = eval_tokens * (2 * shape.num_layers * shape.hidden_size * d + 4 * shape.vocab_size)
    server = {"base_weights": frozen_bytes, "adapters": 4 * global_trainable,
              "gradients": 4 * global_trainable, "evaluation": eval_act}
    server["total"] = sum(server.values())

    clients_per_round = max(1, round(cfg.fl.fraction * cfg.fl.num_clients))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = _workers(cfg, clients_per_round, gpus if device.type == "cuda" else 0)
    device_total = server["total"] + workers["at_once"] * client["total"]

    examples = (cfg.data.train_examples or 0) / cfg.fl.num_clients
    steps = math.ceil(examples / cfg.train.batch_size) * cfg.train.local_epochs if examples else 0
    if cfg.train.max_local_steps:
        steps = min(steps, cfg.train.max_local_steps) if steps else cfg.train.max_local_steps
    tokens_per_client = steps * cfg.train.batch_size * seq
    budgets = assign_budgets(cfg.fl.num_clients, cfg.fl.budgets, cfg.fl.budget_pattern, cfg.train.seed)
    clients_at = {beta: budgets.count(beta) * clients_per_round / cfg.fl.num_clients
                  for beta in cfg.fl.budgets}
    rows, round_flops = [], 0.0
    for lvl in levels:
        per_token = training_flops_per_token(shape, lvl["top_k"], lvl["lora_rank"], seq,
                                             router_trainable=cfg.model.router_trainable)["total"]
        per_round = clients_at[lvl["beta"]] * tokens_per_client * per_token
        round_flops += per_round
        rows.append({**lvl, "activated_params": param_counts(shape, lvl["top_k"])["total"],
                     "flops_per_token": per_token, "clients_per_round": clients_at[lvl["beta"]],
                     "flops_per_round": per_round})

    keep = cfg.fl.keep_checkpoints  # 0: every round's checkpoint is kept
    kept = cfg.fl.rounds if keep == 0 else min(keep, cfg.fl.rounds)
    ckpt = 4 * global_trainable
    return {
        "model": {"name": cfg.model.name, "init": cfg.model.resolved_init, "device": label,
                  "dtype": str(dtype).removeprefix("torch."), "shape": asdict(shape)},
        "params": {"total": param_counts(shape)["total"], "frozen_in_model": frozen,
                   "trainable_per_client": trainable,
                   "trainable_global": global_trainable, "per_budget": rows},
        "memory": {"client_process": client, "server_process": server,
                   "device_total": device_total},
        "processes": {"server": 1, "workers": workers, "device": label,
                      "clients_per_round": clients_per_round},
        "flops_per_round": round_flops,
        "disk": {"checkpoint_bytes": ckpt, "kept_checkpoints": kept,
                 "total": ckpt * kept + ckpt},
        "assumptions": {
            "micro_batch": micro, "grad_accumulation_steps": accumulation,
            "activation_checkpointing": checkpointing, "seq_len": seq,
            "steps_per_round": steps, "tokens_per_client_round": tokens_per_client,
            "activation_formula": (f"{ACTIVATION_PEAK_FACTOR:g} x b*T*[L*(8H + K(2H + 3I + 2r))*d "
                                   "+ L*4E + V*(d + 8)] bytes, sequences padded to T, no "
                                   "activation checkpointing"),
        },
    }


def level_memory(cfg: RunConfig) -> list[int]:
    """Planned peak bytes of one client process training at each budget level.

    The client-process sum of :func:`plan` (base weights + adapters, gradients and
    Adam states at the level's LoRA rank + training activations at the level's K and
    rank, ``ACTIVATION_PEAK_FACTOR`` included), per level. A planned figure: on the
    CPU no per-level peak counter exists (a process's peak RSS covers every level it
    ran); ``budget=auto`` clients compare it with their memory cap.

    Returns:
        ``[len(fl.budgets)]`` bytes, in level order.

    Raises:
        ValueError: the model has no readable OLMoE config.
    """
    model, method, dtype = _meta_model(cfg)
    shape = with_lora_experts(model_shape_from_config(olmoe_config(cfg.model).to_dict(), cfg.model.name),
                              cfg.model.lora_experts, cfg.model.lora_experts_top_k)
    d = torch.finfo(dtype).bits // 8
    k_max = shape.top_k or 1
    micro = max(1, math.ceil(cfg.train.batch_size / cfg.train.grad_accumulation_steps))
    out = []
    for j, beta in enumerate(cfg.fl.budgets):
        rank, alpha = method.client_lora(j, cfg.model.lora_rank, cfg.model.lora_alpha)
        k = method.client_top_k(top_k_for_budget(beta, k_max, cfg.model.k_min), k_max, cfg.train.top_k)
        set_lora_rank(model, rank, alpha, seed=cfg.train.seed + 1)
        _, frozen_bytes, trainable = _split(model)
        act = activation_bytes(shape, micro, cfg.data.max_length, k, rank, d,
                               cfg.train.activation_checkpointing)
        out.append(frozen_bytes + 4 * 4 * trainable + act)  # params, grads, 2 Adam states: float32
    return out


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM on CPU.

    CPU: ``psutil.virtual_memory().available``, else ``MemAvailable`` of
    ``/proc/meminfo``.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of ray
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("free memory: unknown on this platform")  # pragma: no cover


def _advice(p: dict[str, Any]) -> str:
    """The setting to change, from the largest term of the plan."""
    client = p["memory"]["client_process"]
    workers = p["processes"]["workers"]["at_once"]
    if workers > 1:
        knob = "fl.client_gpus" if p["processes"]["workers"]["client_gpus"] else "fl.client_cpus"
        return f"raise {knob} (fewer clients at once)"
    largest = max(("base_weights", "activations", "optimizer"), key=lambda k: client[k])
    if largest == "activations":
        return "lower train.batch_size or data.max_length (or turn on train.activation_checkpointing)"
    if largest == "base_weights" and p["model"]["dtype"] == "float32":
        return "set model.dtype=bfloat16"
    return "use a larger device or a smaller model"


def check_plan(cfg: RunConfig, free_bytes: int | None = None) -> dict[str, Any]:
    """Pre-flight of ``ubsmoe run``: stop a run that does not fit its device.

    The server process and the workers running at once share the device
    (``model.device``); the run fits when their planned memory
    (``memory.device_total`` of :func:`plan`) is at most 90% of its free memory.

    Args:
        cfg: the run config.
        free_bytes: free memory to check against (default: :func:`free_memory`).

    Returns:
        The plan.

    Raises:
        ConfigError: ``model.device`` names no visible device.
        PlanError: the run does not fit (one line: what, how much, which setting).
    """
    device = resolve_device(cfg.model.device)
    p = plan(cfg)
    free = free_memory(device) if free_bytes is None else int(free_bytes)
    need = p["memory"]["device_total"]
    if need > FREE_MEMORY_SHARE * free:
        workers = p["processes"]["workers"]["at_once"]
        client = p["memory"]["client_process"]["total"]
        server = p["memory"]["server_process"]["total"]
        raise PlanError(
            f"plan: the run needs {need / GIB:.2f} GiB on {device} (server {server / GIB:.2f} GiB + "
            f"{workers} worker{'s' if workers > 1 else ''} x {client / GIB:.2f} GiB) but 90% of its "
            f"free memory is {FREE_MEMORY_SHARE * free / GIB:.2f} GiB: {_advice(p)}, "
            "or pass --force")
    return p


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def check_resources(cfg: RunConfig, cpus: int | None = None, gpus: int | None = None) -> list[str]:
    """Pre-flight of ``ubsmoe run``: can the simulation start a client on this machine?

    Every simulated client (a ClientApp worker) reserves ``fl.client_cpus`` CPUs and
    ``fl.client_gpus`` GPUs from the simulation runtime, which offers the machine's
    CPUs and visible CUDA devices; a client that cannot be placed stops the run only
    after the SuperLink has started ("ActorPool is empty"). A worker that reserves no
    GPU sees none, so with ``fl.client_gpus = 0`` clients train on the CPU even on a
    GPU box.

    Args:
        cfg: the run config.
        cpus: CPUs to check against (default: :func:`machine_cpus`).
        gpus: visible CUDA devices (default: ``torch.cuda.device_count()``).

    Returns:
        Warnings (one line each): clients that will train on the CPU while the
        server uses a GPU (``model.device=auto``, ``fl.client_gpus=0``, a GPU visible).

    Raises:
        ConfigError: one line naming the setting: ``fl.client_cpus`` above the CPUs,
            ``fl.client_gpus`` > 0 without a visible CUDA device or above the visible
            devices, ``model.device=cuda...`` with ``fl.client_gpus = 0``, or
            ``model.device=cuda:N`` (N > 0) with ``fl.client_gpus > 0`` (a client's one
            visible GPU is ``cuda:0``).
    """
    cpus = machine_cpus() if cpus is None else cpus
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    fl, device = cfg.fl, cfg.model.device
    if fl.client_cpus > cpus:
        raise ConfigError(f"fl.client_cpus: got {fl.client_cpus:g}, expected at most {cpus} (the CPUs "
                          "this machine offers; each simulated client reserves fl.client_cpus)")
    if fl.client_gpus > 0 and gpus == 0:
        raise ConfigError(f"fl.client_gpus: got {fl.client_gpus:g}, expected 0 (no CUDA device is "
                          "visible; each simulated client would reserve fl.client_gpus GPUs)")
    if fl.client_gpus > gpus > 0:
        raise ConfigError(f"fl.client_gpus: got {fl.client_gpus:g}, expected at most {gpus} "
                          f"(the CUDA devices visible)")
    if fl.client_gpus > 0 and device.startswith("cuda:") and device != "cuda:0":
        raise ConfigError(f"model.device: got {device!r}, expected auto or cuda with fl.client_gpus > 0 "
                          "(a simulated client sees only the GPU it reserved, as cuda:0; to put a run "
                          "on one GPU, start it with CUDA_VISIBLE_DEVICES)")
    if gpus and fl.client_gpus == 0 and device.startswith("cuda"):
        raise ConfigError(f"fl.client_gpus: got 0 with model.device={device}, expected a share of a "
                          "GPU per client, e.g. 0.5 (a simulated client that reserves no GPU sees none)")
    if gpus and fl.client_gpus == 0 and device == "auto":
        return [("clients train on the CPU: fl.client_gpus=0 reserves no GPU for them (the server "
                 "uses cuda); set fl.client_gpus, e.g. 0.5, to train them on the GPU")]
    return []


__all__ = ["ConfigError", "PlanError", "activation_bytes", "check_plan", "check_resources", "free_memory",
           "level_memory", "machine_cpus", "plan"]
