"""Cross-check preftune's GRPO objectives against TRL 1.16's ``GRPOTrainer._compute_loss`` on identical float64
tensors (per-token log-probs, old log-probs, advantages, masks), called on a trainer object made without
``__init__`` whose log-prob method returns the given tensors. Prints the largest absolute loss difference.

    python bench/trl_grpo_loss_crosscheck.py
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl import GRPOTrainer

from preftune.losses.grpo import grpo_loss

B, T = 8, 7


class Accelerator:
    num_processes = 1
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def pad_across_processes(x, **kwargs):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return logps, old, mask, torch.randn(B, generator=g, dtype=torch.float64), \
        torch.rand(B, T, generator=g, dtype=torch.float64) * 2


def trl_loss(logps, old, mask, adv, entropy, loss_type, level, epsilon_high=0.28, delta=None, off_policy=None,
             top_quantile=1.0):
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        top_entropy_quantile=top_quantile, loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high,
        importance_sampling_level=level, beta=0.0, off_policy_mask_threshold=off_policy, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True), accelerator=Accelerator(),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        max_completion_length=T, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                             use_bias_correction_kl=False, steps_per_generation=1))
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropy, None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "num_items_in_batch": mask.sum().to(torch.float64)}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


CASES = [  # label, TRL loss_type, level, our objective, our aggregation, extra (TRL, ours)
    ("GRPO (grpo)", "grpo", "token", "clip", "sequence_mean", {}, {}),
    ("DAPO (dapo)", "dapo", "token", "clip", "token_mean", {}, {}),
    ("Dr. GRPO (dr_grpo)", "dr_grpo", "token", "clip", "constant", {}, {}),
    ("GSPO (grpo, sequence)", "grpo", "sequence", "clip", "sequence_mean", {}, {}),
    ("LUSPO (luspo, sequence)", "luspo", "sequence", "clip", "sequence_sum", {}, {}),
    ("CISPO (cispo)", "cispo", "token", "cispo", "token_mean", {"epsilon_high": 5.0}, {"epsilon_high": 5.0}),
    ("SAPO (sapo)", "sapo", "token", "sapo", "sequence_mean", {}, {}),
    ("VESPO (vespo)", "vespo", "token", "vespo", "token_mean", {}, {}),
    ("two-sided clip delta 1.3 (dapo)", "dapo", "token", "clip", "token_mean", {"delta": 1.3}, {"delta": 1.3}),
    ("off-policy mask 0.05 (dapo)", "dapo", "token", "clip", "token_mean", {"off_policy": 0.05},
     {"off_policy_threshold": 0.05}),
    ("top_entropy_quantile 0.3 (dapo)", "dapo", "token", "clip", "token_mean", {"top_quantile": 0.3},
     {"top_entropy_quantile": 0.3}),
]


def main():
    print(f"TRL {trl.__version__}, torch {torch.__version__}; 5 random batches of {B} completions x {T} tokens, "
          "float64\n")
    print("| objective | max abs diff, loss |\n| --- | --- |")
    for label, loss_type, level, objective, aggregation, theirs, ours in CASES:
        worst = 0.0
        for seed in range(5):
            logps, old, mask, adv, entropy = batch(seed)
            reference = trl_loss(logps, old, mask, adv, entropy, loss_type, level, **theirs)
            options = {"epsilon_high": 0.28, **ours}
            mine = grpo_loss(logps, adv, mask.bool(), old_logps=old, epsilon_low=0.2, aggregation=aggregation,
                             max_completion_length=T, objective=objective, importance_sampling_level=level,
                             entropy=entropy, **options).loss
            worst = max(worst, abs(mine.item() - reference.item()))
        print(f"| {label} | {worst:.1e} |")


if __name__ == "__main__":
    main()
