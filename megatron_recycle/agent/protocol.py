"""The tag protocol of the search agent (METHOD.md section 4).

The policy reasons in <think>...</think>, searches with <search>query</search>, receives the
top-k passages inside <information>...</information> (inserted by the environment, never
trained on) and finishes with <answer>...</answer>. Generation stops after </search> or
</answer>.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from megatron_recycle.agent.types import Passage

STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")

INSTRUCTION = (
    "Answer the question below. Think step by step inside <think> and </think>. "
    "Whenever you lack a fact, search a Wikipedia index by writing <search> your query </search>; "
    "the results come back between <information> and </information>. "
    "You may search several times. When you know the answer, write it as a short phrase "
    "(a name, a place, a year), without explanation, inside <answer> and </answer>, "
    "for example <answer> Paris </answer>.\nQuestion: {question}\n"
)

# A tag's content runs from the last opening tag before its closing one: "<search> a <search> b
# </search>" searches "b" (text that mentions the tag, e.g. while thinking, is not sent as a query).
_TAG_RE = re.compile(r"<(search|answer)>((?:(?!<\1>).)*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def user_message(question: str) -> str:
    """The user turn that carries the instruction and the question."""
    return INSTRUCTION.format(question=question.strip())


def render_prompt(tokenizer, question: str) -> str:
    """Prompt text for a question: the chat template when the tokenizer has one, else plain."""
    message = user_message(question)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message


def prompt_token_ids(tokenizer, question: str) -> list[int]:
    """The prompt's token ids, as rollouts and SFT both start a trajectory: the chat template's
    text carries its own special tokens; a plain prompt gets the tokenizer's (e.g. a base model's
    BOS)."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(render_prompt(tokenizer, question), add_special_tokens=add_special).input_ids)


def observation_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text the environment appends (information blocks, error messages): special-
    token strings in it (a passage quoting ``<|im_end|>``) stay plain text; parsed, they became
    real end-of-turn / start-of-turn tokens in the middle of the block. Rollouts and SFT both use
    this, so the two see the same ids. A tokenizer without the option (not a Hugging Face one)
    encodes the text as it does."""
    try:
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    except TypeError:
        enc = tokenizer(text, add_special_tokens=False)
    return list(enc.input_ids if hasattr(enc, "input_ids") else enc["input_ids"])


def parse_action(text: str) -> tuple[str | None, str | None]:
    """The last complete <search> or <answer> tag in a generated chunk: (kind, content).

    Returns (None, None) when the chunk holds neither (the turn ended without an action).
    """
    matches = list(_TAG_RE.finditer(text))
    if not matches:
        return None, None
    last = matches[-1]
    return last.group(1), last.group(2).strip()


def extract_answer(response: str) -> str | None:
    """Content of the last complete <answer> tag of a whole response, or None."""
    answers = _ANSWER_RE.findall(response)
    return answers[-1].strip() if answers else None


def format_information(passages: Sequence[Passage], max_words: int = 0) -> str:
    """The block the environment appends after a search (loss mask 0).

    ``max_words`` > 0 keeps only the first words of each passage's text, or of a one-line
    passage's title (shorter contexts: the rollouts, the SFT data and evaluation must use the
    same value).
    """
    def cut(part: str) -> str:
        words = part.split()
        return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")

    lines = []
    for i, p in enumerate(passages, 1):
        title, text = p.title, p.text
        if max_words > 0:
            text = cut(text)
            if "\n" not in p.contents:  # a passage of one line is all title: the bound holds there too
                title = cut(title)
        lines.append(f"Doc {i} (Title: {title}) {text}".rstrip())
    return "\n\n<information>" + "\n".join(lines) + "</information>\n\n"


def format_retrieval_error(message: str) -> str:
    """The observation the agent receives when retrieval failed after its retries."""
    return f"\n\n<information>Search failed: {message}. Try again or answer.</information>\n\n"
