"""Config sections of the model: :class:`ModelConfig` and the tiny presets' sizes :class:`TinyModelConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ubsmoe.budgets import DEVICE_NAMES, valid_device_name
from ubsmoe.config.choices import DTYPES, LORA_SCALE_RULES, MODEL_INITS, MODEL_PRESETS
from ubsmoe.errors import ConfigError, raise_if_any
from ubsmoe.errors import bad_value as _bad

# model.lora_scale_rule and model.lora_scale defaults (also a bare Method's, methods/base.py).
DEFAULT_LORA_SCALE_RULE = "rank_independent"
DEFAULT_LORA_SCALE = 0.8
# ``model.name`` alias of the pretrained testbed base shipped with the package
# (``ubsmoe pretrain``; docs page "The testbed base").
TESTBED = "testbed"


def packaged_base_path() -> Path:
    """The folder of the shipped testbed base (``ubsmoe/testbed_base``, a Hugging Face checkpoint)."""
    return Path(__file__).resolve().parents[1] / "testbed_base"


@dataclass
class TinyModelConfig:
    """Sizes of the randomly initialised OLMoE-architecture `tiny` preset.

    Experts and top-k match OLMoE-1B-7B (64 experts, top-8) so that budgets map to
    the same K_c; width and depth are small enough for CPU runs. ``initializer_range``
    is the std of the random weights (HF default 0.02; at that scale and width the
    experts' output, gated by ~1/64 softmax weights, is ~1e-3 of the residual stream,
    so K_c barely changes predictions — the embedded default uses 0.1).

    Attributes:
        hidden_size: hidden width H of the tiny preset (the ``tiny-*`` family
            presets and ``tiny-dense`` use the same sizes).
        num_hidden_layers: decoder layers L.
        num_attention_heads: attention heads.
        intermediate_size: expert intermediate size I (``tiny-dense``: its MLP is
            ``4 * intermediate_size``).
        num_experts: experts M per SMoE layer (OLMoE-1B-7B: 64).
        num_experts_per_tok: the native top-k K_max, in [1, ``num_experts``]
            (OLMoE-1B-7B: 8; a larger value is a config error naming both fields).
        vocab_size: vocabulary size; the tokenizer is trained locally to it and cached.
        max_position_embeddings: longest sequence the model accepts.
        initializer_range: std of the random weights, > 0 (HF default 0.02; the
            embedded default run uses 0.1: at 0.02 the experts' gated output is ~1e-3
            of the residual stream, so K barely changes predictions).
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 32
    num_experts: int = 64
    num_experts_per_tok: int = 8
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not self.initializer_range > 0:
            raise ConfigError(_bad("model.tiny.initializer_range", self.initializer_range, "a number > 0"))
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(_bad("model.tiny.num_experts_per_tok", self.num_experts_per_tok,
                                   f"an integer in [1, model.tiny.num_experts={self.num_experts}]"))


