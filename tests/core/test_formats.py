"""Dataset format rules: every accepted shape, and every refusal with its code and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asft_core.formats import DatasetFormatError, iter_examples, read_examples, validate_file


def lines(*rows: object) -> list[str]:
    return [row if isinstance(row, str) else json.dumps(row) for row in rows]


def test_three_formats_normalise_to_chat_messages() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Draft", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    (example,) = iter_examples(lines(chat))
    assert [m.role for m in example.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m.trainable for m in example.messages] == [False, False, False, False, True]

    (prompt,) = iter_examples(lines({"prompt": "2+2?", "completion": "4"}))
    assert [(m.role, m.content, m.trainable) for m in prompt.messages] == [
        ("user", "2+2?", False),
        ("assistant", "4", True),
    ]

    (alpaca,) = iter_examples(lines({"instruction": "Sum", "input": "2 2", "output": "4"}))
    assert alpaca.messages[0].content == "Sum\n\n2 2"
    (bare,) = iter_examples(lines({"instruction": "Sum", "output": "4"}))
    assert bare.messages[0].content == "Sum"


def test_blank_lines_are_skipped_but_counted() -> None:
    examples = list(iter_examples(["", json.dumps({"prompt": "a", "completion": "b"}), "  "]))
    assert [e.line for e in examples] == [2]


@pytest.mark.parametrize(
    ("bad_line", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_row", None),
        (json.dumps({"text": "x"}), "unknown_format", None),
        (json.dumps({"prompt": "a"}), "invalid_row", "completion"),
        (json.dumps({"prompt": "a", "completion": 3}), "invalid_row", "completion"),
        (json.dumps({"prompt": " ", "completion": "b"}), "empty_content", "prompt"),
        (json.dumps({"messages": []}), "invalid_row", "messages"),
        (
            json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
            "invalid_role",
            "messages[0].role",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}]}),
            "missing_assistant",
            "messages",
        ),
        (
            json.dumps({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}),
            "invalid_row",
            "messages[0].weight",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "y"},
                    ]
                }
            ),
            "invalid_row",
            "messages",
        ),
        (json.dumps({"instruction": "a", "input": 1, "output": "b"}), "invalid_row", "input"),
    ],
)
def test_bad_rows_name_their_line_and_code(bad_line: str, code: str, param: str | None) -> None:
    # Blank lines before it are skipped yet counted, so the error must say line 3.
    with pytest.raises(DatasetFormatError) as error:
        list(iter_examples(["", "   ", bad_line]))
    assert error.value.code == code
    assert error.value.line == 3
    assert error.value.param == param
    assert str(error.value).startswith("line 3: ")


def test_mixed_formats_and_bad_bytes_are_refused() -> None:
    with pytest.raises(DatasetFormatError) as mixed:
        list(
            iter_examples(
                lines({"prompt": "a", "completion": "b"}, {"instruction": "a", "output": "b"})
            )
        )
    assert (mixed.value.code, mixed.value.line) == ("mixed_formats", 2)
    with pytest.raises(DatasetFormatError) as encoding:
        list(iter_examples([b'{"prompt": "\xff", "completion": "b"}']))
    assert encoding.value.code == "invalid_encoding"


def test_files_empty_and_valid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetFormatError) as error:
        read_examples(empty)
    assert error.value.code == "empty_file" and error.value.line is None
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(lines({"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "e"}))
    )
    summary = validate_file(good)
    assert (summary.row_format, summary.num_examples, summary.num_trainable_messages) == (
        "prompt_completion",
        2,
        2,
    )
    assert summary.characters == 5


def test_a_byte_order_mark_on_the_first_line_is_accepted() -> None:
    from asft_core.formats import iter_examples

    rows = [
        b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n',
        b'{"prompt": "c", "completion": "d"}\n',
    ]
    examples = list(iter_examples(rows))
    assert [e.line for e in examples] == [1, 2]
    assert examples[0].messages[0].content == "a"
