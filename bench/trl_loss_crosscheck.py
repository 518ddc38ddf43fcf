"""Cross-check preftune's preference losses against TRL 1.16's own loss code on identical float64 tensors.

For each loss TRL has, the same random logits (policy) and reference log-probs go to TRL's trainer method
(called on a minimal trainer object built without ``__init__``: ``DPOTrainer._compute_loss``,
``CPOTrainer.get_batch_loss_metrics``, ``ORPOTrainer.get_batch_loss_metrics``) and to preftune's loss,
whose log-probs are computed here from the same logits. Prints the largest absolute difference of
the batch loss per loss, and of the logged rewards, as a Markdown table.

    python bench/trl_loss_crosscheck.py            # needs the bench extra (TRL 1.16)

Convention differences are named in the table's last column and in docs (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, entropy_from_logits, selective_log_softmax

from preftune.data.collate import add_length_weights
from preftune.logprobs import weighted_sums
from preftune.losses import PreferenceLogps, chosen_nll, preference_loss
from preftune.losses.weighting import wpo_weights
from preftune.speed.head import STAT_COLUMNS, token_stats

PAIRS, LENGTH, VOCAB, PROMPT = 6, 14, 11, 4


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


def make_batch(seed: int, dtype: torch.dtype):
    """Chosen rows then rejected rows, each: a prompt of PROMPT tokens, a completion of random length, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    lengths = torch.randint(2, LENGTH - PROMPT + 1, (2 * PAIRS,), generator=g)
    position = torch.arange(LENGTH)
    completion = (position >= PROMPT) & (position < PROMPT + lengths[:, None])
    attention = position < PROMPT + lengths[:, None]
    ids = ids.masked_fill(~attention, 0)
    logits = (2.0 * torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=g)).to(dtype)
    ref_logits = (logits + 0.7 * torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=g).to(dtype))
    return ids, completion.long(), attention.long(), logits, ref_logits


def sums(logits, ids, completion, ld_alpha=None):
    """preftune's side: per-sequence summed completion log-probs and token counts, written here; with ``ld_alpha``
    each token weighted by preftune's LD-DPO weights (its pair collator's ``add_length_weights``)."""
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = completion[:, 1:].to(logits.dtype)
    if ld_alpha is None:
        return (token * mask).sum(-1), mask.sum(-1)
    weights = add_length_weights({"input_ids": ids, "completion_mask": completion}, ld_alpha)["token_weights"]
    return weighted_sums(token * mask, weights[:, 1:]), mask.sum(-1)


def wpo(logits, ids, completion):
    """preftune's WPO weights: its head's per-token statistics (one chunk: every completion row) and ``wpo_weights``."""
    mask = completion[:, 1:].bool()
    rows, targets = logits[:, :-1][mask], ids[:, 1:][mask]
    stats = token_stats(rows, torch.log_softmax(rows, -1), targets)
    return wpo_weights(stats[:, STAT_COLUMNS.index("wpo_aligned")], mask.nonzero()[:, 0], PAIRS)


def ours(batch, names, reference=True, ld_alpha=None, use_weighting=False, **options):
    ids, completion, _, logits, ref_logits = batch
    policy, lengths = sums(logits, ids, completion, ld_alpha)
    ref = sums(ref_logits, ids, completion, ld_alpha)[0]
    lp = PreferenceLogps(policy[:PAIRS], policy[PAIRS:], ref[:PAIRS] if reference else None,
                         ref[PAIRS:] if reference else None, lengths[:PAIRS], lengths[PAIRS:],
                         pair_weights=wpo(logits, ids, completion) if use_weighting else None)
    total, metrics = preference_loss(names, lp, options.pop("beta"), **options)
    if names == "orpo":   # the odds-ratio term only (TRL's NLL covers the prompt too)
        total = total - chosen_nll(lp).mean()
    return total, metrics["rewards/chosen"]


def fused_head(logits):
    """A model called as TRL 1.16's DPOTrainer calls it (``labels=..., fused_lm_head=True``): its fused LM head's
    per-token outputs, zero where the label is -100, computed from ``logits`` with TRL's own helpers."""
    def forward(labels, **kwargs):
        shifted, targets = logits[:, :-1], labels[:, 1:]
        keep = targets != -100
        log_probs = selective_log_softmax(shifted, targets.clamp(min=0)) * keep
        probs = torch.softmax(shifted, -1)
        return FusedCausalLMOutput(
            log_probs=log_probs, entropy=entropy_from_logits(shifted) * keep,
            log_sum_sq_probs=torch.log((probs ** 2).sum(-1)) * keep, mean_logits=shifted.mean(-1) * keep,
            is_top1=(shifted.argmax(-1) == targets) & keep, label_mask=keep)
    return forward


