"""`dfns-agent files`: the example config and the units ship inside the package (agent/data links to
pkcs11_config/, their one source), so a pip install has them; `install` never overwrites."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agent.cli.main import main
from agent.cli.service import FILES
from agent.dev.testing import ROOT


def test_every_shipped_file_is_the_repository_file() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["files", "list"]).output.split() == list(FILES)
    for name in FILES:
        r = runner.invoke(main, ["files", "print", name])
        assert r.exit_code == 0, r.output
        assert r.output == (ROOT / "pkcs11_config" / FILES[name]).read_text()


def test_install_puts_the_units_and_the_example_in_place_and_keeps_existing_files(tmp_path: Path) -> None:
    units, conf = tmp_path / "units", tmp_path / "etc"
    conf.mkdir()
    (conf / "agent.example.toml").write_text("mine")
    r = CliRunner().invoke(main, ["files", "install", "--systemd-dir", str(units), "--config-dir", str(conf)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in units.iterdir()) == ["dfns-agent.service", "dfns-agent.socket"]
    assert (units / "dfns-agent.service").read_text() == (ROOT / "pkcs11_config/systemd/dfns-agent.service").read_text()
    assert (units / "dfns-agent.socket").stat().st_mode & 0o777 == 0o644
    assert (conf / "agent.example.toml").read_text() == "mine" and "kept" in r.output
