"""A load generator for any OpenAI-compatible server: concurrent streamed completions, timed per token.

    report = run_load(LoadSpec(url="http://127.0.0.1:8000/v1", model="tiny_gpt", requests=32, concurrency=4))
    print(report.figures())
    spec = LoadProfile(input_len=32, output_len=16, num_prompts=64, concurrency=8).spec(url, model, vocab_size=512)

Each request is a streamed `/completions` call (greedy, `ignore_eos`, its own number of new tokens, the usage
asked for at the end: the token count comes from it where the server gives it); a prompt is
text, or token ids (a `LoadProfile`: random ids of a length drawn per request, as upstream FlagScale's serve
profile describes them, the same for every run with the same seed). From the server-sent events it records the
time to the first token (TTFT), the gaps between tokens (ITL), the time per output token after the first (TPOT)
and the end-to-end latency; the report gives mean/p50/p95 of each, requests/s and tokens/s over the wall time.
Standard library only (threads and urllib), so it measures a server without adding a client library's overhead
of its own; bounded by the spec's request count and timeout. `flagscale bench URL` runs it from the command line.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

Prompt = str | tuple[int, ...]

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
    """New tokens per request (unless `output_lens` gives each its own)."""
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    """Cycled over the requests: text, or token ids."""
    output_lens: tuple[int, ...] = ()
    """New tokens of each request (cycled); empty: `max_tokens` for all."""
    warmup: int = 0
    """Requests sent (one at a time) and left out before the measured ones: a server's first requests are slow."""
    timeout_s: float = 120.0
    """Per request."""
    more_urls: tuple[str, ...] = ()
    """Other servers of the same model: request i goes to (url, *more_urls)[i % n] (replicas, no load balancer)."""

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.max_tokens < 1 or self.warmup < 0 or not self.prompts:
            raise ValueError("a load needs requests >= 1, concurrency >= 1, max_tokens >= 1, warmup >= 0 and a prompt")

    def request(self, index: int) -> tuple[Prompt, int]:
        """The prompt and the number of new tokens of request `index`."""
        tokens = self.output_lens[index % len(self.output_lens)] if self.output_lens else self.max_tokens
        return self.prompts[index % len(self.prompts)], tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadProfile:
    """A deployment's `profile:` (upstream FlagScale's serve profile): random token-id prompts of `input_len` tokens
    (after a shared `prefix_len`), `output_len` new tokens, both drawn per request between `range_ratio` × the
    length and the length; `num_prompts` requests, `concurrency` at a time (default: all at once, as upstream)."""

    prefix_len: int = 0
    input_len: int = 1024
    output_len: int = 1024
    num_prompts: int = 200
    range_ratio: float = 0.5
    concurrency: int | None = None
    """Requests in flight at a time (None: all of them at once)."""
    warmup_requests: int = 2
    """Requests before the measured ones (left out of the figures)."""
    seed: int = 0
    vocab_size: int | None = None
    """Token ids are drawn below it (default: the model's vocabulary, read from its files)."""
    timeout_s: float = 300.0
    """Per request."""

    def __post_init__(self) -> None:
        counts = {"prefix_len": self.prefix_len, "warmup_requests": self.warmup_requests}
        positive = {"input_len": self.input_len, "output_len": self.output_len, "num_prompts": self.num_prompts,
                    "concurrency": self.concurrency or 1, "vocab_size": self.vocab_size or 1}
        for name, value in {**counts, **positive}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in positive else 0):
                raise ValueError(f"profile.{name} must be a whole number >= {1 if name in positive else 0}, "
                                 f"got {value!r}")
        if not 0 < self.range_ratio <= 1:
            raise ValueError(f"profile.range_ratio must be in (0, 1] (1: every request the full length), "
                             f"got {self.range_ratio!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"profile.timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def longest(self) -> int:
        """Tokens of context the longest request needs (prompt + new tokens)."""
        return self.prefix_len + self.input_len + self.output_len

    def spec(self, url: str, model: str, vocab_size: int) -> LoadSpec:
        """The requests of this profile for a model with `vocab_size` token ids (the profile's own, if set)."""
        vocab = self.vocab_size or vocab_size
        rng = random.Random(self.seed)
        prefix = [rng.randrange(vocab) for _ in range(self.prefix_len)]
        prompts, outputs = [], []
        for i in range(self.num_prompts):
            length = rng.randint(max(1, int(self.input_len * self.range_ratio)), self.input_len)
            start = rng.randrange(vocab)
            prompts.append(tuple(prefix + [(start + i + j) % vocab for j in range(length)]))
            outputs.append(rng.randint(max(1, int(self.output_len * self.range_ratio)), self.output_len))
        return LoadSpec(url=url, model=model, requests=self.num_prompts,
                        concurrency=min(self.concurrency or self.num_prompts, self.num_prompts),
                        max_tokens=self.output_len, prompts=tuple(prompts), output_lens=tuple(outputs),
                        warmup=self.warmup_requests, timeout_s=self.timeout_s)


@dataclass(slots=True)
class RequestTiming:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    """Known when the prompt was token ids."""
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

        def rate(count: int) -> float:
            return round(count / self.wall_s, 1) if self.wall_s else 0.0

        figures: dict[str, Any] = {"requests": len(self.timings), "failed": len(self.timings) - len(ok),
                                   "concurrency": self.spec.concurrency, "wall_s": round(self.wall_s, 3),
                                   "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
                                   "output_tokens_per_s": rate(tokens)}
        if ok and all(t.prompt_tokens is not None for t in ok):
            figures["total_tokens_per_s"] = rate(tokens + sum(t.prompt_tokens or 0 for t in ok))
        series = {"ttft": [t.ttft_s for t in ok], "itl": [g for t in ok for g in t.gaps_s],
                  "tpot": [t.tpot_s for t in ok], "e2el": [t.e2e_s for t in ok]}
        for name, values in series.items():
            present = sorted(v for v in values if v is not None)
            figures[f"{name}_mean_ms"] = round(statistics.fmean(present) * 1000, 2) if present else None
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


def served_models(url: str, timeout_s: float = 10.0) -> list[str]:
    """The model names a server lists at URL/models ([] if it lists none or does not answer)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/models", timeout=timeout_s) as response:
            return [m["id"] for m in json.loads(response.read()).get("data", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def one_request(spec: LoadSpec, prompt: Prompt, max_tokens: int, url: str | None = None) -> RequestTiming:
    """One streamed completion (to `url`, default the spec's), timed from sending to each token's event."""
    url = url or spec.url
    body = json.dumps({"model": spec.model, "prompt": list(prompt) if isinstance(prompt, tuple) else prompt,
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    stamps: list[float] = []
    counted: int | None = None
    ended: float | None = None
    try:
        with urllib.request.urlopen(request, timeout=spec.timeout_s) as response:
            for raw in response:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                now = time.perf_counter()
                counted = (event.get("usage") or {}).get("completion_tokens", counted)
                for choice in event.get("choices") or []:
                    # a token's chunk: text, or none yet (a special token, part of a UTF-8 character); an empty
                    # chunk with a finish_reason only ends the stream
                    if choice.get("text") or choice.get("finish_reason") is None:
                        stamps.append(now)
                    else:
                        ended = now
    except (OSError, ValueError) as err:
        return RequestTiming(ok=False, error=f"{type(err).__name__}: {err}")
    if not stamps and counted and ended is not None:  # the server sent the tokens' text only at the end
        stamps = [ended]
    if not stamps:
        return RequestTiming(ok=False, error="the stream carried no token")
    prompt_tokens = len(prompt) if isinstance(prompt, tuple) else None
    return RequestTiming(ok=True, ttft_s=stamps[0] - started, e2e_s=stamps[-1] - started,
                         tokens=counted or len(stamps), prompt_tokens=prompt_tokens,
                         gaps_s=[b - a for a, b in pairwise(stamps)])


def run_load(spec: LoadSpec, on_done: Callable[[int, int], None] = lambda done, total: None) -> LoadReport:
    """`spec.warmup` requests one at a time (not measured), then `spec.requests`, at most `spec.concurrency` at a
    time; `on_done(done, total)` after each measured request."""
    servers = (spec.url, *spec.more_urls)
    for i in range(spec.warmup * len(servers)):
        one_request(spec, *spec.request(spec.requests + i), servers[i % len(servers)])
    done, lock = [0], threading.Lock()

    def timed(index: int) -> RequestTiming:
        timing = one_request(spec, *spec.request(index), servers[index % len(servers)])
        with lock:
            done[0] += 1
            on_done(done[0], spec.requests)
        return timing

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        timings = list(pool.map(timed, range(spec.requests)))
    return LoadReport(spec=spec, wall_s=time.perf_counter() - started, timings=timings)
