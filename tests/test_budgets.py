"""Node declarations (ubsmoe.budgets), `ubsmoe certs`, and the server applying declared budgets."""

from __future__ import annotations

import pytest

from ubsmoe.budgets import (
    DEFAULT_RANKS,
    NodeDeclaration,
    assign_clients,
    check_ranks_per_level,
    declared_level,
    global_rank,
    parse_node_config,
    rank_for_level,
)
from ubsmoe.errors import ConfigError, DeclarationError

BUDGETS = [0.125, 0.25, 0.5, 1.0]
K_LEVELS = [1, 2, 4, 8]  # tiny (top-8): K_c = floor(8 * beta)


# ----- the rank rules per level (rank methods) ------------------------------------------
def test_rank_for_level_reads_one_rank_per_level_and_names_a_missing_one():
    assert [rank_for_level(DEFAULT_RANKS, j, "hetlora") for j in range(4)] == [12, 16, 24, 40]
    assert global_rank(DEFAULT_RANKS) == 40 and global_rank([8, 4]) == 8
    with pytest.raises(ValueError, match=r"budget level 4: hetlora.ranks has 4 entries"):
        rank_for_level(DEFAULT_RANKS, 4, "hetlora")
    with pytest.raises(ValueError, match=r"budget level -1"):
        rank_for_level(DEFAULT_RANKS, -1, "hetlora")


def test_check_ranks_per_level_wants_one_rank_per_budget_level():
    check_ranks_per_level([4, 8], [0.5, 1.0], "flexlora")
    with pytest.raises(ConfigError, match=r"flexlora.ranks: got \[4, 8, 16\] \(3 ranks\), expected one rank per "
                                          r"fl.budgets level \(2: \[0.5, 1.0\]\)"):
        check_ranks_per_level([4, 8, 16], [0.5, 1.0], "flexlora")


# ----- parse_node_config ---------------------------------------------------------------
def test_parse_partition_budget_device():
    d = parse_node_config({"partition-id": 2, "budget": 0.25, "device": "cuda:1"}, node=7)
    assert d == NodeDeclaration(partition_id=2, device="cuda:1", budget=0.25)
    assert d.budget_key == "budget" and d.budget_value == 0.25
    assert NodeDeclaration.from_dict(d.to_dict()) == d


def test_parse_simulation_node_config_is_a_plain_partition():
    # What Flower's simulation sets: partition-id and num-partitions only.
    d = parse_node_config({"partition-id": 0, "num-partitions": 8})
    assert d == NodeDeclaration(partition_id=0)
    assert d.budget_key is None and d.budget_value is None


def test_parse_data_path_top_k_and_lora_rank():
    d = parse_node_config({"data-path": "/data/node3", "top-k": 2})
    assert d.data_path == "/data/node3" and d.partition_id is None and d.top_k == 2
    assert d.budget_key == "top-k"
    assert parse_node_config({"partition-id": 1, "lora-rank": 16}).lora_rank == 16


@pytest.mark.parametrize("node_config, message", [
    ({"partition-id": 0, "budjet": 0.25}, ("node 5: unknown node-config key 'budjet'; allowed: partition-id, "
                                          "data-path, device, budget, top-k, lora-rank")),
    ({"budget": 0.25}, "node 5: declare exactly one of partition-id=K or data-path=/path (got neither)"),
    ({"partition-id": 0, "data-path": "/x"}, ("declare exactly one of partition-id=K or data-path=/path "
                                             "(got both)")),
    ({"partition-id": 0, "budget": 0.25, "top-k": 2}, ("node 5: declares budget and top-k; declare at most "
                                                      "one of budget=, top-k=, lora-rank=")),
    ({"partition-id": 0, "budget": 1.5}, "node 5: budget=1.5 is not a number in (0, 1]"),
    ({"partition-id": 0, "budget": 0}, "node 5: budget=0 is not a number in (0, 1]"),
    ({"partition-id": 0, "budget": "half"}, "node 5: budget='half' is not a number in (0, 1]"),
    ({"partition-id": 0, "top-k": 0}, "node 5: top-k=0 is not an integer >= 1"),
    ({"partition-id": 0, "top-k": 2.5}, "node 5: top-k=2.5 is not an integer >= 1"),
    ({"partition-id": 0, "lora-rank": True}, "node 5: lora-rank=True is not an integer >= 1"),
    ({"partition-id": -1}, "node 5: partition-id=-1 is not an integer >= 0"),
    ({"partition-id": 0, "device": "gpu0"}, "node 5: device='gpu0' is not one of auto, cpu, cuda, cuda:N"),
    ({"data-path": " "}, "node 5: data-path is empty"),
])
def test_parse_rejects_with_one_line(node_config, message):
    with pytest.raises(DeclarationError) as e:
        parse_node_config(node_config, node=5)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----- declared_level ------------------------------------------------------------------
