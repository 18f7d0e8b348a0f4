import pytest

from tests.training.helpers import byte_tokenizer


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()
