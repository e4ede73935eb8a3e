"""Where a local training step's time goes (issue 10 performance): times and a profile.

Usage::

    python benchmarks/perf_profile.py [--quick] [--ks 1,2,4,8] [--profile-ks 1,8] [--reps 5]

Builds the ``step`` part's model (random OLMoE-1B-7B, bfloat16, LoRA rank 20 on the
experts and attention, batch 8 x 256; ``--quick``: the bench's tiny CPU shapes) and:

1. times one ``local_train`` step per K with CUDA events (median of ``--reps`` after
   two warm-up steps), and per phase (forward, loss, backward, clip, Adam) with a
   synchronisation after each phase;
2. profiles one step at each of ``--profile-ks`` (torch.profiler, CPU + CUDA):
   top ops by self CUDA time and by self CPU time, the number of host-blocking
   calls (``cudaStreamSynchronize``, ``cudaMemcpy*``) and of kernel launches, and
   the summed kernel time against the step's wall time;
3. times and profiles the SMoE layer alone (OLMoE layer shape, 4096 tokens, K = 1
   and 8, forward + backward).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch


def olmoe_sizes(quick: bool):
    """OLMoE-1B-7B's sizes (the shipped config), or the bench's tiny ones."""
    from ubsmoe.config import TinyModelConfig

    if quick:
        return TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=16, num_experts=16, num_experts_per_tok=8,
                               vocab_size=256)
    from ubsmoe.models.presets import shipped_config

    c = shipped_config("allenai/OLMoE-1B-7B-0924")
    return TinyModelConfig(
        hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        num_experts=c["num_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> list[float]:
    """Milliseconds per call (CUDA events on CUDA, perf_counter on CPU)."""
    out = []
    for _ in range(reps):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def phases(model, batch, top_k: int, device: torch.device) -> dict[str, float]:
    """One step as local_train does it, split into phases, ms each (synchronised)."""
    from ubsmoe.fl.train import causal_lm_loss
    from ubsmoe.models import routing_mask, step_stats

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    model.train()
    marks = {}
    sync(device)
    t = time.perf_counter()

    def mark(name):
        nonlocal t
        sync(device)
        now = time.perf_counter()
        marks[name] = 1e3 * (now - t)
        t = now

    opt.zero_grad(set_to_none=True)
    with step_stats(model):
        with routing_mask(model, batch["attention_mask"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mark("forward")
        loss = causal_lm_loss(logits, batch["labels"])
        mark("loss")
        loss.backward()
        mark("backward")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    mark("clip")
    opt.step()
    mark("adam")
    model.eval()
    return marks


def profile(fn, device: torch.device, label: str, rows: int = 25) -> None:
    """Profile one call of ``fn``; print top ops and host-blocking call counts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with tprofile(activities=acts) as prof:
        fn()
        sync(device)
    wall = 1e3 * (time.perf_counter() - t0)
    ka = prof.key_averages()
    print(f"\n===== profile {label}: wall {wall:.1f} ms (profiled) =====")
    if device.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    names = Counter()
    kernel_us = 0.0
    for e in prof.events():
        names[e.name] += 1
        if device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += e.self_device_time_total if hasattr(e, "self_device_time_total") else 0.0
    keys = [k for k in names if any(s in k for s in ("Synchronize", "Memcpy", "LaunchKernel",
                                                      "cudaMemset", "LaunchCooperative"))]
    print(f"[{label}] host/runtime call counts:", {k: names[k] for k in sorted(keys)})
    print(f"[{label}] summed kernel time {kernel_us / 1e3:.1f} ms vs wall {wall:.1f} ms")
    # Which ops issue the syncs: ops whose CPU children contain a sync call.
    culprits = Counter()
    for e in prof.events():
        for c in e.cpu_children:
            if "Synchronize" in c.name or ("Memcpy" in c.name and "DtoH" in str(getattr(c, "name", ""))):
                culprits[e.name] += 1
            elif c.name == "cudaMemcpyAsync":
                culprits["memcpy<-" + e.name] += 1
    print(f"[{label}] ops calling cudaStreamSynchronize / cudaMemcpyAsync:", culprits.most_common(20))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--profile-ks", default="1,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-layer", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    from ubsmoe.bench.model_step import SMOE_RANK, StepConfig, _batch, _build
    from ubsmoe.config import TrainConfig
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class
    from ubsmoe.models import set_top_k

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    print("torch", torch.__version__, "device", device, flush=True)
    sizes = olmoe_sizes(args.quick)
    step_cfg = StepConfig("olmoe", sizes, batch_size=2 if args.quick else 8,
                          seq_len=16 if args.quick else 256)
    t0 = time.perf_counter()
    model = _build(step_cfg, SMOE_RANK, 0, device, dtype)
    batch = _batch(step_cfg, 0, device)
    method = get_method_class("smoe")()
    cfg = TrainConfig()
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)

    def step(k):
        def run():
            set_top_k(model, k)
            local_train(model, [batch], method, cfg, k)
        return run

    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        step(k)()
        step(k)()
    res = {}
    for _ in range(2):  # interleaved
        for k in ks:
            res.setdefault(k, []).extend(timed(step(k), device, max(1, args.reps // 2 + 1)))
    for k in ks:
        print(f"step K={k}: median {statistics.median(res[k]):.1f} ms  all {[round(v, 1) for v in res[k]]}",
              flush=True)
    for k in (ks[0], ks[-1]):
        set_top_k(model, k)
        ph = [phases(model, batch, k, device) for _ in range(3)]
        print(f"phases K={k} (ms, synced, last of 3):", {n: round(v, 1) for n, v in ph[-1].items()},
              flush=True)
    if not args.no_profile:
        for k in [int(k) for k in args.profile_ks.split(",")]:
            profile(step(k), device, f"step K={k}")
    if args.no_layer:
        return
    from ubsmoe.bench.layer import QUICK_SHAPE, LayerShape, build_layers

    shape = QUICK_SHAPE if args.quick else LayerShape(
        hidden=sizes.hidden_size, intermediate=sizes.intermediate_size,
        num_experts=sizes.num_experts, num_tokens=4096, lora_rank=20, lora_alpha=16.0)
    ours, _, _ = build_layers(shape, 8, torch.bfloat16 if device.type == "cuda" else torch.float32, 0, device)
    x = torch.randn(shape.num_tokens, shape.hidden, device=device, dtype=ours.gate_up_proj.dtype,
                    requires_grad=True)
    g = torch.randn_like(x)

    def layer_run():
        ours.zero_grad(set_to_none=True)
        x.grad = None
        ours(x).backward(g)

    for k in (1, 8):
        ours.set_top_k(k)
        timed(layer_run, device, 3)
        t = timed(layer_run, device, 20)
        print(f"layer K={k}: median {statistics.median(t):.2f} ms", flush=True)
    if not args.no_profile:
        for k in (1, 8):
            ours.set_top_k(k)
            profile(layer_run, device, f"layer K={k}", rows=20)


if __name__ == "__main__":
    main()
