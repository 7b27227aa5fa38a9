"""The regular (non-editable) install ships every package of the source tree."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_fbcompile_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fbcompile").rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found and "fbcompile" in found
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"]["fbcompile.rules"] == "rules" and "fbcompile.rules" in listed
