"""The cause of a failed job, from real host logs (tests/golden/diagnosis/, captured from the training program
on this machine: see its README.md) and exit statuses; across hosts the root cause wins over its consequences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flagscale.supervisor.diagnosis import Diagnosis, HostEvidence, Kind, diagnose

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "diagnosis"


def log(name: str) -> str:
    return (GOLDEN / name).read_text()


def one_host(name: str, host: str = "n1", exit_code: int | None = 1) -> Diagnosis:
    return diagnose([HostEvidence(host=host, exit_code=exit_code, log=log(name))])


@pytest.mark.parametrize(
    ("name", "kind", "rank", "detail"),
    [
        ("rank_sigkill.log", Kind.RANK_KILLED, 1, "rank 1 on host n1 was killed by SIGKILL (signal 9); if nobody "
         "killed it, the kernel's out-of-memory killer did (see dmesg)"),
        ("rank_sigsegv.log", Kind.RANK_CRASHED, 1, "rank 1 on host n1 crashed with SIGSEGV (signal 11)"),
        ("rank_error_empty_data.log", Kind.RANK_ERROR, 0, "rank 0 on host n1 failed: ValueError: cannot mmap an "
         "empty file"),
        ("rank_error_corrupt_checkpoint.log", Kind.RANK_ERROR, 1, "rank 1 on host n1 failed: error: checkpoint "
         "/tmp/diag_ckpt/checkpoints/iter_0000010 is incomplete or corrupt: no metadata.json"),
        ("oom_cpu_allocator.log", Kind.OOM, 1, "rank 1 on host n1 ran out of memory: RuntimeError: [enforce fail at "
         "alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
         "274877906944 bytes. Error code 12 (Cannot allocate memory); use a smaller micro batch or more model "
         "parallelism"),
        ("collective_timeout_stopped_rank.log", Kind.COMMUNICATION, 0, "rank 0 on host n1 failed communicating with "
         "the other ranks: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer"
         ".cc:78] Timed out waiting 60000ms for recv operation to complete"),
        ("rendezvous_timeout.log", Kind.COMMUNICATION, None, "torchrun on host n1 could not join the job "
         "(rendezvous): torch.distributed.DistNetworkError: The client socket has timed out after 15000ms while "
         "trying to connect to (127.0.0.9, 29599); check master_addr/master_port and that the master host answers"),
        ("user_stop.log", Kind.RANK_KILLED, None, "torchrun on host n1 received SIGTERM (signal 15)"),
    ],
)  # fmt: skip
def test_one_host_log(name: str, kind: Kind, rank: int | None, detail: str) -> None:
    found = one_host(name)
    assert (found.kind, found.host, found.rank, found.detail) == (kind, "n1", rank, detail)


def test_the_rank_torchrun_saw_fail_first_is_read_not_the_one_it_killed_itself() -> None:
    # rank 1 was stopped (SIGSTOP), rank 0's collective timed out; torchrun then SIGKILLed rank 1 itself
    assert "exitcode  : -9 (pid: 2320)  (SIGKILL)" in log("collective_timeout_stopped_rank.log")
    assert one_host("collective_timeout_stopped_rank.log").kind is Kind.COMMUNICATION


def test_tracebacks_of_ignored_exceptions_are_not_the_error() -> None:
    assert "AttributeError: 'IndexedDataset' object has no attribute" in log("rank_error_empty_data.log")
    assert one_host("rank_error_empty_data.log").message == "ValueError: cannot mmap an empty file"


def test_a_rank_killed_on_one_host_is_the_cause_of_the_others_communication_errors() -> None:
    peer = HostEvidence(host="127.0.0.2", exit_code=1, log=log("two_hosts_peer_of_killed_rank.log"))
    killed = HostEvidence(host="127.0.0.3", exit_code=1, log=log("two_hosts_killed_rank.log"))
    assert diagnose([peer]).kind is Kind.COMMUNICATION  # alone, the peer only saw a connection reset
    for hosts in ([peer, killed], [killed, peer]):
        found = diagnose(hosts)
        assert (found.kind, found.host, found.rank) == (Kind.RANK_KILLED, "127.0.0.3", 1)
        assert found.detail.startswith("rank 1 on host 127.0.0.3 was killed by SIGKILL (signal 9)")


def test_a_host_that_does_not_answer_is_lost() -> None:
    survivor = HostEvidence(host="127.0.0.2", exit_code=1, log=log("two_hosts_peer_of_lost_host.log"))
    lost = HostEvidence(host="127.0.0.3", answered=False)
    found = diagnose([survivor, lost])
    assert (found.kind, found.host, found.rank) == (Kind.HOST_LOST, "127.0.0.3", None)
    assert found.detail.startswith("host 127.0.0.3 did not answer")


def test_a_user_stop_is_not_a_failure() -> None:
    hosts = [HostEvidence(host=h, log=log("user_stop.log"), user_stopped=True) for h in ("n1", "n2")]
    found = diagnose(hosts)
    assert (found.kind, found.detail) == (Kind.USER_STOP, "the job was stopped by the user (action=stop)")
    assert not found.restartable


def test_a_host_that_failed_on_its_own_is_the_cause_even_if_others_were_stopped() -> None:
    hosts = [HostEvidence(host="n1", log=log("user_stop.log"), user_stopped=True),
             HostEvidence(host="n2", exit_code=1, log=log("rank_sigsegv.log"))]  # fmt: skip
    assert (diagnose(hosts).kind, diagnose(hosts).host) == (Kind.RANK_CRASHED, "n2")


def test_no_evidence_is_unknown() -> None:
    assert diagnose([]).kind is Kind.UNKNOWN
    running = diagnose([HostEvidence(host="n1", log="[default0]: iteration 10/400 | loss 6.7")])
    assert (running.kind, running.host) == (Kind.UNKNOWN, None)


def test_a_completed_host_has_no_cause_whatever_its_log_says() -> None:
    assert one_host("rank_sigkill.log", exit_code=0).kind is Kind.UNKNOWN


def test_a_hang_beats_the_timeouts_it_causes() -> None:
    hung = HostEvidence(host="n1", log=log("collective_timeout_stopped_rank.log"), hung=True,
                        seconds_since_iteration=312.4)  # fmt: skip
    found = diagnose([hung])
    assert (found.kind, found.host) == (Kind.HANG, "n1")
    assert found.detail == "no new iteration for 312s while the processes on host n1 still run: the job hangs"


@pytest.mark.parametrize(
    ("code", "kind", "detail"),
    [(137, Kind.RANK_KILLED, "the job's processes on host n1 were killed by SIGKILL (signal 9, exit 137)"),
     (139, Kind.RANK_CRASHED, "the job's processes on host n1 crashed with SIGSEGV (signal 11, exit 139)"),
     (2, Kind.UNKNOWN, "host n1 exited with code 2 and its log names no cause")],
)  # fmt: skip
def test_only_an_exit_status(code: int, kind: Kind, detail: str) -> None:
    found = diagnose([HostEvidence(host="n1", exit_code=code)])
    assert (found.kind, found.detail) == (kind, detail)


def with_error(line: str) -> str:
    """The real empty-data log with rank 0's exception line replaced (errors this machine cannot produce)."""
    text = log("rank_error_empty_data.log")
    assert text.count("[default0]:[rank0]: ValueError: cannot mmap an empty file") == 1
    return text.replace("[default0]:[rank0]: ValueError: cannot mmap an empty file", f"[default0]:[rank0]: {line}")