def trl_dpo(batch, loss_types, beta, loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None, use_weighting=False):
    """TRL's ``_compute_loss``; with ``ld_alpha`` its reference runs live (the same fused-head model answering from
    the reference logits), so TRL combines the reference's log-probs itself."""
    ids, completion, attention, logits, ref_logits = batch
    ref = sums(ref_logits, ids, completion)[0]   # precomputed reference log-probs, as TRL's precompute passes them
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={}), accelerator=Accelerator(),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=ld_alpha is None,
        ref_model=fused_head(ref_logits), f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref[:PAIRS], "ref_rejected_logps": ref[PAIRS:]}
    loss = DPOTrainer._compute_loss(trainer, fused_head(logits), inputs, False)
    return loss, torch.tensor(trainer._metrics["train"]["rewards/chosen"][0], dtype=torch.float64)


def pair_batch(batch):
    """The batch in the experimental trainers' format (labels -100 outside the completion)."""
    ids, completion, attention, logits, _ = batch
    labels = ids.masked_fill(completion == 0, -100)
    return {"chosen_input_ids": ids[:PAIRS], "chosen_attention_mask": attention[:PAIRS],
            "chosen_labels": labels[:PAIRS], "rejected_input_ids": ids[PAIRS:],
            "rejected_attention_mask": attention[PAIRS:], "rejected_labels": labels[PAIRS:]}


def trl_experimental(cls, batch, beta, **attributes):
    logits = batch[3]
    trainer = cls.__new__(cls)
    trainer.__dict__.update(is_encoder_decoder=False, pad_token_id=0, padding_value=0, label_pad_token_id=-100,
                            accelerator=Accelerator(), aux_loss_enabled=False, beta=beta, **attributes)
    model = lambda *args, **kw: SimpleNamespace(logits=logits)  # noqa: E731
    loss, metrics = trainer.get_batch_loss_metrics(model, pair_batch(batch))
    if cls is ORPOTrainer:   # the odds-ratio term only: TRL's NLL covers prompt and response, preftune's the response
        loss = loss - metrics["nll_loss"]
    return loss, metrics["rewards/chosen"]


