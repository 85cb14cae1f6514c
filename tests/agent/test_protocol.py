"""Tag protocol: prompt rendering, action parsing, answer extraction, information blocks."""

from __future__ import annotations

from megatron_recycle.agent.protocol import (
    STOP_STRINGS,
    extract_answer,
    format_information,
    format_retrieval_error,
    parse_action,
    render_prompt,
    user_message,
)
from megatron_recycle.agent.types import Passage


def test_stop_strings():
    assert set(STOP_STRINGS) == {"</search>", "</answer>"}


def test_parse_action_takes_the_last_complete_tag():
    assert parse_action("<think>x</think><search> capital of France </search>") == ("search", "capital of France")
    assert parse_action("<search>a</search> then <answer> Paris </answer>") == ("answer", "Paris")
    assert parse_action("<search>multi\nline</search>") == ("search", "multi\nline")
    assert parse_action("no tags here") == (None, None)
    assert parse_action("<search>unclosed") == (None, None)
    assert parse_action("<search>a</answer>") == (None, None)  # mismatched tags are no action
    assert parse_action("<search></search>") == ("search", "")
    # a repeated opening tag: the content starts after the last one (thinking that mentions the tag
    # does not go to the retriever)
    assert parse_action("<think>I will use <search> next</think><search> capital of France</search>") == (
        "search", "capital of France")
    assert parse_action("<answer> <answer> Paris </answer>") == ("answer", "Paris")
    assert parse_action("<answer> x <search> y </answer>") == ("answer", "x <search> y")  # only its own tag


def test_extract_answer():
    assert extract_answer("<answer> 1879 </answer>") == "1879"
    assert extract_answer("<answer>a</answer><answer>b</answer>") == "b"
    assert extract_answer("<answer>open") is None
    assert extract_answer("<answer> <answer> Paris </answer>") == "Paris"
    assert extract_answer("<answer>a</answer> <answer> <answer>b</answer>") == "b"
    assert extract_answer("") is None


def test_format_information_layout():
    passages = [Passage("1", "Paris\nCapital of France.", 3.0), Passage("2", "Lyon", 1.0)]
    block = format_information(passages)
    assert block.startswith("\n\n<information>") and block.endswith("</information>\n\n")
    assert "Doc 1 (Title: Paris) Capital of France." in block
    assert "Doc 2 (Title: Lyon)" in block
    assert parse_action(block) == (None, None)
    assert format_information([]) == "\n\n<information></information>\n\n"
    # max_words bounds a passage's text, and a one-line passage's title (it has no other part)
    long_text = " ".join(f"w{i}" for i in range(40))
    cut = format_information([Passage("1", f"Paris\n{long_text}"), Passage("2", long_text)], max_words=5)
    assert "Doc 1 (Title: Paris) w0 w1 w2 w3 w4 ..." in cut
    assert "Doc 2 (Title: w0 w1 w2 w3 w4 ...)" in cut and "w5" not in cut
    assert "Doc 2 (Title: Lyon)" in format_information(passages, max_words=5)  # a short one stays whole


def test_format_information_cuts_only_what_is_longer_and_leaves_no_trailing_space():
    five = "w0 w1 w2 w3 w4"
    # exactly max_words words: nothing was cut, so no " ..." claims otherwise
    assert format_information([Passage("1", f"Paris\n{five}")], max_words=5) == (
        f"\n\n<information>Doc 1 (Title: Paris) {five}</information>\n\n")
    # a multi-line passage keeps its whole title: only its text is bounded
    title = " ".join(f"t{i}" for i in range(8))
    assert f"Doc 1 (Title: {title}) x0 x1 ...</information>" in format_information(
        [Passage("1", f"{title}\nx0 x1 x2")], max_words=2)
    # a one-line passage has no text: its line ends at the title, without a space before the tag
    assert format_information([Passage("2", "Lyon")]) == "\n\n<information>Doc 1 (Title: Lyon)</information>\n\n"


def test_format_retrieval_error_is_an_information_block():
    text = format_retrieval_error("timeout")
    assert "<information>" in text and "timeout" in text and text.endswith("</information>\n\n")


class _PlainTokenizer:
    chat_template = None


class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_render_prompt_with_and_without_chat_template():
    assert render_prompt(_PlainTokenizer(), "  Who wrote Hamlet? ") == user_message("Who wrote Hamlet?")
    assert user_message("Who?").endswith("Question: Who?\n")
    chat = render_prompt(_ChatTokenizer(), "Who?")
    assert chat.startswith("<user>") and "Question: Who?" in chat and chat.endswith("<assistant>")
