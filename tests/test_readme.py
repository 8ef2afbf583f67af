"""The README's two commands are the set-up; CI must run the test one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2, "the README must start with exactly two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1] in ci.splitlines()
    assert "lora-ckpt demo" in block[0]
