"""Render examples to token ids and loss labels; build generation prompts for exact-match eval.

A conversation is rendered with the tokenizer's own chat template (``tokenizer.chat_template``)
when it has one, else with the default template below. Loss is taken on assistant tokens only
(labels are ``-100`` elsewhere); a plain-text example is ``bos + text + eos`` with loss on every
token. Labels are aligned with ``input_ids`` (the Hugging Face convention: the model shifts them).

Default template (:data:`DEFAULT_CHAT_TEMPLATE`, the same text as Jinja), one block per turn::

    <s><|system|>
    You are terse.<|end|>
    <|user|>
    What is 2 + 2?<|end|>
    <|assistant|>
    4<|end|>

i.e. ``bos`` then, per turn, ``<|ROLE|>\\n`` + content + ``<|end|>\\n``; the generation prompt is
``<|assistant|>\\n``. Labelled tokens are the assistant content and its ``<|end|>\\n``, so the
model learns to stop; generation stops at ``<|end|>`` (:func:`stop_token_ids`).

Assistant masks for arbitrary templates are derived from prefixes: for assistant turn ``i`` the
text ``render(messages[:i], add_generation_prompt=True)`` ends where the reply starts and
``render(messages[:i + 1])`` ends where it stops. The text is cut at those points and each piece
is tokenised on its own, so a generation prompt's ids are exactly the ids the model saw before the
reply during training (tokenising the whole string could merge across the boundary). Templates
that re-render earlier turns differently (e.g. dropping past reasoning) only get their final
assistant turn supervised, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from moe_app.core.data.formats import Example, Message
from moe_app.errors import DataError

logger = logging.getLogger("moe_app.core.data")

IGNORE_INDEX = -100
"""Label value ignored by the loss (``torch.nn.CrossEntropyLoss`` default)."""

ROLE_MARKERS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_MARKER = "<|end|>"
CHAT_MARKERS: tuple[str, ...] = (*ROLE_MARKERS.values(), END_MARKER)

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Jinja form of the default template (set on the suite tokenizer so exported models carry it)."""

