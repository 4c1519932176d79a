"""The `flagscale` command: the same actions as run.py, found by model name.

    flagscale train tiny_gpt                  # examples/tiny_gpt/conf/train.yaml, detached
    flagscale train tiny_gpt --foreground     # like action=test: live progress, job's exit code
    flagscale train tiny_gpt train.model.train_iters=50 --dryrun
    flagscale serve tiny_gpt [--model-path P] [--port N] [--engine-args JSON]   # examples/tiny_gpt/conf/serve.yaml
    flagscale bench http://127.0.0.1:8000/v1 [-n 64 -c 8] [--input-len 48 --output-len 32 --vocab-size 1024]
    flagscale status [EXP_DIR|MODEL] [--watch]
    flagscale logs [EXP_DIR|MODEL] [-f]
    flagscale stop [EXP_DIR|MODEL]
Without EXP_DIR|MODEL, status/logs/stop act on the last job launched from this account.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import click

from flagscale.config.loader import load_job_config
from flagscale.exceptions import FlagScaleError, JobRecordError
from flagscale.main import compose_config, run_job
from flagscale.runner.base import REPO_ROOT
from flagscale.spec.record import load_record, record_path


def examples_dir() -> Path:
    return Path(os.environ.get("FLAGSCALE_EXAMPLES", REPO_ROOT / "examples"))


def resolve_config(model: str, yaml_name: str | None, default: str) -> tuple[Path, str]:
    """`model [yaml]` -> (config dir, config name); a yaml path is taken as it is."""
    if yaml_name and (yaml_name.endswith((".yaml", ".yml")) or os.sep in yaml_name):
        path = Path(yaml_name).expanduser().resolve()
        return path.parent, path.stem
    conf = examples_dir() / model / "conf"
    if not conf.is_dir():
        known = sorted(p.name for p in examples_dir().iterdir() if (p / "conf").is_dir())
        raise FlagScaleError(f"no example '{model}' (looked in {conf}); known: {', '.join(known)}")
    return conf, yaml_name or default


def _split(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The optional YAML name and the Hydra overrides (anything with '=')."""
    yaml_name = next((a for a in args if "=" not in a), None)
    overrides = [a for a in args if "=" in a]
    extra = [a for a in args if "=" not in a and a != yaml_name]
    if extra:
        raise FlagScaleError(f"unexpected argument(s) {' '.join(extra)}; overrides look like key=value")
    return yaml_name, overrides


def _launch(task: str, model: str, args: tuple[str, ...], action: str) -> int:
    yaml_name, overrides = _split(args)
    config_dir, name = resolve_config(model, yaml_name, task)
    cfg, source = compose_config(config_dir, name, [*overrides, f"action={action}"])
    return run_job(cfg, source)


def _target_exp_dir(target: str | None) -> Path:
    """An exp dir, a model name (its default train config's exp_dir), or the last job."""
    if target is None:
        from flagscale.jobs import state_dir

        last = state_dir() / "last_job"
        if not last.is_file():
            raise JobRecordError("no job launched yet from this account; give an experiment dir")
        return Path(last.read_text().strip())
    if record_path(target).is_file() or Path(target).is_dir():
        return Path(target)
    config_dir, name = resolve_config(target, None, "train")
    cfg, source = compose_config(config_dir, name, [])
    return load_job_config(cfg, source).exp_dir


