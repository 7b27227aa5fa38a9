"""--frontend on the command line (issue 12): inspect and verify capture with the front end asked for,
and "auto" falls back to torch.export for a model torch.fx cannot trace."""
import textwrap

import pytest

from fbcompile.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shapes(tmp_path):
    path = tmp_path / "shapes.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        class ShapeBranch(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
            def forward(self, x):
                h = self.fc1(x)
                if h.shape[-1] > 4:      # fx cannot branch on a traced shape
                    h = h.tanh()
                return self.fc2(h)
    """))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_falls_back_to_export_and_says_so(capsys, shapes):
    code, out, _ = run(capsys, "inspect", f"{shapes}:ShapeBranch", "--input-shape", "6", "--no-code")
    assert code == 0 and "captured with torch.export (torch.fx:" in out and "tanh.transpose" in out
    assert "shapes.py" in out and "h = h.tanh()" in out          # the source line of each node
    code, _, err = run(capsys, "inspect", f"{shapes}:ShapeBranch", "--input-shape", "6", "--frontend", "fx")
    assert code != 0 and "control flow" in err


def test_verify_with_the_export_front_end(capsys):
    code, out, _ = run(capsys, "verify", "lenet", "--input-shape", "1,8,8", "--frontend", "export")
    assert code == 0 and "OK: all" in out
