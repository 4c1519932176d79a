"""Real Megatron-Core training on 2 hosts x 1 process, launched over SSH (two sshd on loopback
addresses), gloo over lo. Converges, completes, and leaves no process on any host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_CONF, group_members, run_py, tiny_overrides
from tests.helpers.requires import requirement
from tests.helpers.sshd import SSHCluster, sshd_available

pytestmark = pytest.mark.integration
_sshd = requirement(sshd_available(), "needs root and openssh-server (apt-get install openssh-server)")

SMALL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 2, "seq_length": 64,
         "max_position_embeddings": 64, "global_batch_size": 8, "train_iters": 30, "eval_interval": 15}


def test_two_hosts_train_over_ssh(tiny_data: Path, tmp_path: Path) -> None:
    cluster = SSHCluster(tmp_path / "ssh")
    try:
        cluster.start("127.0.0.2")
        cluster.start("127.0.0.3")
        hostfile = cluster.hostfile(tmp_path / "hostfile.txt")
        proc = run_py(*TINY_CONF, "action=test", *tiny_overrides(tiny_data, tmp_path / "exp", **SMALL),
                      f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2",
                      "experiment.runner.nproc_per_node=1", "+experiment.envs.GLOO_SOCKET_IFNAME=lo",
                      env=cluster.env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        record = json.loads((tmp_path / "exp" / "job.json").read_text())
        assert [h["host"]["name"] for h in record["hosts"]] == ["127.0.0.2", "127.0.0.3"]
        assert record["master_addr"] == "127.0.0.2"
        metrics = next((tmp_path / "exp" / "logs").glob("*/metrics.jsonl"))
        events = [json.loads(line) for line in metrics.read_text().splitlines()]
        start = next(e for e in events if e["event"] == "start")
        assert start["world_size"] == 2 and start["dp"] == 2
        losses = [e["loss"] for e in events if e["event"] == "train"]
        assert losses[-1] < losses[0] - 1.0, losses
        assert not group_members([h["pgid"] for h in record["hosts"]])
    finally:
        cluster.stop_all()
