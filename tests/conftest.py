"""Shared fixtures and run lists: a tiny tokenizer, the tiny model config, the small runs that
many files train, and :func:`run_rounds`, the library round loop (Server + ClientRuntime, no
Flower) those files share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "commonsense"

# A small run on the shared data: 3 tasks, 4 clients, 2 rounds of 2 local steps (tiny preset).
SMALL = [
    "model.name=tiny",
    "eval.protocols=[generation,loglik]",
    "eval.before_training=false",
    "data.tasks=[boolq,piqa,ARC-Easy]",
    "data.train_examples=160",
    "data.max_length=128",
    "fl.num_clients=4",
    "fl.rounds=2",
    "train.batch_size=8",
    "train.max_local_steps=2",
    "eval.examples_per_task=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "model.tiny.vocab_size=512",
]

# tests/models/test_dense.py's run on the tiny dense backbone: 2 tasks, 2 clients, 1 round (tests/models/test_lora_experts.py
# adds LoRA experts to it).
DENSE_SMALL = [
    "model.name=tiny-dense",
    "data.tasks=[boolq,piqa]",
    "data.train_examples=64",
    "data.max_length=96",
    "fl.num_clients=2",
    "fl.rounds=1",
    "train.batch_size=8",
    "train.max_local_steps=2",
    "eval.examples_per_task=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "model.tiny.vocab_size=512",
]

TEXTS = [
    f"Question {i}: is the sky blue? the correct answer is {'true' if i % 2 else 'false'} "
    f"answer{i % 5 + 1} solution{i % 2 + 1} option{i % 2 + 1} ending{i % 4 + 1}"
    for i in range(300)
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512) trained on synthetic text."""
    from ubsmoe.models import train_tokenizer

    return train_tokenizer(TEXTS, 512, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_model_cfg():
    """The tiny preset's ModelConfig (64 experts, top-8, hidden 64, 2 layers)."""
    from ubsmoe.config import ModelConfig

    return ModelConfig()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The embedded default as the tests were written against it: the random-weight tiny preset,
# generation + loglik, no round-0 evaluation. The shipped default fine-tunes the pretrained
# testbed base (ubsmoe/configs/default.yaml); tests that check it are marked `real_default`.
TINY_DEFAULT = {"model": {"name": "tiny"},
                "eval": {"protocols": ["generation", "loglik"], "before_training": False}}


@pytest.fixture(scope="session", autouse=True)
def _tiny_default():
    """In-process configs start from :data:`TINY_DEFAULT` on top of the shipped default.

    Session-wide, so module- and session-scoped fixtures that build runs see it too.
    Tests pin numbers of tiny-preset runs; a test marked ``real_default`` sees the
    shipped default unchanged (:func:`_real_default`). CLI subprocesses are not
    affected (their lists name ``model.name=tiny`` themselves, see :data:`SMALL`).
    """
    from ubsmoe.config import parse
    from ubsmoe.experiments import cells

    shipped = parse.default_config_dict

    def tiny_default():
        return parse.merge_trees(shipped(), TINY_DEFAULT)

    patch = pytest.MonkeyPatch()
    patch.setattr(parse, "default_config_dict", tiny_default)
    patch.setattr(cells, "default_config_dict", tiny_default)
    yield shipped
    patch.undo()


@pytest.fixture(autouse=True)
def _real_default(request, monkeypatch, _tiny_default):
    """A test marked ``real_default`` loads the shipped embedded default (the testbed base)."""
    if request.node.get_closest_marker("real_default"):
        from ubsmoe.config import parse
        from ubsmoe.experiments import cells

        monkeypatch.setattr(parse, "default_config_dict", _tiny_default)
        monkeypatch.setattr(cells, "default_config_dict", _tiny_default)


def run_rounds(cfg, run_dir, setup=None, *, rounds=None, reverse=False, finish=False):
    """Run ``cfg``'s federated rounds in process, as the ServerApp does, without Flower.

    Each round trains every sampled client with one ``ClientRuntime`` from what
    ``Server.client_task`` sends it, then ends the round with the updates.

    Args:
        cfg: the run's ``RunConfig``.
        run_dir: the run directory the server writes.
        setup: a ``SharedSetup`` to reuse (default: ``shared_setup(cfg)``).
        rounds: stop after this round (default: ``cfg.fl.rounds``).
        reverse: hand the updates to ``end_round`` in reverse client order (arrival order
            must not matter).
        finish: also call ``server.finish()``.

    Returns:
        The ``Server``, or ``(server, summary)`` with ``finish``.
    """
    from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
    from ubsmoe.fl.server import Server

    setup = setup or shared_setup(cfg)
    server = Server(cfg, run_dir, setup)
    server.evaluate_before_training()  # round 0, as serve() does (a no-op unless eval.before_training)
    runtime = ClientRuntime(cfg, setup)
    for r in range(1, (rounds or cfg.fl.rounds) + 1):
        updates = [runtime.train_round(**server.client_task(c, r)) for c in server.sample_clients(r)]
        server.end_round(r, list(reversed(updates)) if reverse else updates)
    return (server, server.finish()) if finish else server


def run_fleet_rounds(cfg, setup, run_dir, rounds, step_cost=None, tamper=None):
    """Rounds as the ServerApp runs them, each client through ``fleet_round``; the train records.

    Args:
        step_cost: an injected cost model (None: the run's ``fl.step_cost``).
        tamper: applied to each client's update before the server sees it.

    Returns:
        ``(server, [train records of metrics.jsonl])``.
    """
    from ubsmoe.fl.autobudget import fleet_round
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.server import Server
    from ubsmoe.io import read_jsonl

    server = Server(cfg, run_dir, setup)
    runtime = ClientRuntime(cfg, setup)
    states = {}
    for r in range(1, rounds + 1):
        updates = []
        for c in server.sample_clients(r):
            u, states[c] = fleet_round(runtime, server.client_task(c, r), states.get(c),
                                       auto=c in server.auto_clients, step_cost=step_cost)
            updates.append(tamper(u) if tamper else u)
        server.end_round(r, updates)
    return server, [rec for rec in read_jsonl(run_dir / "metrics.jsonl") if rec["type"] == "train"]


def make_and_setup(cache, base, method):
    """``(make(*overrides) -> cfg, setup)``: configs on ``base`` and the ``shared_setup`` of
    ``make(f"method={method}")`` (data, tokenizer and partitions depend only on ``base``)."""
    from ubsmoe.config import load_config
    from ubsmoe.fl.client_runtime import shared_setup

    def make(*extra):
        return load_config(overrides=[*base, f"model.tokenizer_cache={cache}", *extra])

    return make, shared_setup(make(f"method={method}"))


def config_and_setup(cache, base):
    """``make(*overrides) -> (cfg, setup)``: configs on ``base`` sharing one ``shared_setup``.

    The data, tokenizer and partitions depend only on ``base`` (the overrides change
    budgets, speeds or methods), so the first config's setup serves every later one.
    """
    from ubsmoe.config import load_config
    from ubsmoe.fl.client_runtime import shared_setup

    setups = {}

    def make(*overrides):
        cfg = load_config(overrides=[*base, f"model.tokenizer_cache={cache}", *overrides])
        if "setup" not in setups:
            setups["setup"] = shared_setup(cfg)
        return cfg, setups["setup"]
    return make
