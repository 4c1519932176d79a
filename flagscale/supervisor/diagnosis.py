"""Why a job failed, from what its hosts left behind: exit statuses, whether they answered, their logs.

Pure and torch-free: the caller gathers one `HostEvidence` per host (the text of each host's log is
torchrun's output with `--tee 3`, every rank's line prefixed `[default<local rank>]:`), and `diagnose`
names one root cause for the whole job. The patterns below are the text real failures of the training
program leave; tests/golden/diagnosis/ holds such logs, captured here (see its README.md).

Across hosts the cause is the event no other failure explains: a rank killed on one host makes the ranks
on the others fail with communication errors, so the kill is reported, not the communication error. On
one host torchrun names the rank that failed first ("Root Cause (first observed failure)"); the ranks it
then terminated itself (SIGTERM, then SIGKILL) are consequences and are not read.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """What kind of failure ended (or stalled) the job."""

    OOM = "out of memory"
    RANK_KILLED = "rank killed"
    RANK_CRASHED = "rank crashed"
    RANK_ERROR = "rank error"
    COMMUNICATION = "communication error"
    HOST_LOST = "host lost"
    HANG = "hang"
    USER_STOP = "user stop"
    UNKNOWN = "unknown"


CAUSE_ORDER = (
    Kind.OOM,
    Kind.RANK_CRASHED,
    Kind.RANK_KILLED,
    Kind.HOST_LOST,
    Kind.RANK_ERROR,
    Kind.HANG,
    Kind.COMMUNICATION,
    Kind.UNKNOWN,
)
"""Which host's cause is the job's when hosts disagree, first wins: a signal, an out-of-memory error or a lost
host is never the consequence of another host's failure; an exception can be, a communication error mostly is."""

RESTART_HELPS = frozenset(
    {Kind.RANK_KILLED, Kind.RANK_CRASHED, Kind.COMMUNICATION, Kind.HOST_LOST, Kind.HANG, Kind.UNKNOWN}
)
"""Kinds a restart from the last checkpoint can cure. Not OOM (the same sizes need the same memory), not a
user stop; a rank's exception only when it reads as transient (`TRANSIENT_ERROR`)."""

TRANSIENT_ERROR = re.compile(r"TimeoutError|Input/output error|Stale file handle|ECC error", re.IGNORECASE)
OUT_OF_MEMORY = re.compile(
    r"OutOfMemoryError|out of memory|DefaultCPUAllocator|Cannot allocate memory|"
    r"\bMemoryError\b",
    re.IGNORECASE,
)
COMMUNICATION = re.compile(
    r"gloo|nccl|DistNetworkError|DistBackendError|DistStoreError|Rendezvous|"
    r"Connection (reset|closed|refused)|Broken pipe|timed out|ProcessGroup",
    re.IGNORECASE,
)
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})

RANK_LINE = re.compile(r"^\[default(\d+)\]:(?:\[rank(\d+)\]: ?)?(.*)$")
"""A rank's line in the host log: local rank, global rank (uncaught exceptions carry it), the rank's own text."""
ROOT_CAUSE = "Root Cause (first observed failure):"
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
FAILED_LINE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: \d+\)")
"""torchrun's own line for the first rank it saw fail (its summary may be cut off the end of the log)."""
AGENT_SIGNAL = re.compile(r"SignalException: Process \d+ got signal: (\d+)")
MESSAGE_CHARS = 240


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The root cause of a job's failure, as one line a user can act on."""

    kind: Kind
    host: str | None
    rank: int | None
    """The global rank, when the log names it."""
    detail: str
    message: str | None = None
    """The failed rank's own last error line, verbatim, when it printed one."""

    @property
    def restartable(self) -> bool:
        """Whether running the same job again (from the last checkpoint) can get past this failure."""
        if self.kind is Kind.RANK_ERROR:
            return bool(self.message and TRANSIENT_ERROR.search(self.message))
        return self.kind in RESTART_HELPS


