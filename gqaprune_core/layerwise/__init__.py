"""Layer-wise pruning and evaluation for models larger than memory.

Notation: L layers, N windows of T tokens, B windows per batch, E hidden size, I MLP width.

Instead of loading the whole model, the layer-wise path keeps a *skeleton* (the model with its
decoder layers on the meta device: no memory) plus the embedding, final norm and LM head, and
brings one decoder layer at a time onto the device::

    source weights (lazy safetensors) ──► layer i on the device ──► hidden states (CPU, per batch)
                                              │                       through it
                                              ▼
                                  score / cut / re-fit, write ──► output shards; outputs → layer i+1

Modules: :mod:`.source` (open a model directory lazily, build the skeleton, load one layer),
:mod:`.stream` (hidden states and running one layer over them, with per-layer progress),
:mod:`.importance` (layer scores in one streamed pass), :mod:`.prune` (one layer's cut and
``down_proj`` re-fit), :mod:`.evaluate` (streamed perplexity), :mod:`.output` (the checkpoint
writer), :mod:`.pipeline` (the whole run, and when to use it).

Forward-only methods stream: layer scores ``block_influence`` and ``activation``, group and
channel scores ``magnitude`` and ``random``, and MLP channels by output energy with the
least-squares re-fit. Taylor scores need gradients through the whole model and are refused
(:func:`.pipeline.check_streamable`); so do Fisher channel scores, which the ``default`` preset
adds to energy in memory: layer by layer it keeps energy alone and says so
(:func:`.pipeline.streamable_selection`).
"""
