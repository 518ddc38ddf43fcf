"""An LLM judge over HTTP: a chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

It is pairwise: :meth:`LLMJudge.compare` asks which of two responses to a prompt is better. Each
pair is asked twice, in both orders, and the two verdicts averaged, which cancels the judge's
position bias (Zheng et al. 2023, "Judging LLM-as-a-judge"). A prompt given as chat messages is
shown to the judge as "role: content" lines. Verdicts pass the same checks as every scorer's scores.
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

from ..data.messages import plain_text
from ..errors import PreftuneError
from .base import check_batch, check_scores

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

    def compare(self, prompts: list, first: list[str], second: list[str]) -> list[float]:
        """Each pair asked as (first, second) and as (second, first); the verdicts are averaged."""
        check_batch(self.name, prompts, first)
        check_batch(self.name, prompts, second)
        texts = [plain_text(p) for p in prompts]
        jobs = [(p, a, b) for p, a, b in zip(texts, first, second)] + \
               [(p, b, a) for p, a, b in zip(texts, first, second)]
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
        return check_scores(self.name, results, len(prompts))
