"""verify() on every model that compiles, and its small-beta limit check (issue 18).

Part 1: nodes that read only parameters (a class token's expand, a transposed weight, an embedding
on integer ids) get a "parameter" row checked against autograd as gradients; a whole tuple as an
input (stack(h.unbind(1))), slices of tuples, None elements of tuples and integer pieces are taken
apart into their floating tensors. Part 2: per unit, the angle between DTP's update as beta -> 0 and
error mode's is ~0 on correct rules and large exactly upstream of a rule whose target map is not the
linearisation of its error map. Everything float64, random inputs, no parameter at exact zero."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.registry import find_rule, register_rule
from fbcompile.verify.checks import adjoint_check, rule_errors
from fbcompile.verify.limit import limit_angles

TOL = 1e-12
LIMIT_DEG = 0.01
W = 6


def _exact(model, *inputs, **compile_options):
    """Compile and verify; every node row exact (TJML and adjoint gap), returns (program, report)."""
    program = fbcompile.compile(model, inputs if len(inputs) > 1 else inputs[0], **compile_options)
    report = fbcompile.verify(program, inputs)
    assert report.ok(TOL), [(r["node"], r["path"], r["matching"]) for r in report.failures(TOL)]
    for name, (tjml_rel, gap) in rule_errors(program, inputs).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    return program, report


def _rows(report, node):
    return {r["path"]: r for r in report.rows if r["level"] == "node" and r["node"] == node}


# -- part 1: every model that compiles ------------------------------------------------------------
class ClassToken(nn.Module):
    """A class token expanded to the batch and cat-ed to the activations (ViT)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(5, W), nn.Linear(W, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, W))

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1).mean(1))


def test_class_token_expand_is_checked_as_a_parameter_path():
    """expand reads only the token (its size comes from the input): no activation argument, so its
    row is the error-mode gradient into the token, checked against autograd."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _, report = _exact(ClassToken().double(), x)
    expand = _rows(report, "expand")
    assert set(expand) == {"parameter"} and expand["parameter"]["n_in"] == W      # its input: the token
    assert expand["parameter"]["n_out"] == 3 * W and expand["parameter"]["matching"] < TOL
    assert _rows(report, "cat")
    lines = str(report).splitlines()
    assert "path" in lines[1] and any(line.split()[1:3] == ["expand", "parameter"] for line in lines[3:])


class TiedTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(W, 5)), nn.Linear(W, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w.transpose(0, 1)).mean(1))


def test_transposed_weight_and_matmul_operand_rows():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _, report = _exact(TiedTranspose().double(), x)
    assert set(_rows(report, "transpose")) == {"parameter"}
    assert set(_rows(report, "matmul")) == {"activation", "parameter"}
    assert _rows(report, "matmul")["parameter"]["n_in"] == W * 5


class Embedded(nn.Module):
    """Integer token ids into nn.Embedding (with a padding row: autograd gives it no gradient although
    the forward reads it), plus a float input and an integer-indexed gather."""

    def __init__(self):
        super().__init__()
        self.embedding, self.a, self.head = nn.Embedding(10, W, padding_idx=0), nn.Linear(5, W), nn.Linear(W, 3)
        with torch.no_grad():
            self.embedding.weight[0].normal_()          # no parameter at exact zero

    def forward(self, ids, x, index):
        h = torch.tanh(self.embedding(ids) + self.a(x))
        return self.head(h.gather(1, index).mean(1))


def test_integer_inputs_embedding_and_gather():
    torch.manual_seed(0)
    ids, x = torch.randint(0, 10, (3, 4)), torch.randn(3, 4, 5, dtype=torch.float64)
    ids[0, -2:] = 0                                     # padding tokens
    index = torch.randint(0, 4, (3, 2, W))
    _, report = _exact(Embedded().double(), ids, x, index)
    assert set(_rows(report, "embedding")) == {"parameter"}
    assert _rows(report, "embedding")["parameter"]["n_in"] == 10 * W
    assert set(_rows(report, "add")) == {"activation"} and _rows(report, "add")["activation"]["n_in"] == 2 * 4 * W
    assert set(_rows(report, "gather")) == {"activation"}


class OnlyIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.head = nn.Embedding(10, W), nn.Linear(W, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embedding(ids)).mean(1))


def test_a_model_of_integer_ids_only():
    ids = torch.randint(0, 10, (3, 4))
    _, report = _exact(OnlyIds().double(), ids)
    assert set(_rows(report, "embedding")) == {"parameter"}
    assert _rows(report, "embedding")["parameter"]["n_in"] == 10 * W
    assert set(_rows(report, "tanh")) == {"activation"}
    assert all(r["angle_deg"] < LIMIT_DEG for r in report.limit["rows"] if r["params"])


class SquashedWeight(nn.Module):
    """A weight computed from a parameter through an activation: tanh(w^T) is a parameter path."""

    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(W, 5)), nn.Linear(W, 3)

    def forward(self, x):
        return self.head(x @ torch.tanh(self.w.transpose(0, 1)))


class Tuples(nn.Module):
    """A whole tuple as an input (stack of unbind), a slice of a tuple (stacked or unpacked), a
    negative index, and max(dim)'s (values, integer indices) pair."""

    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.head = how, nn.Linear(5, W), nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))                           # (b, 4, W)
        if self.how == "unbind":
            h = torch.stack(h.unbind(1), 1).max(1)[0]
        else:
            parts = h.sum(1).chunk(3, 1)
            if self.how == "slice-stack":
                h = torch.stack(parts[1:], 1).sum(1)
            else:
                u, v = parts[1:]
                h = 0.5 * u + v * parts[-1]
        return self.head(torch.tanh(h[..., :2]))