def _guard(work) -> None:
    try:
        code = work()
    except FlagScaleError as err:
        click.echo(f"error: {err}", err=True)
        code = 2
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """FlagScale: train, serve and tune large models from YAML."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("model")
@click.argument("args", nargs=-1)
@click.option("--foreground", "-F", is_flag=True, help="Run in the foreground with live progress (action=test).")
@click.option("--dryrun", is_flag=True, help="Write the scripts and print the commands; start nothing.")
def train(model: str, args: tuple[str, ...], foreground: bool, dryrun: bool) -> None:
    """Train MODEL with examples/MODEL/conf/train.yaml (or [YAML]); extra args are Hydra overrides."""
    action = "dryrun" if dryrun else "test" if foreground else "run"
    _guard(lambda: _launch("train", model, args, action))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("model")
@click.argument("args", nargs=-1)
@click.option("--model-path", help="The model to serve (engine_args.model of the first deployment).")
@click.option("--port", type=int, help="The port to listen on (engine_args.port of the first deployment).")
@click.option("--engine-args", help="More engine arguments (vLLM's names, or the engine's own) as a JSON "
              "object, e.g. '{\"max_num_seqs\": 8}'.")
@click.option("--foreground", "-F", is_flag=True, help="Stay in the foreground until the server ends (action=test).")
@click.option("--dryrun", is_flag=True, help="Write the scripts and print the commands; start nothing.")
def serve(model: str, args: tuple[str, ...], model_path: str | None, port: int | None, engine_args: str | None,
          foreground: bool, dryrun: bool) -> None:
    """Serve MODEL with examples/MODEL/conf/serve.yaml (or [YAML]); returns once it answers. Extra args are
    Hydra overrides."""
    from flagscale.serve.overrides import serve_overrides

    action = "dryrun" if dryrun else "test" if foreground else "run"
    _guard(lambda: _launch("serve", model, (*args, *serve_overrides(model_path, port, engine_args)), action))


@main.command()
@click.argument("target", required=False)
def stop(target: str | None) -> None:
    """Stop a job (TERM, wait, KILL its recorded process groups on every host)."""
    from flagscale.runner.actions import stop_job

    _guard(lambda: stop_job(_target_exp_dir(target)))


@main.command()
@click.argument("target", required=False)
@click.option("--watch", "-w", is_flag=True, help="Keep showing live progress until the job ends.")
def status(target: str | None, watch: bool) -> None:
    """Show a job's state per host, with its last iteration and loss."""
    from flagscale.runner.actions import query_job, watch_job

    _guard(lambda: watch_job(_target_exp_dir(target)) if watch else query_job(_target_exp_dir(target)))


@main.command()
@click.argument("target", required=False)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (all hosts, prefixed by host).")
@click.option("--lines", "-n", default=50, show_default=True, help="Lines of each host's log to show first.")
def logs(target: str | None, follow: bool, lines: int) -> None:
    """Print each host's log of a job (read on the host itself, shared file system or not)."""
    _guard(lambda: show_logs(_target_exp_dir(target), follow, lines))


def show_logs(exp_dir: Path, follow: bool, lines: int) -> int:
    from flagscale.launcher.launcher import Launcher

    record = load_record(exp_dir)
    launcher = Launcher.from_settings(record.settings)
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else [])]
    logs = [(h.host, h.host.name, h.log_path) for h in record.hosts]
    if (record.info.get("slurm") or {}).get("output"):  # a Slurm job's batch output (srun's own messages)
        logs.append((record.hosts[0].host, "batch", record.info["slurm"]["output"]))
    prefix = len(logs) > 1
    events = (record.info.get("supervisor") or {}).get("events")

    def pump(host, label: str, path: str) -> None:
        for line in launcher.transport(host).stream([*argv, path]):
            click.echo(f"[{label}] {line.rstrip()}" if prefix else line.rstrip())

    threads = [threading.Thread(target=pump, args=log, daemon=True) for log in logs]
    if events:
        threads.append(threading.Thread(target=show_events, args=(Path(events), follow), daemon=True))
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        launcher.close()
    return 0


def show_events(path: Path, follow: bool) -> None:
    """The supervisor's events (launches, failures with their diagnosis, hangs, restarts), one line each."""
    import json
    import time

    seen = 0
    while True:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines[seen:]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            when = time.strftime("%H:%M:%S", time.localtime(event.pop("time", 0)))
            kind = event.pop("event", "?")
            rest = " ".join(f"{k}={v}" for k, v in event.items() if v not in (None, [], ""))
            click.echo(f"[supervisor {when}] {kind} {rest}")
        seen = len(lines)
        if not follow:
            return
        time.sleep(1.0)


