import pytest

from tests.training.helpers import byte_tokenizer, chat_rows, tiny_model_file, write_jsonl


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.pth")


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(24))


@pytest.fixture
def tok_dir(tmp_path, tok):
    """The byte tokenizer saved as a folder a recipe's model.tokenizer names."""
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    return d
