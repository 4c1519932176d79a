"""job.json: the typed launcher settings round-trip, records written before they had a version load, and a
newer settings version is one clear error."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from flagscale.config.hostfile import LOCALHOST
from flagscale.exceptions import JobRecordError
from flagscale.launcher.launcher import Launcher
from flagscale.spec.record import HostRecord, JobRecord, LauncherSettings, load_record, record_path

SETTINGS = LauncherSettings(python=sys.executable, ssh_port=2222, strict_host_key_checking=False,
                            connect_timeout=3.0, no_shared_fs=True, stop_timeout=4.0)  # fmt: skip


def record(exp_dir: Path) -> JobRecord:
    host = HostRecord(host=LOCALHOST, node_rank=0, pgid=123, script="s.sh", log_path="l.log", exit_file="e",
                      started_at=time.time())  # fmt: skip
    return JobRecord(run_id="r1", task_type="train", exp_name="t", exp_dir=str(exp_dir), log_dir=str(exp_dir),
                     created_at=time.time(), hosts=[host], settings=SETTINGS, master_addr="localhost",
                     master_port=None)  # fmt: skip


def test_settings_round_trip_and_build_the_launcher(tmp_path: Path) -> None:
    record(tmp_path).save()
    loaded = load_record(tmp_path)
    assert loaded.settings == SETTINGS
    launcher = Launcher.from_settings(loaded.settings)
    ssh = launcher.ssh
    assert (ssh.port, ssh.strict_host_key_checking, ssh.connect_timeout) == (2222, False, 3.0)
    assert launcher.shared_fs is False and launcher.python == sys.executable


def test_settings_without_a_version_load_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    record(tmp_path).save()
    data = json.loads(record_path(tmp_path).read_text())
    del data["settings"]["version"]  # as records written before the settings were typed
    record_path(tmp_path).write_text(json.dumps(data))
    assert load_record(tmp_path).settings == SETTINGS
    data["settings"]["version"] = 99
    record_path(tmp_path).write_text(json.dumps(data))
    with pytest.raises(JobRecordError, match="launcher settings version 99"):
        load_record(tmp_path)