CASES = [
    # (label, our loss_type, our options, TRL call, convention note)
    ("sigmoid", "sigmoid", {}, lambda b, **o: trl_dpo(b, ["sigmoid"], **o), ""),
    ("hinge", "hinge", {}, lambda b, **o: trl_dpo(b, ["hinge"], **o), ""),
    ("ipo (TRL offline) = ipo_norm", "ipo_norm", {}, lambda b, **o: trl_dpo(b, ["ipo"], **o),
     "preftune's `ipo` sums log-ratios; TRL's offline `ipo` is preftune's `ipo_norm`"),
    ("exo_pair", "exo_pair", {"label_smoothing": 0.01},
     lambda b, **o: trl_dpo(b, ["exo_pair"], **o), "TRL makes ε a float32 tensor before taking its log"),
    ("nca_pair", "nca_pair", {}, lambda b, **o: trl_dpo(b, ["nca_pair"], **o), ""),
    ("robust", "robust", {"label_smoothing": 0.2}, lambda b, **o: trl_dpo(b, ["robust"], **o), ""),
    ("bco_pair", "bco_pair", {}, lambda b, **o: trl_dpo(b, ["bco_pair"], **o), ""),
    ("sppo_hard", "sppo_hard", {}, lambda b, **o: trl_dpo(b, ["sppo_hard"], **o), ""),
    ("aot", "aot", {"label_smoothing": 0.1}, lambda b, **o: trl_dpo(b, ["aot"], **o), ""),
    ("aot_unpaired", "aot_unpaired", {"label_smoothing": 0.1},
     lambda b, **o: trl_dpo(b, ["aot_unpaired"], **o), ""),
    ("apo_zero", "apo_zero", {}, lambda b, **o: trl_dpo(b, ["apo_zero"], **o), ""),
    ("apo_down", "apo_down", {}, lambda b, **o: trl_dpo(b, ["apo_down"], **o), ""),
    ("discopop", "discopop", {"discopop_tau": 0.3}, lambda b, **o: trl_dpo(b, ["discopop"], **o), ""),
    ("sft", "sft", {}, lambda b, **o: trl_dpo(b, ["sft"], **o),
     "TRL logs β·log-ratio rewards for every loss; preftune's `sft` (no reference) logs β·log π"),
    ("sigmoid_norm", "sigmoid_norm", {}, lambda b, **o: trl_dpo(b, ["sigmoid_norm"], **o), ""),
    ("MPO: sigmoid + bco_pair + sft", ["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]},
     lambda b, **o: trl_dpo(b, ["sigmoid", "bco_pair", "sft"], **o), ""),
    ("f-DPO forward_kl (sigmoid)", "sigmoid", {"f_divergence_type": "forward_kl"},
     lambda b, **o: trl_dpo(b, ["sigmoid"], **o), ""),
    ("f-DPO js_divergence (sigmoid)", "sigmoid", {"f_divergence_type": "js_divergence"},
     lambda b, **o: trl_dpo(b, ["sigmoid"], **o), ""),
    ("f-DPO forward_kl (ipo_norm)", "ipo_norm", {"f_divergence_type": "forward_kl"},
     lambda b, **o: trl_dpo(b, ["ipo"], **o), ""),
    ("f-DPO js_divergence (sigmoid_norm)", "sigmoid_norm", {"f_divergence_type": "js_divergence"},
     lambda b, **o: trl_dpo(b, ["sigmoid_norm"], **o), ""),
    ("f-DPO alpha_divergence 0.3 (sigmoid)", "sigmoid",
     {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
     lambda b, **o: trl_dpo(b, ["sigmoid"], **o), "float32 only: TRL's α-divergence has no float64 clamp entry"),
    ("ORPO, odds-ratio term", "orpo", {}, lambda b, **o: trl_experimental(ORPOTrainer, b, o["beta"]),
     "TRL casts the odds-ratio inputs to float32; TRL's ORPO NLL covers prompt and response tokens, preftune's "
     "the response tokens (as its `sft` and CPO's NLL, and TRL's)"),
    ("CPO (sigmoid)", "cpo", {"label_smoothing": 0.1, "cpo_alpha": 0.5},
     lambda b, **o: trl_experimental(CPOTrainer, b, o["beta"], loss_type="sigmoid", cpo_alpha=0.5, alpha=0.0,
                                     label_smoothing=0.1, simpo_gamma=0.5), ""),
    ("SimPO (CPOTrainer simpo, cpo_alpha 0)", "simpo", {"simpo_gamma": 0.7},
     lambda b, **o: trl_experimental(CPOTrainer, b, o["beta"], loss_type="simpo", cpo_alpha=0.0, alpha=0.0,
                                     label_smoothing=0.0, simpo_gamma=0.7), ""),
    ("LD-DPO ld_alpha 0.5 (sigmoid)", "sigmoid", {"ld_alpha": 0.5}, lambda b, **o: trl_dpo(b, ["sigmoid"], **o),
     "TRL's reference runs live here (its precompute would combine alike)"),
    ("LD-DPO ld_alpha 0 (ipo_norm)", "ipo_norm", {"ld_alpha": 0.0}, lambda b, **o: trl_dpo(b, ["ipo"], **o), ""),
    ("LD-DPO ld_alpha 0.3 (sigmoid_norm)", "sigmoid_norm", {"ld_alpha": 0.3},
     lambda b, **o: trl_dpo(b, ["sigmoid_norm"], **o), ""),
    ("WPO use_weighting (sigmoid)", "sigmoid", {"use_weighting": True}, lambda b, **o: trl_dpo(b, ["sigmoid"], **o),
     ""),
    ("WPO use_weighting (MPO: sigmoid + bco_pair)", ["sigmoid", "bco_pair"],
     {"use_weighting": True, "loss_weights": [0.8, 0.2]}, lambda b, **o: trl_dpo(b, ["sigmoid", "bco_pair"], **o),
     ""),
    ("WPO use_weighting + LD-DPO 0.5 (hinge)", "hinge", {"use_weighting": True, "ld_alpha": 0.5},
     lambda b, **o: trl_dpo(b, ["hinge"], **o), ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print(f"TRL {trl.__version__}, torch {torch.__version__}; {args.seeds} random batches of {PAIRS} pairs, "
          f"float64 unless noted\n")
    print("| loss | TRL | max abs diff, loss | max abs diff, rewards/chosen | convention |")
    print("| --- | --- | --- | --- | --- |")
    for label, names, options, trl_call, note in CASES:
        dtype = torch.float32 if "float32" in note else torch.float64
        beta = 2.0 if names in ("simpo", "sigmoid_norm") else 0.1
        options = {**options, "beta": beta}
        trl_options = {k: v for k, v in options.items() if k not in ("cpo_alpha", "simpo_gamma")}
        loss_diff = reward_diff = 0.0
        for seed in range(args.seeds):
            batch = make_batch(seed, dtype)
            mine, mine_reward = ours(batch, names, reference=True, **dict(options))
            theirs, their_reward = trl_call(batch, **trl_options)
            loss_diff = max(loss_diff, abs(mine.item() - float(theirs)))
            reward_diff = max(reward_diff, abs(mine_reward.item() - float(their_reward)))
        trl_name = {"ORPO, odds-ratio term": "ORPOTrainer", "CPO (sigmoid)": "CPOTrainer"}.get(label, "DPOTrainer")
        if label.startswith("SimPO"):
            trl_name = "CPOTrainer"
        print(f"| {label} | {trl_name} | {loss_diff:.1e} | {reward_diff:.1e} | {note} |")


if __name__ == "__main__":
    main()
