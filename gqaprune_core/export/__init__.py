"""Where a pruned model goes once it is cut: files other tools read.

- :mod:`~gqaprune_core.export.shards`: sharded safetensors with the Hugging Face index, written
  as a stream and read lazily (checkpoints and the layer-wise pipeline use it).
"""