@dataclass(slots=True, kw_only=True)
class HostEvidence:
    """What one host tells about the job."""

    host: str
    exit_code: int | None = None
    """The exit status of the host's part (torchrun's), None while it runs or when it left none."""
    answered: bool = True
    user_stopped: bool = False
    """The user stopped it (the job record's stop request, or the host's `stopped_at`): its failure is no cause."""
    log: str = ""
    """The end of the host's log (the last few tens of KB are enough)."""
    hung: bool = False
    """The caller saw no new iteration for its hang timeout while the processes ran."""
    seconds_since_iteration: float | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    """The first rank torchrun saw fail on a host."""

    local_rank: int
    exit_code: int
    rank: int | None


def diagnose(hosts: Sequence[HostEvidence]) -> Diagnosis:
    """The job's root cause from every host's evidence (hosts in node-rank order: ties go to the first)."""
    causes = [cause for host in hosts if not host.user_stopped for cause in _host_causes(host)]
    if causes:
        return min(causes, key=lambda cause: CAUSE_ORDER.index(cause.kind))
    if any(host.user_stopped for host in hosts):
        return Diagnosis(Kind.USER_STOP, None, None, "the job was stopped by the user (action=stop)")
    return Diagnosis(Kind.UNKNOWN, None, None, "no cause found in the hosts' exit statuses and logs")


def _host_causes(evidence: HostEvidence) -> list[Diagnosis]:
    """What went wrong on one host: nothing when it completed or still runs well."""
    host = evidence.host
    if not evidence.answered:
        detail = f"host {host} did not answer; its ranks are lost with it (bring it back or use another host)"
        return [Diagnosis(Kind.HOST_LOST, host, None, detail)]
    logged = _from_log(host, evidence.log) if evidence.exit_code != 0 else None
    causes = [logged] if logged else []
    if evidence.hung:
        causes.append(_hang(host, evidence.seconds_since_iteration))
    if not causes and evidence.exit_code:
        causes.append(_from_exit_code(host, evidence.exit_code))
    return causes


def _hang(host: str, seconds: float | None) -> Diagnosis:
    since = f" for {seconds:.0f}s" if seconds is not None else ""
    detail = f"no new iteration{since} while the processes on host {host} still run: the job hangs"
    return Diagnosis(Kind.HANG, host, None, detail)


def _from_log(host: str, log: str) -> Diagnosis | None:
    """The cause torchrun's log shows: its first failed rank, else torchrun's own error (e.g. rendezvous)."""
    lines = log.splitlines()
    failure = _first_failure(lines)
    if failure is not None:
        return _rank_cause(host, failure, lines)
    own = [line for line in lines if not RANK_LINE.match(line)]
    message = _last_error(own)
    return _agent_cause(host, message) if message else None


def _first_failure(lines: list[str]) -> _Failure | None:
    """torchrun's root-cause entry (rank, local rank, exit code), else its first "failed (exitcode ...)" line."""
    starts = [i for i, line in enumerate(lines) if line.startswith(ROOT_CAUSE)]
    if starts:
        entry = lines[starts[-1] + 1 : starts[-1] + 10]
        ranks = [m for m in map(SUMMARY_RANK.match, entry) if m]
        codes = [m for m in map(SUMMARY_EXIT.match, entry) if m]
        if ranks and codes:
            return _Failure(local_rank=int(ranks[0][2]), exit_code=int(codes[0][1]), rank=int(ranks[0][1]))
    found = next((m for m in map(FAILED_LINE.search, lines) if m), None)
    return _Failure(local_rank=int(found[2]), exit_code=int(found[1]), rank=None) if found else None


def _rank_cause(host: str, failure: _Failure, lines: list[str]) -> Diagnosis:
    """Why torchrun's first failed rank ended: the signal that ended it, else its own last error line."""
    text, prefixed_rank = _rank_text(lines, failure.local_rank)
    rank = failure.rank if failure.rank is not None else prefixed_rank
    who = f"rank {rank}" if rank is not None else f"local rank {failure.local_rank}"
    who = f"{who} on host {host}"
    message = _last_error(text)
    if failure.exit_code < 0:
        return _signalled(who, host, rank, -failure.exit_code, message)
    if message:
        return _from_message(who, host, rank, message)
    return Diagnosis(Kind.UNKNOWN, host, rank, f"{who} exited with code {failure.exit_code} and printed no error")


