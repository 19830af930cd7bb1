"""Heartbeats (``agent/daemon/liveness.py``) across a real fork: a child's beats are what the parent judges."""

from __future__ import annotations

import os
import time

from agent.daemon.liveness import Heartbeats, beat_interval


def test_a_forked_workers_beats_are_seen_and_silence_is_judged() -> None:
    beats = Heartbeats(2)
    assert beats.silent(0.0) == []  # not started: never judged
    pid = os.fork()
    if pid == 0:
        beats.slot(1).beat()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert beats.silent(3600.0) == []  # index 1 beat just now
    time.sleep(0.05)
    silent = beats.silent(0.01)
    assert [index for index, _ in silent] == [1] and silent[0][1] >= 0.01
    beats.forget(1)
    assert beats.silent(0.0) == []


def test_a_well_worker_beats_several_times_within_the_limit() -> None:
    assert beat_interval(60.0) == 1.0 and beat_interval(2.0) == 0.5
