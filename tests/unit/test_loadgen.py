"""flagscale/serve/loadgen.py against a local HTTP server that streams server-sent events on a known clock: the
measured TTFT, inter-token gaps, token counts and rates follow that clock; a server that fails is counted, with
its error, not timed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flagscale.serve.loadgen import LoadSpec, percentile, run_load

FIRST_S, GAP_S, TOKENS = 0.08, 0.03, 5


class Streamer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "tiny":
            self.send_error(404, "no such model")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(FIRST_S)
        tokens = min(TOKENS, body["max_tokens"])
        for i in range(tokens):
            if i:
                time.sleep(GAP_S)
            text = "" if i == 2 else f"t{i}"  # token 2 has no text of its own (a special token, half a character)
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': text, 'finish_reason': None}]})}\n\n".encode())
            self.wfile.flush()
        end = {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": tokens}}
        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Streamer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()


def test_latencies_follow_the_server_s_clock(server: str) -> None:
    report = run_load(LoadSpec(url=server, model="tiny", requests=8, concurrency=4, max_tokens=16))
    figures = report.figures()
    assert figures["requests"] == 8 and figures["failed"] == 0
    assert all(t.tokens == TOKENS and len(t.gaps_s) == TOKENS - 1 for t in report.timings)  # the empty chunk counts
    assert FIRST_S <= figures["ttft_p50_ms"] / 1000 < FIRST_S + 0.1
    assert GAP_S * 0.8 <= figures["itl_p50_ms"] / 1000 < GAP_S + 0.05
    expected_e2e = FIRST_S + (TOKENS - 1) * GAP_S
    assert expected_e2e <= figures["e2el_p50_ms"] / 1000 < expected_e2e + 0.15
    assert figures["output_tokens_per_s"] == pytest.approx(8 * TOKENS / figures["wall_s"], rel=0.01)
    assert report.wall_s < 2 * expected_e2e + 0.3  # 8 requests, 4 at a time: two rounds


def test_a_failing_server_is_counted_not_timed(server: str) -> None:
    figures = run_load(LoadSpec(url=server, model="other", requests=3, concurrency=3)).figures()
    assert figures["failed"] == 3 and figures["ttft_p50_ms"] is None and "404" in figures["first_error"]


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5) and percentile(values, 95) == pytest.approx(95.05)
    assert percentile([3.0], 95) == 3.0


def test_flagscale_bench_measures_a_server_and_writes_json(server: str, tmp_path) -> None:
    from click.testing import CliRunner

    from flagscale.cli import main

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", server, "--model", "tiny", "-n", "6", "-c", "3", "--input-len", "12",
                                       "--output-len", "4", "--vocab-size", "50", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["figures"]
    assert figures["requests"] == 6 and figures["failed"] == 0 and figures["ttft_p50_ms"] / 1000 >= FIRST_S
    assert figures["total_tokens_per_s"] > figures["output_tokens_per_s"]  # the prompt's tokens are known
    failing = CliRunner().invoke(main, ["bench", server, "--model", "other", "-n", "2"])
    assert failing.exit_code == 1 and "failed" in failing.output


def test_requests_are_spread_over_replicas(server: str) -> None:
    import dataclasses

    seen: list[str] = []
    original = Streamer.do_POST

    def counting(self) -> None:
        seen.append(self.server.server_address[1])
        original(self)

    Streamer.do_POST = counting
    other = ThreadingHTTPServer(("127.0.0.1", 0), Streamer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        second = f"http://127.0.0.1:{other.server_address[1]}/v1"
        spec = dataclasses.replace(LoadSpec(url=server, model="tiny", requests=6, concurrency=3, max_tokens=2),
                                   more_urls=(second,))
        figures = run_load(spec).figures()
    finally:
        Streamer.do_POST = original
        other.shutdown()
    assert figures["failed"] == 0 and seen.count(other.server_address[1]) == 3 and len(seen) == 6