def _split_at_the_tuple(node):
    """Units asked for: everything up to the tuple's producer, then the rest (the tuple's consumers
    join its unit anyway)."""
    return 0 if node.name in ("a", "tanh", "unbind", "sum", "chunk") else 1


@pytest.mark.parametrize("how", ["unbind", "slice-stack", "slice-unpack"])
@pytest.mark.parametrize("units", ["layer", "split"])
def test_tuple_values_and_slices(how, units):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    program, report = _exact(Tuples(how).double(), x, units=_split_at_the_tuple if units == "split" else units)
    unit_rows = [r for r in report.rows if r["level"] == "unit"]
    assert unit_rows and all(r["tjml_rel"] < TOL for r in unit_rows), unit_rows
    # a tuple never crosses a unit boundary: whatever the grouping asks, its consumers join its unit
    assert not any(n.meta["fbcompile"].is_tuple for unit in program.units for n in unit.inputs)
    assert report.limit["rows"] and not report.limit_failures(LIMIT_DEG), report.limit


class Attention(nn.Module):
    """nn.MultiheadAttention with need_weights=False: a tuple output with a None element."""

    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(W, 2, batch_first=True), nn.Linear(W, 3)

    def forward(self, x):
        out, _ = self.mha(x, x, x, need_weights=False)
        return self.head(out.mean(1))


def test_tuple_output_with_a_none_element():
    torch.manual_seed(1)
    model = Attention().double().eval()
    x = torch.randn(2, 3, W, dtype=torch.float64)
    program, _ = _exact(model, x)
    assert adjoint_check(program, "mha", x) < TOL


# -- wrong rules are caught -------------------------------------------------------------------------
@pytest.fixture
def wrong_tanh():
    """Replace tanh's condition-T rule; restore the original afterwards."""
    original = find_rule("tanh", "T")

    def install(error=None, target=None):
        register_rule("tanh", conditions="T", kind=original.kind, target=target or original.target,
                      affine=original.affine, name="tanh.wrong", replace=True)(error or original.error)

    yield install
    register_rule("tanh", conditions="T", kind=original.kind, target=original.target, affine=original.affine,
                  supports=original.supports, name=original.name, replace=True)(original.error)