@main.command()
@click.argument("url")
@click.option("--model", help="The model name to ask for (default: the first one the server's /v1/models lists).")
@click.option("--requests", "-n", default=32, show_default=True, help="Measured requests.")
@click.option("--concurrency", "-c", default=4, show_default=True, help="Requests in flight at a time.")
@click.option("--max-tokens", default=32, show_default=True, help="New tokens per request (text prompts).")
@click.option("--input-len", type=int, help="Random token-id prompts of this many tokens (with --output-len).")
@click.option("--output-len", type=int, help="New tokens per request for token-id prompts.")
@click.option("--range-ratio", default=1.0, show_default=True, help="Lengths drawn between ratio x length and length.")
@click.option("--vocab-size", type=int, help="Token ids are drawn below it (needed with --input-len).")
@click.option("--warmup", default=2, show_default=True, help="Requests before the measured ones.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures here.")
def bench(url: str, model: str | None, requests: int, concurrency: int, max_tokens: int, input_len: int | None,
          output_len: int | None, range_ratio: float, vocab_size: int | None, warmup: int,
          json_path: Path | None) -> None:
    """Measure any OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000/v1): TTFT, inter-token latency,
    TPOT, end-to-end latency (mean/p50/p95), requests/s and tokens/s of streamed completions."""
    _guard(lambda: run_bench(url, model, requests, concurrency, max_tokens, input_len, output_len, range_ratio,
                             vocab_size, warmup, json_path))


def run_bench(url: str, model: str | None, requests: int, concurrency: int, max_tokens: int, input_len: int | None,
              output_len: int | None, range_ratio: float, vocab_size: int | None, warmup: int,
              json_path: Path | None) -> int:
    from rich.console import Console
    from rich.table import Table

    from flagscale.serve.loadgen import LoadProfile, LoadSpec, run_load, served_models

    url = url.rstrip("/")
    model = model or next(iter(served_models(url)), None)
    if model is None:
        raise FlagScaleError(f"{url}/models lists no model; give --model")
    try:
        if input_len is not None:
            if vocab_size is None:
                raise FlagScaleError("--input-len draws random token ids: give --vocab-size (the model's vocabulary)")
            profile = LoadProfile(input_len=input_len, output_len=output_len or max_tokens, num_prompts=requests,
                                  range_ratio=range_ratio, concurrency=concurrency, warmup_requests=warmup)
            spec = profile.spec(url, model, vocab_size)
        else:
            spec = LoadSpec(url=url, model=model, requests=requests, concurrency=concurrency, max_tokens=max_tokens,
                            warmup=warmup)
    except ValueError as err:
        raise FlagScaleError(str(err)) from None
    console = Console(highlight=False)
    with console.status(f"{requests} requests to {url} ({model}), {concurrency} at a time") as status:
        report = run_load(spec, lambda done, total: status.update(f"request {done}/{total}"))
    figures = report.figures()
    table = Table(title=f"{url} · {model}", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, f"{value:,}" if isinstance(value, int | float) else str(value))
    console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.to_json() + "\n")
        console.print(f"written: {json_path}")
    return 1 if figures["failed"] else 0


@main.command(hidden=True, context_settings={"ignore_unknown_options": True})
@click.option("--config-dir", required=True, type=click.Path(path_type=Path))
@click.option("--config-name", required=True)
@click.argument("overrides", nargs=-1)
def supervise(config_dir: Path, config_name: str, overrides: tuple[str, ...]) -> None:
    """The detached supervisor of a job started by action=run (started by run itself, stopped by stop)."""
    from flagscale.runner.actions import supervise_detached

    def work() -> int:
        cfg, source = compose_config(config_dir, config_name, [*overrides, "action=run"])
        return supervise_detached(load_job_config(cfg, source))

    _guard(work)


if __name__ == "__main__":
    main()
