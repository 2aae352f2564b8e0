import re

import pytest

from segmentation.model.prompts import (
    PromptError,
    max_new_tokens_for,
    object_token_cost,
    parse_prompt,
)


@pytest.mark.parametrize(
    ("prompt", "task", "text"),
    [
        ("cat", "segment", "segment cat"),
        ("segment cat", "segment", "segment cat"),
        ("Segment  cat", "segment", "segment cat"),
        ("cat;dog", "segment", "segment cat ; dog"),
        ("  cat ;  dog ; ", "detect", "detect cat ; dog"),
        ("detect car ; bus", "detect", "detect car ; bus"),
        ("detect car", "segment", "segment car"),  # the route picks the task
        ("the man on the left", "segment", "segment the man on the left"),
        ("cat\tdog", "segment", "segment cat dog"),
        ("chat noir ; 猫", "segment", "segment chat noir ; 猫"),
    ],
)
def test_parse_prompt_normalises(prompt, task, text):
    assert parse_prompt(prompt, task).text == text


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("segment", "empty"),
        (" ; ; ", "empty"),
        ("cat\x00", "U+0000"),
        ("cat\ndog", "U+000A"),
        ("x" * 1001, "limit is 1000"),
        (" ; ".join(f"c{i}" for i in range(33)), "limit is 32"),
        ("<loc0001> cat", "'<'"),
        (123, "string"),
    ],
)
def test_parse_prompt_rejects(prompt, message):
    with pytest.raises(PromptError, match=re.escape(message)):
        parse_prompt(prompt)


def test_parse_prompt_rejects_unknown_task():
    with pytest.raises(PromptError, match="segment, detect"):
        parse_prompt("cat", "caption")  # type: ignore[arg-type]


def test_object_cost_counts_locs_codes_label_separator():
    assert object_token_cost(1, "segment") == 4 + 16 + 1 + 2
    assert object_token_cost(3, "detect") == 4 + 3 + 2


@pytest.mark.parametrize(
    ("labels", "task", "per_class", "ceiling", "expected"),
    [
        ([1], "segment", 5, 512, 5 * 23),
        ([1, 2], "segment", 5, 512, 5 * 23 + 5 * 24),
        ([1] * 10, "segment", 5, 512, 512),  # capped
        ([2], "detect", 3, 512, 3 * 8),
        ([1], "segment", 1, 10, 10),
    ],
)
def test_max_new_tokens_grows_with_classes(labels, task, per_class, ceiling, expected):
    assert max_new_tokens_for(labels, task, objects_per_class=per_class, ceiling=ceiling) == expected
