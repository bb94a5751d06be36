"""TextOutput: token outputs become text deltas; stop strings cut the text and are never streamed."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from splitserve.runtime.engine_client import TokenOutput
from splitserve.runtime.frontend.text_output import TextDelta, TextOutput


class PieceDetokenizer:
    """Token id i decodes to pieces[i]: lets a test choose exactly where token boundaries fall."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def add(self, token_ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in token_ids)


def stream(pieces: list[str], stop: Sequence[str] = (), finish_reason: str = "length", stop_token_ids=()) -> tuple[list[TextDelta], TextOutput]:
    """Feed one output per piece, the last one finished; return the deltas TextOutput produced."""
    text = TextOutput(PieceDetokenizer(pieces), stop, stop_token_ids)
    deltas = []
    for i in range(len(pieces)):
        last = i == len(pieces) - 1
        deltas.append(text.add(TokenOutput("r", [i], finished=last, finish_reason=finish_reason if last else None)))
    return deltas, text


def test_without_stop_strings_text_passes_through():
    deltas, text = stream(["Hel", "lo", " world"])
    assert deltas == [TextDelta("Hel"), TextDelta("lo"), TextDelta(" world", "length")]
    assert text.num_tokens == 3


def test_stop_string_inside_one_token_cuts_before_it():
    deltas, text = stream(["Hello", ". Bye", " now"], stop=["."])
    assert deltas == [TextDelta("Hello"), TextDelta("", "stop"), TextDelta("")]
    # Tokens after the match are not output, even though the engine produced them.
    assert text.num_tokens == 2
    assert text.finish_reason == "stop"


def test_stop_string_split_across_tokens_is_held_back_and_never_streamed():
    deltas, text = stream(["Say", " E", "N", "D", " more"], stop=["END"])
    assert deltas == [TextDelta("Say"), TextDelta(" "), TextDelta(""), TextDelta("", "stop"), TextDelta("")]
    assert text.num_tokens == 4


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop():
    deltas, _ = stream(["a", "EN", "x", "y"], stop=["END"])
    assert deltas == [TextDelta("a"), TextDelta(""), TextDelta("ENx"), TextDelta("y", "length")]


def test_held_back_text_is_released_when_the_engine_finishes():
    deltas, _ = stream(["a", "EN"], stop=["END"])
    assert deltas == [TextDelta("a"), TextDelta("EN", "length")]


def test_earliest_stop_string_wins():
    deltas, _ = stream(["Hello world"], stop=["world", "lo"])
    assert deltas == [TextDelta("Hel", "stop")]


def test_stop_token_text_is_dropped_but_counted():
    deltas, text = stream(["Hi", "!", "<eos>"], finish_reason="stop", stop_token_ids={2})
    assert "".join(d.text for d in deltas) == "Hi!"
    assert deltas[-1].finish_reason == "stop"
    assert text.num_tokens == 3


def test_last_token_is_kept_when_the_request_ends_for_length():
    deltas, _ = stream(["Hi", "<eos>"], finish_reason="length", stop_token_ids={1})
    assert "".join(d.text for d in deltas) == "Hi<eos>"


def expected_answer(pieces: list[str], stop: list[str]) -> str:
    """Reference: after each token, if any stop string occurs in the text so far, cut at the first one."""
    text = ""
    for piece in pieces:
        text += piece
        found = [i for s in stop if (i := text.find(s)) >= 0]
        if found:
            return text[: min(found)]
    return text


alphabet = st.text(alphabet="abc", min_size=1, max_size=4)


@given(pieces=st.lists(st.text(alphabet="abc", max_size=3), min_size=1, max_size=12), stop=st.lists(alphabet, max_size=3))
def test_streamed_text_is_exactly_the_answer(pieces, stop):
    # Everything streamed is in the final answer (nothing is taken back), and nothing is lost.
    deltas, _ = stream(pieces, stop)
    assert "".join(d.text for d in deltas) == expected_answer(pieces, stop)
    finished = [d for d in deltas if d.finish_reason]
    assert len(finished) == 1