@pytest.mark.parametrize(
    ("line", "kind"),
    [("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
      "79.15 GiB of which 1.02 GiB is free.", Kind.OOM),
     ("MemoryError", Kind.OOM),
     ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
      Kind.COMMUNICATION),
     ("FileNotFoundError: [Errno 2] No such file or directory: '/data/missing.idx'", Kind.RANK_ERROR)],
)  # fmt: skip
def test_the_rank_error_line_is_classified(line: str, kind: Kind) -> None:
    found = diagnose([HostEvidence(host="n1", exit_code=1, log=with_error(line))])
    assert (found.kind, found.rank, found.message) == (kind, 0, line)


def test_an_abort_after_a_communication_error_is_a_communication_error() -> None:
    text = with_error("torch.distributed.DistBackendError: [Rank 0] Watchdog caught collective operation timeout")
    text = text.replace("exitcode  : 1 (pid: 25353) ", "exitcode  : -6 (pid: 25353)  (SIGABRT)")
    found = diagnose([HostEvidence(host="n1", exit_code=1, log=text)])
    assert found.kind is Kind.COMMUNICATION and found.detail.startswith("rank 0 on host n1 aborted (SIGABRT)")


@pytest.mark.parametrize(
    ("found", "restartable"),
    [(Diagnosis(Kind.RANK_ERROR, "n1", 0, "d", "error: checkpoint x is incomplete or corrupt"), False),
     (Diagnosis(Kind.RANK_ERROR, "n1", 0, "d", "ValueError: cannot mmap an empty file"), False),
     (Diagnosis(Kind.RANK_ERROR, "n1", 0, "d", "OSError: [Errno 5] Input/output error"), True),
     (Diagnosis(Kind.OOM, "n1", 0, "d"), False),
     (Diagnosis(Kind.RANK_KILLED, "n1", 0, "d"), True),
     (Diagnosis(Kind.RANK_CRASHED, "n1", 0, "d"), True),
     (Diagnosis(Kind.COMMUNICATION, "n1", 0, "d"), True),
     (Diagnosis(Kind.HOST_LOST, "n1", None, "d"), True),
     (Diagnosis(Kind.HANG, "n1", None, "d"), True),
     (Diagnosis(Kind.USER_STOP, None, None, "d"), False)],
)  # fmt: skip
def test_whether_a_restart_can_help(found: Diagnosis, restartable: bool) -> None:
    assert found.restartable is restartable


def test_the_real_failures_a_restart_can_or_cannot_cure() -> None:
    assert one_host("rank_sigkill.log").restartable
    assert not one_host("rank_error_corrupt_checkpoint.log").restartable
    assert not one_host("oom_cpu_allocator.log").restartable


def test_a_diagnosis_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        one_host("rank_sigkill.log").rank = 0  # type: ignore[misc]


def test_a_signal_without_a_name_is_still_a_kill() -> None:
    found = diagnose([HostEvidence(host="n1", exit_code=128 + 99)])
    assert (found.kind, found.detail) == (Kind.RANK_KILLED, "the job's processes on host n1 were killed by an "
                                                            "unnamed signal (signal 99, exit 227)")  # fmt: skip
