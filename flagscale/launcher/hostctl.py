"""Host-side process control, run on every host as `python -c <this file's source> VERB ...`.

Standard library only: hosts need nothing installed but Python. It prints one JSON object.
  start  SCRIPT LOG PID_FILE GRACE
                              start `bash SCRIPT` in a new session, output to LOG; write its pid, pgid and
                              start time to PID_FILE at once (a launcher that loses this answer finds the
                              process there); report them, or its exit code if it ended within GRACE seconds
  status PGID START SCRIPT EXIT_FILE
                              the processes of the job tree and the recorded exit code
  stop   PGID START SCRIPT TIMEOUT
                              SIGTERM every process group of the job tree, wait, SIGKILL the rest
  stacks PGID START SCRIPT OUT PREFIX
                              the Python stack of every Python process of the job tree (`py-spy dump`, found on
                              PATH or beside this Python, read without pausing the process: a stopped one works
                              too), each written to OUT/PREFIX-PID.txt; reports the files and any error
  port   PORT                 PORT (0: any) if it can be bound here, else an error
  probe  PORT NAME=VALUE...   the devices visible here under the job's environment (NAME=VALUE: the
                              *_VISIBLE_DEVICES the job's env layers set; they win over this host's own),
                              and PORT as `port` checks it (PORT '-': no port)

The job tree is every process in the recorded session/group plus all their descendants: torchrun
starts each worker in a session of its own, so the workers' groups are found through the tree
(snapshotted before any signal, since orphans lose their parent link) and signalled by group id.

A recorded pgid is only trusted while it is still the launch's: if its leader (the script's bash) lives,
its start time must be the recorded START (field 22 of /proc/PID/stat; START '-' for records written
before start times were kept: then its command line must be `bash SCRIPT`); if the leader has ended,
only the members whose environment carries this launch's mark (FLAGSCALE_SCRIPT=SCRIPT, set at start
and inherited) are the job's. Anything else under that number is another process: never signalled.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time


def _procs():
    """(pid, ppid, pgid, sid, state) of every live process, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, ppid, pgid, sid = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
        if state not in ("Z", "X"):
            out.append((int(name), ppid, pgid, sid, state))
    return out


MARK = "FLAGSCALE_SCRIPT"
VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def _tree(root, procs=None, member=None):
    """{pid: pgid} of the processes in session/group `root` (those `member(pid)` accepts, if given), and
    all their descendants."""
    procs = _procs() if procs is None else procs
    members = {p[0]: p[2] for p in procs if (p[2] == root or p[3] == root) and (member is None or member(p[0]))}
    changed = True
    while changed:
        changed = False
        for pid, ppid, pgid, _sid, _state in procs:
            if ppid in members and pid not in members:
                members[pid] = pgid
                changed = True
    members.pop(os.getpid(), None)
    return members


def _start_time(pid):
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _job_tree(pgid, start, script):
    """The tree of the recorded launch (see the module docstring); {} if the number is no longer its."""
    pgid, procs = int(pgid), _procs()
    if any(p[0] == pgid for p in procs):
        return _tree(pgid, procs) if _is_leader(pgid, start, script) else {}
    return _tree(pgid, procs, lambda pid: _marked(pid, script))


def _is_leader(pid, start, script):
    if start != "-":
        return str(_start_time(pid)) == start
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:2] == [b"bash", script.encode()]
    except OSError:
        return False


def _marked(pid, script):
    """Whether the process started with this launch's mark in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARK}={script}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _write_private(path, text):
    """Write `text` to `path`, readable by the owner only, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _alive(pids):
    live = {p[0] for p in _procs()}
    return [pid for pid in pids if pid in live]


def start(script, log, pid_file, grace):
    os.makedirs(os.path.dirname(log) or ".", mode=0o700, exist_ok=True)
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out, \
            open(os.devnull, "rb") as devnull:
        os.fchmod(out.fileno(), 0o600)
        proc = subprocess.Popen(
            ["bash", script], stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env={**os.environ, MARK: script},
        )
    ident = {"pid": proc.pid, "pgid": proc.pid, "start": _start_time(proc.pid)}
    _write_private(pid_file, json.dumps(ident))
    deadline = time.time() + float(grace)
    while time.time() < deadline:
        code = proc.poll()
        if code is not None:
            return {**ident, "exited": code, "tail": _tail(log)}
        time.sleep(0.05)
    return {**ident, "exited": None}


def _tail(path, limit=2000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def status(pgid, start, script, exit_file):
    tree = _job_tree(pgid, start, script)
    code = None
    try:
        with open(exit_file) as f:
            code = int(f.read().strip() or "-1")
    except (OSError, ValueError):
        code = None
    return {"pids": sorted(tree), "exit_code": code}


def _signal_groups(groups, sig):
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(pgid, start, script, timeout):
    tree = _job_tree(pgid, start, script)
    if not tree:
        return {"found": 0, "terminated": 0, "killed": 0, "remaining": []}
    groups = sorted(set(tree.values()))
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.time() + float(timeout)
    while time.time() < deadline and _alive(tree):
        time.sleep(0.05)
    stubborn = _alive(tree)
    if stubborn:
        _signal_groups(groups, signal.SIGKILL)
        for pid in stubborn:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.time() + 5
        while time.time() < end and _alive(stubborn):
            time.sleep(0.05)
    remaining = _alive(tree)
    return {"found": len(tree), "terminated": len(tree) - len(stubborn), "killed": len(stubborn),
            "remaining": remaining}


def _is_python(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0).startswith(b"python")


def stacks(pgid, start, script, out, prefix):
    import shutil

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.isfile(spy):
        return {"files": [], "error": "py-spy is not installed on this host (pip install py-spy)"}
    os.makedirs(out, mode=0o700, exist_ok=True)
    files, errors = [], []
    for pid in sorted(p for p in _job_tree(pgid, start, script) if _is_python(p)):
        try:
            dump = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=30)
        except subprocess.TimeoutExpired:
            errors.append(f"pid {pid}: py-spy did not answer in 30s")
            continue
        if dump.returncode != 0:
            errors.append(f"pid {pid}: {(dump.stderr or dump.stdout).strip()[:300]}")
            continue
        path = os.path.join(out, f"{prefix}-{pid}.txt")
        _write_private(path, dump.stdout)
        files.append(path)
    return {"files": files, "error": "; ".join(errors) or None}


def port(number):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as servers bind: a port whose last connections linger in TIME_WAIT is free; a listening one is not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", int(number)))
        return {"port": sock.getsockname()[1]}
    except OSError as err:
        return {"error": f"port {number} is in use ({err.strerror})"}
    finally:
        sock.close()


def visible_devices(job_env, host_env):
    """The first *_VISIBLE_DEVICES set (the job's value over the host's) as {variable, value, count, source};
    None if none is set or it lists no device (then nothing caps the process count)."""
    for name in VISIBLE_DEVICE_VARS:
        value = job_env.get(name, host_env.get(name))
        if value is not None:
            count = len([d for d in re.split(r"[,\s]+", value) if d])
            source = "the job's envs" if name in job_env else "the host's environment"
            return {"variable": name, "value": value, "count": count, "source": source} if count else None
    return None


def probe(number, *assignments):
    job_env = dict(a.split("=", 1) for a in assignments)
    answer = {"devices": visible_devices(job_env, os.environ)}
    if number != "-":
        answer.update(port(number))
    return answer


def main(argv):
    verbs = {"start": start, "status": status, "stop": stop, "port": port, "probe": probe, "stacks": stacks}
    print(json.dumps(verbs[argv[0]](*argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
