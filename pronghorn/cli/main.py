"""Entry point of ``pronghorn`` / ``python -m pronghorn``."""
from __future__ import annotations

import argparse
import logging
import sys

from pronghorn.config.loading import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pronghorn", description="Fast, lean, exact LLM fine-tuning")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="Fine-tune a model (no --model_name: the embedded default model and data)")
    train.add_argument("--config", help="YAML file with the same keys as these options")
    add_config_arguments(train)

    for name in ("chat", "generate"):
        chat = sub.add_parser(name, help="Talk to a trained model (merged directory, adapter or hub name)")
        chat.add_argument("--model", required=True, help="Model directory or hub name")
        chat.add_argument("--prompt", action="append", help="Answer this prompt and exit (repeatable)")
        chat.add_argument("--max_new_tokens", type=int, default=128)
        chat.add_argument("--temperature", type=float, default=0.0)

    export = sub.add_parser("export", help="Merge / convert a trained adapter or model")
    export.add_argument("--model", required=True, help="Adapter or model directory")
    export.add_argument("--output_dir", required=True)
    export.add_argument("--save_method", default="merged_16bit", help="lora | merged_16bit | merged_4bit")
    export.add_argument("--gguf", default=None, help="Also write GGUF with this quantization (e.g. q8_0)")
    export.add_argument("--overwrite", action="store_true")

    sub.add_parser("doctor", help="Print the environment pronghorn sees")
    sub.add_parser("templates", help="List the registered chat templates")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = args.command or "train"
    if args.command is None:
        args = build_parser().parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    if command == "train":
        from pronghorn.cli.train import train_command

        return train_command(args)
    if command in ("chat", "generate"):
        from pronghorn.cli.chat import chat_command

        return chat_command(args)
    if command == "export":
        from pronghorn.cli.export import export_command

        return export_command(args)
    if command == "doctor":
        from pronghorn.cli.doctor import doctor_command

        return doctor_command()
    if command == "templates":
        from pronghorn.data import list_chat_templates

        print("\n".join(list_chat_templates()))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