# End-of-turn strings of common templates, used to cut generated text.
_KNOWN_STOPS = (END_MARKER, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")


@dataclass
class EncodedExample:
    """One example as token ids (all lists of python ints, unpadded)."""

    input_ids: list[int]
    """Full sequence (prompt and replies), truncated to ``max_length``."""
    labels: list[int]
    """Same length as ``input_ids``; ``-100`` where no loss is taken."""
    prompt_ids: list[int] | None
    """Everything before the last assistant reply, ending with the assistant header; ``None`` for text."""
    reference: str | None
    """Expected final answer (``Example.answer()``); ``None`` for text."""


def uses_default_template(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return not template or template == DEFAULT_CHAT_TEMPLATE


def _bos(tokenizer) -> str:
    if getattr(tokenizer, "bos_token_id", None) is None:
        return ""
    return tokenizer.bos_token or ""


def _default_segments(tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """``(text, is_assistant_reply)`` pieces of the default template (no Jinja: fast path)."""
    segments: list[tuple[str, bool]] = []
    pending = _bos(tokenizer)
    for m in messages:
        pending += ROLE_MARKERS[m.role] + "\n"
        if m.role == "assistant":
            segments.append((pending, False))
            segments.append((m.content + END_MARKER + "\n", True))
            pending = ""
        else:
            pending += m.content + END_MARKER + "\n"
    if pending:
        segments.append((pending, False))
    return segments


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DataError(
            f"the tokenizer's chat template could not render a conversation: {err}",
            fix="make the data match what the template accepts (e.g. no system turn), "
            "or set `tokenizer.chat_template = None` to use moe-app's default template.",
        ) from err


_warned_prefix = False


def _template_segments(tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Pieces of a Jinja-rendered conversation, cut where each assistant reply starts and stops."""
    global _warned_prefix
    full = _render(tokenizer, messages, False)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True)
        stop = _render(tokenizer, messages[: i + 1], False)
        if not (
            len(start) >= pos and full.startswith(start) and full.startswith(stop) and len(stop) >= len(start)
        ):
            break
        segments += [(full[pos : len(start)], False), (full[len(start) : len(stop)], True)]
        pos = len(stop)
    else:
        if pos < len(full):
            segments.append((full[pos:], False))
        return [s for s in segments if s[0]]
    # Fallback: earlier turns are re-rendered differently in later prefixes; supervise the last reply.
    if not _warned_prefix:
        logger.warning(
            "the chat template does not render conversations prefix-consistently; "
            "only the final assistant turn of multi-turn examples gets loss"
        )
        _warned_prefix = True
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    start = _render(tokenizer, messages[:last], True)
    if not full.startswith(start):
        raise DataError(
            "the chat template's generation prompt is not a prefix of the rendered conversation, "
            "so assistant tokens cannot be located",
            fix="use a template where add_generation_prompt=True renders the start of the reply, "
            "or set `tokenizer.chat_template = None` to use moe-app's default template.",
        )
    return [s for s in ((full[: len(start)], False), (full[len(start) :], True)) if s[0]]


def conversation_segments(tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant_reply)`` pieces, in order."""
    if uses_default_template(tokenizer):
        return _default_segments(tokenizer, messages)
    return _template_segments(tokenizer, messages)


def render_text(tokenizer, messages: Sequence[Message]) -> str:
    """The whole conversation as one string (for inspection and tokenizer training)."""
    return "".join(text for text, _ in conversation_segments(tokenizer, messages))


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added), each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        encoded = [e.ids for e in backend.encode_batch_fast(unique, add_special_tokens=False)]
    else:
        encoded = tokenizer(unique, add_special_tokens=False)["input_ids"]
    by_text = dict(zip(unique, encoded))
    return [list(by_text[t]) for t in texts]


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[EncodedExample | None]:
    """Tokenise many examples with one batched tokenizer call.

    Sequences longer than ``max_length`` are cut on the right; a conversation whose replies are all
    cut away gets ``None`` (nothing to learn). Generation prompts longer than ``max_length`` keep
    their last ``max_length`` tokens (the assistant header must stay).
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}", fix="use a larger max_length.")
    plans: list[list[tuple[str, bool]]] = []
    for ex in examples:
        if ex.messages is not None:
            plans.append(conversation_segments(tokenizer, ex.messages))
        else:
            plans.append([(ex.text, True)])
    flat = _ids(tokenizer, [text for plan in plans for text, _ in plan])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[EncodedExample | None] = []
    k = 0
    for ex, plan in zip(examples, plans):
        pieces = flat[k : k + len(plan)]
        k += len(plan)
        if ex.messages is None:
            ids = ([bos] if bos is not None else []) + pieces[0] + ([eos] if eos is not None else [])
            ids = ids[:max_length]
            out.append(EncodedExample(ids, list(ids), None, ex.reference))
            continue
        ids, labels, prompt = [], [], []
        replies = [i for i, (_, is_reply) in enumerate(plan) if is_reply]
        if not replies:  # only possible with empty replies rendered to nothing by a template
            out.append(None)
            continue
        last_reply = replies[-1]
        for i, ((_, is_reply), piece) in enumerate(zip(plan, pieces)):
            if i == last_reply:
                prompt = list(ids)
            ids += piece
            labels += piece if is_reply else [IGNORE_INDEX] * len(piece)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            out.append(None)
            continue
        out.append(EncodedExample(ids, labels, prompt[-max_length:], ex.answer()))
    return out


def encode_example(tokenizer, example: Example, max_length: int) -> EncodedExample | None:
    """:func:`encode_examples` for one example."""
    return encode_examples(tokenizer, [example], max_length)[0]


def generation_prompt(tokenizer, example: Example, max_length: int | None = None) -> tuple[list[int], str]:
    """``(prompt_ids, reference)``: everything before the last assistant reply (with the assistant
    header) and the expected answer, for greedy-generation exact match."""
    if example.messages is None:
        raise DataError("a plain-text example has no generation prompt", fix="use a conversation example.")
    enc = encode_examples(tokenizer, [example], max_length or 1 << 30)[0]
    if enc is None:
        raise DataError(
            "the example's replies are all truncated away",
            fix="increase max_length.",
        )
    return enc.prompt_ids or [], enc.reference or ""


def stop_strings(tokenizer) -> list[str]:
    """Strings that end an assistant reply: the template's end marker(s) and the eos token."""
    if uses_default_template(tokenizer):
        stops = [END_MARKER]
    else:
        stops = [s for s in _KNOWN_STOPS if s in tokenizer.chat_template]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(stops))


def stop_token_ids(tokenizer) -> list[int]:
    """Single-token ids of :func:`stop_strings` (pass as ``eos_token_id`` to ``generate``)."""
    ids = []
    for s in stop_strings(tokenizer):
        tok_ids = tokenizer.convert_tokens_to_ids(s) if s in tokenizer.get_vocab() else None
        if isinstance(tok_ids, int) and tok_ids != tokenizer.unk_token_id:
            ids.append(tok_ids)
    return list(dict.fromkeys(ids))


def extract_answer(tokenizer, generated_ids: Sequence[int]) -> str:
    """Decode generated ids (after the prompt), cut at the first stop string, strip whitespace."""
    text = tokenizer.decode(list(generated_ids), skip_special_tokens=False)
    cut = len(text)
    for s in stop_strings(tokenizer):
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    text = text[:cut]
    pad = tokenizer.pad_token
    if pad:
        text = text.replace(pad, "")
    return text.strip()
