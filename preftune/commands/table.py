"""Every ``preftune`` command, in one table: its name, its help, its arguments and the function it calls.

``preftune.cli`` builds the parser from :data:`COMMANDS` alone. A command of several words
("annotate token add") sits under its group; :data:`GROUPS` gives each group's help. To add a
command, write its ``*_arguments(parser)`` and ``run_*(args) -> int`` in a module beside this one
(or use :func:`~.training.training_command` for a config-driven trainer) and add its row here.
"""

from __future__ import annotations

from .. import train_dpo, train_grpo, train_kto, train_online_dpo, train_ppo, train_pretrain, train_reward, train_sft
from ..config import (
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
)
from . import Command, annotate, annotate_options, data, demo, evaluate, export, iterate, reward
from .training import training_command

# name -> (help, description) of the commands that only group sub-commands
GROUPS: dict[str, tuple[str, str | None]] = {
    "data": ("Inspect preference datasets.", None),
    "annotate": ("Collect human preferences: web app, items, tokens, export.",
                 "Collect preferences from people: import items, issue tokens, serve the labelling app, then export "
                 "training pairs."),
    "export": ("Write a trained model in another format (GGUF).", None),
    "annotate member": ("Choose who may see and label a project (admins see all).", None),
    "annotate token": ("Issue, list, rotate and revoke annotator tokens.", None),
}

