"""Chat messages: validation, rendering with the tokenizer's chat template, and the end-of-turn rule.

A conversation is a list of ``{"role", "content"}`` objects (TRL's conversational format) with roles
from :data:`ROLES`. Every reader of messages (preference pairs, SFT rows, PPO and eval prompts,
reward-model scoring, annotation imports) validates and renders them here, so they all accept the
same data and tokenise it the same way:

* a prompt is rendered with ``add_generation_prompt=True`` (the template opens the assistant's turn)
  and tokenised without special tokens: the template writes BOS itself;
* a reply is the text the full conversation adds after the rendered prompt. Templates whose
  generation prompt is not a prefix of the rendered conversation (thinking templates such as Qwen3's
  or DeepSeek-R1's open the turn with ``<think>`` that the finished conversation drops) train on the
  prompt as rendered for generation and a reply of one assistant message: its content followed by
  the template's end-of-turn text (what the template writes after the content). A notice says so
  once. Other templates must be prefix-stable;
* every trained reply ends with EOS: we append the EOS id ourselves, so an EOS text the template
  writes at the end of a reply is dropped first (never twice).

Validation raises :class:`~preftune.data.rows.InvalidRow`, which the reader turns into an error
naming the file, the row and the field.
"""

from __future__ import annotations

import difflib

from preftune.data.rows import InvalidRow, type_name
from preftune.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")


def required_field(row: dict, name: str, messages: bool):
    """A required field: a string, or (``messages``) a list of messages."""
    if name not in row:
        raise InvalidRow("missing field", name, "missing field")
    value = row[name]
    if value is None:
        raise InvalidRow("missing field", name, "missing field (the value is empty or null)")
    if messages:
        return check_messages(name, value)
    if not isinstance(value, str):
        raise InvalidRow("wrong type", name, f"wrong type: expected a string, found {type_name(value)}")
    return value


def check_messages(field: str, value) -> list[dict]:
    """``value`` as a list of messages with known roles and string contents, else InvalidRow."""
    if not isinstance(value, list):
        raise InvalidRow("wrong type", field, "wrong type: expected a list of messages (objects with 'role' "
                                              f"and 'content'), found {type_name(value)}")
    for number, message in enumerate(value, start=1):
        _check_message(field, number, message)
    return value


def _check_message(field: str, number: int, message) -> None:
    if not isinstance(message, dict):
        raise InvalidRow("bad message", field, f"malformed message {number}: expected an object with 'role' "
                                               f"and 'content', found {type_name(message)}")
    for key in ("role", "content"):
        if key not in message or message[key] is None:
            raise InvalidRow("bad message", field, f"malformed message {number}: no '{key}'")
        if not isinstance(message[key], str):
            raise InvalidRow("bad message", field, f"malformed message {number}: '{key}' must be a string, "
                                                   f"found {type_name(message[key])}")
    role = message["role"]
    if role not in ROLES:
        close = difflib.get_close_matches(role.lower(), ROLES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise InvalidRow("bad message", field, f"message {number} has an unknown role '{role}'{hint} "
                                               f"(roles are {', '.join(ROLES)})")


def check_contents(field: str, messages: list[dict], kind: str = "empty response") -> None:
    """Every message has some non-whitespace content."""
    for number, message in enumerate(messages, start=1):
        if not message["content"].strip():
            raise InvalidRow(kind, field, f"{kind}: message {number} has empty content")


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this data holds conversations (lists of messages), but the tokenizer has no "
                          "chat template to render them")


