"""vLLM as the generation engine (the ``vllm`` extra): in the training process, or a separate server.

In-process (``generation_engine: vllm``): ``vllm.LLM`` loads the policy's architecture from
``model_name_or_path`` on the training GPU and takes ``vllm_gpu_memory_utilization`` of its memory.
With ``vllm_enable_sleep_mode`` it sleeps (level 1: weights offloaded to CPU, KV cache freed) while the
trainer updates the policy and wakes for the next sampling phase. Each phase first loads the policy's
current weights into vLLM's model (``LLM.apply_model`` → the model's ``load_weights``, LoRA merged:
:func:`~.weights.merged_weights`) and resets the prefix cache, whose entries belong to the old weights.
vLLM's workers run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tensors are handed
over without a copy through another process.

Server (``vllm_server_url``): a ``vllm serve`` started beforehand with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; each phase saves the policy's adapter under the run
directory, loads it with ``POST /v1/load_lora_adapter`` and samples it through ``/v1/completions``
(prompts as token ids, the sampled token ids returned). A full (non-LoRA) policy cannot be pushed
to a server this way: use the in-process engine or ``--lora``.

Either way the checkpoint's ``generation_config.json`` is ignored (``generation_config="vllm"``), as
by :mod:`preftune.generate`, and a response ends at the tokenizer's EOS only.
"""

from __future__ import annotations

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from ..errors import ConfigError
from ..generate import Generation, SamplingSettings
from ..models import is_peft_model
from .weights import merged_weights


class VLLMEngine:
    """Samples with vLLM (an ``LLM`` object in this process, or a :class:`VLLMServer`)."""

    name = "vllm"

    def __init__(self, *, eos_token_id: int | None, llm=None, server: "VLLMServer | None" = None,
                 sleep_mode: bool = False):
        self.llm = llm
        self.server = server
        self.eos_token_id = eos_token_id
        self.sleep_mode = sleep_mode and llm is not None
        self.asleep = False

    @classmethod
    def create(cls, policy, tokenizer, options: dict) -> "VLLMEngine":
        try:
            import vllm
        except ImportError:
            raise ConfigError("generation_engine: vllm needs vLLM: pip install 'preftune[vllm]' (a CUDA GPU "
                              "machine)") from None
        eos = tokenizer.eos_token_id
        if options.get("server_url"):
            if not is_peft_model(policy):
                raise ConfigError("vllm_server_url: a vLLM server receives the policy's updates as LoRA adapters; "
                                  "train with --lora, or leave vllm_server_url empty for the in-process engine")
            sync_dir = Path(options.get("sync_dir") or "runs") / "engine-adapters"
            return cls(eos_token_id=eos, server=VLLMServer(options["server_url"], sync_dir))
        if not options.get("model_path"):
            raise ConfigError("generation_engine: vllm loads the policy's architecture from model_name_or_path; "
                              "give the model as a path or hub name")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = vllm.LLM(model=str(options["model_path"]), gpu_memory_utilization=options["gpu_memory_utilization"],
                       enable_sleep_mode=bool(options.get("sleep_mode")), seed=int(options.get("seed") or 0),
                       dtype=options.get("dtype", "auto"), generation_config="vllm")
        return cls(eos_token_id=eos, llm=llm, sleep_mode=bool(options.get("sleep_mode")))

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *, seed: int | None = None,
                 row_seeds: list[int] | None = None, prompt_inputs: list[dict] | None = None) -> Generation:
        if prompt_inputs is not None:
            raise ConfigError("the vllm engine samples from token ids only; prompts with images need "
                              "generation_engine: transformers")
        settings.validate()
        if row_seeds is None:
            first = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else seed
            row_seeds = [(first + i) % 2**31 for i in range(len(prompt_ids))]
        if self.server is not None:
            outputs = self.server.complete(prompt_ids, settings, row_seeds, self.eos_token_id)
        else:
            outputs = self._generate_local(prompt_ids, settings, row_seeds)
        responses, ended = [], []
        for tokens, stopped in outputs:
            response, end = cut_at_eos(list(tokens), stopped, self.eos_token_id)
            responses.append(response)
            ended.append(end)
        return Generation([list(p) for p in prompt_ids], responses, ended)

    def _generate_local(self, prompt_ids, settings, row_seeds) -> list[tuple[list[int], bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**sampling_fields(settings, s, self.eos_token_id)) for s in row_seeds]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [(list(r.outputs[0].token_ids), r.outputs[0].finish_reason == "stop") for r in results]

    def sync(self, policy) -> None:
        if self.server is not None:
            self.server.load_adapter(policy)
            return
        weights = [(name, tensor) for name, tensor in merged_weights(policy).items()]
        self.llm.apply_model(partial(_load_weights, weights))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def _load_weights(weights: list[tuple[str, torch.Tensor]], model) -> None:
    model.load_weights(weights)


def sampling_fields(settings: SamplingSettings, seed: int, eos_token_id: int | None) -> dict:
    """vLLM ``SamplingParams`` fields for one row: the same distribution as :mod:`preftune.generate`, EOS only."""
    return {"n": 1, "max_tokens": settings.max_new_tokens, "seed": seed,
            "temperature": settings.temperature if settings.do_sample else 0.0,
            "top_k": settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
            "top_p": settings.top_p if settings.do_sample else 1.0,
            "ignore_eos": True, "stop_token_ids": [eos_token_id] if eos_token_id is not None else [],
            "skip_special_tokens": False}


def cut_at_eos(tokens: list[int], stopped: bool, eos_token_id: int | None) -> tuple[list[int], bool]:
    """A response as :class:`~preftune.generate.Generation` keeps it: up to and including the first EOS
    (appended when the engine stopped on EOS without returning it)."""
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[:tokens.index(eos_token_id) + 1], True
    if stopped and eos_token_id is not None:
        return tokens + [eos_token_id], True
    return tokens, False


class VLLMServer:
    """A running ``vllm serve``: completions of token-id prompts, and LoRA adapters loaded at run time."""

    def __init__(self, url: str, sync_dir: Path, workers: int = 32):
        self.url = url.rstrip("/")
        self.sync_dir = Path(sync_dir)
        self.workers = workers
        self.version = 0
        self.model = None      # the served model name (None until the first adapter is loaded)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                text = response.read().decode()
        except OSError as exc:
            raise ConfigError(f"vllm_server_url: {self.url}{path} failed: {exc}") from None
        return json.loads(text) if text.strip().startswith("{") else {}

    def load_adapter(self, policy) -> None:
        self.version += 1
        path = (self.sync_dir / f"v{self.version}").resolve()
        policy.save_pretrained(str(path))
        name = f"policy-v{self.version}"
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if self.model is not None:
            self.post("/v1/unload_lora_adapter", {"lora_name": self.model})
        self.model = name

    def complete(self, prompt_ids, settings, row_seeds, eos_token_id) -> list[tuple[list[int], bool]]:
        def one(row: int):
            fields = sampling_fields(settings, row_seeds[row], eos_token_id)
            fields.pop("n")
            body = {"model": self.model, "prompt": list(prompt_ids[row]), "return_token_ids": True, **fields}
            choice = self.post("/v1/completions", body)["choices"][0]
            if "token_ids" not in choice:
                raise ConfigError("vllm_server_url: the server returned no token ids; it needs vLLM >= 0.10.2")
            return list(choice["token_ids"]), choice.get("finish_reason") == "stop"

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, range(len(prompt_ids))))