COMMANDS: tuple[Command, ...] = (
    training_command(
        "pretrain", PretrainConfig, train_pretrain,
        help="Train a causal LM on raw text (from a checkpoint or from random weights).",
        description="Next-token prediction on raw text, packed into rows of max_length tokens. Start from "
                    "--model_name_or_path, or from random weights with --model_config and --tokenizer_name_or_path."),
    training_command(
        "sft", SFTConfig, train_sft,
        help="Supervised fine-tuning on prompt/completion rows or conversations.",
        description="Supervised fine-tuning: the loss covers completion (assistant) tokens only unless "
                    "--no-completion_only_loss; --packing packs several examples per row."),
    training_command(
        "reward", RewardConfig, train_reward,
        help="Train a reward model on preference pairs (Bradley-Terry, margin ranking, soft labels).",
        description="A scalar reward model: a one-output classification head on any transformers backbone, read at "
                    "the last token (decoders) or [CLS] (encoders)."),
    training_command(
        "ppo", PPOConfig, train_ppo,
        help="Fine-tune a policy with PPO against a reward model or a reward function (KL-penalised).",
        description="Proximal Policy Optimization for language models: sample responses to the prompts, score them "
                    "(reward_model_path or reward_function), penalise the KL to the starting policy, and update "
                    "policy and critic with clipped objectives."),
    training_command(
        "grpo", GRPOConfig, train_grpo,
        help="Fine-tune a policy with GRPO (DAPO, Dr. GRPO) against reward functions or reward models; no critic.",
        description="Group Relative Policy Optimization: sample num_generations completions per prompt, score them "
                    "(reward_funcs, weighted by reward_weights), use each reward minus its group's mean (scaled by "
                    "scale_rewards) as the advantage, and update with the clipped objective (epsilon, epsilon_high), "
                    "optionally with a k3 KL to the reference (beta)."),
    training_command(
        "rloo", RLOOConfig, train_grpo,
        help="Fine-tune a policy with RLOO (REINFORCE leave-one-out) against reward functions or reward models.",
        description="REINFORCE Leave-One-Out: sample num_generations completions per prompt; each completion's "
                    "baseline is the mean reward of the others, and beta x its KL to the reference is subtracted from "
                    "its reward. The GRPO trainer with advantage=rloo."),
    training_command(
        "online-dpo", OnlineDPOConfig, train_online_dpo,
        help="Online DPO: two completions per prompt from the current policy, a judge picks one, a DPO-family loss.",
        description="Online DPO (Guo et al. 2024): every step samples two completions per prompt from the current "
                    "policy (generation_engine), the judge (a reward model, a Python function or an LLM judge) "
                    "picks the preferred one, and the loss_type (any preference loss of preftune dpo) is applied to "
                    "the fresh pairs against the frozen starting policy."),
    training_command(
        "dpo", DPOConfig, train_dpo,
        help="Train a policy on preference pairs (DPO and its family: IPO, SLiC, rDPO, SimPO, ORPO, CPO, ...).",
        description="Direct Preference Optimization and its family."),
    training_command(
        "kto", KTOConfig, train_kto,
        help="Train a policy on thumbs-up / thumbs-down examples (KTO); preference pairs work too.",
        description="Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on prompt/completion/label rows; "
                    "pairs (prompt/chosen/rejected) give one desirable and one undesirable example each."),
    Command("iterate", iterate.run_iterate, iterate.iterate_arguments, help=iterate.HELP,
            description=iterate.DESCRIPTION),
    Command("score", reward.run_score, reward.score_arguments,
            help="Score prompt/response rows with a reward model; writes each row plus 'reward' (JSONL).",
            description="Reads rows with 'prompt' and 'response' (strings, or lists of messages rendered with the "
                        "chat template) and writes each row with its 'reward' added, in the input order."),
    Command("eval", evaluate.run_eval, evaluate.eval_arguments,
            help="Sample from a model on prompts and measure reward, win rate, KL and diversity."),
    Command("report", evaluate.run_report, evaluate.report_arguments,
            help="Render runs' curves and evaluations into one HTML page."),
    Command("export gguf", export.run_export_gguf, export.gguf_arguments,
            help="Write a run's model (LoRA adapter merged) as a GGUF file.",
            description="Writes the model of a run directory (its model/) or of a model directory as GGUF, with a "
                        "LoRA adapter merged into its base. Llama-family models; tokenizer and chat template "
                        "included."),
    Command("data check", data.run_check, data.check_arguments,
            help="Validate a dataset and report lengths, duplicates and biases."),
    Command("annotate serve", annotate.run_serve, annotate_options.serve_arguments, help="Start the web app."),
    Command("annotate import", annotate.run_import, annotate_options.import_arguments,
            help="Add items (a prompt and 2..N responses) to a project.",
            description="Rows need 'prompt' and the candidates as 'responses' (list), 'response_1', 'response_2', "
                        "... or 'chosen'/'rejected'; optional 'id'. With --model the candidates are sampled "
                        "instead. The project is created if new; the given settings update it."),
    Command("annotate project", annotate.run_project, annotate_options.project_arguments,
            help="List projects, or show / change one."),
    Command("annotate member add", annotate.run_member, annotate_options.member_arguments,
            help="Let an annotator see and label a project."),
    Command("annotate member remove", annotate.run_member, annotate_options.member_arguments,
            help="Take an annotator off a project (their labels are kept)."),
    Command("annotate member list", annotate.run_member, annotate_options.member_list_arguments,
            help="List a project's members."),
    Command("annotate token add", annotate.run_token, annotate_options.token_add_arguments,
            help="Create an annotator (or admin) and print its token once."),
    Command("annotate token rotate", annotate.run_token, annotate_options.token_name_arguments,
            help="Give an annotator a new token (the old one stops working)."),
    Command("annotate token revoke", annotate.run_token, annotate_options.token_name_arguments,
            help="Disable an annotator's token (labels are kept)."),
    Command("annotate token list", annotate.run_token, annotate_options.db_arguments,
            help="List annotators (tokens are not stored, so not shown)."),
    Command("annotate rank", annotate.run_rank, annotate_options.rank_arguments,
            help="Order a project's queue by a reward model (least separated first)."),
    Command("annotate export", annotate.run_export, annotate_options.export_arguments,
            help="Write training pairs (preftune dpo / reward read them)."),
    Command("annotate stats", annotate.run_stats, annotate_options.stats_arguments,
            help="Progress, inter-annotator agreement and per-annotator statistics."),
    Command("annotate migrate", annotate.run_migrate, annotate_options.db_arguments,
            help="Upgrade the database schema (every command also does this)."),
    Command("demo", demo.run_demo, demo.demo_arguments,
            help="Run the built-in controlled-sentiment experiment end to end, offline."),
)
