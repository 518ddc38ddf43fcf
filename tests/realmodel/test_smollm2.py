"""preftune on a real chat model (SmolLM2-135M-Instruct, 134.5M parameters), at small sizes."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import write_jsonl
from preftune.models import load_causal_lm
from toydata import make_toy_preferences

END_OF_TURN = "<|im_end|>"
NOISY = (FutureWarning, DeprecationWarning, PendingDeprecationWarning, UserWarning)
QUESTION = [{"role": "user", "content": "Answer in one word: what colour is a clear daytime sky?"}]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def chat_ids(tokenizer):
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)
    return rendered["input_ids"]


def small_run(**overrides):
    values = dict(per_device_batch_size=2, max_length=128, logging_steps=1, max_steps=3, warmup_ratio=0.0, seed=0,
                  lora=True, lora_r=8, lora_alpha=16, learning_rate=2e-3)
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory):
    """Two conversational pairs: every step sees the same two, so the loss must fall."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_toy_preferences(2, conversational=True))


def test_loading_the_gguf_equals_loading_its_converted_checkpoint(smollm2_gguf, smollm2_tokenizer, one_thread):
    from preftune.gguf_import import load_gguf

    direct, direct_tokenizer = load_gguf(smollm2_gguf)
    ids = chat_ids(smollm2_tokenizer)
    assert direct_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"] == ids
    with torch.no_grad():
        expected = direct(torch.tensor([ids])).logits
        got = load_causal_lm(str(smollm2_gguf))(torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)   # the conversion stores the de-quantised fp32 weights


def test_lora_dpo_on_conversational_pairs_starts_at_ln2_and_learns(smollm2_dir, two_pairs, tmp_path, one_thread):
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    cfg = DPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(two_pairs), output_dir=str(tmp_path / "dpo"),
                    cache_dir=str(tmp_path / "ref-cache"), **small_run())
    cfg.validate()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_dpo(cfg)
    assert [str(w.message) for w in seen if issubclass(w.category, NOISY)] == []   # none a user cannot act on
    losses = [r["loss"] for r in records(tmp_path / "dpo")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)     # LoRA starts as the reference
    assert losses[-1] < losses[0] - 1e-3


def test_sft_step_on_messages_learns(smollm2_dir, tmp_path, one_thread):
    from preftune.config import SFTConfig
    from preftune.recipes.sft import train_sft

    rows = [{"messages": QUESTION + [{"role": "assistant", "content": "Blue, like a calm sea."}]},
            {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}]}]
    cfg = SFTConfig(model_name_or_path=str(smollm2_dir), dataset=str(write_jsonl(tmp_path / "sft.jsonl", rows)),
                    output_dir=str(tmp_path / "sft"), **small_run())
    cfg.validate()
    train_sft(cfg)
    losses = [r["loss"] for r in records(tmp_path / "sft")]
    assert 0 < losses[0] < 8 and losses[-1] < losses[0] - 1e-2     # a pretrained model: far below ln(49152) = 10.8