def render(tokenizer, messages: list, field: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template (a template error names the field)."""
    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # template errors (jinja, raise_exception) are about these messages
        raise InvalidRow("bad message", field, f"the chat template could not render these messages: {exc}") from None


def require_prefix(prefix: str, text: str, field: str) -> None:
    """A conversation rendered up to a reply must begin with its rendering up to the turn before."""
    if not text.startswith(prefix):
        raise InvalidRow("chat template", field,
                         "the chat template is not prefix-stable: the conversation rendered before the reply ends "
                         f"{prefix[-40:]!r}, but rendered with the reply it reads "
                         f"{text[max(0, len(prefix) - 40):len(prefix)]!r} there, so the context tokens cannot be "
                         "split from the reply's; use a chat template that renders a conversation as its prompt "
                         "followed by the reply", fatal=True)


def reply_text(tokenizer, prompt: list, prompt_text: str, reply: list, field: str, whole_turn: bool = False) -> str:
    """The text ``reply`` adds after the rendered prompt, without a trailing EOS text (the trainers append the EOS
    id), or with ``whole_turn`` everything the template writes for the turn, newline after its end included: the
    prompt and this text are then the conversation exactly as the chat template renders it, which is what a reward
    model reads (the scoring convention of :mod:`preftune.scoring.reward_model`)."""
    segment = reply_segment(tokenizer, prompt, prompt_text, reply, field)
    return segment if whole_turn else strip_trailing_eos(segment, tokenizer.eos_token)


def reply_segment(tokenizer, prompt: list, prompt_text: str, reply: list, field: str) -> str:
    """The text the model learns to write after ``prompt_text`` (the template's end of turn included).

    What the rendered conversation adds after the prompt; for a template whose generation prompt is not
    a prefix of the conversation, the assistant's content and the template's end-of-turn text.
    """
    full = render(tokenizer, prompt + reply, field)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    content = reply[-1]["content"] if len(reply) == 1 and reply[0]["role"] == "assistant" else None
    found = [c for c in (content, (content or "").strip()) if c and c in full]
    if not found:
        require_prefix(prompt_text, full, field)   # not a thinking template either: refused, with the reason
    _notice_generation_prompt(tokenizer)
    end = full.rindex(found[0]) + len(found[0])
    return found[0] + full[end:]


_NOTICED: set[str] = set()


def _notice_generation_prompt(tokenizer) -> None:
    """Say once per template that its conversations are split at the generation prompt."""
    if tokenizer.chat_template in _NOTICED:
        return
    _NOTICED.add(tokenizer.chat_template)
    from rich.console import Console

    Console(stderr=True).print(
        "[yellow]note:[/] the chat template's generation prompt is not a prefix of the rendered conversation "
        "(a thinking template): replies are trained after the prompt rendered with add_generation_prompt=True, "
        "as the assistant's content followed by the template's end-of-turn text", highlight=False, soft_wrap=True)


def render_pair(tokenizer, prompt: list, reply: list, field: str, whole_turn: bool = False) -> tuple[str, str]:
    """(prompt text, reply text); the generation prompt is added when the reply is the assistant's (``whole_turn``:
    see :func:`reply_text`)."""
    prompt_text = render(tokenizer, prompt, "prompt", add_generation_prompt=reply[0]["role"] == "assistant")
    return prompt_text, reply_text(tokenizer, prompt, prompt_text, reply, field, whole_turn)


def strip_trailing_eos(text: str, eos_token: str | None) -> str:
    """Templates that close replies with the EOS text would get it twice: we append EOS ids ourselves."""
    trimmed = text.rstrip()
    if eos_token and trimmed.endswith(eos_token) and len(trimmed) > len(eos_token):
        return trimmed[: -len(eos_token)]
    return text


def eos_id(tokenizer) -> int:
    """The id every trained response ends with; ConfigError when the tokenizer has none."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, but every response must end with one; "
                          "set tokenizer.eos_token")
    return tokenizer.eos_token_id


def end_turn(ids: list[int], eos: int) -> list[int]:
    """A trained piece ends its turn with EOS: appended unless the chat template already wrote it."""
    return ids if eos in ids else ids + [eos]


def prompt_text(tokenizer, prompt, field: str = "prompt") -> tuple[str, bool]:
    """A prompt column's value -> (text the model reads, whether it was rendered by the chat template).

    A string is used as it is (tokenise it with special tokens: BOS); a list of messages is rendered
    with the generation prompt (tokenise it without: the template wrote BOS).
    """
    if prompt is None:
        raise InvalidRow("missing field", field, f"missing field (every row needs a '{field}')")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRow("empty prompt", field, "empty prompt: the text is empty or only whitespace")
        return prompt, False
    if not isinstance(prompt, list):
        raise InvalidRow("wrong type", field, f"wrong type: expected a string or a list of messages, "
                                              f"found {type_name(prompt)}")
    if not check_messages(field, prompt):
        raise InvalidRow("empty prompt", field, "empty prompt: no messages")
    return render(tokenizer, prompt, field, add_generation_prompt=True), True


def prompt_ids(tokenizer, prompt, field: str = "prompt") -> list[int]:
    """Token ids of a prompt as every trainer tokenises it (see :func:`prompt_text`)."""
    text, chat = prompt_text(tokenizer, prompt, field)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def plain_text(prompt) -> str:
    """A prompt for readers without a tokenizer (an LLM judge, an annotator): messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def reply_plain_text(reply) -> str:
    """A response for a scorer, which reads text: a string as it is, one message's content, else "role: content"."""
    if isinstance(reply, str):
        return reply
    return reply[0]["content"] if len(reply) == 1 else plain_text(reply)
