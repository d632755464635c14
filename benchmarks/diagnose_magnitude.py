"""Why magnitude pruning collapses on the demo model: channels with tiny weights but large
activations. Reads the magnitude row of a quality results file (channels kept per layer),
recomputes the magnitude ranking, and reports where the layers' largest intermediate
activations rank by weight norm.

    python benchmarks/diagnose_magnitude.py [benchmarks/results/quality_b.json] [--ratio 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

from gqaprune_core.data import calibration_batch  # noqa: E402
from gqaprune_core.models import decoder_layers, load_model  # noqa: E402
from gqaprune_core.unit_importance import channel_scores, layer_saliency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=HERE / "results" / "quality_b.json")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    entry = next(e for e in json.loads(Path(args.results).read_text())["results"]
                 if e["method"] == "magnitude" and e["ratio"] == args.ratio)
    kept = entry["details"]["channels_kept"]
    model, tokenizer = load_model("demo")
    ids = calibration_batch(tokenizer, "demo", 4, 128, 0)
    peaks: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(module, inputs):
            peaks[index] = inputs[0].detach().abs().amax(dim=(0, 1))
        return record

    layers = decoder_layers(model)[:args.layers]
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    saliency = layer_saliency(model, "magnitude", None, list(range(args.layers)))
    for i in range(args.layers):
        order = torch.argsort(channel_scores(saliency[i]), descending=True)
        rank = {int(c): r for r, c in enumerate(order)}
        top = torch.topk(peaks[i], 3)
        print(f"layer {i}: magnitude keeps {kept[i]} of {order.numel()}; largest max|h| channels "
              + ", ".join(f"{c} (|h| {v:.1f}, weight rank {rank[c]}, "
                          f"{'kept' if rank[c] < kept[i] else 'REMOVED'})"
                          for c, v in zip(top.indices.tolist(), top.values.tolist())))


if __name__ == "__main__":
    main()