def _level(method="ubsmoe", level_k=K_LEVELS, ranks=None, **decl):
    return declared_level(NodeDeclaration(partition_id=0, **decl), 3, method, BUDGETS, level_k, ranks)


def test_no_budget_declared_is_none():
    assert _level() is None


@pytest.mark.parametrize("beta, level", [(0.125, 0), (0.25, 1), (0.5, 2), (1.0, 3), (1, 3)])
def test_budget_maps_to_its_level(beta, level):
    assert _level(budget=beta) == level


def test_budget_not_a_level_names_the_allowed_levels():
    with pytest.raises(DeclarationError, match=r"^node 3: budget=0.3 is not one of fl.budgets "
                                               r"\[0.125, 0.25, 0.5, 1\]$"):
        _level(budget=0.3)


@pytest.mark.parametrize("k, level", [(1, 0), (2, 1), (4, 2), (8, 3)])
def test_top_k_maps_to_the_level_whose_k_equals_it(k, level):
    assert _level(top_k=k) == level


def test_top_k_not_a_level_k():
    with pytest.raises(DeclarationError, match=r"top-k=3 is not the K of any fl.budgets level "
                                               r"\(K per level: \[1, 2, 4, 8\]\)"):
        _level(top_k=3)


def test_top_k_matching_two_levels_is_ambiguous():
    # k_min clamps two levels to the same K.
    with pytest.raises(DeclarationError, match=r"top-k=2 is the K of several levels \[0.125, 0.25\]"):
        _level(top_k=2, level_k=[2, 2, 4, 8])


def test_top_k_refused_when_every_level_trains_at_one_k():
    with pytest.raises(DeclarationError, match=r"top-k=8 cannot be used by method hetlora \(every level "
                                               r"trains at K=8\); use budget= or lora-rank="):
        _level(method="hetlora", level_k=[8, 8, 8, 8], ranks=[12, 16, 24, 40], top_k=8)
    with pytest.raises(DeclarationError, match=r"cannot be used by method fedit .*; use budget=$"):
        _level(method="fedit", level_k=[8, 8, 8, 8], top_k=8)


def test_lora_rank_maps_to_the_level_of_its_rank():
    assert _level(method="flexlora", level_k=[8] * 4, ranks=[12, 16, 24, 40], lora_rank=16) == 1
    assert _level(method="flora", level_k=[8] * 4, ranks=[12, 16, 24, 40], lora_rank=40) == 3


def test_lora_rank_refused_by_a_k_budget_method():
    with pytest.raises(DeclarationError, match=r"^node 3: lora-rank=16 cannot be used by method ubsmoe "
                                               r"\(K budgets\); use budget= or top-k=$"):
        _level(lora_rank=16)


def test_lora_rank_not_in_ranks_and_ambiguous():
    with pytest.raises(DeclarationError, match=r"lora-rank=20 is not one of hetlora.ranks \[12, 16, 24, 40\]"):
        _level(method="hetlora", level_k=[8] * 4, ranks=[12, 16, 24, 40], lora_rank=20)
    with pytest.raises(DeclarationError, match=r"lora-rank=16 is the rank of several levels \[0.125, 0.25\]"):
        _level(method="hetlora", level_k=[8] * 4, ranks=[16, 16, 24, 40], lora_rank=16)


