"""What each node declared (deployment): budget level, own data, device (plain PyTorch, no Flower).

:class:`NodeDeclarations` is part of :class:`~ubsmoe.fl.server.Server`: a node's
declaration (:mod:`ubsmoe.budgets`) replaces the budget level the config gave its client.
"""

from __future__ import annotations

from typing import Any

from ubsmoe.budgets import declared_level
from ubsmoe.fl.client_runtime import tokenizer_to_files
from ubsmoe.fl.run_dir import METRICS_FILE
from ubsmoe.io import append_jsonl


class NodeDeclarations:
    """The Server's node declarations: each client's level, K_c, rank, and its node's own data.

    Uses the Server's ``cfg``, ``method``, ``budgets``, ``top_k``, ``lora``,
    ``declared``, ``run_dir``, ``tokenizer``, :meth:`level_top_k` and :meth:`level_lora`.
    """

    def declare_nodes(self, declarations: dict[int, Any],
                      node_ids: dict[int, int] | None = None) -> dict[int, dict[str, Any]]:
        """Use what each client's node declared (:mod:`ubsmoe.budgets`) instead of the config.

        A node's budget declaration (``budget=``, ``top-k=``, ``lora-rank=``) replaces
        the level ``fl.budget_pattern`` gave its client (K_c and LoRA rank follow
        the level); a node without one keeps it. A ``budget=auto`` node starts at the
        lowest level and reports its own with each reply (:mod:`ubsmoe.fl.fleet_server`). Clients whose node has its own
        data are sent the server's tokenizer. With at least one declaration a
        ``{"type": "nodes", "clients": [...]}`` record (client -> node, declared key
        and value, level, budget, K, rank, data, device) is appended to
        metrics.jsonl and kept for the summary. Call before the first round.

        Args:
            declarations: client id -> :class:`~ubsmoe.budgets.NodeDeclaration`.
            node_ids: client id -> Flower node id (names the node in errors and the log).

        Returns:
            client id -> the logged entry, for the clients whose node declared a budget.

        Raises:
            DeclarationError: a declaration the run cannot use (one line naming the
                node, the key and the allowed values).
        """
        budgets = list(self.cfg.fl.budgets)
        level_k = [self.level_top_k()[b] for b in budgets]
        ranks = getattr(self.method.config, "ranks", None)
        ranks = list(ranks) if ranks is not None and len(ranks) == len(budgets) else None
        rows = []
        for client, decl in sorted(declarations.items()):
            node = (node_ids or {}).get(client)
            label = f"{node} (client {client})" if node is not None else f"of client {client}"
            level = declared_level(decl, label, self.cfg.method, budgets, level_k, ranks)
            if decl.data_path is not None:
                self._local_data.add(client)
            if decl.auto_budget:  # starts at the lowest level; reports its own from its first reply
                self.auto_clients.add(client)
                level = 0
            if level is not None:
                beta = budgets[level]
                self.budgets[client] = beta
                self.top_k[client] = level_k[level]
                self.lora[client] = self.level_lora(level)
                self.declared[client] = {"declared": decl.budget_key, "value": decl.budget_value,
                                         "level": level, **({"node": node} if node is not None else {})}
            if level is not None or decl.data_path is not None or decl.device is not None:
                rows.append({"id": client, **self.declared.get(client, {}),
                             "budget": self.budgets[client], "top_k": self.top_k[client],
                             "lora_rank": self.lora[client][0],
                             **({"data_path": decl.data_path} if decl.data_path else {}),
                             **({"device": decl.device} if decl.device else {})})
        if rows:
            append_jsonl(self.run_dir / METRICS_FILE, {"type": "nodes", "clients": rows})
        return {c: self.declared[c] for c in self.declared}

    def tokenizer_files(self) -> dict[str, str]:
        """The server's tokenizer as files (cached), for nodes with their own data."""
        if self._tokenizer_files is None:
            self._tokenizer_files = tokenizer_to_files(self.tokenizer)
        return self._tokenizer_files
