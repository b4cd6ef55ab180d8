"""``--tokenizer``: a real model's tokenizer.json, the one the ``anthropic`` package (0.30) ships,
so that nothing is downloaded at run time: exact synthetic prompt sizes, counts where the server
reports none, the command line."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from protocol.inference import TurnRequest
from protocol.messages import Status
from tests.worker_agent.test_agentic import (
    DONE,
    Driver as AgenticDriver,
    Scripted,
    chunk,
    measured,
    sse,
)
from worker_agent.openai import OpenAIExecutor, add_arguments, executor_from_args
from worker_agent.tokenizer import Tokenizer, TokenizerError


def _shipped() -> Path:
    spec = importlib.util.find_spec("anthropic")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).with_name("tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(_shipped().parent)  # a directory holding tokenizer.json


@pytest.mark.parametrize("tokens", [1, 7, 64, 300, 2048])
def test_synthetic_prompts_have_exactly_the_token_count(tokenizer: Tokenizer, tokens: int) -> None:
    text = tokenizer.text_of(tokens, seed="s/0")
    assert tokenizer.count(text) == tokens


def test_shared_hash_ids_still_share_a_prefix(tokenizer: Tokenizer) -> None:
    a = tokenizer.text_of(600, hash_ids=[1, 2, 3], block_tokens=256, seed="a")
    b = tokenizer.text_of(600, hash_ids=[1, 2, 4], block_tokens=256, seed="b")
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert tokenizer.count(a[:shared]) >= 400  # about the two shared blocks


def test_a_missing_or_bad_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a tokenizer\.json"):
        Tokenizer(tmp_path)


@pytest.mark.integration
async def test_the_executor_sends_exact_prompts_and_counts_what_the_server_does_not(
    tokenizer: Tokenizer,
) -> None:
    server = Scripted()
    await server.start()
    reply = "The quick brown fox jumps over the lazy dog."
    server.scripts.append((200, [sse(chunk(content=reply, finish="stop")), DONE]))
    ex = OpenAIExecutor([server.url], tokenizer=tokenizer)
    try:
        result = await AgenticDriver(ex).run("t", TurnRequest(input_tokens=321, output_tokens=16))
    finally:
        await ex.aclose()
        await server.stop()
    assert result.status is Status.COMPLETED
    [message] = server.bodies[0]["messages"]
    assert tokenizer.count(message["content"]) == 321
    m = measured(result)
    assert m.input_tokens == 321 + 1  # no usage: the tokenizer's count and a role marker
    assert m.output_tokens == tokenizer.count(reply)
    assert m.output_tokens != len(reply.split())  # punctuation: not a word count


def test_the_command_line_loads_it_or_says_why_not(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", default="sim")
    parser.add_argument("--capacity", type=int, default=4)
    add_arguments(parser)
    base = ["--executor", "openai", "--endpoint", "http://a:1/v1"]
    args = parser.parse_args([*base, "--tokenizer", str(_shipped()), "--api", "responses"])
    ex = executor_from_args(args)
    assert ex is not None
    assert isinstance(ex.tokenizer, Tokenizer)
    assert ex.endpoints[0].url == "http://a:1/v1/responses"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--tokenizer", str(tmp_path / "nope")])
