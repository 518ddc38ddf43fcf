"""On-policy distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models") on the shared loop.

Each step (:class:`DistillStep`, the loop's step function) takes a batch of the dataset's rows and picks, from
(seed, step) alone, what the student trains on: with probability ``lmbda`` completions the student samples
itself from the rows' prompts (through the run's generation engine), otherwise the rows' own completions, or
with ``seq_kd`` completions sampled from the teacher. One optimiser update then pulls the student's next-token
distributions towards the teacher's at every completion position, by the generalised JSD
(:func:`preftune.losses.distill.generalized_jsd`, ``beta`` from forward to reverse KL), averaged over the
update's completion tokens. Both distributions are computed chunk by chunk over the completion positions
(:func:`~preftune.losses.distill.chunked_divergence`): no ``[batch, seq, vocab]`` tensor is built; the teacher
runs without gradients.

Teacher and student may differ in size but must share a tokenizer. Held-out rows report the divergence and
both KLs at temperature 1. Exact resume: the choice of each step, the sampling seeds and the update order
are functions of (seed, step, row); the rest is the loop's.
"""

from __future__ import annotations

import functools
import random

import torch
from torch import Tensor, nn

from ..config import DistillConfig
from ..data import load_records
from ..data.packing import LMExample
from ..data.split import report_skipped
from ..data.text import SFTSettings, tokenize_sft
from ..engines import make_engine, online_engine, sample_with
from ..errors import ConfigError
from ..generate import SamplingSettings
from ..logprobs import final_hidden_states, head_logits
from ..losses.distill import chunked_divergence, distill_divergences, generalized_jsd
from ..models import compute_dtype, disable_dropout, freeze, load_causal_lm, load_tokenizer, prepare_policy
from ..runtime.loop import Trainer
from ..runtime.run import RunResult, finish_run, save_final_model, start_run, train_and_eval
from ..runtime.seeds import mix_seed
from ..speed import apply as apply_speed
from .online import OnlineStep, Replies, Sampled, minibatch_updates, pad_rows


class StudentTeacher(nn.Module):
    """The module the loop trains: the student (``policy``) and, outside its parameters, the frozen teacher.
    ``forward`` gives a divergence between the two at every completion position (row-major), chunk by chunk."""

    def __init__(self, student: nn.Module, teacher: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.policy = student
        self.frozen = (teacher,)   # a tuple: never trained, saved, checkpointed or moved with the student
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, divergence, temperature: float = 1.0) -> Tensor:
        teacher = self.frozen[0]
        mask = completion_mask[:, 1:].to(torch.bool)   # state t-1 predicts token t
        student_rows = final_hidden_states(self.policy, input_ids, attention_mask)[:, :-1][mask]
        with torch.no_grad():
            teacher_rows = final_hidden_states(teacher, input_ids, attention_mask)[:, :-1][mask]
        return chunked_divergence(student_rows, teacher_rows, head_logits(self.policy), head_logits(teacher),
                                  divergence, temperature, self.chunk_size)


