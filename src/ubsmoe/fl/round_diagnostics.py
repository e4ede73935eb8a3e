"""A round's diagnostics: utilization, phi and PG alignment (DESIGN.md section 6; no Flower).

:class:`RoundDiagnostics` is part of :class:`~ubsmoe.fl.server.Server`; the
statistics themselves are :mod:`ubsmoe.metrics.diagnostics`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ubsmoe.data.prompts import collate, tokenize_example
from ubsmoe.fl.privacy import ServerRelease
from ubsmoe.fl.train import causal_lm_loss, client_seed
from ubsmoe.methods import ClientUpdate
from ubsmoe.methods.aggregation import round_utilization
from ubsmoe.methods.base import phi_layer_of
from ubsmoe.metrics.diagnostics import pg_alignment, utilization_summary
from ubsmoe.models import load_adapter_state


class RoundDiagnostics:
    """The Server's per-round diagnostics record and the fixed PG probe batch.

    Uses the Server's ``cfg``, ``method``, ``model``, ``tokenizer``, ``setup``,
    ``state`` and :meth:`level_top_k`.
    """

    def global_phi(self) -> torch.Tensor | None:
        """The global DMR modulation ``[L, E]`` (None when the method has no phi)."""
        layer_of = phi_layer_of(list(self.state.adapters))
        if not layer_of:
            return None
        return torch.stack([self.state.adapters[n] for n in sorted(layer_of, key=layer_of.get)])

    @functools.cached_property
    def probe_batch(self) -> dict[str, torch.Tensor]:
        """The fixed PG-alignment probe batch: ``eval.pg_probe_examples`` seeded training examples.

        Returns:
            ``input_ids`` / ``attention_mask`` / ``labels``, each ``[batch, seq]``, on
            the server model's device.
        """
        train = self.setup.data.train
        gen = torch.Generator().manual_seed(client_seed(self.cfg.train.seed, -2, 0))
        idx = torch.randperm(len(train), generator=gen)[:self.cfg.eval.pg_probe_examples].tolist()
        examples = [tokenize_example(self.tokenizer, train[i], self.cfg.data.max_length) for i in idx]
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    def diagnostics(self, round_idx: int, updates: Sequence[ClientUpdate],
                    release: ServerRelease | None = None) -> dict[str, Any]:
        """Utilization, phi and PG-alignment diagnostics of a round (DESIGN.md section 6).

        Args:
            round_idx: the round.
            updates: the round's folded client updates.
            release: the round's DP release (privacy on): the logged utilization is then
                the one released (central: with the counts' noise; both: clamped at 0),
                the same draw DMR's server update used, so logging it costs no privacy.

        Returns:
            A ``"type": "diagnostics"`` metrics record: the round's global
            utilization u~ ``[L, E]``, its entropy (per layer, mean, variance across
            layers) and Gini coefficient, the phi-utilization correlations and phi's
            range when the method has phi, and, for methods with a pseudo-gradient,
            the PG alignment on the probe batch at each budget level's K.
            ``utilization_top_k`` lists the K the round's clients trained at (the
            utilization mixes them; eval rows carry utilization at one K each). ``phi``
            holds phi's ``min``/``max``/``mean_abs``, ``outside_share`` (share of global
            phi entries outside the method's ``phi_range``, after aggregation) and, from
            the clients' ``phi_penalty_max`` metrics, ``penalty_max`` (max over clients)
            and ``penalty_acted`` (the range penalty was > 0 at some local step).
        """
        utilization = round_utilization(updates, signed=release is not None)  # [L, E]
        if release is not None:  # DP: log u~ as released (noised, clamped), never the clients' clean mean
            utilization = release.utilization(utilization, len(updates))  # [L, E]
        phi = self.global_phi()  # [L, E] or None
        # A dense backbone has no experts ([0, 0]): no utilization statistics.
        record: dict[str, Any] = {"type": "diagnostics", "round": round_idx,
                                  **(utilization_summary(utilization, phi) if utilization.numel() else {}),
                                  "utilization": utilization.tolist(),
                                  # training-time statistics: measured at each client's K_c
                                  "utilization_top_k": sorted({int(u.top_k) for u in updates})}
        if phi is not None:
            record["phi"] = {"min": float(phi.min()), "max": float(phi.max()),
                             "mean_abs": float(phi.abs().mean())}
            bounds = self.method.phi_range()
            if bounds is not None:  # share of global phi entries the range penalty would act on
                record["phi"]["outside_share"] = float(((phi < bounds[0]) | (phi > bounds[1]))
                                                       .double().mean())
            penalties = [u.metrics["phi_penalty_max"] for u in updates if "phi_penalty_max" in u.metrics]
            if penalties:  # largest range penalty in any client's loss at any local step
                record["phi"]["penalty_max"] = max(penalties)
                record["phi"]["penalty_acted"] = max(penalties) > 0
        pg = self.method.pseudo_gradient
        if pg is not None and self.cfg.eval.pg_probe_examples > 0:
            load_adapter_state(self.model, self.state.adapters)
            record["pg_alignment"] = [
                pg_alignment(self.model, self.probe_batch, k, pg, causal_lm_loss)
                for k in sorted(set(self.level_top_k().values()))
            ]
        return record