def test_a_wrong_error_map_on_a_parameter_path_fails_its_parameter_row(wrong_tanh):
    x = torch.randn(3, 5, dtype=torch.float64)
    _exact(SquashedWeight().double(), x)
    wrong_tanh(error=lambda ctx, g: {"input": 1.5 * g * (1 - ctx.saved("output") ** 2)})
    report = fbcompile.verify(fbcompile.compile(SquashedWeight().double(), x), x)
    assert [(r["node"], r["path"]) for r in report.failures()] == [("tanh", "parameter")]
    assert abs(_rows(report, "tanh")["parameter"]["tjml_rel"] - 0.5) < 1e-12      # ||1.5 J - J|| / ||J||


# -- part 2: the small-beta limit ---------------------------------------------------------------------
class ThreeUnits(nn.Module):
    """relu unit -> tanh unit -> linear head, after a parameter-free first unit."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.o(torch.tanh(self.b(torch.relu(self.a(torch.sigmoid(x))))))


def _angles(report):
    return {r["unit"]: r["angle_deg"] for r in report.limit["rows"]}


@pytest.mark.parametrize("mode", ["difference", "unit_difference"])
def test_correct_rules_meet_the_limit_in_every_unit(mode):
    torch.manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64)
    for model in (ThreeUnits().double(), ClassToken().double(), TiedTranspose().double()):
        inputs = x if not isinstance(model, (ClassToken, TiedTranspose)) else torch.randn(3, 4, 5, dtype=torch.float64)
        report = fbcompile.verify(fbcompile.compile(model, inputs), inputs, limit=mode)
        rows = [r for r in report.limit["rows"] if r["params"]]
        assert rows and all(r["angle_deg"] < LIMIT_DEG for r in rows), report.limit
        assert all(abs(r["target_norm"] / r["error_norm"] - 1) < 1e-6 for r in rows)
        assert not report.limit_failures(LIMIT_DEG)


def test_a_parameter_free_unit_is_marked_and_the_limit_is_in_the_report():
    x = torch.randn(6, 5, dtype=torch.float64)
    report = fbcompile.verify(fbcompile.compile(ThreeUnits().double(), x), x)
    first = report.limit["rows"][0]
    assert first["params"] == 0 and first["angle_deg"] is None and first["note"] == "no trainable parameters"
    assert report.to_dict()["limit"]["rows"][1]["angle_deg"] < LIMIT_DEG
    assert "Small-beta limit (difference mode" in str(report) and "angle_deg" in str(report)
    assert fbcompile.verify(fbcompile.compile(ThreeUnits().double(), x), x, limit=None).limit is None


def test_the_error_side_is_error_modes_own_update():
    """With a given output error, each unit's error-side norm is the norm of the gradients that
    propagate_error writes for that unit's parameters."""
    torch.manual_seed(3)
    model, x = ThreeUnits().double(), torch.randn(6, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    e = torch.randn(6, 3, dtype=torch.float64)
    result = limit_angles(program, x, output_error=e)
    program.propagate_error(x, e)
    checked = 0
    for unit, row in zip(program.units, result["rows"]):
        if not unit.params:
            assert row["error_norm"] is None
            continue
        expected = float(torch.cat([model.get_parameter(q).grad.flatten() for q in unit.params]).norm())
        assert abs(row["error_norm"] - expected) < 1e-12 * expected, (unit.index, row, expected)
        checked += 1
    assert checked == 3


def test_a_target_map_that_is_not_the_linearisation_shows_in_exactly_the_unit_upstream(wrong_tanh):
    """tanh's target map made straight-through, t_in = x + (t - y): its linearisation is the identity,
    not tanh's error map (1 - y^2). Only the unit before the tanh gets its targets through it."""
    wrong_tanh(target=lambda ctx, t: {"input": ctx.saved("input") + (t - ctx.saved("output"))})
    torch.manual_seed(4)
    x = torch.randn(6, 5, dtype=torch.float64)
    program = fbcompile.compile(ThreeUnits().double(), x)
    report = fbcompile.verify(program, x)
    assert report.ok(1e-10)                      # the error maps are still exact: JML cannot see this
    angles = _angles(report)
    assert angles[1] > 1.0, angles               # unit 1 (a, relu) learns from targets through the tanh
    assert angles[2] < LIMIT_DEG and angles[3] < LIMIT_DEG, angles
    assert [r["unit"] for r in report.limit_failures(LIMIT_DEG)] == [1]
