"""The fields that shape a task's run: model, system, options, output_schema; and the set of
models a task may name, with a stand-in Ollama listing its own."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from koubou_mcp.backends.structured import Misfit, parse_structured
from koubou_mcp.config import Settings
from koubou_mcp.modelset import ModelSet, list_ollama_models
from koubou_mcp.taskfields import (
    MAX_SCHEMA_BYTES,
    InvalidField,
    check_model,
    check_options,
    check_output_schema,
    check_system,
)
from tests.fakes.ollama_server import FakeOllama

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "score": {"type": "integer", "minimum": 1}},
          "required": ["title", "score"]}


def refused(fn, *args: Any) -> InvalidField:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidField) as caught:
        fn(*args)
    return caught.value


# -- model ------------------------------------------------------------------------------------

def test_a_known_model_is_accepted_with_or_without_its_latest_tag() -> None:
    known = ["gpt-oss:20b", "llama3.2:latest"]
    assert check_model("llama3.2", known) == "llama3.2"
    assert check_model("gpt-oss:20b", known) == "gpt-oss:20b"
    assert check_model(None, known) is None


def test_an_unknown_model_is_refused_with_the_names_that_work() -> None:
    error = refused(check_model, "mistral", ["gpt-oss:20b", "llama3.2:latest"])
    assert error.field == "model"
    assert "'mistral'" in str(error) and "gpt-oss:20b, llama3.2:latest" in str(error)


@pytest.mark.parametrize("value", ["", "  ", 3, ["a"], "x" * 201, "a\nb"])
def test_a_model_that_is_not_a_name_is_refused(value: object) -> None:
    assert "model must be a model name" in str(refused(check_model, value, ["a"]))


# -- system and options --------------------------------------------------------------------

def test_system_is_a_non_empty_string_for_general_tasks() -> None:
    assert check_system("You are terse.", "general", 100) == "You are terse."
    assert check_system(None, "code", 100) is None
    for value, words in [("", "must not be empty"), (5, "must be a string"),
                         ("x" * 101, "the limit is 100"), ("a\x00", "NUL"),
                         ("\ud800", "not valid Unicode")]:
        assert words in str(refused(check_system, value, "general", 100))
    assert "general tasks only" in str(refused(check_system, "hi", "code", 100))


def test_options_come_from_the_allow_list_within_bounds() -> None:
    assert check_options({"temperature": 0, "top_p": 0.9, "num_ctx": 8192.0, "seed": 7},
                         "general") == {"temperature": 0.0, "top_p": 0.9, "num_ctx": 8192,
                                        "seed": 7}
    assert check_options({}, "general") is None and check_options(None, "general") is None
    cases = [
        ({"num_gpu": 99}, "unknown key(s) num_gpu; accepted: temperature, top_p, num_ctx, seed"),
        ({"temperature": 3}, "options.temperature must be a number from 0 to 2"),
        ({"temperature": True}, "options.temperature must be a number"),
        ({"temperature": "hot"}, "options.temperature must be a number"),
        ({"num_ctx": 100}, "options.num_ctx must be an integer from 256"),
        ({"seed": 1.5}, "options.seed must be an integer"),
        ({"top_p": float("nan")}, "options.top_p must be a number"),
        ([("temperature", 1)], "options must be an object"),
    ]
    for value, words in cases:
        assert words in str(refused(check_options, value, "general")), value
    assert "general tasks only" in str(refused(check_options, {"seed": 1}, "code"))


# -- output schema ----------------------------------------------------------------------------

def test_a_valid_schema_is_kept_and_a_bad_one_is_refused_saying_where() -> None:
    assert check_output_schema(SCHEMA, "general") == SCHEMA
    error = refused(check_output_schema, {"type": "object", "properties": {"a": {"type": 5}}},
                    "general")
    assert error.field == "output_schema" and "properties/a/type" in str(error)
    assert "JSON Schema object" in str(refused(check_output_schema, "json", "general"))
    big = {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}
    assert "larger than" in str(refused(check_output_schema, big, "general"))
    assert "plain JSON" in str(refused(check_output_schema, {"minimum": float("inf")}, "general"))
    assert "general tasks only" in str(refused(check_output_schema, SCHEMA, "code"))


def test_an_answer_is_parsed_and_checked_against_its_schema() -> None:
    assert parse_structured('{"title": "t", "score": 2}', SCHEMA) == {"title": "t", "score": 2}
    assert parse_structured('```json\n{"title": "t", "score": 2}\n```', SCHEMA)["score"] == 2
    with pytest.raises(Misfit, match="not JSON"):
        parse_structured('{"title": "t", "sco', SCHEMA)
    with pytest.raises(Misfit, match="at score: 0 is less than the minimum of 1"):
        parse_structured('{"title": "t", "score": 0}', SCHEMA)
    with pytest.raises(Misfit, match="'score' is a required property"):
        parse_structured('{"title": "t"}', SCHEMA)


# -- the model set ----------------------------------------------------------------------------

def test_the_models_are_the_configured_two_plus_what_ollama_lists(home) -> None:  # type: ignore[no-untyped-def]
    with FakeOllama(models=["gpt-oss:20b", "llama3.2:latest", "qwen3:8b"]) as fake:
        settings = Settings.from_env({}, home=str(home), ollama_url=fake.url)
        settings = settings.with_overrides(code_model="qwen3-coder:30b")
        assert ModelSet(settings).names() == ["gpt-oss:20b", "qwen3-coder:30b",
                                              "llama3.2:latest", "qwen3:8b"]
        assert list_ollama_models(fake.url) == ["gpt-oss:20b", "llama3.2:latest", "qwen3:8b"]


def test_koubou_models_replaces_the_default_set(home) -> None:  # type: ignore[no-untyped-def]
    settings = Settings.from_env({"KOUBOU_MODELS": "a:1, b:2,a:1"}, home=str(home))
    asked: list[str] = []
    models = ModelSet(settings, fetch=lambda url, t: asked.append(url) or ["c"])
    assert models.names() == ["a:1", "b:2"] and asked == []


def test_ollama_is_asked_once_per_ttl_and_soon_again_after_a_failure(home) -> None:  # type: ignore[no-untyped-def]
    settings = Settings.from_env({}, home=str(home))
    now = [0.0]
    answers: list[list[str] | None] = [None, ["x:1"], ["y:1"]]
    asked: list[float] = []

    def fetch(url: str, timeout_s: float) -> list[str] | None:
        asked.append(now[0])
        return answers.pop(0)

    models = ModelSet(settings, ttl_s=30.0, fetch=fetch, clock=lambda: now[0])
    assert models.names() == ["gpt-oss:20b"]  # unreachable: the configured ones still work
    now[0] = 1.0
    assert models.names() == ["gpt-oss:20b"] and asked == [0.0]  # not at every submit
    now[0] = 6.0
    assert models.names() == ["gpt-oss:20b", "x:1"]
    now[0] = 20.0
    assert models.names()[-1] == "x:1" and asked == [0.0, 6.0]
    now[0] = 36.5
    assert models.names()[-1] == "y:1"


def test_an_unreachable_ollama_lists_nothing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert list_ollama_models(f"http://127.0.0.1:{sock.getsockname()[1]}", 1.0) is None
