"""Adapters anyone can load: plain transformers + PEFT logits equal ours; load_run; ubsmoe eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL as CONFTEST_SMALL
from conftest import run_rounds
from typer.testing import CliRunner

from ubsmoe.config import ModelConfig, load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.export import export_adapters, lora_terms, peft_expert_factors, stack_terms
from ubsmoe.models import adapter_state, build_model, load_adapter_state, smoe_layers
from ubsmoe.models.adapters import merge_into_base
from ubsmoe.models.build import base_model

SMALL = [*CONFTEST_SMALL, "eval.protocols=[loglik]", "eval.pg_probe_examples=0"]


def _peft_load(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def random_adapter_model(tiny_tokenizer):
    """Our patched tiny model with nonzero random LoRA (attention + expert) and a changed router."""
    cfg = ModelConfig()
    model, tok = build_model(cfg, tiny_tokenizer, seed=3)
    gen = torch.Generator().manual_seed(0)
    state = {k: (v + torch.randn(v.shape, generator=gen)) if "router" in k
             else torch.randn(v.shape, generator=gen) * 0.05 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    model.eval()
    return cfg, model, tok, state


def test_expert_factor_layout_matches_peft_param_wrapper_delta():
    from peft.tuners.lora.layer import ParamWrapper  # noqa: F401  (PEFT's layout is what is tested)

    E, r, i, o = 3, 2, 5, 4
    A, B = torch.randn(E, r, i), torch.randn(E, o, r)
    la, lb = peft_expert_factors(A, B)
    # PEFT 0.21 ParamWrapper.get_delta_weight on an [E, out, in] parameter (swapped in/out):
    delta = torch.einsum("o r e, e r i -> e o i", lb.reshape(o, r, E), la.reshape(E, r, i))
    assert torch.allclose(delta, B @ A, atol=1e-6)


def test_plain_peft_model_has_our_logits_with_expert_lora_and_router(random_adapter_model, tmp_path):
    cfg, model, tok, state = random_adapter_model
    export_adapters(model, state, [], tmp_path / "adapter")
    base, _ = base_model(cfg, tok, seed=3)
    base.save_pretrained(tmp_path / "base")
    loaded = _peft_load(tmp_path / "base", tmp_path / "adapter")
    ids = torch.randint(2, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    ours = _logits(model, ids)
    theirs = _logits(loaded, ids)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    # every part matters: the bare base differs, and so does ours with the untrained router
    assert (_logits(base.eval(), ids) - ours).abs().max() > 1e-3
    routers = {k: v for k, v in state.items() if k.endswith("router_weight")}
    assert routers
    for layer, block in zip(smoe_layers(model), base.model.layers):
        layer.router_weight.data.copy_(block.mlp.gate.weight)
    assert (_logits(model, ids) - theirs).abs().max() > 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["modules_to_save"] == ["mlp.gate"] and config["r"] == cfg.lora_rank


def test_stacked_merges_are_one_exact_lora(random_adapter_model, tmp_path):
    """FLoRA / FLoRIST: merges B_i A_i on the base are one stacked LoRA of rank sum r_i."""
    cfg, model, tok, state = random_adapter_model
    from ubsmoe.methods.rank_base import lora_pairs

    pairs, _ = lora_pairs(list(state))
    gen = torch.Generator().manual_seed(2)
    merges = []
    for i, (rank, subset) in enumerate([(3, pairs), (5, pairs[::2])]):  # the second skips modules
        factors = {}
        for p in subset:
            A, B = state[p.a], state[p.b]
            factors[f"{p.module}.A"] = torch.randn(*A.shape[:-2], rank, A.shape[-1], generator=gen) * 0.1
            factors[f"{p.module}.B"] = torch.randn(*B.shape[:-1], rank, generator=gen) * 0.1
        merges.append((f"m{i}", factors))
        merge_into_base(model, factors)
    # FLoRA resets B after a merge: the current adapter is zero and left out
    current = {k: torch.zeros_like(v) if (".lora_B." in k or k.endswith(".B")) else v for k, v in state.items()}
    load_adapter_state(model, current)
    export_adapters(model, current, merges, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "ubsmoe_export.json").read_text())
    assert info["stacked"] and info["r"] == 3 + 5 and info["lora_alpha"] == 8
    base, _ = base_model(cfg, tok, seed=3)
    base.save_pretrained(tmp_path / "base")
    loaded = _peft_load(tmp_path / "base", tmp_path / "adapter")
    ids = torch.randint(2, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logits(model, ids), _logits(loaded, ids)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    unmerged = _peft_load(tmp_path / "base", tmp_path / "adapter")
    unmerged.base_model.disable_adapter_layers()
    with torch.no_grad():
        assert (unmerged(input_ids=ids).logits - ours).abs().max() > 1e-3


def test_stack_terms_sums_the_scaled_updates_and_pads():
    gen = torch.Generator().manual_seed(0)
    terms = [(torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen), 0.5),
             (torch.randn(3, 6, generator=gen), torch.randn(4, 3, generator=gen), 2.0)]
    A, B = stack_terms(terms, 7)
    assert A.shape == (7, 6) and B.shape == (4, 7)
    assert torch.allclose(B @ A, sum(s * b @ a for a, b, s in terms), atol=1e-6)
    with pytest.raises(ValueError, match="rank 4 < stacked rank 5"):
        stack_terms(terms, 4)


def test_lora_terms_names_the_transformers_targets(random_adapter_model):
    cfg, _, _, state = random_adapter_model
    terms = lora_terms(state, cfg.lora_alpha / cfg.lora_rank)
    assert "model.layers.0.self_attn.q_proj" in terms
    assert "model.layers.1.mlp.experts.gate_up_proj" in terms and "model.layers.1.mlp.experts.down_proj" in terms


# ----- a finished tiny run: load_run, ubsmoe eval, the exported folder -----------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_run")
    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp / 'cache'}", "method=fedit"])
    server, summary = run_rounds(cfg, tmp / "run", finish=True)
    return tmp / "run", summary, server


def test_ubsmoe_eval_reproduces_the_runs_summary(finished_run):
    from ubsmoe.finished_run import evaluate_run

    run_dir, summary, _ = finished_run
    result = evaluate_run(run_dir)
    rows = [{k: v for k, v in r.items() if k != "n"} for r in result["accuracy"]]
    assert rows == summary["accuracy"] and len(rows) == 4
    written = json.loads(Path(result["path"]).read_text())
    assert written["accuracy"] == result["accuracy"] and Path(result["path"]).name.startswith("eval_")


def test_ubsmoe_eval_cli_selects_budget_tasks_and_examples(finished_run):
    from ubsmoe.cli import app

    run_dir, _, _ = finished_run
    before = set(run_dir.glob("eval_*.json"))
    res = CliRunner().invoke(app, ["eval", str(run_dir), "--budget", "0.125", "--tasks", "boolq,piqa",
                                   "--examples-per-task", "2", "--protocol", "loglik"])
    assert res.exit_code == 0, res.output
    (path,) = set(run_dir.glob("eval_*.json")) - before
    rows = json.loads(path.read_text())["accuracy"]
    assert [(r["budget"], r["top_k"]) for r in rows] == [(0.125, 1)]
    assert sorted(rows[0]["per_task"]) == ["boolq", "piqa"] and rows[0]["n"] == {"boolq": 2, "piqa": 2}
    bad = CliRunner().invoke(app, ["eval", str(run_dir), "--budget", "0.3"])
    assert bad.exit_code == 2 and "budget: got 0.3, expected one of" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(app, ["eval", str(run_dir), "--protocol", "rouge"])
    assert bad.exit_code == 2 and "eval.protocols" in bad.output
    bad = CliRunner().invoke(app, ["eval", str(run_dir), "--tasks", "boolq,nope"])
    assert bad.exit_code == 2 and "tasks: got ['nope'], expected a subset of" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_load_run_sets_the_budget_levels_k(finished_run):
    import ubsmoe

    run_dir, _, _ = finished_run
    model, tok = ubsmoe.load_run(run_dir, budget=0.125, device="cpu")
    assert {layer.top_k for layer in smoe_layers(model)} == {1}
    model, _ = ubsmoe.load_run(run_dir)
    assert {layer.top_k for layer in smoe_layers(model)} == {8}
    out = model.generate(**tok("Question: is the sky blue?", return_tensors="pt"), max_new_tokens=3,
                         do_sample=False)
    assert out.shape[1] > 3
    with pytest.raises(ConfigError, match="budget: got 0.3"):
        ubsmoe.load_run(run_dir, budget=0.3)


def test_exported_run_loads_in_plain_peft_with_the_card(finished_run, tmp_path):
    import ubsmoe

    run_dir, summary, _ = finished_run
    adapter = run_dir / "checkpoints" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    card = (adapter / "README.md").read_text()
    assert "fedit" in card and "randomly initialised" in card and "| 0.125 | 1 |" in card
    avg = summary["accuracy"][0]["average"]
    assert f"{100 * avg:.2f}" in card
    base = ubsmoe.save_base_model(run_dir, tmp_path / "base")
    loaded = _peft_load(base, adapter)
    model, tok = ubsmoe.load_run(run_dir)
    ids = tok(["Question: is the sky blue? Answer", "the correct answer is true"], return_tensors="pt",
              padding=True)["input_ids"]
    ours, theirs = _logits(model, ids), _logits(loaded, ids)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flora", "florist", "a3smoe"])
def test_finished_run_export_loads_in_plain_peft(method, tmp_path):
    """Through the whole server path: FLoRA's stacked merges; a3smoe's trained router at native K."""
    import ubsmoe
    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", f"method={method}",
                                 "fl.num_clients=2", "eval.examples_per_task=1"])
    run_rounds(cfg, tmp_path / "run", finish=True)
    adapter = tmp_path / "run" / "checkpoints" / "adapter"
    info = json.loads((adapter / "ubsmoe_export.json").read_text())
    assert info["stacked"] == (method in ("flora", "florist"))
    assert method in (adapter / "README.md").read_text()
    loaded = _peft_load(ubsmoe.save_base_model(tmp_path / "run", tmp_path / "base"), adapter)
    model, tok = ubsmoe.load_run(tmp_path / "run")
    ids = tok(["Question: is the sky blue? Answer"], return_tensors="pt")["input_ids"]
    ours, theirs = _logits(model, ids), _logits(loaded, ids)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    base = _peft_load(tmp_path / "base", adapter)
    base.base_model.disable_adapter_layers()
    assert (_logits(base, ids) - ours).abs().max() > 1e-4