@dataclass
class ModelConfig:
    """Which model to fine-tune and where its LoRA adapters go.

    Attributes:
        name: a random-weight preset (``tiny``: the CPU default; ``medium``: hidden
            512, 4 layers, 4 heads, 64 experts, top-8, expert intermediate 256,
            vocabulary 4096, the ``model_step`` bench shapes; ``tiny-mixtral``,
            ``tiny-qwen2-moe``, ``tiny-qwen3-moe``: the ``tiny`` sizes in that MoE
            family's architecture; ``tiny-dense``: a dense OLMo of the ``tiny``
            width, depth and MLP size ``4 * intermediate_size``), else a hub name or
            local path of a supported checkpoint (OLMoE, Mixtral, Qwen2-MoE,
            Qwen3-MoE; dense OLMo, Llama, Mistral; e.g. ``allenai/OLMoE-1B-7B-0924``,
            ``allenai/OLMo-1B-hf``; see ``ubsmoe.models.families`` and the docs page
            "Your data and models"). ``testbed``: the pretrained testbed base shipped
            with the package (``ubsmoe/testbed_base``, 64 experts, top-8; the embedded
            default), resolved to that folder's absolute path when the config is
            built. The shipped ``allenai/OLMoE-1B-7B-0924`` and
            ``allenai/OLMo-1B-hf`` (dense: ``fedit`` and the rank methods only)
            configs build offline with ``init=random``.
        lora_rank: LoRA rank r of every expert projection and attention projection.
        lora_alpha: LoRA alpha of every LoRA under ``lora_scale_rule=fixed_alpha``
            (scale alpha / r); unused under ``rank_independent``.
        lora_scale_rule: how a LoRA's scale s (its update is ``s B A``) follows its
            rank r, for every method: ``rank_independent`` (default; s =
            ``lora_scale`` at every rank, alpha = s r, as FLoRA's official code sets
            ``lora_alpha = 2 r``; a rank-12 and a rank-40 client train at the same
            effective step) or ``fixed_alpha`` (the old rule: s = alpha / r with
            ``lora_alpha`` here and the rank methods' ``<method>.alpha``, which damps
            high-rank clients: 1.33 at rank 12, 0.4 at rank 40 for alpha 16).
        lora_scale: the one LoRA scale s of every method and rank under
            ``lora_scale_rule=rank_independent``, > 0. Default 0.8 = 16 / 20, the
            scale the SMoE methods had at their default rank 20 and alpha 16, so
            their default runs are unchanged (FLoRA's code uses 2).
        attention_lora: also put LoRA on q/k/v/o attention projections (PEFT).
        dtype: parameter dtype of the frozen model: ``auto`` (bfloat16 on a GPU,
            float32 on CPU), ``float32``, ``bfloat16`` or ``float16``. LoRA factors
            (expert LoRA in ``SMoELayer``, attention LoRA through PEFT's adapter
            autocast), DMR phi and a trainable router stay float32 whatever this is.
        device: where clients train (model and batches) and the server evaluates:
            ``auto`` (``cuda:0`` when CUDA is visible, else CPU), ``cuda``,
            ``cuda:N`` or ``cpu``. Checked against the visible devices when the
            model is built. Adapters over the wire and in checkpoints are CPU tensors.
        init: ``pretrained`` (load the checkpoint's weights and tokenizer, from the
            hub or a local path), ``random`` (random weights of the preset's or the
            checkpoint's architecture, from a shipped or local config.json, built on
            the target device, with a tokenizer trained locally to its vocabulary
            size and cached: no hub access needed) or ``auto`` (``random`` for
            presets, ``pretrained`` otherwise). ``pretrained`` with a preset is a
            config error.
        k_min: smallest number of activated experts a client may get (K_min of
            K_c = clamp(floor(K_max beta), K_min, K_max)); at most the native top-k.
        router_trainable: train the router ``W_r`` of every SMoE layer (every
            method; it is uploaded with the adapters and aggregated by p_c-weighted
            mean like any non-LoRA adapter tensor, also by A3SMoE and the rank
            methods, as a plain dense tensor; DESIGN.md section 3), checkpointed and
            exported to ``adapter/router.safetensors``. Kept in float32 when
            ``dtype`` is lower precision (Adam steps of ~lr would round away in
            bfloat16). False keeps the host model's router frozen.
        tokenizer_cache: where the tiny preset's trained tokenizer is cached
            (empty: ``$UBSMOE_CACHE`` or ``~/.cache/ubsmoe``).
        lora_experts: M, a mixture of LoRA experts on a dense backbone's frozen MLP
            (beyond the papers; docs page "Your data and models", "Mixture of LoRA
            experts on a dense model"): every decoder layer's MLP becomes an SMoE
            layer of M experts that share the frozen MLP weights and differ by their
            own LoRA, with a new router ``W_r [M, H]`` that picks K_c per token, so
            the SMoE methods (``ubsmoe``, ``smoe``, ``smoe_llb``, ``a3smoe``) run on
            the dense model; not with ``flora``/``florist`` (they merge into the
            shared base). 0 (default): off. Dense families only.
        lora_experts_top_k: K_max, the LoRA experts a token runs at budget 1
            (``1 <= K_max <= M``); a level beta runs ``clamp(floor(K_max beta), k_min, K_max)``.
            Each active expert is one more pass through the frozen MLP.
    """

    name: str = "tiny"
    lora_rank: int = 20
    lora_alpha: float = 16.0
    lora_scale_rule: str = DEFAULT_LORA_SCALE_RULE
    lora_scale: float = DEFAULT_LORA_SCALE
    attention_lora: bool = True
    dtype: str = "auto"
    device: str = "auto"
    init: str = "auto"
    k_min: int = 1
    router_trainable: bool = True
    tokenizer_cache: str = ""
    lora_experts: int = 0
    lora_experts_top_k: int = 2
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        if self.name == TESTBED:
            self.name = str(packaged_base_path())
        errors = []
        if self.lora_rank < 1:
            errors.append(_bad("model.lora_rank", self.lora_rank, "an integer >= 1"))
        if not self.lora_alpha > 0:
            errors.append(_bad("model.lora_alpha", self.lora_alpha, "a number > 0"))
        if self.lora_scale_rule not in LORA_SCALE_RULES:
            errors.append(_bad("model.lora_scale_rule", self.lora_scale_rule,
                               f"one of {', '.join(LORA_SCALE_RULES)}"))
        if isinstance(self.lora_scale, bool) or not isinstance(self.lora_scale, (int, float)) \
                or not math.isfinite(self.lora_scale) or not self.lora_scale > 0:
            errors.append(_bad("model.lora_scale", self.lora_scale, "a finite number > 0"))
        if self.dtype not in DTYPES:
            errors.append(_bad("model.dtype", self.dtype, f"one of {', '.join(DTYPES)}"))
        if self.k_min < 1:
            errors.append(_bad("model.k_min", self.k_min, "an integer >= 1"))
        if not valid_device_name(self.device):
            errors.append(_bad("model.device", self.device, DEVICE_NAMES))
        if self.init not in MODEL_INITS:
            errors.append(_bad("model.init", self.init, f"one of {', '.join(MODEL_INITS)}"))
        elif self.init == "pretrained" and self.name in MODEL_PRESETS:
            errors.append(_bad("model.init", self.init,
                               f"random or auto for the preset {self.name!r} (it has no pretrained weights)"))
        if not isinstance(self.router_trainable, bool):
            errors.append(_bad("model.router_trainable", self.router_trainable, "true or false"))
        if self.lora_experts < 0:
            errors.append(_bad("model.lora_experts", self.lora_experts, "an integer >= 0 (0: off)"))
        elif self.lora_experts and not 1 <= self.lora_experts_top_k <= self.lora_experts:
            errors.append(_bad("model.lora_experts_top_k", self.lora_experts_top_k,
                               f"an integer in [1, model.lora_experts={self.lora_experts}]"))
        raise_if_any(errors)

    def alpha_for(self, rank: int, fixed_alpha: float | None = None) -> float:
        """LoRA alpha of a rank-``rank`` LoRA under ``lora_scale_rule`` (see :func:`lora_alpha_for`).

        Args:
            rank: the LoRA rank r >= 1.
            fixed_alpha: the alpha of the ``fixed_alpha`` rule (default ``lora_alpha``;
                the rank methods pass their section's ``alpha``).
        """
        return lora_alpha_for(self.lora_scale_rule, self.lora_scale,
                              self.lora_alpha if fixed_alpha is None else fixed_alpha, rank)

    @property
    def resolved_init(self) -> str:
        """``random`` or ``pretrained``: ``auto`` resolved by the model name."""
        if self.init != "auto":
            return self.init
        return "random" if self.name in MODEL_PRESETS else "pretrained"




def lora_alpha_for(rule: str, scale: float, fixed_alpha: float, rank: int) -> float:
    """The LoRA alpha that gives a rank-``rank`` LoRA its scale under ``rule``.

    PEFT and :class:`~ubsmoe.core.smoe.ExpertLoRA` compute the scale as ``alpha / r``
    (DESIGN.md section 5), so ``rank_independent`` returns ``alpha = scale * r`` (scale
    ``scale`` at every rank) and ``fixed_alpha`` returns ``fixed_alpha`` (scale
    ``fixed_alpha / r``).

    Args:
        rule: one of ``LORA_SCALE_RULES``.
        scale: the rank-independent scale s > 0.
        fixed_alpha: the alpha of the ``fixed_alpha`` rule.
        rank: the LoRA rank r >= 1.

    Raises:
        ValueError: an unknown rule or a rank below 1.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: got {rank!r}, expected an integer >= 1")
    if rule == "rank_independent":
        return float(scale) * rank
    if rule == "fixed_alpha":
        return float(fixed_alpha)
    raise ValueError(_bad("model.lora_scale_rule", rule, f"one of {', '.join(LORA_SCALE_RULES)}"))
