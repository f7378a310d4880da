"""The `flock` command: one module per subcommand, registered in COMMANDS.

Each module has `register(subparsers)`, which adds its parser and sets `func(args, settings) -> exit code`.
The CLI sits above every layer it calls (service, router, adapters, training, eval, bench); nothing imports it.
"""

from __future__ import annotations

import argparse
import logging

from cli import bench, describe, evaluate, experts, loadtest, prepare, route, serve, soak, train, train_gates
from service.request_id import RequestIdFilter
from service.settings import Settings

COMMANDS = (serve, prepare, route, experts, train, train_gates, describe, evaluate, bench, loadtest, soak)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flock", description="OpenAI-compatible gateway routing each request "
                                     "across a pool of LoRA experts served by vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: "
                        "%(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    for noisy in ("httpx", "httpcore", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    return args.func(args, settings)