# ----- assign_clients ------------------------------------------------------------------
def test_assign_clients_partitions_then_free_ids_for_own_data():
    decl = {30: NodeDeclaration(data_path="/a"), 10: NodeDeclaration(partition_id=1),
            20: NodeDeclaration(data_path="/b"), 40: NodeDeclaration(partition_id=3)}
    assert assign_clients(decl, 4) == {0: 20, 1: 10, 2: 30, 3: 40}


def test_assign_clients_errors():
    with pytest.raises(DeclarationError, match=r"node 2: partition-id=0 is also held by node 1"):
        assign_clients({1: NodeDeclaration(partition_id=0), 2: NodeDeclaration(partition_id=0)}, 2)
    with pytest.raises(DeclarationError, match=r"partition-id=4 is not in 0..3 \(fl.num_clients=4\)"):
        assign_clients({1: NodeDeclaration(partition_id=4)}, 4)
    with pytest.raises(DeclarationError, match=r"no node holds clients \[1\]"):
        assign_clients({1: NodeDeclaration(partition_id=0), 2: NodeDeclaration(partition_id=2)}, 3)


# ----- the server uses the declarations ------------------------------------------------
@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    from ubsmoe.config import load_config
    from ubsmoe.fl.client_runtime import shared_setup

    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(overrides=["data.tasks=[boolq,piqa]", "data.train_examples=64", "data.max_length=64",
                                 "fl.num_clients=4", "fl.rounds=1", "train.batch_size=4",
                                 "train.max_local_steps=1", "model.tiny.vocab_size=512",
                                 f"model.tokenizer_cache={cache}"])
    return cfg, shared_setup(cfg)


def test_server_uses_declared_levels_and_logs_them(small_setup, tmp_path):
    from ubsmoe.fl.server import Server
    from ubsmoe.io import read_jsonl

    cfg, setup = small_setup
    server = Server(cfg, tmp_path / "run", setup)
    before = list(server.budgets)
    assert sorted(before) == BUDGETS  # uniform pattern: one client per level
    # Every client declares the level the pattern did not give it (a rotation).
    target = {c: BUDGETS[(BUDGETS.index(b) + 1) % 4] for c, b in enumerate(before)}
    decl = {0: NodeDeclaration(partition_id=0, budget=target[0]),
            1: NodeDeclaration(partition_id=1, top_k=int(8 * target[1])),
            2: NodeDeclaration(partition_id=2)}  # client 2 declares nothing, client 3 has no entry
    logged = server.declare_nodes(decl, node_ids={0: 100, 1: 101, 2: 102})
    assert server.budgets[0] == target[0] and server.budgets[1] == target[1]
    assert server.budgets[2] == before[2] and server.budgets[3] == before[3]
    assert server.top_k[0] == int(8 * target[0]) and server.top_k[1] == int(8 * target[1])
    assert logged[0] == {"declared": "budget", "value": target[0], "level": BUDGETS.index(target[0]),
                         "node": 100}
    task = server.client_task(0, 1)
    assert task["top_k"] == int(8 * target[0]) and "tokenizer_files" not in task
    rec = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "nodes"]
    assert [c["id"] for c in rec[0]["clients"]] == [0, 1]
    assert rec[0]["clients"][1]["declared"] == "top-k" and rec[0]["clients"][1]["budget"] == target[1]
    summary = server.summary()["clients"]
    assert summary[0]["budget"] == target[0] and summary[0]["declared"]["declared"] == "budget"


def test_server_refuses_a_declaration_the_run_cannot_use(small_setup, tmp_path):
    from ubsmoe.fl.server import Server

    cfg, setup = small_setup
    server = Server(cfg, tmp_path / "run", setup)
    with pytest.raises(DeclarationError, match=r"^node 102 \(client 2\): lora-rank=16 cannot be used by "
                                               r"method ubsmoe \(K budgets\); use budget= or top-k=$"):
        server.declare_nodes({2: NodeDeclaration(partition_id=2, lora_rank=16)}, {2: 102})


