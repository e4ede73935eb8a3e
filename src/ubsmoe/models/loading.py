"""Load or build a model (sparse MoE or dense, :mod:`ubsmoe.models.families`) and patch it.

Two ways to get the model (``model.init``, see :class:`~ubsmoe.config.ModelConfig`):

- ``random``: a randomly initialised causal LM of a preset's sizes (``tiny``,
  ``medium``: OLMoE-1B-7B's routing shape, 64 experts and top-8, at small width and
  depth; ``tiny-mixtral``, ``tiny-qwen2-moe``, ``tiny-qwen3-moe``, ``tiny-dense``:
  the tiny sizes in another family's architecture) or of a full architecture read
  from a shipped or local ``config.json`` (e.g. OLMoE-1B-7B, OLMo-1B), built directly on the target device in the
  target dtype (no CPU copy first), plus a byte-level BPE tokenizer trained locally
  (Hugging Face ``tokenizers``) on the run's training text to the config's
  vocabulary size and cached on disk: everything runs without the model hub.
- ``pretrained``: a checkpoint's weights and tokenizer (hub name or local path).

:func:`resolve_device` and :func:`resolve_dtype` turn ``model.device`` /
``model.dtype`` into torch objects. LoRA factors (PEFT attention LoRA through PEFT's
adapter autocast, per-expert LoRA in :class:`~ubsmoe.models.smoe.ExpertLoRA`) and
the DMR modulation phi are float32 whatever the base dtype; adapters leave the
model (:func:`adapter_state`) as CPU tensors.

:func:`build_model` then replaces every host sparse-MoE block (``OlmoeSparseMoeBlock``,
``MixtralSparseMoeBlock``, ...) with :class:`~ubsmoe.models.smoe.SMoELayer` (reusing
the frozen expert weights) and puts PEFT LoRA on the attention projections (if
configured), a Qwen2-MoE shared expert, or a dense backbone's MLP (:func:`lora_targets`).
With ``model.lora_experts = M > 0`` a dense backbone's MLPs become SMoE layers of M
LoRA experts sharing the frozen MLP weights instead (:func:`patch_lora_experts`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ubsmoe.config import ConfigError, ModelConfig, TinyModelConfig
from ubsmoe.models.smoe import ExpertLoRA, SMoELayer, TokenMask

# The `medium` preset: OLMoE-1B-7B's routing (64 experts, top-8), expert intermediate =
# hidden / 2 and head width 128 as in OLMoE, at hidden 512 and 4 layers (about 0.11B
# parameters; the `olmoe_medium` shapes of the model_step benchmark).
MEDIUM = TinyModelConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                         vocab_size=4096, max_position_embeddings=1024)

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_ADAPTER = "default"
# Frozen SMoELayer weight each per-expert LoRA adapts (same [E, out, in] layout as B @ A).
EXPERT_BASE_WEIGHT = {"gate_up_lora": "gate_up_proj", "down_lora": "down_proj"}
SPECIAL_TOKENS = ("<pad>", "<|endoftext|>")


def cache_dir(cfg: ModelConfig) -> Path:
    """Folder for cached artefacts (tokenizers): config, ``$UBSMOE_CACHE`` or ``~/.cache/ubsmoe``."""
    root = cfg.tokenizer_cache or os.environ.get("UBSMOE_CACHE") or Path.home() / ".cache" / "ubsmoe"
    return Path(root)


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache: Path):
    """Train (or load from cache) a byte-level BPE tokenizer on ``texts``.

    The cache key is a hash of the texts and the vocabulary size, so the server and
    every client of a run get the identical tokenizer.

    Args:
        texts: training text (the run's training prompts and responses).
        vocab_size: target vocabulary size, including the special tokens.
        cache: folder holding one sub-folder per trained tokenizer.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` as pad token and
        ``<|endoftext|>`` as eos/bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    digest = hashlib.sha256()
    digest.update(str(vocab_size).encode())
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\x00")
    path = cache / "tokenizers" / digest.hexdigest()[:16] / "tokenizer.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        from ubsmoe.io import atomic_write_text

        atomic_write_text(path, tok.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )


def resolve_device(name: str) -> torch.device:
    """The torch device of ``model.device``.

    Args:
        name: ``auto`` (``cuda:0`` when a CUDA device is visible, else CPU), ``cpu``,
            ``cuda`` (the current CUDA device) or ``cuda:N``.

    Returns:
        The device (``meta`` is accepted too, for shape-only builds).

    Raises:
        ConfigError: an unknown name, CUDA asked for without a visible CUDA device,
            or ``cuda:N`` beyond the visible devices (one line naming ``model.device``).
    """
    if name in ("cpu", "meta"):
        return torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    head, sep, index = name.partition(":")
    if head != "cuda" or (sep and not index.isdigit()):
        raise ConfigError(f"model.device: got {name!r}, expected auto, cpu, cuda or cuda:N")
    if count == 0:
        raise ConfigError(f"model.device: got {name!r}, expected auto or cpu (no CUDA device visible)")
    if not sep:
        return torch.device("cuda", torch.cuda.current_device())
    if int(index) >= count:
        raise ConfigError(f"model.device: got {name!r}, expected auto, cpu, cuda or cuda:0..cuda:{count - 1} "
                          f"({count} CUDA device{'s' if count > 1 else ''} visible)")
    return torch.device("cuda", int(index))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``model.dtype`` on ``device``.

    Args:
        name: ``auto`` (bfloat16 on a CUDA device, float32 elsewhere), ``float32``,
            ``bfloat16`` or ``float16``.
        device: the resolved device (:func:`resolve_device`).

    Raises:
        ConfigError: an unknown dtype name.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: got {name!r}, expected one of auto, float32, bfloat16, float16")
    return getattr(torch, name)


# Preset name -> Hugging Face model_type of its architecture (ubsmoe.models.families).
PRESET_MODEL_TYPES = {"tiny": "olmoe", "medium": "olmoe", "tiny-mixtral": "mixtral",
                      "tiny-qwen2-moe": "qwen2_moe", "tiny-qwen3-moe": "qwen3_moe",
                      "tiny-dense": "olmo"}
# A dense preset's MLP is this many times the tiny expert width (a dense MLP is wider).
DENSE_MLP_FACTOR = 4


def preset_sizes(name: str, cfg: ModelConfig | None = None) -> TinyModelConfig | None:
    """The sizes of preset ``name`` (``tiny*``: ``cfg.tiny``; ``medium``: :data:`MEDIUM`), else None."""
    if name == "medium":
        return MEDIUM
    if name in PRESET_MODEL_TYPES:
        return cfg.tiny if cfg is not None else TinyModelConfig()
    return None


def _read_config(cfg: ModelConfig) -> dict:
    """The raw ``config.json`` dict of a non-preset ``model.name`` (shipped, local, hub)."""
    import json

    from ubsmoe.metrics.flops import SHIPPED_CONFIGS, shipped_config

    if cfg.name in SHIPPED_CONFIGS:
        return shipped_config(cfg.name)
    path = Path(cfg.name)
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.name).to_dict()
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name: no config for {cfg.name!r} (not shipped, not a local "
                         f"path, hub lookup failed); shipped offline: "
                         f"{', '.join(SHIPPED_CONFIGS)}") from e


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face ``model_type`` of ``cfg.name`` (a preset's, or read from its config).

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    if cfg.name in PRESET_MODEL_TYPES:
        return PRESET_MODEL_TYPES[cfg.name]
    return architecture_config(cfg)["model_type"]


def known_model_type(cfg: ModelConfig) -> str | None:
    """``model_type`` of a preset, shipped config or local ``config.json``; None otherwise.

    Never touches the network (a hub name gives None: its type is known once loaded).
    """
    import json

    from ubsmoe.metrics.flops import SHIPPED_CONFIGS, shipped_config

    if cfg.name in PRESET_MODEL_TYPES:
        return PRESET_MODEL_TYPES[cfg.name]
    if cfg.name in SHIPPED_CONFIGS:
        return shipped_config(cfg.name).get("model_type")
    path = Path(cfg.name)
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def architecture_config(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict of a non-preset ``model.name``, read offline.

    Resolution: a shipped config (:data:`ubsmoe.metrics.flops.SHIPPED_CONFIGS`) ->
    a local ``config.json`` or a folder holding one -> ``transformers.AutoConfig``
    (hub name; needs the network or the HF cache).

    Raises:
        ValueError: nothing could be loaded, or the architecture is not a supported
            family (:mod:`ubsmoe.models.families`: a sparse-MoE family or a dense
            backbone).
    """
    from ubsmoe.models.families import DENSE_FAMILIES, MOE_FAMILIES

    config = _read_config(cfg)
    model_type = config.get("model_type")
    if model_type not in MOE_FAMILIES and model_type not in DENSE_FAMILIES:
        raise ValueError(f"model.name: {cfg.name!r} is a {model_type!r} model; supported: sparse MoE "
                         f"{', '.join(MOE_FAMILIES)}; dense {', '.join(DENSE_FAMILIES)}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None,
              eos_token_id: int | None = None):
    """The Hugging Face config a ``random`` build uses: a preset's sizes or a full architecture.

    A ``tiny*`` preset takes ``cfg.tiny``'s sizes in its family's architecture: the
    expert width is ``intermediate_size`` (Qwen's ``moe_intermediate_size``), a
    Qwen2-MoE shared expert is ``4 * intermediate_size`` wide (Qwen1.5-MoE's ratio),
    ``norm_topk_prob`` follows the family's released checkpoints
    (:attr:`~ubsmoe.models.families.MoEFamily.preset_norm_topk`), and the dense
    ``tiny-dense`` (OLMo) has an MLP of ``4 * intermediate_size``.

    Args:
        cfg: model config (``name``: a preset, or a shipped / local config).
        vocab_size: a preset's vocabulary (the trained tokenizer's size; default the
            preset's ``vocab_size``). A full architecture keeps its own vocabulary.
        pad_token_id, eos_token_id: the tokenizer's special ids (default: the config's;
            0 and 1 for a preset, where :func:`train_tokenizer` puts them).

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    from ubsmoe.models.families import MOE_FAMILIES, family

    t = preset_sizes(cfg.name, cfg)
    special = {k: v for k, v in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id),
                                 ("bos_token_id", eos_token_id)) if v is not None}
    if t is None:
        config = architecture_config(cfg)
        return family(config["model_type"]).config_cls()(**{**config, **special})
    fam = family(PRESET_MODEL_TYPES[cfg.name])
    # A preset's trained tokenizer puts <pad> at 0 and <|endoftext|> at 1 (SPECIAL_TOKENS).
    special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1, **special}
    common = dict(
        vocab_size=vocab_size or t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
        initializer_range=t.initializer_range,
        **special,
    )
    if fam.model_type not in MOE_FAMILIES:
        return fam.config_cls()(intermediate_size=DENSE_MLP_FACTOR * t.intermediate_size, **common)
    moe = {fam.num_experts_key: t.num_experts, fam.expert_size_key: t.intermediate_size,
           "num_experts_per_tok": t.num_experts_per_tok}
    if not fam.always_norm_topk:
        moe["norm_topk_prob"] = fam.preset_norm_topk
    if fam.expert_size_key != "intermediate_size":  # Qwen: the dense-MLP width (unused layers)
        moe["intermediate_size"] = DENSE_MLP_FACTOR * t.intermediate_size
    if fam.shared_expert:
        moe[fam.shared_expert_size_key] = DENSE_MLP_FACTOR * t.intermediate_size
    return fam.config_cls()(**moe, **common)


def tokenizer_vocab_size(cfg: ModelConfig) -> int:
    """Vocabulary size a locally trained tokenizer targets: the preset's or the architecture's."""
    t = preset_sizes(cfg.name, cfg)
    return t.vocab_size if t is not None else int(architecture_config(cfg)["vocab_size"])


def random_model(cfg: ModelConfig, vocab_size: int | None, pad_token_id: int | None,
                 eos_token_id: int | None, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of the configured family, built directly on ``device``.

    Construction runs under a ``torch.device(device)`` context, so every weight is
    allocated (and initialised, with the model's ``initializer_range``) on the target
    device: a 7B model never takes a CPU copy, and ``device="meta"`` allocates
    nothing (shapes only, for planning).

    Args:
        cfg: model config (a preset, or a shipped / local config of a supported family).
        vocab_size: a preset's vocabulary (the trained tokenizer's size).
        pad_token_id, eos_token_id: the tokenizer's special token ids.
        seed: initialisation seed (the same on server and every client).
        device: target device.
        dtype: parameter dtype.

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    from ubsmoe.models.families import family

    device = torch.device(device)
    hf_cfg = hf_config(cfg, vocab_size, pad_token_id, eos_token_id)
    model_cls = family(hf_cfg.model_type).model_cls()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls._from_config(hf_cfg, dtype=dtype)
    return model


# The names the OLMoE-only code used (kept for the benchmarks and tests that import them).
olmoe_config = hf_config
random_olmoe = random_model


def tiny_olmoe(cfg: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int,
               seed: int = 0):
    """A randomly initialised model of a ``tiny*`` preset's sizes on CPU (default: OLMoE ``tiny``).

    Args:
        cfg: model config (sizes from ``cfg.tiny``; a ``tiny-*`` name picks that
            family's architecture, anything else ``tiny``; ``cfg.dtype``, ``auto`` =
            float32).
        vocab_size: the trained tokenizer's vocabulary size.
        pad_token_id, eos_token_id: the tokenizer's special token ids.
        seed: initialisation seed (the same on server and every client).
    """
    name = cfg.name if cfg.name.startswith("tiny") and cfg.name in PRESET_MODEL_TYPES else "tiny"
    tiny = cfg if cfg.name == name else ModelConfig(name=name, tiny=cfg.tiny)
    return random_model(tiny, vocab_size, pad_token_id, eos_token_id, seed, "cpu",
                        resolve_dtype(cfg.dtype, torch.device("cpu")))


def load_hf_model(cfg: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a checkpoint of a supported family and its tokenizer by hub name or local path.

    Args:
        cfg: model config.
        device: where the weights go (default: :func:`resolve_device` of
            ``cfg.device``); loaded straight there (``device_map``) on CUDA.
        dtype: parameter dtype (default: :func:`resolve_dtype` of ``cfg.dtype``).

    Raises:
        ValueError: the checkpoint is not a supported family (:mod:`ubsmoe.models.families`).
        OSError: the hub or path cannot be reached (re-raised with the name).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device) if device is None else device
    dtype = resolve_dtype(cfg.dtype, device) if dtype is None else dtype
    extra = {"device_map": str(device)} if device.type == "cuda" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name: could not load {cfg.name!r} ({first}); without the hub use "
                      "model.init=random or a local checkpoint path") from e
    from ubsmoe.models.families import DENSE_FAMILIES, MOE_FAMILIES

    if model.config.model_type not in MOE_FAMILIES and model.config.model_type not in DENSE_FAMILIES:
        raise ValueError(
            f"model.name: {cfg.name!r} is a {model.config.model_type!r} model; supported: sparse MoE "
            f"{', '.join(MOE_FAMILIES)}; dense {', '.join(DENSE_FAMILIES)}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def patch_smoe(model: nn.Module, lora_rank: int, lora_alpha: float) -> list[SMoELayer]:
    """Replace every host sparse-MoE block in ``model`` by an :class:`SMoELayer`.

    The host family comes from ``model.config.model_type``
    (:data:`ubsmoe.models.families.MOE_FAMILIES`). The new layer reuses the block's
    router and expert tensors (frozen), its top-k and its top-k renormalisation
    convention, keeps a shared expert and its gate (Qwen2-MoE) as the host modules,
    and adds per-expert LoRA. Returns the new layers in depth order.

    Raises:
        ValueError: the model is not a supported sparse-MoE family, has no MoE block,
            or uses Mixtral's router jitter (``router_jitter_noise > 0``), which the
            SMoE layer does not reproduce.
    """
    from ubsmoe.models.families import moe_family_of

    fam = moe_family_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if fam is None:
        raise ValueError(f"model: {model_type!r} is not a sparse-MoE family the SMoE patch supports")
    block_type = fam.block_type()
    layers: list[SMoELayer] = []
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, block_type)]
    if not targets:
        raise ValueError(f"model: no {fam.block_class} found to patch")
    for name, block in targets:
        if getattr(block, "jitter_noise", 0.0):
            raise ValueError(f"model: router_jitter_noise = {block.jitter_noise}, expected 0 "
                             "(the SMoE layer routes without jitter)")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # LoRA factors, phi and the routing counters are allocated on the experts' device.
        with torch.device(block.experts.gate_up_proj.device):
            layer = SMoELayer(
                router_weight=block.gate.weight,
                gate_up_proj=block.experts.gate_up_proj,
                down_proj=block.experts.down_proj,
                act_fn=block.experts.act_fn,
                top_k=block.gate.top_k,
                norm_topk_prob=fam.norm_topk_prob(block),
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                shared_expert=block.shared_expert if fam.shared_expert else None,
                shared_expert_gate=block.shared_expert_gate if fam.shared_expert else None,
            )
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def patch_lora_experts(model: nn.Module, num_experts: int, top_k: int, lora_rank: int,
                       lora_alpha: float, seed: int = 0) -> list[SMoELayer]:
    """Replace every dense MLP by an :class:`SMoELayer` of LoRA experts sharing its frozen weights.

    Beyond the papers (README, "Mixture of LoRA experts on a dense model"). Each
    decoder layer's SwiGLU MLP (``model.layers[i].mlp``: ``gate_proj`` ``[I, H]``,
    ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``, ``act_fn``) becomes an SMoE layer
    of ``num_experts`` = M experts. Every expert's frozen weights are the MLP's:
    ``gate_up_proj = cat([gate, up]).expand(M, 2I, H)`` and
    ``down_proj = down.expand(M, H, I)`` are stride-0 views (one copy of the MLP,
    not M); the experts differ only by their own :class:`~ubsmoe.models.smoe.ExpertLoRA`.
    A new router ``W_r`` ``[M, H]`` is drawn from ``N(0, initializer_range^2)`` with a
    CPU generator seeded by ``seed`` (the same on every device), and the top-K gate
    weights are renormalised (``norm_topk_prob=True``): they sum to 1, so with zero
    LoRA the layer computes ``sum_i g_i MLP(x) = MLP(x)``, the dense model, at any K.
    Compute: a token runs the frozen MLP once per selected expert (K MLP passes plus
    K LoRA passes plus the router, :func:`ubsmoe.metrics.flops.training_flops_per_token`).

    Build the model on its target device and dtype first: the views share the MLP's
    storage, and nothing here copies them (a later ``model.to`` to another device or
    dtype would materialise M copies).

    Args:
        model: a dense causal LM (:data:`ubsmoe.models.families.DENSE_FAMILIES`),
            possibly PEFT-wrapped with LoRA on its attention only.
        num_experts: M >= 0 (0: off, nothing patched).
        top_k: K_max, the experts a token runs at budget 1, in ``[1, M]``.
        lora_rank, lora_alpha: the experts' LoRA rank and alpha.
        seed: seed of the routers (every layer's drawn in depth order).

    Returns:
        The new layers in depth order.

    Raises:
        ValueError: the model is not a dense family, has no such MLP, its MLP has
            biases (``mlp_bias``), or M / K_max are out of range.
    """
    from ubsmoe.models.families import DENSE_FAMILIES, check_lora_experts

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_lora_experts(num_experts, top_k, model_type in DENSE_FAMILIES, repr(model_type))
    if num_experts == 0:  # off: nothing to patch
        return []
    names = DENSE_FAMILIES[model_type].mlp_modules  # gate, up, down
    targets = [(name, mod) for name, mod in model.named_modules()
               if name.rpartition(".")[2] == "mlp" and all(isinstance(getattr(mod, n, None), nn.Linear)
                                                           for n in names)]
    if not targets:
        raise ValueError(f"model: no dense MLP with {', '.join(names)} found to patch")
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    layers: list[SMoELayer] = []
    for name, mlp in targets:
        gate, up, down = (getattr(mlp, n) for n in names)
        if any(p.bias is not None for p in (gate, up, down)):
            raise ValueError("model: MLP projections with biases (mlp_bias) are not supported by LoRA experts")
        weight = gate.weight
        router = torch.empty(num_experts, weight.shape[1]).normal_(0.0, std, generator=generator)  # [M, H]
        gate_up = torch.cat([gate.weight.detach(), up.weight.detach()], 0)  # [2I, H], one copy
        parent_name, _, child = name.rpartition(".")
        with torch.device(weight.device):
            layer = SMoELayer(
                router_weight=router.to(weight.device, weight.dtype),
                gate_up_proj=gate_up.unsqueeze(0).expand(num_experts, -1, -1),  # [M, 2I, H], stride 0
                down_proj=down.weight.detach().unsqueeze(0).expand(num_experts, -1, -1),  # [M, H, I]
                act_fn=mlp.act_fn,
                top_k=top_k,
                norm_topk_prob=True,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
            )
        setattr(model.get_submodule(parent_name), child, layer)
        layers.append(layer)
    return layers


def is_lora_expert_model(model: nn.Module) -> bool:
    """True for a dense backbone whose MLPs were replaced by LoRA experts (:func:`patch_lora_experts`)."""
    return is_dense_model(model) and bool(smoe_layers(model))


def distinct_numel(t: torch.Tensor) -> int:
    """Elements a tensor really holds: a stride-0 (expanded) dimension counts once.

    ``numel()`` of a LoRA-expert layer's ``gate_up_proj`` ``[M, 2I, H]`` (a stride-0
    view of one ``[2I, H]`` weight) is M times its storage; this is ``2I * H``. Works
    on the meta device (no storage to compare there).
    """
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n


def smoe_layers(model: nn.Module) -> list[SMoELayer]:
    """The model's SMoE layers in depth order."""
    return [m for m in model.modules() if isinstance(m, SMoELayer)]


def set_top_k(model: nn.Module, k: int) -> None:
    """Set K_c on every SMoE layer (raises ``ValueError`` outside ``[1, num_experts]``)."""
    for layer in smoe_layers(model):
        layer.set_top_k(k)


@contextmanager
def routing_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Route only real tokens: padding (``attention_mask == 0``) skips the experts.

    Args:
        attention_mask: ``[batch, seq]`` 1 for real tokens, or None for all tokens.
    """
    layers = smoe_layers(model)
    mask = None if attention_mask is None else TokenMask.from_attention_mask(attention_mask)
    for layer in layers:
        layer.token_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


@contextmanager
def step_stats(model: nn.Module) -> Iterator[None]:
    """One optimizer step: PG's per-batch routing statistics cover all its micro-batches.

    On entry every SMoE layer's ``batch_expert_counts`` and ``router_prob_sum`` are
    cleared and then accumulate over every forward inside the block, so a gradient
    hook run at the end of the block (before leaving it) sees the active set and pi
    of the whole effective batch (README, "Memory for long runs"). The utilization
    counters ``expert_counts``/``token_count`` are not touched.
    """
    layers = smoe_layers(model)
    for layer in layers:
        layer.batch_expert_counts = None
        layer.router_prob_sum = None
        layer.accumulate_step_stats = True
    try:
        yield
    finally:
        for layer in layers:
            layer.accumulate_step_stats = False


def _checkpoint_contexts(layers: list[SMoELayer]):
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute replays this forward.

    Called when a checkpointed decoder layer runs forward. The recompute context
    (entered in the backward pass) restores the SMoE layers' ``token_mask`` of that
    forward, so padding is skipped exactly as it was, and sets ``recomputing`` so the
    replay records no statistics and keeps no router logits.
    """
    masks = [layer.token_mask for layer in layers]

    @contextmanager
    def recompute() -> Iterator[None]:
        """Replay the forward's token mask and mark the SMoE layers as recomputing."""
        saved = [(layer.token_mask, layer.recomputing) for layer in layers]
        for layer, mask in zip(layers, masks):
            layer.token_mask = mask
            layer.recomputing = True
        try:
            yield
        finally:
            for layer, (mask, flag) in zip(layers, saved):
                layer.token_mask = mask
                layer.recomputing = flag

    return nullcontext(), recompute()


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every decoder layer on or off.

    Uses transformers' per-layer mechanism (``GradientCheckpointingLayer``: only in
    training mode with autograd on, caching off) with
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; the recomputation in
    the backward pass counts no token twice in the SMoE layers' utilization
    statistics and captures no router logits (see :func:`_checkpoint_contexts`).

    Args:
        model: a model from :func:`build_model` (possibly PEFT-wrapped).
        enabled: True to checkpoint, False to store activations as usual.

    Raises:
        ValueError: ``enabled`` and the model has no checkpointable decoder layer.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if enabled and not decoder_layers:
        raise ValueError("model: no decoder layer supports activation checkpointing")
    for module in decoder_layers:
        smoe = smoe_layers(module)
        module.gradient_checkpointing = bool(enabled)
        module._gradient_checkpointing_func = partial(
            checkpoint, use_reentrant=False, context_fn=partial(_checkpoint_contexts, smoe))


def build_model(cfg: ModelConfig, tokenizer=None, seed: int = 0, device: torch.device | str | None = None):
    """Build or load the configured model on its device, patch its MoE blocks (if any), add LoRA.

    Args:
        cfg: model config (``init``, ``device``, ``dtype``, LoRA).
        tokenizer: required for ``model.init=random`` (the locally trained one sets
            a preset's vocabulary and the special ids); ignored for ``pretrained``,
            whose own tokenizer is returned.
        seed: initialisation seed of random weights and of the LoRA A factors.
        device: override of ``cfg.device`` (e.g. ``"meta"`` for a shape-only build).

    Returns:
        ``(model, tokenizer)``: the patched model on its device with only LoRA
        parameters (and the routers when ``cfg.router_trainable``) trainable.

    Raises:
        ConfigError: ``model.device`` names no visible device.
        ValueError: ``random`` without a tokenizer, or an unsupported architecture.
    """
    model, tokenizer = base_model(cfg, tokenizer, seed, device)
    return prepare_model(model, cfg, seed), tokenizer


def base_model(cfg: ModelConfig, tokenizer=None, seed: int = 0, device: torch.device | str | None = None):
    """The unpatched ``OlmoeForCausalLM`` :func:`build_model` starts from, and its tokenizer.

    The same weights :func:`build_model` patches (a ``random`` model from ``seed`` and
    the tokenizer's vocabulary, or the ``pretrained`` checkpoint), without the SMoE
    patch or LoRA: the base a plain transformers + PEFT user loads the exported
    adapters onto (``save_pretrained`` it for a random preset).

    Args:
        cfg: model config (``init``, ``device``, ``dtype``).
        tokenizer: required for ``model.init=random``; ignored for ``pretrained``.
        seed: initialisation seed of random weights.
        device: override of ``cfg.device``.

    Returns:
        ``(model, tokenizer)``: the unpatched, unfrozen model on its device.

    Raises:
        ConfigError: ``model.device`` names no visible device.
        ValueError: ``random`` without a tokenizer, or a non-OLMoE architecture.
    """
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.resolved_init == "random":
        if tokenizer is None:
            raise ValueError(f"model.init=random ({cfg.name}) needs the locally trained tokenizer")
        vocab = len(tokenizer) if preset_sizes(cfg.name, cfg) is not None else None
        if vocab is None and len(tokenizer) > tokenizer_vocab_size(cfg):
            raise ValueError(f"tokenizer: {len(tokenizer)} tokens exceed {cfg.name}'s vocabulary "
                             f"{tokenizer_vocab_size(cfg)}")
        model = random_model(cfg, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed,
                             device, dtype)
    else:
        model, tokenizer = load_hf_model(cfg, device, dtype)
    return model, tokenizer


def lora_targets(model: nn.Module, attention_lora: bool, lora_experts: int = 0) -> list[str]:
    """PEFT ``target_modules`` of a model: attention, dense MLP and shared-expert projections.

    - a sparse-MoE model: q/k/v/o when ``attention_lora``; a Qwen2-MoE shared expert's
      ``gate_proj``/``up_proj``/``down_proj`` always (the routed experts get
      :class:`~ubsmoe.models.smoe.ExpertLoRA` from :func:`patch_smoe` instead);
    - a dense backbone (:data:`ubsmoe.models.families.DENSE_FAMILIES`): q/k/v/o when
      ``attention_lora`` plus the MLP's gate/up/down projections unless
      ``lora_experts > 0`` (its only MLP is the dense one; FedIT and the rank methods
      put LoRA on both; with LoRA experts, :func:`patch_lora_experts` gives the MLP
      its per-expert LoRA instead).

    Raises:
        ValueError: the model's ``model_type`` is not a supported family.
    """
    from ubsmoe.models.families import DenseFamily, family

    fam = family(model.config.model_type)
    targets = list(ATTENTION_MODULES) if attention_lora else []
    if isinstance(fam, DenseFamily):
        return targets if lora_experts else targets + list(fam.mlp_modules)
    if fam.shared_expert:
        targets += [f"shared_expert.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    return targets


def is_dense_model(model: nn.Module) -> bool:
    """True for a dense backbone (no SMoE layer is or will be patched in)."""
    from ubsmoe.models.families import is_dense

    return is_dense(getattr(model.config, "model_type", ""))


def prepare_model(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Freeze a model, add PEFT LoRA (:func:`lora_targets`), patch its MoE blocks (if any).

    With ``model.router_trainable`` every SMoE layer's router ``W_r`` ``[E, H]`` is
    trainable too (float32, see :meth:`~ubsmoe.models.smoe.SMoELayer.set_router_trainable`)
    and so part of :func:`adapter_state`. A dense backbone gets LoRA on its attention
    (``attention_lora``) and MLP projections and no SMoE layer, or with
    ``model.lora_experts = M > 0`` LoRA on its attention only and an SMoE layer of M
    LoRA experts per MLP (:func:`patch_lora_experts`, router seeded from ``seed``).

    Args:
        model: a causal LM of a supported family (hub checkpoint or :func:`random_model`).
        cfg: LoRA rank, alpha and whether attention gets LoRA.
        seed: seed of the LoRA A factors (``seed + 1`` is used, as in :func:`build_model`).

    Returns:
        The model (a PEFT wrapper when PEFT LoRA targets exist) with only LoRA (and
        the routers, when trainable) trainable.

    Raises:
        ValueError: the model is not a supported family, a MoE model has no
            sparse-MoE block, or ``model.lora_experts > 0`` on a sparse-MoE model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    dense = is_dense_model(model)
    if cfg.lora_experts and not dense:
        raise ValueError(f"model.lora_experts: got {cfg.lora_experts}, expected 0 for the sparse-MoE "
                         f"model {cfg.name} ({model.config.model_type}); LoRA experts are for dense backbones")
    targets = lora_targets(model, cfg.attention_lora, cfg.lora_experts)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        if targets:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules=targets, bias="none")
            with warnings.catch_warnings():
                # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; the
                # FutureWarning is about PEFT's code, not ours (only this message is hidden).
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                model = get_peft_model(model, lora)
        if not dense:
            patch_smoe(model, cfg.lora_rank, cfg.lora_alpha)
        elif cfg.lora_experts:
            patch_lora_experts(model, cfg.lora_experts, cfg.lora_experts_top_k, cfg.lora_rank,
                               cfg.lora_alpha, seed)
    for layer in smoe_layers(model):
        layer.set_router_trainable(cfg.router_trainable)
    model.config.use_cache = True
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter (LoRA, phi, routers), keyed by parameter name.

    CPU whatever the model's device: this is what goes over the wire and into
    checkpoints.
    """
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (tensors on any device) into the model's trainable parameters, on their device.

    Raises:
        KeyError: a trainable parameter is missing from ``state`` or ``state`` has
            an unknown name.
        ValueError: a shape differs.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"adapter state: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ValueError(f"adapter state {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name])


# ----- LoRA rank and base-weight merges (heterogeneous-rank methods) -------------------
def _peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers holding the ``default`` adapter, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and PEFT_ADAPTER in m.lora_A}


def _expert_loras(model: nn.Module) -> dict[str, ExpertLoRA]:
    """Per-expert LoRA modules, by module name (``...mlp.gate_up_lora`` / ``...mlp.down_lora``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLoRA)}


def lora_rank_scales(model: nn.Module) -> set[tuple[int, float]]:
    """The distinct ``(rank, scale)`` pairs of the model's LoRA modules (attention and experts).

    ``scale = alpha / rank`` as PEFT and :class:`~ubsmoe.models.smoe.ExpertLoRA` compute it.
    """
    out = {(int(m.r[PEFT_ADAPTER]), float(m.scaling[PEFT_ADAPTER]))
           for m in _peft_lora_layers(model).values()}
    out |= {(m.rank, float(m.scale)) for m in _expert_loras(model).values()}
    return out


def set_lora_rank(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> None:
    """Give every LoRA of the model (attention and per-expert) rank ``rank``, scale ``alpha / rank``.

    Heterogeneous-rank methods (HetLoRA, FlexLoRA, FLoRA, FLoRIST; DESIGN.md section 5)
    train a client of budget level beta at its own rank r_c on every LoRA module. A
    no-op when every LoRA already has this rank and alpha; otherwise each adapter is
    recreated with PEFT's own ``update_layer`` (attention; the PEFT config's ``r`` and
    ``lora_alpha`` are updated too, so a saved adapter states the new rank) and a new
    :class:`~ubsmoe.models.smoe.ExpertLoRA` (experts), PEFT-initialised (A
    Kaiming-uniform, B = 0) from ``seed``. Frozen weights are untouched. Callers load
    the factors they want with :func:`load_adapter_state` afterwards.

    Args:
        model: a model from :func:`build_model`.
        rank: new LoRA rank, ``>= 1``.
        alpha: LoRA alpha, ``> 0``.
        seed: seed of the new factors' initialisation (the global RNG is not touched).

    Raises:
        ValueError: ``rank < 1`` or ``alpha <= 0``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: got {rank!r}, expected an integer >= 1")
    if not alpha > 0:
        raise ValueError(f"lora alpha: got {alpha!r}, expected a number > 0")
    if lora_rank_scales(model) <= {(rank, alpha / rank)}:
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_layers = _peft_lora_layers(model)
        if peft_layers:
            import dataclasses

            lora_cfg = dataclasses.replace(model.peft_config[PEFT_ADAPTER], r=rank, lora_alpha=alpha)
            model.peft_config[PEFT_ADAPTER] = lora_cfg
            for layer in peft_layers.values():
                dtype = layer.lora_A[PEFT_ADAPTER].weight.dtype  # PEFT may keep LoRA in float32
                layer.update_layer(PEFT_ADAPTER, rank, alpha, config=lora_cfg)
                layer.lora_A[PEFT_ADAPTER].to(dtype)
                layer.lora_B[PEFT_ADAPTER].to(dtype)
        for name, old in _expert_loras(model).items():
            parent_name, _, child = name.rpartition(".")
            num_experts, _, in_features = old.A.shape
            with torch.device(old.A.device):
                new = ExpertLoRA(num_experts, in_features, old.B.shape[1], rank, alpha, old.A.dtype)
            setattr(model.get_submodule(parent_name), child, new)


def lora_base_weight(model: nn.Module, module_name: str) -> nn.Parameter:
    """The frozen weight the LoRA module ``module_name`` adapts.

    Args:
        model: a model from :func:`build_model`.
        module_name: a PEFT LoRA layer (``...self_attn.q_proj``; its base weight is
            ``[out, in]``) or a per-expert LoRA (``...mlp.gate_up_lora`` /
            ``...mlp.down_lora``; the SMoE layer's ``gate_up_proj [E, 2I, H]`` /
            ``down_proj [E, H, I]``, i.e. ``[E, out, in]``).

    Raises:
        KeyError: ``module_name`` is not a LoRA module of the model.
    """
    try:
        module = model.get_submodule(module_name)
    except AttributeError as e:
        raise KeyError(f"no LoRA module {module_name!r} in the model") from e
    if isinstance(module, ExpertLoRA):
        parent_name, _, child = module_name.rpartition(".")
        return getattr(model.get_submodule(parent_name), EXPERT_BASE_WEIGHT[child])
    if module_name in _peft_lora_layers(model):
        return module.get_base_layer().weight
    raise KeyError(f"{module_name!r} is not a LoRA module")


def merge_into_base(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add low-rank updates ``B @ A`` to frozen base weights in place (FLoRA / FLoRIST merge).

    Args:
        model: a model from :func:`build_model`.
        factors: ``"<module>.A"`` ``[r, in]`` (``[E, r, in]`` for per-expert LoRA) and
            ``"<module>.B"`` ``[out, r]`` (``[E, out, r]``) per LoRA module name (see
            :func:`lora_base_weight`), with any scale already folded in (the update is
            exactly ``B @ A``). Accumulated in at least float32, stored in the weight's
            dtype.

    Raises:
        KeyError: a module name is unknown or its ``.A`` / ``.B`` partner is missing.
        ValueError: shapes do not match the base weight.
    """
    from ubsmoe.methods.lowrank import merge_into_weight

    modules = sorted({k.rpartition(".")[0] for k in factors})
    with torch.no_grad():
        for name in modules:
            A, B = factors[f"{name}.A"], factors[f"{name}.B"]
            weight = lora_base_weight(model, name)
            if weight.dim() == 3:  # [E, out, in]: W[e] += B[e] @ A[e], batched over experts
                if A.dim() != 3 or B.dim() != 3 or weight.shape != (A.shape[0], B.shape[1], A.shape[2]) \
                        or A.shape[:2] != (B.shape[0], B.shape[2]):
                    raise ValueError(f"merge {name}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                                     f"{tuple(weight.shape)}")
                work = torch.promote_types(weight.dtype, torch.float32)  # as merge_into_weight
                weight.copy_(torch.baddbmm(weight.to(work), B.to(work), A.to(work)))
            else:
                weight.copy_(merge_into_weight(weight, A, B, 1.0))
