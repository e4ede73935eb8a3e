"""Suite ``layer``: the SMoE layer against what a user would otherwise run.

Reference: transformers' ``OlmoeSparseMoeBlock`` with the ``grouped_mm`` experts
implementation (``OlmoeConfig(experts_implementation="grouped_mm")``, dispatched by
``transformers.integrations.moe``) and PEFT LoRA on the expert parameters
(``LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])``,
PEFT's ``ParamWrapper``, which adds ``scale * B A`` to every expert's weight on each
forward). Ours: :class:`~ubsmoe.core.smoe.SMoELayer` with the same frozen router
and expert weights and the same LoRA factors (copied into PEFT's layout), so both
compute the same function; the suite records the largest output and gradient
differences to show it.

One timed unit is forward + backward of the whole block (router included) on
``num_tokens`` tokens with frozen base weights, LoRA rank r on both expert
projections of every expert, and an input that requires grad (as inside a model
with trainable layers below). Both implementations at K = 1 and K = 8 (and any
other ``ks``) run interleaved in one process per dtype; FLOPs come from
``FlopCounterMode`` (grouped matmuls included, see :mod:`ubsmoe.metrics.flops`).

Targets (issue 5): >= 2.0x faster than the reference at K = 1, >= 1.3x at K = 8,
and our K = 1 time <= 0.20 of our K = 8 time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.bench.harness import (
    BenchOptions,
    device_sync,
    interleaved_timings,
    ratio_stats,
    register_suite,
    summarize,
)
from ubsmoe.core.smoe import SMoELayer
from ubsmoe.metrics.flops import register_grouped_mm_flops

TARGETS = {"speedup_k1": 2.0, "speedup_k8": 1.3, "k1_over_k8": 0.20}


@dataclass(frozen=True)
class LayerShape:
    """Shape of one benchmarked sparse-MoE block.

    Attributes:
        hidden: model width H.
        intermediate: expert intermediate size I (gate_up is ``[E, 2I, H]``).
        num_experts: E.
        num_tokens: tokens per forward (batch * sequence).
        lora_rank: r of every expert projection's LoRA.
        lora_alpha: LoRA alpha (scale alpha / r).
    """

    hidden: int
    intermediate: int
    num_experts: int
    num_tokens: int
    lora_rank: int
    lora_alpha: float


REFERENCE_SHAPE = LayerShape(hidden=512, intermediate=256, num_experts=64, num_tokens=2048,
                             lora_rank=16, lora_alpha=16.0)
QUICK_SHAPE = LayerShape(hidden=64, intermediate=32, num_experts=16, num_tokens=64,
                         lora_rank=4, lora_alpha=8.0)


class _Block(nn.Module):
    """Holds the HF block under the name ``mlp`` (PEFT targets ``mlp.experts.*``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.mlp = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, N, H] -> [1, N, H]``."""
        return self.mlp(x)


def build_layers(shape: LayerShape, top_k: int, dtype: torch.dtype, seed: int,
                 device: str | torch.device = "cpu") -> tuple[SMoELayer, nn.Module, nn.Module]:
    """Our SMoE layer and the HF + PEFT reference with identical weights and LoRA.

    Base weights are N(0, 0.02) (HF's init std); LoRA A follows PEFT's init and B is
    N(0, 0.02) rather than zero, so the LoRA path contributes to the output.

    Args:
        shape: block and LoRA sizes.
        top_k: initial K of both.
        dtype: parameter dtype.
        seed: weight seed (the draws depend on the device's generator, so CPU and
            CUDA weights differ for one seed).
        device: where every tensor is created (no CPU copy first).

    Returns:
        ``(ours, reference, reference_block)``: ``reference`` is the PEFT model,
        ``reference_block`` its ``OlmoeSparseMoeBlock`` (set ``.gate.top_k`` on it).
    """
    # peft and HF's reference MoE block (seconds to import): only this suite compares against them
    from peft import LoraConfig, get_peft_model
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_experts=shape.num_experts, num_experts_per_tok=top_k,
                      experts_implementation="grouped_mm")
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        block = OlmoeSparseMoeBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02)
        block = block.to(dtype)
        for p in block.parameters():
            p.requires_grad_(False)
        ours = SMoELayer(
            router_weight=block.gate.weight, gate_up_proj=block.experts.gate_up_proj,
            down_proj=block.experts.down_proj, act_fn=block.experts.act_fn, top_k=top_k,
            norm_topk_prob=cfg.norm_topk_prob, lora_rank=shape.lora_rank,
            lora_alpha=shape.lora_alpha,
        )
        with torch.no_grad():
            ours.gate_up_lora.B.normal_(0.0, 0.02)
            ours.down_lora.B.normal_(0.0, 0.02)
        lora = LoraConfig(r=shape.lora_rank, lora_alpha=shape.lora_alpha, target_modules=[],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        reference = get_peft_model(_Block(block), lora)
    for wrapper in reference.modules():
        name = getattr(wrapper, "parameter_name", None)
        if name in ("gate_up_proj", "down_proj"):
            src = ours.gate_up_lora if name == "gate_up_proj" else ours.down_lora
            _copy_lora_to_peft(src.A, src.B, wrapper)
    return ours, reference, block


def _copy_lora_to_peft(a: torch.Tensor, b: torch.Tensor, wrapper: nn.Module) -> None:
    """Copy per-expert factors ``A [E, r, in]``, ``B [E, out, r]`` into a PEFT ParamWrapper.

    PEFT stores ``lora_A.weight`` as ``[E * r, in]`` (reshaped to ``[E, r, in]``) and
    ``lora_B.weight`` as ``[out, r * E]`` (reshaped to ``[out, r, E]``, expert last);
    see ``ParamWrapper.get_delta_factors``.
    """
    num_experts, rank, in_features = a.shape
    out_features = b.shape[1]
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(a.reshape(num_experts * rank, in_features))
        wrapper.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(out_features, rank * num_experts))


def _step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` with a fixed output gradient."""

    def run() -> None:
        """Clear gradients, forward, backward."""
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_out)

    return run


