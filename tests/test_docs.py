"""Meta-tests: every CLI command has help text and is documented in the README."""

from pathlib import Path

from kb.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_command_has_help_and_a_readme_entry():
    for name, command in cli.commands.items():
        assert command.help, name
        assert f"kb {name}" in README, f"`kb {name}` is not in the README"


def test_readme_starts_with_the_two_commands():
    head = README[:1500]
    assert "scripts/setup.sh" in head and "kb ingest examples/" in head and "pytest" in head
