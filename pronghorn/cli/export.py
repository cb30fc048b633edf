"""``pronghorn export``: merge an adapter / convert a model after training."""
from __future__ import annotations


def export_command(args) -> int:
    from pronghorn.models.fast_language_model import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, fast_paths=False)
    if args.save_method:
        model.save_pretrained_merged(args.output_dir, tokenizer, save_method=args.save_method,
                                     overwrite=args.overwrite)
        print(f"{args.save_method}: {args.output_dir}")
    if args.gguf:
        model.save_pretrained_gguf(args.output_dir + "_gguf", tokenizer, quantization_method=args.gguf,
                                   overwrite=args.overwrite)
        print(f"gguf ({args.gguf}): {args.output_dir}_gguf")
    return 0
