"""Loopback deployment: a SuperLink and three SuperNodes as separate processes on 127.0.0.1.

TLS on (certificates from ``ubsmoe certs``), SuperNode authentication on (node keys
registered with ``flwr supernode register``), each node declaring a different budget
in its ``--node-config``; ``flwr run`` submits the packaged ubsmoe app to the
SuperLink as a user would (docs/deployment.md). Marked ``deploy`` (about two
minutes on two cores): ``pytest -m deploy`` (docs/testing.md, ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ubsmoe.fl.simulation import (
    _wait_healthy,
    app_dir,
    child_path,
    executable,
    free_port,
    stop_process_tree,
)
from ubsmoe.io import read_jsonl

pytestmark = pytest.mark.deploy

SRC = Path(__file__).resolve().parents[2] / "src"
CONNECTION = "ubsmoe-deploy"
# Node i declares DECLARED[i]; the (budget, K) each client trains at in rounds 1 and 2 (tiny: top-8,
# K = 8 * beta). Node 2 chooses its own budget (docs/fleet.md): it calibrates at the lowest level in
# round 1 and, with no deadline (fl.round_deadline_s=0: memory alone decides, no memory-gib cap: the
# device's free memory), reports the top level, which the server applies from round 2.
DECLARED = ["budget=0.125", "top-k=4", 'budget="auto"']  # node config is TOML: strings quoted
EXPECTED = {1: [(0.125, 1), (0.5, 4), (0.125, 1)], 2: [(0.125, 1), (0.5, 4), (1.0, 8)]}
OVERRIDES = ("data.tasks=[boolq,piqa] data.train_examples=48 data.max_length=64 fl.num_clients=3 "
             "fl.rounds=2 fl.budget_pattern=reverse_long_tail train.batch_size=4 train.max_local_steps=1 "
             "eval.protocols=[loglik] eval.examples_per_task=2 eval.batch_size=4 "
             "model.tiny.vocab_size=512")
RUN_TIMEOUT_S = 420.0


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Deployment:
    """The processes of one loopback deployment and their logs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}  # every process of ours ever observed
        self.home = root / "flwr-home"
        self.certs = root / "certs"
        # PATH: the SuperLink and SuperNodes start flower-superexec / flwr-clientapp by name;
        # this interpreter's folder first, so `/venv/bin/pytest -m deploy` works unactivated.
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PATH=child_path(os.environ.get("PATH", "")),
                        PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", ""))
                                                   if p))

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env or self.env, cwd=self.root, stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.observe()
        return proc

    def observe(self) -> None:
        """Remember every live descendant of the started processes (for the leftover check)."""
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.Error:
                pass

    def supernode(self, i: int, key: Path, node_config: str) -> subprocess.Popen:
        home = self.home / f"node-{i}"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(self.env, FLWR_HOME=str(home))
        return self.start([executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                           "--root-certificates", str(self.certs / "ca.crt"),
                           "--auth-supernode-private-key", str(key), "--node-config", node_config,
                           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--max-retries", "3", "--max-wait-time", "20"],
                          self.root / f"supernode-{i}.log", env=env)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([executable("flwr"), *args], env=self.env, cwd=self.root, capture_output=True, check=False,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        self.observe()
        stop_process_tree(self.procs)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink (TLS, node auth) + three registered, connected SuperNodes; all stopped after."""
    root = tmp_path_factory.mktemp("deploy")
    d = Deployment(root)
    try:
        made = subprocess.run([sys.executable, "-m", "ubsmoe.cli", "certs", str(d.certs), "--nodes", "4",
                               "--host", "127.0.0.1"], env=d.env, capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0, made.stderr
        d.port = free_port()
        d.home.mkdir()
        (d.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{d.port}"\nroot-certificates = "{d.certs / "ca.crt"}"\n')
        c = d.certs
        d.superlink = d.start([executable("flower-superlink"), "--ssl-certfile", str(c / "server.crt"),
                               "--ssl-keyfile", str(c / "server.key"), "--ssl-ca-certfile", str(c / "ca.crt"),
                               "--enable-supernode-auth", "--isolation", "subprocess", "--host", "127.0.0.1",
                               "--port", str(d.port), "--disable-runtime-dependency-installation"],
                              root / "superlink.log")
        _wait_healthy(d.port, d.superlink, root / "superlink.log", cafile=c / "ca.crt")
        for i in range(3):  # node-3's key is never registered
            reg = d.flwr("supernode", "register", str(c / f"node-{i}.pub"), CONNECTION)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        for i in range(3):
            d.nodes[i] = d.supernode(i, c / f"node-{i}", f'partition-id={i} {DECLARED[i]} device="cpu"')
        for i in range(3):
            def connected(i: int = i) -> bool:
                assert d.nodes[i].poll() is None, (root / f"supernode-{i}.log").read_text()[-2000:]
                return "SuperNode ID:" in (root / f"supernode-{i}.log").read_text()

            _wait_for(connected, 120,
                      f"SuperNode {i} to connect (see {root / f'supernode-{i}.log'})")
        d.observe()
        yield d
    finally:
        d.stop()


def _run(d: Deployment, name: str, overrides: str, during=None) -> tuple[subprocess.Popen, Path, float]:
    """Submit the packaged app with ``flwr run`` and wait; ``during(events)`` is polled meanwhile."""
    out = d.root / name
    events = d.root / f"{name}.events.jsonl"
    run_config = d.root / f"{name}.toml"
    run_config.write_text(f'config-file = ""\noverrides = {json.dumps(overrides)}\nout = "{out}"\n'
                          f'resume = false\nprogress-file = "{events}"\n')
    start = time.monotonic()
    proc = d.start([executable("flwr"), "run", str(app_dir()), CONNECTION, "--stream",
                    "--run-config", str(run_config)], d.root / f"{name}.flwr.log")
    deadline = start + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        d.observe()
        if during is not None and events.is_file():
            during([json.loads(ln) for ln in events.read_text().splitlines() if ln.strip()])
        if events.is_file() and any(json.loads(ln)["event"] in ("done", "error")
                                    for ln in events.read_text().splitlines() if ln.strip()):
            break
        time.sleep(0.5)
    return proc, out, time.monotonic() - start


def test_deployment_tls_auth_declared_budgets(deployment, record_property):
    """Two rounds over TLS with authenticated nodes; every client runs at its node's declared level,
    and the ``budget=auto`` node at the level it measured and reported."""
    d = deployment
    proc, out, wall = _run(d, "run", OVERRIDES + f" model.tokenizer_cache={d.root / 'cache'}")
    flower_log = (d.root / "run.flwr.log").read_text()
    assert (out / "summary.json").is_file(), flower_log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    for c, (beta, k) in enumerate(EXPECTED[2]):
        client = summary["clients"][c]
        assert (client["budget"], client["top_k"]) == (beta, k)
        assert client["declared"]["declared"] == DECLARED[c].split("=")[0]
    assert summary["clients"][2]["declared"]["value"] == "auto"
    records = read_jsonl(out / "metrics.jsonl")
    nodes = [r for r in records if r["type"] == "nodes"]
    assert len(nodes) == 1 and [(c["budget"], c["top_k"], c["device"]) for c in nodes[0]["clients"]] == [
        (beta, k, "cpu") for beta, k in EXPECTED[1]]
    train = [r for r in records if r["type"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for r in train:
        assert sorted((c["id"], c["budget"], c["top_k"]) for c in r["clients"]) == [
            (c, beta, k) for c, (beta, k) in enumerate(EXPECTED[r["round"]])]
    # The budget=auto node: timed every level in round 1 (calibration), reported the top level
    # (memory alone decides without a deadline), trained at it in round 2.
    auto = [{row["id"]: row for row in r["auto"]}[2] for r in train]
    assert auto[0]["calibrated"] and auto[0]["next_budget"] == 1.0 and auto[1]["next_budget"] == 1.0
    assert auto[0]["reason"].startswith("the top level fits"), auto[0]
    first = {c["id"]: c for c in train[0]["clients"]}[2]
    assert first["auto_budget"] == 1.0 and first["auto_calibrated"] == 1
    assert all(first[f"auto_pred_s.{j}"] > 0 and first[f"auto_mem_gib.{j}"] > 0 for j in range(4))
    # The config's pattern would have given other levels: the declared ones were used.
    from ubsmoe.budgets import assign_budgets
    from ubsmoe.config import load_config

    cfg = load_config(overrides=OVERRIDES.split())
    pattern = assign_budgets(3, cfg.fl.budgets, cfg.fl.budget_pattern, cfg.train.seed)
    assert pattern != [beta for beta, _ in EXPECTED[2]]
    # Deployment starts a ClientApp process per message: the model is rebuilt every round.
    setup = [c["setup_s"] for r in train for c in r["clients"]]
    assert all(c["runtime_builds"] == 1 for r in train for c in r["clients"])
    assert len({c["pid"] for r in train for c in r["clients"]}) == 6
    record_property("run_wall_s", round(wall, 1))
    record_property("round_wall_s", [round(r["round_wall_s"], 1) for r in train])
    record_property("client_setup_s", [round(s, 2) for s in setup])
    print(f"deployment run: {wall:.1f}s wall; rounds {[round(r['round_wall_s'], 1) for r in train]} s; "
          f"ClientApp setup (model rebuild) per client-round {[round(s, 2) for s in setup]} s")
    assert proc.wait(timeout=60) == 0, flower_log[-3000:]


def test_unregistered_node_is_refused(deployment):
    """A SuperNode whose key was never registered cannot join: it exits with Flower's code 305."""
    d = deployment
    proc = d.supernode(3, d.certs / "node-3", "partition-id=0 budget=0.5")
    code = proc.wait(timeout=120)
    log = (d.root / "supernode-3.log").read_text()
    assert code != 0 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log[-2000:]
    assert "SuperNode ID:" not in log


def test_bad_declaration_is_refused_with_one_line(deployment):
    """A node declaring a level the run does not have: the run fails with the node's one line."""
    d = deployment
    proc, out, _ = _run(d, "bad", OVERRIDES + " fl.budgets=[0.25,0.5,1.0] method=ubsmoe"
                        f" model.tokenizer_cache={d.root / 'cache'}")
    events = [json.loads(ln) for ln in (d.root / "bad.events.jsonl").read_text().splitlines()]
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert errors and errors[0].startswith("DeclarationError: node ") and "(client 0): budget=0.125 is not " \
        "one of fl.budgets [0.25, 0.5, 1]" in errors[0], errors
    assert not (out / "summary.json").exists()
    proc.wait(timeout=60)


def test_killed_node_round_completes_without_it(deployment):
    """Kill SuperNode 2 during round 2: the round completes with the two others' replies."""
    d = deployment
    killed: list[int] = []

    def kill_in_round_2(events: list[dict]) -> None:
        if not killed and any(e["event"] == "round_start" and e["round"] == 2 for e in events):
            d.observe()
            stop_process_tree([d.nodes[2]], timeout=5.0)
            killed.append(2)

    _proc, out, _ = _run(d, "kill", OVERRIDES + " fl.round_timeout_s=60 fl.min_replies=2"
                        f" model.tokenizer_cache={d.root / 'cache'}", during=kill_in_round_2)
    assert killed == [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert sorted(c["id"] for c in train[1]["clients"]) == [0, 1]
    # Client 2 is left out of round 2 with its reason (Flower's node-offline error, or
    # the round timeout if the SuperLink had not yet noticed), in one line.
    assert [f["client"] for f in train[1]["failed"]] == [2], train[1]["failed"]
    reason = train[1]["failed"][0]["reason"]
    assert reason.startswith(("error:", "timeout after 60 s")) and "\n" not in reason, reason
    print(f"killed node: round 2 left out client 2: {reason}")


def test_every_process_is_stopped(deployment):
    """Runs last: shutting the deployment down leaves no process of it alive."""
    d = deployment
    d.stop()
    assert len(d.seen) >= 5  # SuperLink, its SuperExec, three SuperNodes (and their children)
    alive = []
    for pid, p in d.seen.items():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, " ".join(p.cmdline())[:120]))
        except psutil.Error:
            pass
    assert not alive, alive
