"""A load generator for any OpenAI-compatible server: concurrent streamed completions, timed per token.

    report = run_load(LoadSpec(url="http://127.0.0.1:8000/v1", model="tiny_gpt", requests=32, concurrency=4))
    print(report.table())

Each request is a streamed `/completions` call (greedy, `max_tokens` new tokens, prompts cycled from the spec);
from the server-sent events it records the time to the first token (TTFT), the gaps between tokens (ITL), the
time per output token after the first (TPOT) and the end-to-end latency; the report gives p50/p95 of each,
requests/s and output tokens/s over the wall time. Standard library only (threads and urllib), so it measures a
server without adding a client library's overhead of its own; bounded by the spec's request count and timeout.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

DEFAULT_PROMPTS = ("Once upon a time, there was a little", "The little dog ran to the", "One day, a girl named",
                   "In the big forest there lived a")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    url: str
    """The server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1."""
    model: str
    requests: int = 32
    concurrency: int = 4
    max_tokens: int = 32
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    timeout_s: float = 120.0
    """Per request."""


@dataclass(slots=True)
class RequestTiming:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


@dataclass(slots=True, kw_only=True)
class LoadReport:
    spec: LoadSpec
    wall_s: float
    timings: list[RequestTiming]

    @property
    def ok(self) -> list[RequestTiming]:
        return [t for t in self.timings if t.ok]

    def figures(self) -> dict[str, Any]:
        """The summary: counts, rates and p50/p95 latencies in milliseconds."""
        ok = self.ok
        tokens = sum(t.tokens for t in ok)
        figures: dict[str, Any] = {"requests": len(self.timings), "failed": len(self.timings) - len(ok),
                                   "concurrency": self.spec.concurrency, "wall_s": round(self.wall_s, 3),
                                   "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
                                   "output_tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0}
        series = {"ttft": [t.ttft_s for t in ok], "itl": [g for t in ok for g in t.gaps_s],
                  "tpot": [t.tpot_s for t in ok], "e2el": [t.e2e_s for t in ok]}
        for name, values in series.items():
            present = sorted(v for v in values if v is not None)
            for q in (50, 95):
                figures[f"{name}_p{q}_ms"] = round(percentile(present, q) * 1000, 2) if present else None
        errors = [t.error for t in self.timings if t.error]
        if errors:
            figures["first_error"] = errors[0]
        return figures

    def to_json(self) -> str:
        return json.dumps({"spec": asdict(self.spec), "figures": self.figures()}, indent=2)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (linear between closest ranks) of an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1] if q < 100 else sorted_values[-1]


def one_request(spec: LoadSpec, prompt: str) -> RequestTiming:
    """One streamed completion, timed from sending to each token's event."""
    body = json.dumps({"model": spec.model, "prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{spec.url.rstrip('/')}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    stamps: list[float] = []
    try:
        with urllib.request.urlopen(request, timeout=spec.timeout_s) as response:
            for raw in response:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if any(choice.get("text") for choice in event.get("choices", [])):
                    stamps.append(time.perf_counter())
    except (OSError, ValueError) as err:
        return RequestTiming(ok=False, error=f"{type(err).__name__}: {err}")
    if not stamps:
        return RequestTiming(ok=False, error="the stream carried no token")
    return RequestTiming(ok=True, ttft_s=stamps[0] - started, e2e_s=stamps[-1] - started, tokens=len(stamps),
                         gaps_s=[b - a for a, b in pairwise(stamps)])


def run_load(spec: LoadSpec) -> LoadReport:
    """`spec.requests` requests, at most `spec.concurrency` at a time."""
    prompts = [spec.prompts[i % len(spec.prompts)] for i in range(spec.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        timings = list(pool.map(lambda prompt: one_request(spec, prompt), prompts))
    return LoadReport(spec=spec, wall_s=time.perf_counter() - started, timings=timings)
