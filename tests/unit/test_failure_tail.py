"""A failed job shows the ranks' own error lines, not only torchrun's failure summary that ends the log."""

from __future__ import annotations

from pathlib import Path

from flagscale.jobs import log_tail as _tail

SUMMARY = ["torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "=" * 60, "train_gpt.py FAILED"]
SUMMARY += [f"  line {i}" for i in range(20)]


def test_rank_errors_come_before_the_summary(tmp_path: Path) -> None:
    log = tmp_path / "host.log"
    ranks = ["[default1]:error: tok.json: QwenTokenizerFS needs the tokens <|extra_204|>",
             "[default0]:error: tok.json: QwenTokenizerFS needs the tokens <|extra_204|>",
             "[default0]:Traceback (most recent call last):", '[default0]:  File "x.py", line 1',
             "[default0]:RuntimeError: shapes do not match"]  # fmt: skip
    log.write_text("\n".join(["[default0]:iteration 1", *ranks, *SUMMARY]) + "\n")
    shown = _tail(str(log)).splitlines()
    assert shown[:2] == ["  (rank error) error: tok.json: QwenTokenizerFS needs the tokens <|extra_204|>",
                         "  (rank error) RuntimeError: shapes do not match"]  # fmt: skip
    assert shown[-1] == "  line 19" and len(shown) == 2 + 1 + 15


def test_a_log_without_rank_errors_is_just_its_tail(tmp_path: Path) -> None:
    log = tmp_path / "host.log"
    log.write_text("\n".join(SUMMARY) + "\n")
    assert _tail(str(log)).splitlines() == SUMMARY[-15:]
