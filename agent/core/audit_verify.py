"""Offline verification of an audit log: the hash chain across rotated files, and the signed checkpoints.

What it proves, and what not (the README's audit section says the same to operators):

- The chain alone shows a record edited, inserted or deleted *before* the last record of the set.
- A checkpoint whose signature verifies with the audit public key proves records ``1..size`` (its tree
  size): the file's record ``size`` must hash to the checkpoint's head, and every record before it is bound
  to that one by the chain. Editing, dropping or rewriting any of them (even with a recomputed chain) is
  detected, as is a set that ends before a checkpoint's size (truncation), provided the verifier has that
  checkpoint: the ones in the file, or, stronger, copies from the journal (``--checkpoints``), which someone
  who rewrites the file cannot take back.
- A set that starts later than seq 1 (the oldest files deleted by retention, or not given) must start with
  a ``rotate`` record, the first record of a rotated file; one that starts with any other record had records
  cut from the front of its first file, and fails. Such a set is proven only from its first record: what it
  no longer holds can be neither checked nor proven.
- Records after the newest verified checkpoint are only chained: the last of them could have been altered,
  some of them cut off, or all of them rewritten, without a trace in the file. Only a newer checkpoint from
  outside the file covers them.
- Without the public key, checkpoints are only checked for consistency with the file, not authenticity (a
  rewriter could add checkpoints of their own).
- A set that holds no records proves nothing, and may be all that is left of a log truncated or deleted:
  it fails (``empty``), never verifies.

Which files a directory stands for (:func:`directory_files`): the ones the agent's rotation
(``AuditLog._rotate``) leaves there, whatever ``[audit] file`` is called. A rotated file is named
``STEM-SEQ.SUFFIX`` after the live ``STEM.SUFFIX`` (SEQ: its last record's seq, 12 or more digits); so the
set is every regular file named like a rotated file, the live file of each, and any ``*.jsonl`` (the
default ``audit.jsonl``, which may not have rotated yet). Other names (a ``.next`` file left by a rotation
cut short, notes, a file set aside) are not in it; a live file of another name that never rotated is
given by its own path.

A file that cannot be read raises :class:`UnreadableFile`: that is no verdict on the log (the CLI reports
it as an error of its input); a line that cannot be read as a JSON record, however it fails, breaks the
chain there.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TypeGuard

from agent.core.chain import GENESIS, line_hash
from agent.core.checkpoint import Checkpoint, VerifyKey, parse


@dataclass(frozen=True)
class CheckpointCheck:
    """One checkpoint and what the set says about it."""

    checkpoint: Checkpoint
    source: str  # "FILE line N" or "external"
    signed: bool | None  # None: no public key to check it with
    matches: bool | None  # None: its size is outside the records of the set
    problem: str | None = None


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_bad_line: int | None = None
    reason: str | None = None
    bad_file: Path | None = None
    first_seq: int = 0
    last_seq: int = 0
    files: tuple[Path, ...] = ()
    checkpoints: tuple[CheckpointCheck, ...] = ()
    proven: int = 0  # records first_seq..proven are covered by a checkpoint whose signature verified
    warnings: tuple[str, ...] = field(default=())
    continues: str | None = None  # a set that starts later: the file its first (rotate) record continues
    empty: bool = False  # not ok because the set holds no records (no files, or only empty ones)

    def summary(self) -> list[str]:
        """What an operator reads: the verdict, then what is proven and what is not."""
        if self.empty:
            return [f"EMPTY: {self.reason}", *self.warnings]
        if not self.ok:
            where = f"{self.bad_file}: " if self.bad_file is not None and len(self.files) > 1 else ""
            line = f" at line {self.first_bad_line}" if self.first_bad_line is not None else ""
            return [f"BROKEN{line}: {where}{self.reason} ({self.records} record(s) before it)", *self.warnings]
        span = f", seq {self.first_seq}..{self.last_seq}" if self.records else ""
        out = [f"ok: {self.records} record(s){span} in {len(self.files)} file(s), chain intact", *self.warnings]
        start = max(self.first_seq, 1)
        unchecked = [c for c in self.checkpoints if c.signed is None and c.matches]
        if self.proven:
            newest = next(c for c in self.checkpoints if c.signed and c.matches and c.checkpoint.size == self.proven)
            out.append(
                f"proven: records {start}..{self.proven} match a checkpoint signed by {newest.checkpoint.origin} "
                f"({newest.source}): none of them was edited, dropped or rewritten"
            )
        elif unchecked:
            out.append(
                f"not proven: {len(unchecked)} checkpoint(s) match the file, but without --public-key their "
                "signatures were not checked (anyone rewriting the file could have made them)"
            )
        if self.last_seq > self.proven:
            what = f"records {max(self.proven + 1, start)}..{self.last_seq}"
            why = "come after the newest verified checkpoint" if self.proven else "are in no verified checkpoint"
            out.append(
                f"not proven: {what} {why}; they are only chained: the last of them could be altered, some cut off "
                "(truncation), or all rewritten, without a trace; a newer checkpoint from the journal "
                "(--checkpoints, with --public-key) would show it"
            )
        if self.first_seq > 1:
            out.append(
                f"the set starts at seq {self.first_seq}, with a rotate record continuing {self.continues}: "
                f"earlier files are not in it (deleted by retention, or not given); records 1..{self.first_seq - 1} "
                "can be neither checked nor proven here"
            )
        return out


class _Broken(Exception):
    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason


class UnreadableFile(Exception):
    """A file or directory of the set that cannot be read (permissions, I/O): the set cannot be checked,
    which says nothing about the log, so it is raised rather than turned into a verdict."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path, self.reason = path, error.strerror or str(error)
        super().__init__(f"cannot read {path}: {self.reason}")