def test_reward_model_learns_and_scores_the_same_through_transformers(smollm2_dir, two_pairs, tmp_path, one_thread):
    """SmolLM2 has pad == EOS: the saved model must still be read at the same token by transformers."""
    from transformers import AutoModelForSequenceClassification

    from preftune.config import RewardConfig
    from preftune.models import load_tokenizer
    from preftune.recipes.reward import train_reward
    from preftune.scoring.files import score_file
    from preftune.scoring.reward_model import tokenize_for_scoring

    cfg = RewardConfig(model_name_or_path=str(smollm2_dir), dataset=str(two_pairs), output_dir=str(tmp_path / "rm"),
                       merge_lora=True, **small_run())
    cfg.validate()
    saved = train_reward(cfg).model_dir
    losses = [r["loss"] for r in records(tmp_path / "rm")]
    assert losses[-1] < losses[0] - 1e-3
    rows = [{"prompt": QUESTION, "response": "Blue."}, {"prompt": QUESTION, "response": "It is green, with stripes."},
            {"prompt": [{"role": "user", "content": "Name a fruit."}], "response": "A pear."}]
    scored = score_file(saved, write_jsonl(tmp_path / "score.jsonl", rows), tmp_path / "scored.jsonl", batch_size=3,
                        device="cpu").output
    ours = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    tokenizer = load_tokenizer(str(saved))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # the input TRL's RewardTrainer and GRPO build: the whole conversation through the chat template
    sequences = [list(tokenizer.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["response"]}],
                                                    tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    assert sequences == [p + r for p, r in tokenize_for_scoring(tokenizer, [r["prompt"] for r in rows],
                                                                [r["response"] for r in rows])]
    assert all(s[-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
               for s in sequences)   # <|im_end|>\n, as the template ends the turn
    library = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    assert library.config.pad_token_id == tokenizer.pad_token_id
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        alone = [library(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits.item()
                 for s in sequences]
        batch = library(ids, attention_mask=mask).logits.squeeze(-1).tolist()
    assert ours == pytest.approx(alone, abs=1e-4) and ours == pytest.approx(batch, abs=1e-4)
    assert max(ours) - min(ours) > 1e-3    # three different scores, not one constant


def test_generation_with_the_chat_template_stops_at_end_of_turn(smollm2_dir, smollm2_tokenizer, one_thread):
    from preftune.generate import SamplingSettings, encode_prompts, generate_ids

    tokenizer = smollm2_tokenizer
    assert tokenizer.eos_token == END_OF_TURN
    prompt = encode_prompts(tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]])
    assert tokenizer.decode(prompt[0]).endswith("<|im_start|>assistant\n")
    greedy = SamplingSettings(max_new_tokens=40, do_sample=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generation = generate_ids(load_causal_lm(str(smollm2_dir)), prompt, greedy,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert [str(w.message) for w in seen if issubclass(w.category, NOISY)] == []   # the current KV-cache API
    response = generation.response_ids[0]
    assert generation.ended[0] and response[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert END_OF_TURN not in tokenizer.decode(response[:-1])
    assert "paris" in tokenizer.decode(response, skip_special_tokens=True).lower()


def test_cli_dpo_from_the_gguf_file_saves_a_loadable_adapter(smollm2_gguf, smollm2_dir, smollm2_tokenizer, two_pairs,
                                                              tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    args = ["--model_name_or_path", str(smollm2_gguf), "--lora", "--dataset", str(two_pairs), "--output_dir", str(run),
            "--max_steps", "2", "--per_device_batch_size", "2", "--max_length", "128", "--learning_rate", "2e-3",
            "--logging_steps", "1", "--cache_dir", str(tmp_path / "ref-cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", *args], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = run / "model"
    assert (saved / "adapter_config.json").is_file()
    base_name = json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == str(smollm2_gguf)        # the file the user gave, not preftune's cache of its conversion
    ids = torch.tensor([chat_ids(smollm2_tokenizer)])
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), saved)   # its conversion
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4      # two steps changed the model


def test_export_gguf_round_trips_smollm2(smollm2_dir, smollm2_tokenizer, tmp_path, one_thread):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.export_gguf import export_gguf

    output = tmp_path / "smollm2-f16.gguf"
    export_gguf(smollm2_dir, output, "f16")
    reader = gguf.GGUFReader(output)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == smollm2_tokenizer.eos_token_id
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=output.name)
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=output.name)
    ids = chat_ids(smollm2_tokenizer)
    assert back_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] == ids
    with torch.no_grad():
        expected = load_causal_lm(str(smollm2_dir))(torch.tensor([ids])).logits
        got = back(torch.tensor([ids])).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-2     # f16 weights: 1e-2 relative


def test_kto_on_pairs_split_in_two_starts_at_one_half_and_learns(smollm2_dir, two_pairs, tmp_path, one_thread):
    from preftune import KTOConfig, train_kto

    cfg = KTOConfig(model_name_or_path=str(smollm2_dir), dataset=str(two_pairs), output_dir=str(tmp_path / "kto"),
                    cache_dir=str(tmp_path / "ref-cache"), **small_run(per_device_batch_size=4))
    cfg.validate()
    train_kto(cfg)
    losses = [r["loss"] for r in records(tmp_path / "kto")]
    assert losses[0] == pytest.approx(0.5, abs=1e-5)     # r = 0 and z0 = 0 at the start: 1 - σ(0) per example
    assert losses[-1] < losses[0] - 1e-3


def test_grpo_step_on_chat_prompts_with_a_python_reward(smollm2_dir, tmp_path, one_thread):
    from preftune import GRPOConfig, train_grpo

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": QUESTION}] * 4)
    (tmp_path / "short.py").write_text("def short(prompts, completions, **kw):\n"
                                       "    return [1.0 / (1 + len(c.split())) for c in completions]\n")
    cfg = GRPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(prompts), output_dir=str(tmp_path / "grpo"),
                     reward_funcs=[f"{tmp_path / 'short.py'}:short"], num_generations=2, max_completion_length=8,
                     per_device_batch_size=4, max_steps=2, logging_steps=1, lora=True, lora_r=8, lora_alpha=16,
                     learning_rate=1e-3, seed=0)
    cfg.validate()
    train_grpo(cfg)
    rows = records(tmp_path / "grpo")
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) and 0 < r["reward"] <= 1 for r in rows)
    assert (tmp_path / "grpo" / "model" / "adapter_config.json").exists()


