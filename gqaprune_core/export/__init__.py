"""Where a pruned model goes once it is cut: files other tools read.

- :mod:`~gqaprune_core.export.shards`: sharded safetensors with the Hugging Face index, written
  as a stream and read lazily (checkpoints and the layer-wise pipeline use it).
- :mod:`~gqaprune_core.export.staging`: write beside, rename into place; stale folders of killed
  saves removed by the next save.
- :mod:`~gqaprune_core.export.manifest`: SHA-256 of every saved file, checked on load.
- :mod:`~gqaprune_core.export.hf_config`: config.json, plain or with the per-layer remote code of
  ``hf_code/`` (package data copied into checkpoints, never imported by gqaprune).
- :mod:`~gqaprune_core.export.model_card`: the README.md of a saved model.
- :mod:`~gqaprune_core.export.checkpoint_files`: every file of one checkpoint, for whole-model
  saves and the layer-wise pipeline alike.
- :mod:`~gqaprune_core.export.gguf` (+ :mod:`~gqaprune_core.export.gguf_tokenizer`): GGUF for
  llama.cpp / ollama / LM Studio (``llama`` when layers are equal, ``deci`` when they differ);
  CLI ``python -m gqaprune_core.export --pruned_model DIR --gguf OUT.gguf --outtype q8_0``.
"""
