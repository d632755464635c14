"""``python -m gqaprune_core.export``: write a pruned (or dense) model as GGUF for llama.cpp.

Example::

    python -m gqaprune_core.export --pruned_model prune_log/demo20/model --gguf demo20.gguf \\
        --outtype q8_0

``--pruned_model`` takes a gqaprune checkpoint directory, a Hugging Face model directory or
``demo``. Bad input (unknown out type, not a model directory, an existing output without
``--overwrite``, a tokenizer llama.cpp cannot reproduce) prints one line on stderr and exits 2;
nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gqaprune_core.export.gguf import OUT_TYPES, export_gguf

PROGRAM = "gqaprune.export"


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m gqaprune_core.export",
        description="Write a gqaprune checkpoint, a Hugging Face model directory or the demo "
                    "model as a GGUF file (llama.cpp, ollama, LM Studio).")
    parse.add_argument("--pruned_model", required=True,
                       help="gqaprune checkpoint directory (prune_log/NAME/model), a Hugging "
                            "Face model directory, or 'demo'")
    parse.add_argument("--gguf", required=True, help="output file, e.g. model.gguf")
    parse.add_argument("--outtype", default="f16", choices=OUT_TYPES,
                       help="tensor type (default f16; q4_k_m uses llama.cpp's quantizer from "
                            "llama-cpp-python)")
    parse.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; 0 ok, 2 bad input (one line on stderr), 130 interrupted."""
    args = parser().parse_args(argv)  # exits 2 with argparse's message on bad flags
    try:
        result = export_gguf(args.pruned_model, args.gguf, args.outtype, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # GgufExportError, ModelLoadError, CheckpointError, ...
        print(f"{PROGRAM}: error: {' '.join(str(err).split()) or type(err).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted (no output written)", file=sys.stderr)
        return 130
    print(f"wrote {result.path} ({result.architecture}, {result.outtype}, "
          f"{result.size_bytes / 2**20:.1f} MiB, {result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
