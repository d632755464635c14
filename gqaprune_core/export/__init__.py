"""Where a pruned model goes once it is cut: files other tools read.

- :mod:`~gqaprune_core.export.shards`: sharded safetensors with the Hugging Face index, written
  as a stream and read lazily (checkpoints and the layer-wise pipeline use it).
- :mod:`~gqaprune_core.export.gguf` (+ :mod:`~gqaprune_core.export.gguf_tokenizer`): GGUF for
  llama.cpp / ollama / LM Studio (``llama`` when layers are equal, ``deci`` when they differ);
  CLI ``python -m gqaprune_core.export --pruned_model DIR --gguf OUT.gguf --outtype q8_0``.
"""
