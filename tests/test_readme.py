"""The README's two commands are the set-up; CI must run the test one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2, "the README must start with exactly two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1] in ci.splitlines()
    steps = block[1].split(" && ")  # install first, then lint and type-check, then the suite
    order = ["pip install -q -c constraints.txt -e '.[test]'", "ruff check lora_ckpt tests", "mypy lora_ckpt",
             "python -m pytest -q"]
    assert [steps.index(s) for s in order] == sorted(steps.index(s) for s in order)
    assert "lora-ckpt demo" in block[0]


def test_wheel_ships_every_subpackage(tmp_path):
    """A non-editable install must contain lora_ckpt.layouts and py.typed (a `packages = [...]`
    list that forgets a subpackage only shows up outside an editable install). Built from a copy of
    the sources: setuptools reuses a checkout's build/lib, whose stale modules would end up in the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "lora_ckpt", src / "lora_ckpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist()
    shipped = {n for n in names if n.startswith("lora_ckpt/") and n.endswith(".py")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lora_ckpt").rglob("*.py")}
    assert shipped == expected and "lora_ckpt/py.typed" in names
