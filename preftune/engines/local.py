"""The default engine: preftune's own sampler (:mod:`preftune.generate`) on the live policy."""

from __future__ import annotations

from ..generate import Generation, SamplingSettings, generate_ids


class TransformersEngine:
    """Samples with :func:`preftune.generate.generate_ids` from the very module being trained.

    It holds no copy of the weights: :meth:`sync` only points it at the policy, and sleeping frees
    nothing. Samples are exactly those of ``generate_ids`` for the same seeds."""

    name = "transformers"

    def __init__(self, model, *, pad_token_id: int, eos_token_id: int | None, batch_size: int = 16):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.batch_size = batch_size

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *, seed: int | None = None,
                 row_seeds: list[int] | None = None, prompt_inputs: list[dict] | None = None) -> Generation:
        return generate_ids(self.model, prompt_ids, settings, pad_token_id=self.pad_token_id,
                            eos_token_id=self.eos_token_id, batch_size=self.batch_size, seed=seed,
                            row_seeds=row_seeds, prompt_inputs=prompt_inputs)

    def sync(self, policy) -> None:
        self.model = policy

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
