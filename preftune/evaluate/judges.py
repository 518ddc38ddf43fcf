"""Judges: who decides which response is better.

* :class:`RewardModelJudge` scores each response with a trained reward model;
* :class:`FunctionJudge` calls any Python ``module:function(prompts, responses) -> scores``;
* :class:`LLMJudge` asks a chat model behind an OpenAI-compatible ``/chat/completions`` endpoint to
  compare two responses. Each pair is asked twice, in both orders, and the two verdicts averaged,
  which cancels the judge's position bias (Zheng et al. 2023, "Judging LLM-as-a-judge").

Scoring judges give pairwise verdicts by comparing scores; all judges give :meth:`compare`.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ConfigError, PreftuneError


class ScoringJudge:
    """A judge that gives each response a number; higher is better."""

    name = "judge"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """Probability that each ``first`` response beats its ``second`` (ties count one half)."""
        a, b = self.score(prompts, first), self.score(prompts, second)
        return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


class FunctionJudge(ScoringJudge):
    def __init__(self, spec: str):
        from ..losses import load_constraint

        self.fn = load_constraint(spec)
        self.name = spec

    def score(self, prompts, responses):
        scores = [float(s) for s in self.fn(list(prompts), list(responses))]
        if len(scores) != len(responses):
            raise PreftuneError(f"judge {self.name} returned {len(scores)} scores for {len(responses)} responses")
        return scores


class RewardModelJudge(ScoringJudge):
    def __init__(self, path: str, batch_size: int = 16, device=None):
        from ..train.reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(path, device=device)
        self.batch_size = batch_size
        self.name = f"reward model {path}"

    def score(self, prompts, responses):
        from ..train.reward import score_texts

        return list(score_texts(self.model, self.tokenizer, list(prompts), list(responses), self.batch_size))


JUDGE_PROMPT = """You compare two responses to the same prompt and decide which one is better.

Prompt:
{prompt}

Response A:
{a}

Response B:
{b}

Which response is better? Answer with a single letter: A or B."""


@dataclass
class LLMJudge:
    """Pairwise judge over an OpenAI-compatible chat-completions endpoint (e.g. vLLM, llama.cpp, OpenAI)."""

    base_url: str
    model: str = "judge"
    api_key_env: str = "OPENAI_API_KEY"
    template: str = JUDGE_PROMPT
    workers: int = 8
    timeout: float = 60.0
    retries: int = 2
    name: str = "llm judge"
    unparsed: int = field(default=0, init=False)

    def _ask(self, prompt: str, a: str, b: str) -> str | None:
        """'A', 'B' or None (the answer named neither)."""
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 8,
                "messages": [{"role": "user", "content": self.template.format(prompt=prompt, a=a, b=b)}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                break
            except urllib.error.HTTPError as exc:
                if exc.code in (429, 500, 502, 503) and attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise PreftuneError(f"LLM judge at {url} answered HTTP {exc.code}: {exc.read()[:200]!r}") from None
            except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
                if attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise PreftuneError(f"LLM judge at {url} could not be reached: {exc}") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise PreftuneError(f"LLM judge at {url} sent an answer without choices[0].message.content") from None
        match = re.search(r"\b([AB])\b", content.strip().upper())
        return match.group(1) if match else None

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """Each pair asked as (first, second) and as (second, first); the verdicts are averaged."""
        jobs = [(p, a, b) for p, a, b in zip(prompts, first, second)] + \
               [(p, b, a) for p, a, b in zip(prompts, first, second)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            answers = list(pool.map(lambda job: self._ask(*job), jobs))
        n = len(prompts)
        results = []
        for forward, backward in zip(answers[:n], answers[n:]):
            votes = []
            for answer, first_is in ((forward, "A"), (backward, "B")):
                if answer is None:
                    self.unparsed += 1
                    votes.append(0.5)
                else:
                    votes.append(1.0 if answer == first_is else 0.0)
            results.append(sum(votes) / 2)
        return results


def make_judge(spec: str, *, judge_model: str = "judge", device=None):
    """``reward_model:PATH``, ``function:module:function`` or ``llm:BASE_URL`` (OpenAI-compatible)."""
    kind, _, target = spec.partition(":")
    if not target:
        raise ConfigError(f"judge '{spec}' must look like reward_model:PATH, function:module:function or llm:URL")
    if kind == "reward_model":
        return RewardModelJudge(target, device=device)
    if kind == "function":
        return FunctionJudge(target)
    if kind == "llm":
        return LLMJudge(target, model=judge_model)
    raise ConfigError(f"judge '{spec}': unknown kind '{kind}' (reward_model, function or llm)")


def win_rate(judge, prompts: list[str], candidate: list[str], baseline: list[str]) -> float:
    """Fraction of prompts where ``candidate`` beats ``baseline`` (ties one half)."""
    verdicts = judge.compare(prompts, candidate, baseline)
    return sum(verdicts) / len(verdicts) if verdicts else 0.0