def _rank_text(lines: list[str], local_rank: int) -> tuple[list[str], int | None]:
    """One rank's own lines (prefixes removed) and its global rank if a `[rank<N>]:` prefix names it."""
    text, rank = [], None
    for match in map(RANK_LINE.match, lines):
        if match and int(match[1]) == local_rank:
            text.append(match[3])
            rank = int(match[2]) if match[2] is not None else rank
    return text, rank


def _last_error(lines: list[str]) -> str | None:
    """The last `error: ...` line (the program's own) or exception line ending a traceback, skipping the
    tracebacks Python prints for errors it ignores (`Exception ignored in: ...`, e.g. in __del__)."""
    found, in_traceback, ignored = None, False, False
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            found = line
        elif line.startswith("Traceback (most recent call last):"):
            in_traceback, ignored = True, i > 0 and lines[i - 1].startswith("Exception ignored in")
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if not ignored and "ChildFailedError" not in line:
                found = line
    return found


def _signalled(who: str, host: str, rank: int | None, number: int, message: str | None) -> Diagnosis:
    """A rank ended by a signal: crashed (SIGSEGV, SIGABRT, ...) or killed (SIGKILL, SIGTERM, ...)."""
    name = _signal_name(number)
    if number in CRASH_SIGNALS:
        if message and COMMUNICATION.search(message):  # e.g. NCCL's watchdog aborts after a collective times out
            detail = f"{who} aborted ({name}) after a communication error: {_short(message)}"
            return Diagnosis(Kind.COMMUNICATION, host, rank, detail, message)
        return Diagnosis(Kind.RANK_CRASHED, host, rank, f"{who} crashed with {name} (signal {number})", message)
    hint = "; if nobody killed it, the kernel's out-of-memory killer did (see dmesg)" if number == 9 else ""
    return Diagnosis(Kind.RANK_KILLED, host, rank, f"{who} was killed by {name} (signal {number}){hint}", message)


def _from_message(who: str, host: str, rank: int | None, message: str) -> Diagnosis:
    """A rank that exited with an error: out of memory, communication, or an error of its own."""
    if OUT_OF_MEMORY.search(message):
        detail = f"{who} ran out of memory: {_short(message)}; use a smaller micro batch or more model parallelism"
        return Diagnosis(Kind.OOM, host, rank, detail, message)
    if COMMUNICATION.search(message):
        detail = f"{who} failed communicating with the other ranks: {_short(message)}"
        return Diagnosis(Kind.COMMUNICATION, host, rank, detail, message)
    return Diagnosis(Kind.RANK_ERROR, host, rank, f"{who} failed: {_short(message)}", message)


def _agent_cause(host: str, message: str) -> Diagnosis:
    """torchrun itself failed before or apart from its ranks: a signal, the rendezvous, or another error."""
    who = f"torchrun on host {host}"
    signalled = AGENT_SIGNAL.search(message)
    if signalled:
        number = int(signalled[1])
        detail = f"{who} received {_signal_name(number)} (signal {number})"
        return Diagnosis(Kind.RANK_KILLED, host, None, detail, message)
    if COMMUNICATION.search(message):
        detail = f"{who} could not join the job (rendezvous): {_short(message)}; check master_addr/master_port"
        return Diagnosis(Kind.COMMUNICATION, host, None, detail + " and that the master host answers", message)
    return _from_message(who, host, None, message)


def _from_exit_code(host: str, code: int) -> Diagnosis:
    """Only the host's exit status is known: a shell's 128+N (or a negative N) is signal N."""
    number = code - 128 if code > 128 else -code
    who = f"the job's processes on host {host}"
    if number <= 0:
        return Diagnosis(Kind.UNKNOWN, host, None, f"host {host} exited with code {code} and its log names no cause")
    kind = Kind.RANK_CRASHED if number in CRASH_SIGNALS else Kind.RANK_KILLED
    verb = "crashed with" if kind is Kind.RANK_CRASHED else "were killed by"
    return Diagnosis(kind, host, None, f"{who} {verb} {_signal_name(number)} (signal {number}, exit {code})")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "an unnamed signal"


def _short(message: str) -> str:
    """The message cut to fit one line, without its final full stop (the detail goes on after it)."""
    message = message.rstrip(" .")
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."