def test_no_declaration_leaves_the_server_as_configured(small_setup, tmp_path):
    from ubsmoe.fl.server import Server

    cfg, setup = small_setup
    server = Server(cfg, tmp_path / "run", setup)
    before = (list(server.budgets), list(server.top_k), list(server.lora))
    assert server.declare_nodes({c: NodeDeclaration(partition_id=c) for c in range(4)}) == {}
    assert (server.budgets, server.top_k, server.lora) == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_own_data_node_gets_the_server_tokenizer_and_trains_on_its_data(small_setup, tmp_path):
    """A data-path node: the train message carries the server's tokenizer; the node's runtime
    tokenizes its own records with it (identical ids to the server's tokenizer)."""
    import shutil

    from ubsmoe.data.commonsense import resolve_data_dir
    from ubsmoe.fl.client_runtime import ClientRuntime, node_setup, tokenizer_from_files
    from ubsmoe.fl.messages import train_content, train_task_from_content
    from ubsmoe.fl.server import Server

    cfg, setup = small_setup
    server = Server(cfg, tmp_path / "run", setup)
    server.declare_nodes({3: NodeDeclaration(data_path=str(tmp_path / "node"), budget=0.5)})
    task = server.client_task(3, 1)
    assert "tokenizer.json" in task["tokenizer_files"]
    cfg2, received = train_task_from_content(train_content(cfg, **task))
    files = received.pop("tokenizer_files")
    assert files == task["tokenizer_files"]
    tok = tokenizer_from_files(files)
    text = "Please choose the correct answer: the quick brown fox"
    assert tok(text)["input_ids"] == setup.tokenizer(text)["input_ids"]
    assert tok.pad_token_id == setup.tokenizer.pad_token_id
    # The node's own folder: one task's train file (a copy of boolq's first 12 records).
    src = resolve_data_dir(cfg.data.path) / "boolq" / "train.json"
    import json
    (tmp_path / "node" / "boolq").mkdir(parents=True)
    (tmp_path / "node" / "boolq" / "train.json").write_text(
        json.dumps(json.loads(src.read_text())[:12]))
    shutil.rmtree(tmp_path / "run")  # nothing of the server's is needed on the node
    own = node_setup(cfg2, 3, str(tmp_path / "node"), tok)
    assert len(own.data.train) == 12 and own.partitions[3] == list(range(12))
    assert all(not p for c, p in enumerate(own.partitions) if c != 3)
    update = ClientRuntime(cfg2, own).train_round(**received)
    assert update.client_id == 3 and update.top_k == 4 and update.num_examples == 4


# ----- ubsmoe certs ------------------------------------------------------------------------
def test_certs_chain_sans_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ubsmoe.certs import make_certs

    files = make_certs(tmp_path / "c", nodes=2, hosts=["127.0.0.1", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert len(files.node_keys) == 2
    for priv, pub in files.node_keys:
        key = serialization.load_ssh_private_key(priv.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key(pub.read_bytes())
        assert public.public_numbers() == key.public_key().public_numbers()
        assert priv.stat().st_mode & 0o777 == 0o600
    a, b = (p.read_bytes() for p, _ in files.node_keys)
    assert a != b


def test_certs_cli_bad_host_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from ubsmoe.cli import app

    result = CliRunner().invoke(app, ["certs", str(tmp_path / "c"), "--host", "bad host"])
    assert result.exit_code == 2
    assert "--host: got 'bad host', expected an IP address or a DNS name" in result.output
    assert not (tmp_path / "c").exists()
    ok = CliRunner().invoke(app, ["certs", str(tmp_path / "d"), "--nodes", "1"])
    assert ok.exit_code == 0 and (tmp_path / "d" / "node-0.pub").is_file()
