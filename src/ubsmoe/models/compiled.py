"""``train.compile``: ``torch.compile`` of the decoder layers for local training (issue 24).

Each decoder layer (transformers' ``GradientCheckpointingLayer``: attention, its LoRA,
the SMoE layer) is compiled with :meth:`torch.nn.Module.compile`; the embedding, the
LM head and the loss stay eager. The compiled callable is kept on the layer, so a
later round reuses it.

The K guard: the SMoE layer's ``top_k`` is a Python int that fixes the shapes of the
routing (``[N, K]``) and the sorted slots (``[N K, ...]``), so dynamo guards on it and
compiles once per K_c a client trains at (``dynamic=False``: each K gets its own
static graph, which is what CUDA graphs need too). Layers of one model share the
compiled code of their class, so a model costs one compile per K, not one per layer;
the recompile limit is raised to :data:`RECOMPILE_LIMIT` so that a few K values do not
fall back to eager. Operations dynamo cannot trace (a host read, e.g. padding masks)
break the graph and run eagerly, which is correct but saves less.
"""

from __future__ import annotations

from torch import nn

RECOMPILE_LIMIT = 64


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer`` modules)."""
    # lazy: transformers takes seconds to import; only this path needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_compiled(model: nn.Module, enabled: bool) -> None:
    """Run every decoder layer compiled (True) or eager (False).

    Compiles each layer once (``torch.compile(dynamic=False)``, kept as
    ``_ubsmoe_compiled``) and switches :meth:`torch.nn.Module.compile`'s hook on or
    off; turning it off keeps the compiled code for the next time.

    Args:
        model: a model from :func:`~ubsmoe.models.build_model`.
        enabled: compiled (True) or eager (False).

    Raises:
        ValueError: ``enabled`` and the model has no decoder layer to compile.
    """
    if not enabled:
        for layer in decoder_layers(model):
            layer._compiled_call_impl = None
        return
    # lazy: torch._dynamo is imported only when compiling
    import torch._dynamo

    layers = decoder_layers(model)
    if not layers:
        raise ValueError("model: no decoder layer to compile")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in layers:
        compiled = getattr(layer, "_ubsmoe_compiled", None)
        if compiled is None:
            compiled = torch.compile(layer._call_impl, dynamic=False)
            layer._ubsmoe_compiled = compiled
        layer._compiled_call_impl = compiled