def test_eval_on_chat_prompts_with_a_function_judge_and_conversational_pairs(smollm2_dir, tmp_path, one_thread):
    from preftune.cli import main

    france = [{"role": "user", "content": "What is the capital of France?"}]

    seen = tmp_path / "seen.jsonl"
    (tmp_path / "judge.py").write_text(
        "import json\n"
        "def judge(prompts, responses):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps([prompts, responses]) + '\\n')\n"
        "    return [float('paris' in r.lower()) for r in responses]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": france}])
    pair = {"prompt": france, "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}]}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(smollm2_dir), "--prompts", str(prompts), "--max_new_tokens", "12",
                 "--temperature", "0.01", "--judge", f"function:{tmp_path / 'judge.py'}:judge", "--pairs", str(pairs),
                 "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    sample = json.loads((out / "samples.jsonl").read_text())
    assert sample["prompt"] == france and END_OF_TURN not in sample["response"]
    assert "paris" in sample["response"].lower() and metrics["reward"] == 1.0   # the chat template was applied
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls == [[[france], [sample["response"]]], [[france], ["Paris."]], [[france], ["Lyon."]]]
    assert metrics["pair_accuracy"] == 1.0


def test_data_check_on_conversational_pairs_with_and_without_the_tokenizer(smollm2_dir, two_pairs, tmp_path, capsys):
    from preftune.cli import main

    assert main(["data", "check", str(two_pairs), "--tokenizer", str(smollm2_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["kept"], report["tokenized"]) == ("conversational", 2, True)
    assert report["lengths"]["prompt"]["min"] > 20     # SmolLM2's template adds its default system prompt
    typo = json.loads(two_pairs.read_text().splitlines()[0])
    typo["chosen"][0]["role"] = "asistant"
    bad = write_jsonl(tmp_path / "typo.jsonl", [typo, json.loads(two_pairs.read_text().splitlines()[1])])
    assert main(["data", "check", str(bad), "--json"]) == 2       # no tokenizer: the roles are still checked
    captured = capsys.readouterr()
    assert "unknown role 'asistant'; did you mean 'assistant'?" in captured.out
    assert "1 of 2 rows are invalid" in captured.err


def test_prefix_shared_padding_free_log_probs_equal_padded_rows(smollm2_dir, smollm2_tokenizer, one_thread):
    """SmolLM2 (grouped-query attention, SDPA): the default packed layout gives the padded rows' log-probs."""
    from preftune.data.collate import collate_pairs, collate_pairs_packed
    from preftune.data.preference import TokenizedPair
    from preftune.logprobs import packed_sequence_logprobs, sequence_logprobs

    tok = smollm2_tokenizer
    prompt = chat_ids(tok)
    answers = [" Blue.", " The sky is blue on a clear day.", " Green, mostly.", " Blue"]
    ids = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
    pairs = [TokenizedPair(prompt, ids[0], ids[2], 1.0, 0.0, 0), TokenizedPair(prompt[3:], ids[1], ids[3], 1.0, 0.0, 1)]
    model = load_causal_lm(str(smollm2_dir)).eval()
    with torch.no_grad():
        padded_batch = collate_pairs(pairs, tok.pad_token_id)
        padded, _ = sequence_logprobs(model, padded_batch["input_ids"], padded_batch["attention_mask"],
                                      padded_batch["completion_mask"])
        shared = packed_sequence_logprobs(model, collate_pairs_packed(pairs, share_prefix=True))
        free = packed_sequence_logprobs(model, collate_pairs_packed(pairs, share_prefix=False))
    assert padded.shape == (4,) and float(padded.max()) < -0.1
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-4)
    torch.testing.assert_close(free, padded, rtol=0, atol=1e-4)


def test_online_dpo_step_on_chat_prompts_with_a_function_judge(smollm2_dir, tmp_path, one_thread):
    from preftune import OnlineDPOConfig, train_online_dpo

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": QUESTION}] * 2)
    (tmp_path / "short.py").write_text("def short(prompts, completions):\n"
                                       "    return [1.0 / (1 + len(c.split())) for c in completions]\n")
    cfg = OnlineDPOConfig(model_name_or_path=str(smollm2_dir), dataset=str(prompts),
                          output_dir=str(tmp_path / "online"), judge=f"function:{tmp_path / 'short.py'}:short",
                          max_new_tokens=8, per_device_batch_size=2, max_steps=2, logging_steps=1, lora=True, lora_r=8,
                          lora_alpha=16, learning_rate=1e-3, seed=0, log_samples_steps=1)
    cfg.validate()
    train_online_dpo(cfg)
    rows = records(tmp_path / "online")
    assert len(rows) == 2
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)         # the policy starts as its reference
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-3)
    assert first["objective/scores_margin"] >= 0 and 0 < first["objective/scores"] <= 1
    samples = [json.loads(line) for line in (tmp_path / "online" / "samples.jsonl").read_text().splitlines()]
    assert all(s["chosen_score"] >= s["rejected_score"] for s in samples)
    assert "<|im_start|>assistant" in samples[0]["prompt"]                # the chat template was applied
    assert (tmp_path / "online" / "model" / "adapter_config.json").exists()
