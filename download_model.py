"""Import a causal LM into the BentoML model store.

    python download_model.py                       # GPT-2 from the Hugging Face Hub
    python download_model.py --model-id distilgpt2 # another GPT-2-family model
    python download_model.py --from-dir PATH       # a local HF directory, or the seed layout
    python download_model.py --random-init [--tiny]  # offline: random weights, real GPT-2 tokenizer

Importing the same source again prints the existing tag; --force re-imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OFFLINE_HINT = (
    "Offline options: `python download_model.py --from-dir PATH` imports a local "
    "Hugging Face directory; `python download_model.py --random-init` builds GPT-2 "
    "with random weights (the text is meaningless)."
)


class ImportFailed(Exception):
    """A clear, one-message reason the import could not be done."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="gpt2", help="model store name (default: gpt2)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-id", default="gpt2", help="hub id of a GPT-2-family model")
    source.add_argument("--from-dir", type=Path, help="local Hugging Face model directory")
    source.add_argument("--random-init", action="store_true", help="seeded random weights")
    parser.add_argument("--revision", default="main", help="hub revision (default: main)")
    parser.add_argument("--tiny", action="store_true", help="with --random-init: a 2-layer toy")
    parser.add_argument("--force", action="store_true", help="import again even if present")
    args = parser.parse_args(argv)
    if args.tiny and not args.random_init:
        parser.error("--tiny only goes with --random-init")
    return args


def source_of(args: argparse.Namespace) -> str:
    if args.random_init:
        from textgen.models import RANDOM_SEED

        return f"random:gpt2-{'tiny' if args.tiny else '124m'}:seed{RANDOM_SEED}"
    if args.from_dir is not None:
        return f"dir:{args.from_dir.resolve()}"
    return f"hub:{args.model_id}@{args.revision}"


def load(args: argparse.Namespace) -> tuple[object, object, dict[str, object]]:
    """Model, tokenizer and extra metadata for the chosen source."""
    if args.random_init:
        from textgen.models import RANDOM_SEED, gpt2_tokenizer, random_gpt2

        return random_gpt2(tiny=args.tiny), gpt2_tokenizer(), {"random_seed": RANDOM_SEED}
    if args.from_dir is not None:
        return load_dir(args.from_dir)
    return load_hub(args.model_id, args.revision)


def load_dir(path: Path) -> tuple[object, object, dict[str, object]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise ImportFailed(f"--from-dir {path}: no such directory")
    # The seed tutorial's layout: PATH/model and PATH/tokenizer.
    model_dir, tokenizer_dir = (
        (path / "model", path / "tokenizer") if (path / "model").is_dir() else (path, path)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ImportFailed(
            f"--from-dir {path}: not a Hugging Face model directory ({exc})"
        ) from None
    return model, tokenizer, {"local_dir": str(path.resolve())}


def check_hub_reachable(model_id: str, timeout: float = 10.0) -> None:
    """Fails fast when the hub can't be reached, instead of the client's minute of retries."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # offline mode loads from the local cache
    url = f"{constants.ENDPOINT}/api/models/{model_id}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return  # the hub answered; from_pretrained reports what it said
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImportFailed(
            f"The Hugging Face Hub ({constants.ENDPOINT}) is unreachable: {reason}\n{OFFLINE_HINT}"
        ) from None


def load_hub(model_id: str, revision: str) -> tuple[object, object, dict[str, object]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_hub_reachable(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision)
    except Exception as exc:  # the hub client raises many kinds when it can't connect
        raise ImportFailed(
            f"Could not download {model_id!r} (revision {revision!r}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreachable'}\n"
            f"{OFFLINE_HINT}"
        ) from None
    commit = getattr(model.config, "_commit_hash", None)
    return model, tokenizer, {"hub_id": model_id, "revision": revision, "commit": commit}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from textgen.store import find_imported, import_model

    source = source_of(args)
    existing = None if args.force else find_imported(args.name, source)
    if existing is not None:
        print(f"{existing.tag} (already imported from {source}; --force to import again)")
        return 0
    try:
        model, tokenizer, extra = load(args)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "gpt2":
        print(
            f"error: the engine serves GPT-2 architectures; {source} is {model_type!r}",
            file=sys.stderr,
        )
        return 2
    tag = import_model(
        args.name, model, tokenizer, source, random_weights=args.random_init, **extra
    )
    if args.random_init:
        print(
            "warning: RANDOM WEIGHTS: the service will generate meaningless text", file=sys.stderr
        )
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
