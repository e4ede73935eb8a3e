"""The tensor math of UB-SMoE, pure torch (layer 2: imports only the foundation).

- :mod:`ubsmoe.core.grouped`: grouped expert kernels and their autograd functions;
- :mod:`ubsmoe.core.smoe`: the resource-adaptive SMoE layer (:class:`~ubsmoe.core.smoe.SMoELayer`);
- :mod:`ubsmoe.core.routing`: Dynamic Modulated Routing (DMR) and utilization;
- :mod:`ubsmoe.core.pseudo_grad`: pseudo-gradient (PG) rules for inactive experts;
- :mod:`ubsmoe.core.pg_apply`: applying a PG rule to one layer (update or gradient space);
- :mod:`ubsmoe.core.lora`: the LoRA algebra shared by the rank methods.
"""