class DistillTask:
    """A micro-batch of rows (:class:`~preftune.data.packing.LMExample`: ids and the tokens that carry a loss) ->
    the generalised JSD summed over its completion tokens, divided by the update's token count."""

    def __init__(self, cfg: DistillConfig, pad_token_id: int):
        self.cfg = cfg
        self.pad_token_id = pad_token_id

    def collate(self, rows: list[LMExample]) -> dict[str, Tensor]:
        ids, attention = pad_rows([torch.tensor(r.input_ids) for r in rows])
        ids = ids.masked_fill(~attention, self.pad_token_id)
        mask, _ = pad_rows([torch.tensor(r.loss_mask, dtype=torch.bool) for r in rows])
        batch = {"input_ids": ids, "attention_mask": attention.long(), "completion_mask": mask}
        if getattr(rows, "loss_tokens", None) is not None:
            batch["loss_tokens"] = torch.tensor(float(rows.loss_tokens))
        return batch

    def loss(self, model, batch):
        values = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                       functools.partial(generalized_jsd, beta=self.cfg.beta), self.cfg.temperature)
        tokens = batch["loss_tokens"] if "loss_tokens" in batch else max(values.shape[0], 1)
        loss = values.sum() / tokens
        return loss, {"loss": loss.detach()}

    def eval_metrics(self, model, batch):
        """Per row: the summed divergence at the training temperature, both KLs at temperature 1, the tokens."""
        rows = batch["completion_mask"][:, 1:].nonzero()[:, 0]
        count = batch["input_ids"].shape[0]
        jsd = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                    functools.partial(generalized_jsd, beta=self.cfg.beta), self.cfg.temperature)
        both = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                     functools.partial(distill_divergences, beta=self.cfg.beta), 1.0)
        per_row = lambda v: torch.zeros(count, device=v.device).index_add(0, rows, v.float())  # noqa: E731
        return {"jsd": per_row(jsd), "kl_forward": per_row(both[:, 1]), "kl_reverse": per_row(both[:, 2]),
                "tokens": per_row(torch.ones_like(jsd))}

    def eval_summary(self, outputs: list[dict[str, Tensor]]) -> dict[str, float]:
        """Means over every held-out completion token (not of batch means)."""
        total = lambda key: sum(float(o[key].sum()) for o in outputs)  # noqa: E731
        tokens = max(total("tokens"), 1.0)
        return {"loss": total("jsd") / tokens, "kl_forward": total("kl_forward") / tokens,
                "kl_reverse": total("kl_reverse") / tokens}

    @staticmethod
    def loss_tokens(rows: list[LMExample]) -> int:
        return sum(sum(r.loss_mask[1:]) for r in rows)


def train_distill(cfg: DistillConfig, *, model=None, tokenizer=None, teacher=None,
                  teacher_tokenizer=None) -> RunResult:
    """Distil ``cfg.teacher_model_name_or_path`` (or the ``teacher`` object) into the student. ``model`` /
    ``tokenizer`` may be objects; ``teacher_tokenizer`` is checked against the student's when given."""
    cfg.validate(require_model=model is None, require_teacher=teacher is None)
    ctx = start_run(cfg, cfg.sanity_warnings())
    acc = ctx.accelerator
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; sampled completions end at EOS")
    if teacher_tokenizer is None and teacher is None:
        teacher_tokenizer = load_tokenizer(cfg.teacher_model_name_or_path)
    check_same_tokenizer(tokenizer, teacher_tokenizer, cfg)
    train, held = train_and_eval(cfg, _reader(cfg, tokenizer))

    student = prepare_policy(model if model is not None else load_causal_lm(cfg.model_name_or_path), cfg)
    teacher = teacher if teacher is not None else load_causal_lm(cfg.teacher_model_name_or_path,
                                                                 compute_dtype(ctx.precision))
    disable_dropout(teacher)
    apply_speed(teacher, cfg)
    teacher = freeze(teacher).to(acc.device)
    check_vocabularies(student, teacher, tokenizer)

    local = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    if len(train) < local * acc.num_processes:
        raise ConfigError(f"{len(train)} rows are fewer than one batch of {local * acc.num_processes} "
                          "(per_device_batch_size x processes x gradient_accumulation_steps)")
    teacher_engine = make_engine("transformers", teacher, tokenizer, batch_size=cfg.sampling_batch_size)
    step = DistillStep(cfg, online_engine(cfg, student, tokenizer, ctx.run_dir), teacher_engine, tokenizer,
                       student, teacher, local)
    task = DistillTask(cfg, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    trainer = Trainer.from_run(ctx, model=StudentTeacher(student, teacher, cfg.logprob_chunk_size), task=task,
                               train_examples=train, eval_examples=held, unit="samples", step=step,
                               examples_per_step=local * acc.num_processes)
    result = trainer.train()
    model_dir = save_final_model(acc, trainer.unwrapped().policy, tokenizer, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result, {"train_examples": len(train), "eval_examples": len(held)})


def _reader(cfg: DistillConfig, tokenizer):
    """``read(source, split)``: prompt/completion rows (or conversations) tokenised as for SFT."""
    settings = SFTSettings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                           truncation_mode=cfg.truncation_mode, completion_only_loss=True)

    def read(source: str, split: str) -> list[LMExample]:
        records = load_records(source, split=split)
        rows, report = tokenize_sft(records, tokenizer, settings, skip_invalid=cfg.skip_invalid)
        report_skipped(records.name, report)
        return rows

    return read


