"""``preftune iterate`` on SmolLM2-135M-Instruct: the chat demo's task at a tiny size, two rounds end to end."""

import json

from preftune.demo.chat import ChatDemoScale, demo_config, review_reward
from preftune.iterate.rounds import train_iterate


def test_two_rounds_of_iterative_dpo_on_chat_prompts(smollm2_dir, tmp_path, one_thread):
    cfg = demo_config(ChatDemoScale.quick(), smollm2_dir, tmp_path / "run")
    result = train_iterate(cfg)
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    for round_ in (1, 2):
        round_dir = result.run_dir / "rounds" / str(round_)
        samples = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
        assert all(isinstance(s["prompt"], list) and len(s["samples"]) == 3 for s in samples)  # chat prompts
        finished = {(json.dumps(s["prompt"]), t) for s in samples for t, e in zip(s["samples"], s["ended"]) if e}
        pairs = [json.loads(line) for line in (round_dir / "pairs.jsonl").read_text().splitlines()]
        assert pairs, "no pair kept"
        for pair in pairs:   # the oracle's preference, in the conversational format
            chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
            assert {(json.dumps(pair["prompt"]), chosen), (json.dumps(pair["prompt"]), rejected)} <= finished
            assert review_reward([pair["prompt"]] * 2, [chosen, rejected]) == [pair["score_chosen"],
                                                                               pair["score_rejected"]]
            assert pair["score_chosen"] > pair["score_rejected"]
        assert (round_dir / "train" / "model" / "model.safetensors").is_file()   # LoRA merged: a full model
    assert result.rounds[0]["eval"]["kl"] == 0.0 and result.rounds[2]["eval"]["kl"] != 0.0
    assert "Generations per round" in result.report.read_text()
