"""The README documents every user-facing flag and entry point."""

import pathlib

from flax_sum import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()


def test_every_config_key_and_alias_is_in_the_readme():
  missing = [f"--{name}" for field in config_lib.FIELDS for name in (field.key, *field.aliases)
             if f"`--{name}`" not in README]
  assert not missing, f"README.md does not document {missing}"


def test_every_entry_point_is_in_the_readme():
  entry_points = sorted(path.stem for path in (REPO_ROOT / "flax_sum").glob("*.py")
                        if "if __name__ == \"__main__\":" in path.read_text())
  assert "train" in entry_points
  missing = [name for name in entry_points if f"python -m flax_sum.{name}" not in README]
  assert not missing, f"README.md does not show {missing}"


def test_the_readme_shows_the_two_commands():
  assert "./run.sh test" in README and "```bash\n./run.sh " in README
