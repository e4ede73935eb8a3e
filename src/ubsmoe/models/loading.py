"""Load an OLMoE model (hub name, local path or the offline `tiny` preset) and patch it.

The `tiny` preset is a randomly initialised ``OlmoeForCausalLM`` with OLMoE-1B-7B's
routing shape (64 experts, top-8) and small width/depth, plus a byte-level BPE
tokenizer trained locally (Hugging Face ``tokenizers``) on the run's training text
and cached on disk, so everything runs without the model hub.

:func:`build_model` then replaces every ``OlmoeSparseMoeBlock`` with
:class:`~ubsmoe.models.smoe.SMoELayer` (reusing the frozen expert weights) and, if
configured, puts PEFT LoRA on the attention projections.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ubsmoe.config import ModelConfig
from ubsmoe.models.smoe import ExpertLoRA, SMoELayer

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


def tiny_olmoe(cfg: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int,
               seed: int = 0):
    """A randomly initialised ``OlmoeForCausalLM`` of the `tiny` preset's sizes.

    Args:
        cfg: model config (sizes from ``cfg.tiny``).
        vocab_size: the trained tokenizer's vocabulary size.
        pad_token_id, eos_token_id: the tokenizer's special token ids.
        seed: initialisation seed (the same on server and every client).
    """
    from transformers import OlmoeConfig, OlmoeForCausalLM

    t = cfg.tiny
    hf_cfg = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        num_experts=t.num_experts,
        num_experts_per_tok=t.num_experts_per_tok,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        tie_word_embeddings=False,
        initializer_range=t.initializer_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(hf_cfg)
    return model.to(getattr(torch, cfg.dtype))


def load_hf_model(cfg: ModelConfig):
    """Load an OLMoE checkpoint and its tokenizer by hub name or local path.

    Raises:
        ValueError: the checkpoint is not an OLMoE-architecture model.
        OSError: the hub or path cannot be reached (re-raised with the name).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=getattr(torch, cfg.dtype))
    except OSError as e:
        raise OSError(f"model.name: could not load {cfg.name!r} ({e})") from e
    if model.config.model_type != "olmoe":
        raise ValueError(
            f"model.name: {cfg.name!r} is a {model.config.model_type!r} model; "
            "supported: 'tiny' or an OLMoE checkpoint"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def patch_smoe(model: nn.Module, lora_rank: int, lora_alpha: float) -> list[SMoELayer]:
    """Replace every ``OlmoeSparseMoeBlock`` in ``model`` by an :class:`SMoELayer`.

    The new layer reuses the block's router and expert tensors (frozen) and adds
    per-expert LoRA. Returns the new layers in depth order.

    Raises:
        ValueError: the model has no OLMoE sparse-MoE block.
    """
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    layers: list[SMoELayer] = []
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, OlmoeSparseMoeBlock)]
    if not targets:
        raise ValueError("model: no OlmoeSparseMoeBlock found to patch")
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SMoELayer(
            router_weight=block.gate.weight,
            gate_up_proj=block.experts.gate_up_proj,
            down_proj=block.experts.down_proj,
            act_fn=block.experts.act_fn,
            top_k=block.gate.top_k,
            norm_topk_prob=block.gate.norm_topk_prob,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
        )
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


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
    flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
    for layer in layers:
        layer.token_mask = flat
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


def build_model(cfg: ModelConfig, tokenizer=None, seed: int = 0):
    """Load the configured model, patch its MoE blocks and add LoRA.

    Args:
        cfg: model config.
        tokenizer: required for the `tiny` preset (sets vocabulary and special ids);
            ignored for hub models, whose own tokenizer is returned.
        seed: initialisation seed of the tiny model and of the LoRA A factors.

    Returns:
        ``(model, tokenizer)``: the patched model with only LoRA parameters (and the
        routers when ``cfg.router_trainable``) trainable.

    Raises:
        ValueError: `tiny` without a tokenizer, or a non-OLMoE checkpoint.
    """
    if cfg.name == "tiny":
        if tokenizer is None:
            raise ValueError("model.name=tiny needs the locally trained tokenizer")
        model = tiny_olmoe(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    else:
        model, tokenizer = load_hf_model(cfg)
    return prepare_model(model, cfg, seed), tokenizer


def prepare_model(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Freeze an OLMoE model, add attention LoRA (PEFT) if configured, patch its MoE blocks.

    With ``model.router_trainable`` every SMoE layer's router ``W_r`` ``[E, H]`` is
    trainable too (float32, see :meth:`~ubsmoe.models.smoe.SMoELayer.set_router_trainable`)
    and so part of :func:`adapter_state`.

    Args:
        model: an ``OlmoeForCausalLM`` (hub checkpoint or :func:`tiny_olmoe`).
        cfg: LoRA rank, alpha and whether attention gets LoRA.
        seed: seed of the LoRA A factors (``seed + 1`` is used, as in :func:`build_model`).

    Returns:
        The model (a PEFT wrapper when attention LoRA is on) with only LoRA (and the
        routers, when trainable) trainable.

    Raises:
        ValueError: the model has no OLMoE sparse-MoE block.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        if cfg.attention_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules=list(ATTENTION_MODULES), bias="none")
            model = get_peft_model(model, lora)
        patch_smoe(model, cfg.lora_rank, cfg.lora_alpha)
    for layer in smoe_layers(model):
        layer.set_router_trainable(cfg.router_trainable)
    model.config.use_cache = True
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter (LoRA, phi, routers), keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters.

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
            new = ExpertLoRA(num_experts, in_features, old.B.shape[1], rank, alpha, old.A.dtype)
            setattr(model.get_submodule(parent_name), child, new.to(old.A.device))


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
