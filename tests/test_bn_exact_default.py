"""Normalisation statistics per mode family (issue 14): error modes (bp, fa, dfa, ...) use the true
batch-statistics backward by default, so ``bp`` equals autograd in train mode; target modes keep
paper 002's frozen statistics; either is selectable per compile. BatchNorm's feedback is one
``native_batch_norm_backward`` per BN on the forward's saved statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.verify.checks import adjoint_check, autograd_gradients, relative_error
from fbcompile.zoo_models import BasicBlock, InvertedResidual
from fbcompile.rules.norm import batch_norm_backward

TOL = 1e-10


def _randomise(model):
    """Random parameters and running statistics, none exactly zero (BN gamma away from 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.1))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


def resnet_block_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8), BasicBlock(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5))


def depthwise_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         InvertedResidual(8, 8, 1, 6), InvertedResidual(8, 12, 2, 6),
                         nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


NETS = {"resnet-block": resnet_block_net, "depthwise": depthwise_net}


def _grads_close(model, ref):
    """Relative error per parameter; a parameter whose true gradient vanishes (a shift followed by a
    bias-free conv and a batch-statistics BN: its gradient is 0 up to rounding, ~1e-17) is compared
    absolutely at the scale of 1e-3."""
    for name, param in model.named_parameters():
        scale = max(float(ref[name].norm()), 1e-3)
        assert float((param.grad - ref[name]).norm()) / scale < TOL, name


@pytest.mark.parametrize("net", list(NETS))
def test_bp_equals_autograd_in_train_mode(net):
    model = _randomise(NETS[net]().double()).train()
    x, y = torch.randn(6, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    reference = _randomise(NETS[net]().double()).train()
    reference.load_state_dict(model.state_dict())
    loss = F.cross_entropy(reference(x), y)
    loss.backward()
    program = fbcompile.compile(model, x[:2])            # compiled at another batch size
    bn = next(n for n in program.error_rules if program.error_rules[n].op == "batch_norm")
    assert program.rule_for(bn.name, "error").name == "batch_norm.batch_norm_exact"
    assert program.rule_for(bn.name, "target").name == "batch_norm.batch_norm_transpose"
    learner = fbcompile.learner(program, "bp")
    learner.step(x, y, F.cross_entropy)
    _grads_close(model, {n: p.grad for n, p in reference.named_parameters()})
    # the tapped forward updated the running statistics exactly as the modules did
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        if a.device.type == "cpu" or not a.is_floating_point():
            assert torch.equal(a, b), name
        else:
            # on CUDA the modules run cuDNN's batch norm and the tapped forward native_batch_norm: the
            # same statistics from two kernels that sum in different orders, equal to float64 rounding
            assert float((a - b).norm()) <= 1e-12 * float(b.norm()), name
    kernels = [n for n in program.feedback["error"].module.graph.nodes if n.target is batch_norm_backward]
    assert len(kernels) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())     # one per BN


