"""fbcompile.verify: report shape, dense vs randomized estimates, per-unit rows, IJML/PJML where
defined, and no side effects on the model."""
import json

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import OptionError

KEYS = {"level", "node", "path", "op", "rule", "kind", "method", "n_in", "n_out", "tjml", "tjml_rel", "tjml_se", "pjml",
        "pjml_rel", "ijml", "ijml_rel", "matching"}


def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(),
                         nn.Linear(6, 3)).double()


def test_rows_have_the_required_keys_to_dict_and_a_readable_str():
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    report = fbcompile.verify(fbcompile.compile(model, x), x)
    nodes = [r for r in report.rows if r["level"] == "node"]
    assert [r["node"] for r in nodes] == ["_0", "_1", "_2", "_3", "_4", "_5"]
    assert all(KEYS <= set(r) for r in report.rows)
    by_node = {r["node"]: r for r in nodes}
    assert by_node["_0"]["op"] == "linear" and by_node["_0"]["rule"] == "linear.linear_transpose"
    assert by_node["_3"]["kind"] == "frozen-statistics" and by_node["_4"]["kind"] == "linearised"
    assert by_node["_0"]["ijml"] is not None          # square Linear: J_F^-1 exists
    assert by_node["_2"]["ijml"] is None and by_node["_2"]["pjml"] is not None
    assert all(r["tjml_rel"] < 1e-12 for r in nodes if r["kind"] == "exact")
    data = report.to_dict()
    assert data["condition"] == "T" and len(data["rows"]) == len(report.rows)
    json.loads(report.to_json())
    text = str(report)
    assert "Jacobian matching of Sequential (condition T)" in text
    for column in ("node", "op", "kind", "tjml", "tjml_rel", "pjml", "ijml"):
        assert column in text.splitlines()[1]
    assert "frozen-statistics" in text and "layer_norm" in text
    assert report.ok() and [r["node"] for r in report.failures(0.0)] == []


def test_per_unit_rows():
    model, x = mlp(), torch.randn(3, 4, dtype=torch.float64)
    report = fbcompile.verify(fbcompile.compile(model, x), x)
    units = [r for r in report.rows if r["level"] == "unit"]
    assert units, "units of two or more ops get their own row"
    assert units[0]["node"] == "unit 0" and units[0]["kind"] == "exact" and units[0]["tjml_rel"] < 1e-12
    assert any("frozen-statistics" in r["kind"] and r["tjml_rel"] > 1e-3 for r in units)
    assert not [r for r in fbcompile.verify(fbcompile.compile(model, x), x, units=False).rows if r["level"] == "unit"]


def test_randomized_estimate_agrees_with_dense_for_an_inexact_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8)).double()
    with torch.no_grad():
        model[0].weight.normal_()
    x = torch.randn(5, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    dense = fbcompile.verify(program, x).rows[0]
    assert dense["method"].startswith("dense") and dense["tjml_se"] is None
    for seed in range(3):
        est = fbcompile.verify(program, x, dense_limit=10, probes=32, seed=seed).rows[0]
        assert est["method"] == "randomized (32 probes)"
        assert est["tjml_se"] > 0
        assert abs(est["tjml"] - dense["tjml"]) < 4 * est["tjml_se"], (est["tjml"], dense["tjml"], est["tjml_se"])
        assert abs(est["tjml_rel"] - dense["tjml_rel"]) < 0.5 * dense["tjml_rel"]


def test_randomized_estimate_of_an_exact_rule_is_zero():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    rows = fbcompile.verify(fbcompile.compile(model, x), x, dense_limit=10).rows
    assert all(r["method"] == "randomized (8 probes)" and r["tjml_rel"] < 1e-12 for r in rows)


def test_too_few_probes_is_an_option_error():
    model, x = nn.Sequential(nn.Linear(3, 3)).double(), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(OptionError, match="probes"):
        fbcompile.verify(fbcompile.compile(model, x), x, dense_limit=1, probes=1)


def test_condition_p_and_i_programs_report_their_own_matching_loss():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    for condition, key in (("P", "pjml_rel"), ("I", "ijml_rel")):
        report = fbcompile.verify(fbcompile.compile(model, x, condition=condition), x)
        assert report.condition == condition
        nodes = [r for r in report.rows if r["level"] == "node"]
        assert all(r["matching"] == r[key] and r[key] < 1e-8 for r in nodes)
        assert report.ok()


def test_batch_mixing_nodes_are_measured_over_the_whole_batch():
    """BatchNorm with batch statistics, and reductions over the batch, are not block diagonal."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    rows = {r["node"]: r for r in fbcompile.verify(fbcompile.compile(model, x), x).rows}
    assert rows["_0"]["method"] == "dense (6 samples)" and rows["_1"]["method"] == "dense"


def test_verify_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Tanh()).double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fbcompile.verify(program, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_adjoint_check_names_the_valid_nodes():
    from fbcompile.verify.checks import adjoint_check
    model, x = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double(), torch.randn(2, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert adjoint_check(program, "_1", x) < 1e-12
    with pytest.raises(OptionError, match="'fc'.*_0, _1"):
        adjoint_check(program, "fc", x)


def test_adjoint_check_catches_a_rule_off_by_one_percent(monkeypatch):
    from fbcompile.verify.checks import adjoint_check
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double(), torch.randn(2, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    rule = program.rules[next(n for n in program.rules if n.name == "_1")]
    exact = rule.error
    monkeypatch.setattr(rule, "error", lambda ctx, g: {k: v * 1.01 for k, v in exact(ctx, g).items()})
    assert adjoint_check(program, "_1", x) > 1e-4      # exact rules: ~1e-16
