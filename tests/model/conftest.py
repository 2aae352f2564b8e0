"""The tiny fixture's tokenizer and vocabulary, for the grammar tests (no model needed)."""

import pytest

from segmentation.model.grammar import Vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    from make_tiny_model import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocabulary(tokenizer, len(tokenizer) + 7)  # logits wider than the tokenizer, as real PaliGemma