def _set_k(ours: SMoELayer, block: nn.Module, k: int) -> None:
    ours.set_top_k(k)
    block.gate.top_k = k


def _flops(fn: Callable[[], None]) -> dict[str, int]:
    """Total and grouped-matmul FLOPs of one call of ``fn`` (FlopCounterMode)."""
    register_grouped_mm_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return {"total": int(counter.get_total_flops()),
            "grouped_mm": int(counts.get(torch.ops.aten._grouped_mm, 0))}


def _max_diffs(ours: SMoELayer, reference: nn.Module, block: nn.Module, x: torch.Tensor,
               grad_out: torch.Tensor, k: int) -> dict[str, float]:
    """Largest |ours - reference| of the output, the input gradient and the LoRA gradients."""
    _set_k(ours, block, k)
    results = []
    for module in (ours, reference):
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        y.backward(grad_out)
        results.append((y.detach().float(), x.grad.detach().float()))
    grads = {}
    for wrapper in reference.modules():
        name = getattr(wrapper, "parameter_name", None)
        if name in ("gate_up_proj", "down_proj"):
            lora = ours.gate_up_lora if name == "gate_up_proj" else ours.down_lora
            num_experts, rank, in_features = lora.A.shape
            ref_a = wrapper.lora_A["default"].weight.grad.reshape(num_experts, rank, in_features)
            ref_b = wrapper.lora_B["default"].weight.grad.reshape(-1, rank, num_experts).permute(2, 0, 1)
            grads[f"{name}_lora_A_grad"] = float((lora.A.grad - ref_a).abs().max())
            grads[f"{name}_lora_B_grad"] = float((lora.B.grad - ref_b).abs().max())
    (y0, gx0), (y1, gx1) = results
    return {"output": float((y0 - y1).abs().max()), "input_grad": float((gx0 - gx1).abs().max()),
            **grads}