def test_propagate_error_input_gradient_and_eval_mode():
    model = _randomise(resnet_block_net().double())
    x, error = torch.randn(4, 3, 10, 10, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        ref_inputs, ref_params = autograd_gradients(model, x, error)
        model.zero_grad(set_to_none=True)
        assert relative_error(program.propagate_error(x, error), ref_inputs[0]) < TOL, mode
        _grads_close(model, ref_params)


def _frozen_reference(model, x, error):
    """Autograd on the network with every BN's batch variance detached (statistics frozen but the
    mean still differentiated: exactly the frozen-statistics map (g - dbeta / N) gamma invstd)."""
    class Frozen(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.bn = bn

        def forward(self, h):
            mean = h.mean((0, 2, 3), keepdim=True)
            invstd = torch.rsqrt(h.var((0, 2, 3), unbiased=False, keepdim=True) + self.bn.eps).detach()
            return (h - mean) * invstd * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)

    copy = resnet_block_net().double()
    copy.load_state_dict(model.state_dict())
    for parent in list(copy.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, Frozen(child))
    return autograd_gradients(copy, x, error)


def test_frozen_statistics_stay_the_target_default_and_are_selectable():
    model = _randomise(resnet_block_net().double()).train()
    x, error = torch.randn(4, 3, 10, 10, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    default = fbcompile.compile(model, x)
    bns = [n for n in default.rules if default.rules[n].op == "batch_norm"]
    by_name = lambda program, rules: {rules[n].name for n in rules if n.name in {b.name for b in bns}}
    assert bns and {default.rules[n].name for n in bns} == {"batch_norm.batch_norm_transpose"}
    assert {default.error_rules[n].name for n in bns} == {"batch_norm.batch_norm_exact"}
    assert default.rule_for(bns[0].name, "difference").name == "batch_norm.batch_norm_transpose"
    assert default.rule_for(bns[0].name, "unit_error").name == "batch_norm.batch_norm_exact"
    text = default.explain()
    assert "batch_norm.batch_norm_exact (target modes: batch_norm.batch_norm_transpose)" in text
    assert "exact (target modes: frozen-statistics)" in text and "error modes prefer variants exact-statistics" in text
    # frozen statistics in error modes too: equal to autograd with the batch variance detached
    frozen = fbcompile.compile(model, x, variants={"error": ()})
    assert by_name(frozen, frozen.error_rules) == {"batch_norm.batch_norm_transpose"}
    ref_inputs, ref_params = _frozen_reference(model, x, error)
    exact_inputs, _ = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    ours = frozen.propagate_error(x, error)
    assert relative_error(ours, ref_inputs[0]) < TOL
    assert relative_error(ours, exact_inputs[0]) > 1e-3       # and it is not the exact backward
    # exact statistics in target modes when asked; a tuple adds to both families
    for variants in ({"target": ("exact-statistics",)}, ("exact-statistics",)):
        program = fbcompile.compile(model, x, variants=variants)
        assert by_name(program, program.rules) == {"batch_norm.batch_norm_exact"}
        assert by_name(program, program.error_rules) == {"batch_norm.batch_norm_exact"}
    recompiled = frozen.recompile(units="op")
    assert by_name(recompiled, recompiled.error_rules) == {"batch_norm.batch_norm_transpose"}
    with pytest.raises(fbcompile.FBCompileError, match="famil"):
        fbcompile.compile(model, x, variants={"errors": ()})


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_layer_and_group_norm_error_modes_are_exact_target_modes_frozen(norm):
    layer = nn.LayerNorm(8) if norm == "layer" else nn.GroupNorm(2, 8)
    if norm == "layer":
        model = nn.Sequential(nn.Linear(6, 8), layer, nn.Tanh(), nn.Linear(8, 3)).double()
        x = torch.randn(5, 6, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(2, 8, 3), layer, nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16, 3)).double()
        x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    _randomise(model)
    error = torch.randn(5, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    node = next(n for n in program.rules if program.rules[n].op == f"{norm}_norm")
    assert program.rules[node].name.endswith("_frozen") and program.error_rules[node].name.endswith("_exact")
    ref_inputs, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    assert relative_error(program.propagate_error(x, error), ref_inputs[0]) < TOL
    _grads_close(model, ref_params)


def test_batch_norm_feedback_reads_the_saved_statistics_only():
    """No batch statistic is recomputed: the error graph calls the fused kernel and nothing reduces
    over the batch (mean/var) itself; the forward taps mean and invstd."""
    model = _randomise(resnet_block_net().double()).train()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    code = program.code("error")
    assert ".var(" not in code and "rsqrt" not in code and ".mean(" not in code
    taps = program.executable("error").taps
    bn_nodes = [n.name for n in program.rules if program.rules[n].op == "batch_norm"]
    assert {(name, "mean") for name in bn_nodes} | {(name, "invstd") for name in bn_nodes} <= set(taps)


def test_sync_batch_norm_in_one_process_equals_autograd_and_its_target_rule_is_adjoint():
    """Without a process group SyncBatchNorm's global statistics are the local ones: bp equals
    autograd in train mode (float64); the target-mode default is frozen statistics (not J^T, and
    the verifier says so), and the exact-statistics rule meets the adjoint identity
    <J u, v> = <u, J^T v>."""
    def net():
        return nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 36, 4)))
    torch.manual_seed(0)
    model = net().double().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name == "1.weight" else 0.1))
    reference = net().double().train()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    F.cross_entropy(reference(x), y).backward()
    program = fbcompile.compile(model, x)
    assert isinstance(program.model[1], nn.SyncBatchNorm)
    fbcompile.learner(program, "bp").step(x, y, F.cross_entropy)
    _grads_close(model, {n: p.grad for n, p in reference.named_parameters()})
    rows = {row["node"]: row for row in fbcompile.verify(program, x).rows if row.get("op") == "sync_batch_norm"}
    assert rows["_1"]["kind"] == "frozen-statistics" and rows["_1"]["tjml_rel"] > 1e-3    # not J^T: frozen
    exact = fbcompile.compile(model, x, variants=("exact-statistics",))
    assert exact.rule_for("_1", "target").kind == "exact"
    assert adjoint_check(exact, "_1", x) < 1e-10
