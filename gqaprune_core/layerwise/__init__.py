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
:mod:`.importance` (layer scores in one streamed pass), :mod:`.fisher` (loss-weighted channel
scores: a forward pass keeping each layer's input, then a backward pass last layer first),
:mod:`.prune` (one layer's cut and ``down_proj`` re-fit), :mod:`.evaluate` (streamed
perplexity), :mod:`.output` (the checkpoint writer), :mod:`.pipeline` (the whole run, and
when to use it).

What streams: layer scores ``block_influence``, ``activation`` and ``removal``, group and
channel scores ``magnitude`` and ``random``, and MLP channels by output energy and Fisher
scores (the ``default`` preset's) with the least-squares re-fit. Taylor scores need gradients
for every weight through the whole model and are refused (:func:`.pipeline.check_streamable`);
the backward pass's store of hidden states for Fisher scores goes to disk when it would not
fit in host memory, and channels fall back to energy alone, with a note, when it fits neither
(:func:`.fisher.streamable_selection`).
"""