def layer_benchmark(shape: LayerShape, dtypes: list[str], ks: list[int], repeats: int,
                    warmup: int, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Time ours against the HF + PEFT reference, per dtype, interleaved.

    Args:
        shape: block, token and LoRA sizes.
        dtypes: ``"float32"`` and/or ``"bfloat16"`` (dimensions multiple of 8).
        ks: experts per token to time; must contain 1 and the largest K compared.
        repeats, warmup: timed and untimed runs per case.
        seed: weights, input and output-gradient seed.
        device: where the layers run (``"cpu"``, ``"cuda"``, ...); on CUDA every
            timed call is bracketed by ``torch.cuda.synchronize``.

    Returns:
        JSON-ready dict: ``shape``, ``ks``, ``device``, ``timing`` protocol, and per dtype
        ``cases`` (per implementation and K: timing summary and FLOPs),
        ``ratios`` and ``max_abs_diff`` (ours vs reference, per K).

    Raises:
        ValueError: an unknown dtype or a K outside ``[1, num_experts]``.
    """
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad:
        raise ValueError(f"dtypes: got {bad}, expected float32 and/or bfloat16")
    if any(not 1 <= k <= shape.num_experts for k in ks):
        raise ValueError(f"ks: got {ks}, expected integers in [1, {shape.num_experts}]")
    ks = sorted(set(ks))
    k_lo, k_hi = ks[0], ks[-1]
    out: dict[str, Any] = {
        "shape": asdict(shape), "ks": ks, "device": str(device),
        "timing": {"repeats": repeats, "warmup": warmup, "unit": "seconds per forward+backward",
                   "order": "interleaved, alternating direction per repeat"},
        "dtypes": {},
    }
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours, reference, block = build_layers(shape, k_hi, dtype, seed, device)
        g = torch.Generator().manual_seed(seed + 1)  # CPU draws: the same input on every device
        x = torch.randn(1, shape.num_tokens, shape.hidden, generator=g).to(device, dtype)
        x.requires_grad_(True)
        grad_out = torch.randn(1, shape.num_tokens, shape.hidden, generator=g).to(device, dtype)
        diffs = {f"k{k}": _max_diffs(ours, reference, block, x, grad_out, k) for k in (k_lo, k_hi)}
        cases: dict[str, Callable[[], None]] = {}
        for k in ks:
            for impl, module in (("ubsmoe", ours), ("reference", reference)):
                run = _step(module, x, grad_out)

                def case(run=run, k=k, ours=ours, block=block) -> None:
                    """Set K on both implementations, then one forward + backward."""
                    _set_k(ours, block, k)
                    run()

                cases[f"{impl}_k{k}"] = case
        flops = {name: _flops(fn) for name, fn in cases.items()}
        times = interleaved_timings(cases, repeats, warmup, sync=device_sync(device))
        entry = {
            "cases": {name: {**summarize(t), "flops": flops[name]} for name, t in times.items()},
            "ratios": {
                f"speedup_vs_reference_k{k}": ratio_stats(times[f"reference_k{k}"], times[f"ubsmoe_k{k}"])
                for k in ks
            },
            "max_abs_diff": diffs,
        }
        entry["ratios"][f"ubsmoe_k{k_lo}_over_k{k_hi}"] = ratio_stats(times[f"ubsmoe_k{k_lo}"],
                                                                     times[f"ubsmoe_k{k_hi}"])
        entry["ratios"][f"reference_k{k_lo}_over_k{k_hi}"] = ratio_stats(times[f"reference_k{k_lo}"],
                                                                        times[f"reference_k{k_hi}"])
        entry["flop_ratio"] = {
            f"ubsmoe_k{k_lo}_over_k{k_hi}": flops[f"ubsmoe_k{k_lo}"]["total"] / flops[f"ubsmoe_k{k_hi}"]["total"],
            f"reference_k{k_lo}_over_k{k_hi}":
                flops[f"reference_k{k_lo}"]["total"] / flops[f"reference_k{k_hi}"]["total"],
        }
        out["dtypes"][dtype_name] = entry
    return out


def layer_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Headline figures and the issue's targets, per dtype (ratios of medians).

    Args:
        result: a :func:`layer_benchmark` result.

    Returns:
        ``targets`` and per dtype: ``speedup_k1`` / ``speedup_k8`` (reference median
        / ours; None when K = 1 or 8 was not timed), ``k1_over_k8`` (our K = 1 time
        over our K = 8 time), its FLOP ratio, every case's ``median_s`` and
        ``targets_met``.
    """
    ks = result["ks"]
    k_lo, k_hi = ks[0], ks[-1]
    summary: dict[str, Any] = {"targets": TARGETS}
    for dtype_name, entry in result["dtypes"].items():
        r = entry["ratios"]
        s = {
            "speedup_k1": r[f"speedup_vs_reference_k{k_lo}"]["of_medians"] if k_lo == 1 else None,
            "speedup_k8": r[f"speedup_vs_reference_k{k_hi}"]["of_medians"] if k_hi == 8 else None,
            "k1_over_k8": r[f"ubsmoe_k{k_lo}_over_k{k_hi}"]["of_medians"],
            "flop_ratio_k1_over_k8": entry["flop_ratio"][f"ubsmoe_k{k_lo}_over_k{k_hi}"],
            "median_s": {name: c["median_s"] for name, c in entry["cases"].items()},
        }
        s["targets_met"] = {
            "speedup_k1": s["speedup_k1"] is not None and s["speedup_k1"] >= TARGETS["speedup_k1"],
            "speedup_k8": s["speedup_k8"] is not None and s["speedup_k8"] >= TARGETS["speedup_k8"],
            "k1_over_k8": s["k1_over_k8"] <= TARGETS["k1_over_k8"],
        }
        summary[dtype_name] = s
    return summary


@register_suite("layer")
def layer_suite(options: BenchOptions) -> dict[str, Any]:
    """The ``layer`` suite: reference shape (quick: tiny shape), float32 and bfloat16, K = 1, 8."""
    shape = QUICK_SHAPE if options.quick else REFERENCE_SHAPE
    result = layer_benchmark(shape, ["float32", "bfloat16"], [1, 8],
                             repeats=options.n_repeats(9), warmup=options.n_warmup(2),
                             seed=options.seed)
    result["description"] = (
        "SMoE layer forward+backward (router, experts, per-expert LoRA on gate_up and down, "
        "frozen base weights, input requires grad) vs transformers OlmoeSparseMoeBlock with "
        "experts_implementation='grouped_mm' + PEFT LoRA via target_parameters"
    )
    result["summary"] = layer_summary(result)
    return result
