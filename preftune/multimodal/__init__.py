"""Vision-language components: rows with images to batches (:mod:`.data`), batches to completion log-probs
with each pair's images encoded once (:mod:`.logprobs`), and loading the models and choosing what trains
(:mod:`.models`). The training recipes that use them are in :mod:`preftune.modality.vision`."""
