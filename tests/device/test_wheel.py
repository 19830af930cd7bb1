"""What ``pip install dfns-agent`` gets: the wheel carries the product, not the dev tooling.

The wheel is built from a temporary copy of the checkout (``pip wheel --no-deps --no-build-isolation``, so
no network and no ``build/`` left in the checkout), with the build backend of the dev install.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dev.testing import ROOT

# What a checkout holds besides the sources: environments, caches, build output, the dev token.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".dev", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "node_modules"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    before = sorted(p.name for p in ROOT.iterdir())
    shutil.copytree(ROOT, work / "src", ignore=NOT_SOURCES)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "out"), "."],
        cwd=work / "src",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in ROOT.iterdir()) == before, "building the wheel left something in the checkout"
    (built,) = (work / "out").glob("dfns_agent-*.whl")
    with zipfile.ZipFile(built) as z:
        yield z


def metadata(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_the_wheel_has_the_agent_but_not_the_dev_area(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "agent/__init__.py" in names and "agent/cli/main.py" in names
    assert [n for n in names if n.startswith("agent/dev/")] == []
    assert [n for n in names if n.split("/")[0] in ("tests", "bench")] == []


def test_the_wheel_requires_the_dfns_clients_libraries_at_run_time(wheel: zipfile.ZipFile) -> None:
    """aiohttp is the daemon's transport to Dfns (agent/dfnsapi/transport.py) and httpx `doctor`'s client: both
    are runtime dependencies, with no extra; the dev Dfns server that also uses aiohttp is still not in the wheel."""
    meta = email.parser.Parser().parsestr(metadata(wheel, "METADATA"))
    requires = meta.get_all("Requires-Dist") or []
    runtime = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requires if ";" not in r}
    assert {"httpx", "aiohttp", "yarl", "python-pkcs11", "cryptography"} <= runtime, requires
    assert not [n for n in wheel.namelist() if n.startswith("agent/dev/")]


def test_the_console_script_is_declared(wheel: zipfile.ZipFile) -> None:
    entry_points = metadata(wheel, "entry_points.txt")
    assert "[console_scripts]" in entry_points
    assert "dfns-agent = agent.cli.main:main" in entry_points


def test_the_checkout_still_imports_the_dev_area_from_its_editable_install(tmp_path: Path) -> None:
    """agent.dev is left out of the wheel only: the editable dev install (run from elsewhere) still has it."""
    code = "import agent.dev.dfns_server, agent.dev.softhsm, agent.dev.testing as t; print(t.ROOT)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT


def test_the_wheel_carries_the_example_config_the_units_and_the_license(wheel: zipfile.ZipFile) -> None:
    """`pip install dfns-agent` alone gives `dfns-agent files` what it prints and installs."""
    names = set(wheel.namelist())
    for name in (
        "agent.example.toml",
        "systemd/dfns-agent.service",
        "systemd/dfns-agent.socket",
        "systemd/user/dfns-agent.service",
        "systemd/user/dfns-agent.socket",
    ):
        assert wheel.read(f"agent/data/{name}") == (ROOT / "pkcs11_config" / name).read_bytes(), name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
