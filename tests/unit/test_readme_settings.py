"""The README's configuration table is generated from service/settings.py (scripts/settings_table.py), so the two
cannot drift: a new setting, a changed default or a changed description fails here until
`python scripts/settings_table.py --write` is run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("settings_table", REPO / "scripts" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings_table = _load_generator()


def test_readme_settings_block_matches_settings():
    readme = (REPO / "README.md").read_text()
    assert settings_table.readme_block(readme) == settings_table.generate(), (
        "README.md's settings table is out of date: run `python scripts/settings_table.py --write`")


def test_every_setting_is_in_the_readme():
    from service.settings import Settings

    block = settings_table.readme_block((REPO / "README.md").read_text())
    for name, field in Settings.model_fields.items():
        assert f"`FLOCK_{name.upper()}`" in block
        assert field.description, f"setting {name} has no description"


_SOURCE = '''
class Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_")

    # --- first group ---------------------------------------------------------
    alpha: int = Field(1, description="The alpha | with a pipe.")
    beta: list[str] = Field(default_factory=list, description="Empty: <state_dir>/x, or `a|b`.")

    # --- second ---
    gamma: float | None = Field(None, description="Optional.")
    delta: bool = Field(False, description="A flag.")
'''


class Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_")

    alpha: int = Field(1, description="The alpha | with a pipe.")
    beta: list[str] = Field(default_factory=list, description="Empty: <state_dir>/x, or `a|b`.")
    gamma: float | None = Field(None, description="Optional.")
    delta: bool = Field(False, description="A flag.")


def test_generator_groups_orders_and_renders():
    text = settings_table.generate(Demo, source=_SOURCE)
    assert text.splitlines() == [
        "### First group",
        "",
        "| variable | default | what |",
        "|---|---|---|",
        "| `FLOCK_ALPHA` | `1` | The alpha \\| with a pipe. |",
        "| `FLOCK_BETA` | (empty) | Empty: &lt;state_dir&gt;/x, or `a\\|b`. |",
        "",
        "### Second",
        "",
        "| variable | default | what |",
        "|---|---|---|",
        "| `FLOCK_GAMMA` | (empty) | Optional. |",
        "| `FLOCK_DELTA` | `false` | A flag. |",
    ]


def test_a_changed_description_changes_the_table():
    class Changed(Demo):
        alpha: int = Field(1, description="Something else.")

    changed = settings_table.generate(Changed, source=_SOURCE.replace("class Demo", "class Changed"))
    assert "| `FLOCK_ALPHA` | `1` | Something else. |" in changed
    assert changed != settings_table.generate(Demo, source=_SOURCE)


def test_unreadable_source_gives_one_table():
    text = settings_table.generate(Demo, source="this is not python (")
    assert "###" not in text
    assert text.count("| variable | default | what |") == 1


def test_paths_render_independently_of_the_machine(tmp_path):
    cache = tmp_path / "cache" / "flock"
    render = settings_table.render_default
    assert render(REPO / "library", REPO, cache) == "`library`"
    assert render(cache / "state", REPO, cache) == "`~/.cache/flock/state`"
    assert render(cache, REPO, cache) == "`~/.cache/flock`"
    assert render(Path.home() / "x", Path("/nonexistent-repo"), cache) == "`~/x`"
    assert render([], REPO, cache) == "(empty)"
    assert render(300.0) == "`300`"
    assert render(0.05) == "`0.05`"


def test_write_then_check(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{settings_table.START}\nstale\n{settings_table.END}\n\nafter\n")
    assert settings_table.main(["--check", "--readme", str(readme)]) == 1
    assert settings_table.main(["--write", "--readme", str(readme)]) == 0
    assert settings_table.main(["--check", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{settings_table.END}\n\nafter\n")


def test_a_field_outside_every_group_goes_under_other():
    class More(Demo):
        epsilon: int = Field(5, description="Declared elsewhere.")

    text = settings_table.generate(More, source=_SOURCE.replace("class Demo", "class More"))
    assert text.rstrip().endswith("### Other\n\n| variable | default | what |\n|---|---|---|\n"
                                  "| `FLOCK_EPSILON` | `5` | Declared elsewhere. |")
