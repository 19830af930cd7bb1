"""Rate-limit buckets shared by forked processes (issue 13): N workers admit the rule's rate, not N times it."""

from __future__ import annotations

import os

from agent.core.ratelimit import LocalBuckets, SharedBuckets


def test_processes_forked_after_the_buckets_were_made_share_them() -> None:
    buckets = SharedBuckets(slots=64)
    r, w = os.pipe()
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            taken = sum(buckets.take("rule", 7, 1e-6, 10.0, now=100.0) for _ in range(10))
            os.write(w, bytes([taken]))
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    os.close(w)
    taken = sum(os.read(r, 16))
    os.close(r)
    assert taken == 10  # one burst of 10 for the rule and uid, whichever process takes it
    assert not buckets.take("rule", 7, 1e-6, 10.0, now=100.0)
    assert buckets.take("rule", 8, 1e-6, 10.0, now=100.0)  # another uid has its own bucket
    assert buckets.take("rule", 7, 1.0, 10.0, now=101.5)  # and it refills at the rate


def test_a_full_table_reuses_the_slot_idle_longest() -> None:
    buckets = SharedBuckets(slots=4)
    for uid in range(4):
        assert buckets.take("r", uid, 1e-6, 1.0, now=float(uid))
    assert buckets.take("r", 99, 1e-6, 1.0, now=10.0)  # a fifth bucket still works
    assert not buckets.take("r", 99, 1e-6, 1.0, now=10.0)


def test_local_buckets_behave_the_same_in_one_process() -> None:
    local = LocalBuckets()
    assert [local.take("r", 1, 0.5, 2.0, now=0.0) for _ in range(3)] == [True, True, False]
    assert local.take("r", 1, 0.5, 2.0, now=2.0)
