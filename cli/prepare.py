"""`flock prepare`: convert the base model to a bf16 checkpoint vLLM loads (once)."""

from __future__ import annotations

import argparse

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("prepare", help="convert the base model to a bf16 checkpoint (once)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from service.models import convert_base_model

    convert_base_model(settings.resolved_base_model_dir)
    return 0