def check_same_tokenizer(student, teacher, cfg: DistillConfig) -> None:
    """ConfigError, naming both models, unless the two tokenizers map the same strings to the same ids."""
    if teacher is None:
        return
    if student.get_vocab() != teacher.get_vocab() or student.eos_token_id != teacher.eos_token_id:
        raise ConfigError(f"the student ({cfg.model_name_or_path or 'the given model'}) and the teacher "
                          f"({cfg.teacher_model_name_or_path or 'the given teacher'}) have different tokenizers; "
                          "distillation compares their distributions token by token, so they must share one")


def check_vocabularies(student, teacher, tokenizer) -> None:
    """Both output layers cover every token of the shared tokenizer (their widths may differ by padding)."""
    for name, model in (("student", student), ("teacher", teacher)):
        width = model.get_output_embeddings().weight.shape[0]
        if width < len(tokenizer):
            raise ConfigError(f"the {name}'s output layer has {width} tokens, fewer than the tokenizer's "
                              f"{len(tokenizer)}; it was not trained with this tokenizer")


class DistillStep(OnlineStep):
    """One distillation step (:class:`~.online.OnlineStep`): choose the step's completions (the student's
    samples, the dataset's, or the teacher's), then one optimiser update on them."""

    gauges = ("on_policy",)

    def __init__(self, cfg: DistillConfig, engine, teacher_engine, tokenizer, student, teacher, local: int):
        super().__init__(cfg)
        self.samplers = {"student": (engine, student), "teacher": (teacher_engine, teacher)}
        self.tokenizer = tokenizer
        self.local = local
        self.settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p, do_sample=True)

    def source(self, step: int) -> str:
        """What step ``step`` trains on: ``student`` (probability lmbda), else ``teacher`` (seq_kd) or ``dataset``."""
        if random.Random(mix_seed(self.cfg.seed, step)).random() < self.cfg.lmbda:
            return "student"
        return "teacher" if self.cfg.seq_kd else "dataset"

    def sample(self, trainer: Trainer, step: int) -> Sampled:
        rows, ended = trainer.step_examples(step, self.local), None
        source = self.source(step)
        if source != "dataset":
            rows, ended = self.sampled(rows, source, step, trainer.rank * self.local)
        lengths = [sum(r.loss_mask) for r in rows]
        stats = {"on_policy": float(source == "student"), "completions/mean_length": sum(lengths) / len(lengths)}
        examples = [{"prompt": self.tokenizer.decode(r.input_ids[:_prompt_length(r)]),
                     "completion": self.tokenizer.decode(r.input_ids[_prompt_length(r):]), "source": source}
                    for r in rows]
        # the monitors watch the student's own samples (against its first sampled step's)
        replies = Replies([e["completion"] for e in examples], ended, lengths) if source == "student" else None
        return Sampled(rows, stats, examples, len(rows) * trainer.world, replies)

    def sampled(self, rows: list[LMExample], source: str, step: int, first: int) -> tuple[list[LMExample], list]:
        """The rows' prompts with completions sampled by the student or the teacher, and which of them ended."""
        engine, model = self.samplers[source]
        prompts = [r.input_ids[:_prompt_length(r)][-self.cfg.max_prompt_length:] for r in rows]
        seeds = [mix_seed(self.cfg.seed, step, first + i) for i in range(len(rows))]
        generation = sample_with(engine, model, prompts, self.settings, row_seeds=seeds)
        return [LMExample(p + r, [False] * len(p) + [True] * len(r), row.row)
                for p, r, row in zip(prompts, generation.response_ids, rows)], list(generation.ended)

    def update(self, trainer: Trainer, items: list[LMExample], step: int) -> tuple[dict[str, list], int]:
        """One optimiser update over the step's rows, its loss the mean over all their completion tokens."""
        per_update = self.cfg.per_device_batch_size * self.cfg.gradient_accumulation_steps
        return minibatch_updates(trainer, items, epochs=1, per_update=per_update,
                                 micro=self.cfg.per_device_batch_size, seed=self.cfg.seed, step=step,
                                 loss_tokens=DistillTask.loss_tokens)


def _prompt_length(row: LMExample) -> int:
    """Tokens before the first one that carries a loss (the prompt the completion answers)."""
    return row.loss_mask.index(True) if True in row.loss_mask else len(row.loss_mask)
