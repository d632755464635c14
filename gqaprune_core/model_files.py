"""Checks on a model's files before (and around) loading them, so that a bad file gives one
clear line instead of a traceback, an unpickled file, or a silently broken model.

- Pickles: weights travel only through safetensors. A directory whose weights are pickled
  (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ...) is refused unless the caller
  passes ``allow_pickle``; even then only transformers' ``weights_only`` unpickler reads it,
  and a file that it blocks (a pickle that would call a function) is reported in one line.
- Tokenizer: a directory without vocabulary files is refused (transformers would build an
  empty tokenizer that fails much later with a misleading message).
- Checkpoints: a pruned gqaprune checkpoint is not a plain model directory; one without its
  ``gqaprune_plan.json`` is named as such (transformers would ask for remote code, or print
  a table of mismatched shapes).
- Shapes: stored tensor shapes are compared with ``config.json`` before transformers loads
  them (a checkpoint of older gqaprune versions without its plan looks like that).
- GGUF: a truncated or corrupt file is named, with what to do.

Every error is a :class:`gqaprune_core.models.ModelLoadError` (a ``ValueError``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gqaprune_core.export.manifest import MANIFEST_NAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# transformers reads pickled weights only under these names
TRANSFORMERS_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
PLAN_NAME = "gqaprune_plan.json"  # checkpoint.PLAN_NAME; not imported: checkpoint imports models
T = TypeVar("T")


def _error(message: str) -> Exception:
    from gqaprune_core.models import ModelLoadError

    return ModelLoadError(message)


def weight_format(path: Path, allow_pickle: bool = False) -> str:
    """``"safetensors"`` or ``"pickle"``: what ``from_pretrained`` will read in ``path``.

    Raises:
        ModelLoadError: no weights at all; pickled weights without ``allow_pickle`` (the files
            named, with how to convert them); pickles transformers cannot read.
    """
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return "safetensors"
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise _error(f"{path} has no weights: expected model.safetensors (or shards with "
                     "model.safetensors.index.json)")
    if not allow_pickle:
        raise _error(f"{path} holds only pickled weights ({', '.join(pickled)}); gqaprune reads "
                     "safetensors only, since unpickling can run code: convert them to "
                     "model.safetensors where you trust the file (transformers' "
                     "save_pretrained does), or pass --allow_pickle (library: "
                     "allow_pickle=True) to read them with torch's weights_only unpickler")
    if not any((path / name).is_file() for name in TRANSFORMERS_PICKLES):
        raise _error(f"{path}: transformers reads pickled weights only as pytorch_model.bin, "
                     f"this directory has {', '.join(pickled)}; convert them to "
                     "model.safetensors")
    return "pickle"


def guard_unpickling(path: Path, load: Callable[[], T]) -> T:
    """``load()``, with a pickle that the ``weights_only`` unpickler blocks turned into one
    line (torch's own message advises turning weights_only off, which would run the code)."""
    try:
        return load()
    except Exception as err:  # pickle's UnpicklingError, matched by name: no pickle import here
        if not any(kind.__name__ == "UnpicklingError" for kind in type(err).__mro__):
            raise
        blocked = next((line.strip() for line in str(err).splitlines()
                        if "GLOBAL" in line or "Unsupported" in line), "")
        raise _error(f"{path}: refused to unpickle the weights: the file asks to run code "
                     f"that torch's weights_only loader blocks ({blocked or 'unsafe content'});"
                     " do not load it, convert a trusted copy to safetensors") from None


def check_not_a_checkpoint(path: Path) -> None:
    """A gqaprune checkpoint (its config's ``model_type`` is ``gqaprune_*``, or it has the plan
    or the manifest) is not a plain model directory: say what it is, and what is missing,
    before transformers asks for ``trust_remote_code``."""
    try:
        declared = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers names the unreadable config
    model_type = str(declared.get("model_type", "")) if isinstance(declared, dict) else ""
    marked = model_type.startswith("gqaprune") or (path / MANIFEST_NAME).is_file()
    if (path / PLAN_NAME).is_file():
        raise _error(f"{path} is a pruned gqaprune checkpoint: load it with "
                     "gqaprune_core.checkpoint.load_pruned (or load_any)")
    if marked:
        raise _error(f"{path} is a pruned gqaprune checkpoint whose {PLAN_NAME} is missing; "
                     "copy it back from the run directory, or re-save the model")


def check_tokenizer_files(path: Path) -> None:
    """A vocabulary file must be there (see :data:`VOCABULARY_FILES`)."""
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise _error(f"{path} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
                     "copy the tokenizer of the model into this directory")


def check_tokenizer(tokenizer: object, path: Path) -> None:
    """A loaded tokenizer must know more than a couple of tokens."""
    if len(tokenizer) < 2:  # type: ignore[arg-type]
        raise _error(f"{path}: the tokenizer loaded with {len(tokenizer)} tokens "  # type: ignore
                     "(its files are empty or unreadable); copy the model's tokenizer files")


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise _error(f"{index}: unreadable shard index ({err})") from err
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(path / name, framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise _error(f"{path / name}: unreadable safetensors file ({err}); re-download or "
                         "re-save the model") from err
    return shapes


def check_weight_shapes(path: Path, config: object) -> None:
    """Every stored tensor that the config's model has must have the config's shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    for name, shape in _stored_shapes(path).items():
        if name in expected and expected[name] != shape:
            plan_hint = (f" A pruned gqaprune checkpoint with layers of different sizes needs "
                         f"its {PLAN_NAME}, which is missing here: copy it back from the run "
                         "directory, or re-save the model")
            raise _error(f"{path}: tensor {name} has shape {list(shape)}, config.json gives "
                         f"{list(expected[name])}.{plan_hint}")


def read_gguf(path: Path):
    """``gguf.GGUFReader`` of ``path``, or one line naming the file and what to do."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise _error(f"{path} is not a readable GGUF file ({' '.join(str(err).split())}): it is "
                     "truncated or corrupt; re-download or re-export it") from err
