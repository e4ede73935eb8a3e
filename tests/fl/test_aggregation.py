"""Incremental server aggregation, sparse uploads and the round's time accounting."""

from __future__ import annotations

import random

import pytest
import torch

from ubsmoe.fl.fold import OrderedFold, union_seconds
from ubsmoe.fl.payload import ROWS_SUFFIX, dense_from_upload, payload_nbytes, sparse_upload
from ubsmoe.methods import ClientUpdate, available_methods, get_method_class
from ubsmoe.methods.aggregation import FedAvgAggregator, fedavg

E, L = 4, 2
NAMES = {
    "model.layers.0.self_attn.q_proj.lora_A.default.weight": (3, 6),
    "model.layers.0.mlp.gate_up_lora.A": (E, 3, 6),
    "model.layers.0.mlp.down_lora.B": (E, 6, 3),
    "model.layers.1.mlp.gate_up_lora.A": (E, 3, 6),
    "model.layers.0.mlp.phi": (E,),
    "model.layers.1.mlp.phi": (E,),
}


def _update(cid, n=None):
    g = torch.Generator().manual_seed(100 + cid)
    adapters = {k: torch.randn(shape, generator=g) for k, shape in NAMES.items()}
    counts = torch.randint(0, 6, (L, E), generator=g).to(torch.float64)
    return ClientUpdate(client_id=cid, num_examples=n or 3 + 5 * cid, adapters=adapters,
                        expert_counts=counts, token_counts=counts.sum(-1) / 2, top_k=2, loss=float(cid))


def _global():
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=g) for k, shape in NAMES.items()}


@pytest.mark.parametrize("name", available_methods())
def test_incremental_fold_in_any_arrival_order_equals_all_at_once(name):
    method = get_method_class(name)()
    updates = [_update(c) for c in range(6)]
    reference = method.aggregate(_global(), updates)
    for seed in range(3):
        arrival = updates[:]
        random.Random(seed).shuffle(arrival)
        fold = OrderedFold(method.aggregator(_global()), [u.client_id for u in updates])
        for u in arrival:
            fold.add(u)
        out = fold.result()
        assert out.keys() == reference.keys()
        assert all(torch.equal(out[k], reference[k]) for k in out)
        assert [u.client_id for u in fold.folded] == list(range(6))
        assert all(u.adapters == {} for u in fold.folded)  # adapters dropped once folded


def test_in_order_arrival_buffers_nothing_and_bad_replies_are_rejected():
    updates = [_update(c) for c in range(4)]
    fold = OrderedFold(FedAvgAggregator(list(NAMES)), [0, 1, 2, 3])
    for u in updates:
        fold.add(u)
    assert fold.max_buffered == 0
    fold = OrderedFold(FedAvgAggregator(list(NAMES)), [0, 1, 2, 3])
    for u in reversed(updates):
        fold.add(u)
    assert fold.max_buffered == 3
    fold = OrderedFold(FedAvgAggregator(list(NAMES)), [0, 1])
    fold.add(updates[0])
    with pytest.raises(ValueError, match="unexpected reply from client 0"):
        fold.add(updates[0])
    with pytest.raises(ValueError, match="unexpected reply from client 3"):
        fold.add(updates[3])
    with pytest.raises(ValueError, match=r"no reply from clients \[1\]"):
        fold.result()


def test_fedavg_accumulator_matches_the_formula():
    updates = [_update(c) for c in range(3)]
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = n / n.sum()
    out = fedavg(updates)
    for k in NAMES:
        ref = sum(p[c] * updates[c].adapters[k].double() for c in range(3)).float()
        torch.testing.assert_close(out[k], ref, atol=1e-7, rtol=1e-7)
    with pytest.raises(ValueError, match="0 training examples"):
        fedavg([ClientUpdate(**{**updates[0].__dict__, "num_examples": 0})])


def test_sparse_upload_round_trip_is_exact_and_sends_only_changed_rows():
    received = _global()
    trained = {k: v.clone() for k, v in received.items()}
    trained["model.layers.0.mlp.gate_up_lora.A"][[1, 3]] += 0.5  # experts 1 and 3 changed
    trained["model.layers.0.self_attn.q_proj.lora_A.default.weight"] += 1e-3
    up = sparse_upload(trained, received)
    assert up["model.layers.0.mlp.gate_up_lora.A"].shape == (2, 3, 6)
    assert up["model.layers.0.mlp.gate_up_lora.A" + ROWS_SUFFIX].tolist() == [1, 3]
    assert "model.layers.1.mlp.gate_up_lora.A" not in up  # untouched tensors are not sent
    assert payload_nbytes(up) < payload_nbytes(trained)
    rebuilt = dense_from_upload(up, received)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    with pytest.raises(KeyError, match="unknown"):
        dense_from_upload({"nope": torch.zeros(1)}, received)


def test_union_seconds():
    assert union_seconds([]) == 0.0
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(4.0)
    assert union_seconds([(1.0, 4.0), (2.0, 3.0)]) == pytest.approx(3.0)