_ROTATED_STEM = re.compile(r"(.+)-[0-9]{12,}")  # AuditLog._rotate: f"{stem}-{seq:012d}{suffix}"


def live_name(name: str) -> str | None:
    """The live file a rotated file named ``name`` was cut from (``audit-000000001000.log``:
    ``audit.log``), or None when ``name`` is not named like a rotated file."""
    p = PurePath(name)
    m = _ROTATED_STEM.fullmatch(p.stem)
    return m.group(1) + p.suffix if m else None


def directory_files(directory: Path) -> list[Path]:
    """The audit files in ``directory``, by the rule in the module's docstring: rotated files, the live
    file of each, and ``*.jsonl``; regular files only (symbolic links to them too)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise UnreadableFile(directory, e) from None
    rotated_from = {live for live in map(live_name, names) if live is not None}
    found = []
    for name in names:
        if live_name(name) is None and name not in rotated_from and not name.endswith(".jsonl"):
            continue
        path = directory / name
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except FileNotFoundError:  # a dangling link, or renamed by a rotation since the listing
            continue
        except OSError as e:
            raise UnreadableFile(path, e) from None
        if regular:
            found.append(path)
    return found


def audit_files(paths: Iterable[Path]) -> list[Path]:
    """The files of a set: each file given, and :func:`directory_files` of each directory given; a file
    with two names (a hard link left by a rotation cut short) is taken once."""
    found: list[Path] = []
    for p in paths:
        found += directory_files(p) if p.is_dir() else [p]
    seen: set[tuple[int, int]] = set()
    unique = []
    for p in found:
        try:
            st = os.stat(p)
        except OSError as e:
            raise UnreadableFile(p, e) from None
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            unique.append(p)
    return unique


def _lines(path: Path) -> Iterator[bytes]:
    """The raw lines of ``path``; an open or read that fails is :class:`UnreadableFile`."""
    try:
        with open(path, "rb") as f:
            yield from f
    except OSError as e:
        raise UnreadableFile(path, e) from None


def _first_seq(path: Path) -> int | float:
    first = next(_lines(path), b"")
    if first and not first.endswith(b"\n"):
        # Nothing but a torn line (a crash cut the first record short): sorted last, where a torn tail is
        # only warned about, whatever seq it was going to have.
        return float("inf")
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):  # not a record: sorted first, where the chain check reports it
        return 0
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if _integer(seq) else 0


def _integer(value: object) -> TypeGuard[int]:
    """A JSON integer: not ``true`` (Python's ``True == 1``) nor ``2.0``, which the agent does not continue."""
    return isinstance(value, int) and not isinstance(value, bool)


def verify(
    paths: Path | Sequence[Path],
    *,
    public_key: VerifyKey | None = None,
    external: Sequence[Checkpoint] = (),
    origin: str | None = None,
) -> Verification:
    """Check the chain of a set of audit files (in seq order) and the checkpoints in them and given.
    Raises :class:`UnreadableFile` when a file of the set cannot be read."""
    given = [paths] if isinstance(paths, Path) else list(paths)
    files = audit_files(given)
    files.sort(key=_first_seq)
    # Only the hashes checkpoints need are kept, not one per record (a year of files holds millions): those
    # of the sizes given from outside, and a window of recent ones for the checkpoints in the files, which
    # land a few records after the head they sign; one that lands further on is looked up in a second pass.
    hashes: dict[int, str] = {}
    wanted = {cp.size for cp in external}
    recent: list[str] = [""] * _RECENT
    missing: set[int] = set()
    found: list[tuple[Checkpoint, str]] = []
    warnings: list[str] = []
    count, first_seq, prev, seq = 0, 0, None, 0
    continues: str | None = None
    try:
        for index, path in enumerate(files):
            last_file = index == len(files) - 1
            for number, raw in enumerate(_lines(path), start=1):
                if not raw.endswith(b"\n"):
                    if last_file:
                        warnings.append(
                            f"warning: {path} ends in {len(raw)} bytes that are not a complete record (a write "
                            "cut short); the agent cuts them off, with a repair record, before it appends"
                        )
                        break
                    raise _Broken(path, number, "a record cut short in the middle of the set")
                try:
                    record = json.loads(raw)
                except ValueError:
                    raise _Broken(path, number, "not a JSON record") from None
                except RecursionError:  # the parser's own limit: a corrupt line like any other
                    raise _Broken(path, number, "not a JSON record (nested too deep to read)") from None
                if not isinstance(record, dict):
                    raise _Broken(path, number, "not a JSON record")
                if prev is None:  # the very first record of the set
                    first = record.get("seq")
                    seq = first if _integer(first) else 0
                    if seq < 1:
                        raise _Broken(path, number, f"seq is {record.get('seq')!r}")
                    if seq == 1 and record.get("prev") != GENESIS:
                        raise _Broken(path, number, "the first record does not start the chain")
                    first_seq, prev = seq, record.get("prev")
                    if seq > 1:
                        continues = _continued(path, number, seq, record)
                        hashes[seq - 1] = str(prev)
                else:
                    if record.get("prev") != prev:
                        raise _Broken(path, number, "prev does not match the hash of the record before it")
                    seq += 1
                    if not _integer(record.get("seq")) or record.get("seq") != seq:
                        raise _Broken(path, number, f"seq is {record.get('seq')!r}, expected {seq}")
                prev = line_hash(raw)
                recent[seq % _RECENT] = prev
                if seq in wanted:
                    hashes[seq] = prev
                count += 1
                if record.get("event") == "checkpoint":
                    try:
                        cp = parse(str(record.get("checkpoint")))
                    except ValueError as e:
                        raise _Broken(path, number, f"a checkpoint record that is not a checkpoint: {e}") from None
                    found.append((cp, f"{path} line {number}"))
                    if cp.size > seq:
                        wanted.add(cp.size)
                    elif cp.size >= first_seq and cp.size not in hashes:
                        if seq - cp.size < _RECENT:
                            hashes[cp.size] = recent[cp.size % _RECENT]
                        else:
                            missing.add(cp.size)
    except _Broken as b:
        return Verification(
            False, count, b.line, b.reason, b.path, first_seq, seq, tuple(files), warnings=tuple(warnings)
        )
    if missing:
        hashes.update(_hashes_of(files, first_seq, missing))
    checks = [_check(cp, src, hashes, seq, public_key, origin) for cp, src in found]
    checks += [_check(cp, "external", hashes, seq, public_key, origin) for cp in external]
    problem = next((c for c in checks if c.problem), None)
    # A checkpoint proves the records of the set up to its size; one of the record just before the set (the
    # first record's prev) proves none of them: anyone can write a record with that prev.
    proven = max((c.checkpoint.size for c in checks if c.signed and c.matches and c.checkpoint.size >= first_seq),
                 default=0)  # fmt: skip
    if problem is not None:
        return Verification(
            False, count, None, f"checkpoint ({problem.source}): {problem.problem}", None, first_seq, seq,
            tuple(files), tuple(checks), proven, tuple(warnings), continues,
        )  # fmt: skip
    if count == 0:
        return Verification(
            False, 0, None, _nothing(given, files), None, files=tuple(files), checkpoints=tuple(checks),
            warnings=tuple(warnings), empty=True,
        )  # fmt: skip
    return Verification(
        True, count, None, None, None, first_seq, seq, tuple(files), tuple(checks), proven, tuple(warnings),
        continues,
    )  # fmt: skip


_RECENT = 4096  # hashes of the most recent records kept while reading, for the checkpoints in the files


def _hashes_of(files: Sequence[Path], first_seq: int, wanted: set[int]) -> dict[int, str]:
    """The hashes of records ``wanted`` of a set whose chain was checked (its complete lines are records
    ``first_seq``, ``first_seq + 1``, ...), read again. A line that no longer has the seq it had (a file
    rotated or changed since) gives nothing: its checkpoint is then not compared, and proves nothing."""
    out: dict[int, str] = {}
    seq, last = first_seq, max(wanted)
    for path in files:
        for raw in _lines(path):
            if not raw.endswith(b"\n"):
                break
            if seq in wanted:
                try:
                    same = json.loads(raw).get("seq") == seq
                except (ValueError, AttributeError, RecursionError):
                    same = False
                if same:
                    out[seq] = line_hash(raw)
            seq += 1
            if seq > last:
                return out
    return out


def _nothing(given: Sequence[Path], files: Sequence[Path]) -> str:
    """Why an empty set fails, and where to look: it proves nothing, and may be what is left of a log cut to
    nothing or deleted."""
    if files:
        return (
            f"no records in {len(files)} file(s): nothing to verify (an empty log proves nothing; it may have "
            "been truncated)"
        )
    directories = ", ".join(str(p) for p in given if p.is_dir()) or "the paths given"
    return (
        f"no audit files in {directories}: a directory's set is its rotated files (STEM-SEQ.SUFFIX, SEQ of 12 "
        "or more digits), the live file STEM.SUFFIX of each, and any *.jsonl; give a live file of another "
        "name that has not rotated yet by its own path"
    )


def _continued(path: Path, number: int, seq: int, record: dict[str, object]) -> str:
    """The file a set that starts at ``seq`` > 1 continues. Only a ``rotate`` record (the first record of a
    rotated file, left first when retention deleted the files before it) may start such a set: any other
    record means records were cut from the front of the file."""
    event = record.get("event")
    if event != "rotate":
        raise _Broken(
            path, number,
            f"the set starts at seq {seq} with a {event!r} record, not at seq 1 or with a rotate record: "
            f"records were cut from the front of this file (records 1..{seq - 1}, or the ones of them it held, "
            "are missing; retention deletes whole files, each of which starts with seq 1 or a rotate record)",
        )  # fmt: skip
    if record.get("previousSeq") != seq - 1:
        raise _Broken(path, number, f"a rotate record at seq {seq} whose previousSeq is {record.get('previousSeq')!r}")
    return str(record.get("previousFile"))


def _check(
    cp: Checkpoint, source: str, hashes: dict[int, str], last: int, key: VerifyKey | None, origin: str | None
) -> CheckpointCheck:
    signed = None if key is None else cp.verify(cp.origin, key)
    if origin is not None and cp.origin != origin:
        if source == "external":
            return CheckpointCheck(cp, source, None, None)  # another log's checkpoint: not about this set
        return CheckpointCheck(cp, source, signed, None, f"origin {cp.origin!r}, expected {origin!r}")
    if signed is False:
        return CheckpointCheck(cp, source, False, None, f"signature for {cp.size} record(s) does not verify")
    if cp.size > last:
        return CheckpointCheck(
            cp, source, signed, False,
            f"signed for {cp.size} record(s) but the set ends at seq {last}: records were cut off (truncation)",
        )  # fmt: skip
    head = hashes.get(cp.size)
    if head is None:
        return CheckpointCheck(cp, source, signed, None)  # before the set's first file: nothing to compare
    if head != cp.head:
        return CheckpointCheck(
            cp, source, signed, False,
            f"record {cp.size} is not the one it signed: records up to it were edited or rewritten",
        )  # fmt: skip
    return CheckpointCheck(cp, source, signed, True)
