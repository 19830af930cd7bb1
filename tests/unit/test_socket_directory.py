"""The socket's directory: created private, and an existing one checked but never chmodded (it may be shared)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.errors import ListenError
from agent.transport.listener import bind_unix_socket, prepare_directory


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_missing_directory_is_created_0700_whatever_the_umask(short_dir: Path) -> None:
    directory = short_dir / "run"
    old = os.umask(0o277)  # takes the owner's write bit from mkdir's mode (one level: parents would get it too)
    try:
        prepare_directory(directory)
    finally:
        os.umask(old)
    assert mode_of(directory) == 0o700


def test_an_existing_private_directory_is_used_as_it_is(short_dir: Path) -> None:
    directory = short_dir / "run"
    directory.mkdir(mode=0o700)
    prepare_directory(directory)
    assert mode_of(directory) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o1777], ids=["0755", "0750", "1777"])
def test_a_directory_others_can_reach_is_refused_and_left_as_it_was(short_dir: Path, mode: int) -> None:
    # 1777 is /tmp: `--socket /tmp/agent.sock` as root used to make /tmp 0700 for everyone.
    directory = short_dir / "shared"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(ListenError) as info:
        bind_unix_socket(directory / "agent.sock")
    assert mode_of(directory) == mode
    assert not (directory / "agent.sock").exists()
    message = info.value.message
    assert f"has mode {mode:04o}" in message and "does not change the mode" in message, message
    assert "a directory of its own" in message and f"chmod 700 {directory}" in message, message


def test_a_symlinked_directory_is_refused(short_dir: Path) -> None:
    real = short_dir / "real"
    real.mkdir(mode=0o700)
    (short_dir / "link").symlink_to(real)
    with pytest.raises(ListenError, match="is not a directory"):
        prepare_directory(short_dir / "link")
