"""What a request asks its output to look like, as the one `GrammarSpec` the workers compile.

Three spellings reach the same place: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
`structured_outputs` object (`json`, `regex`, `grammar`, `choice`, `json_object`) and vLLM's older
`guided_json` / `guided_regex` / `guided_grammar` / `guided_choice`. A request may use one of them. Each
spec is parsed here (xgrammar, the engine the workers use) so that a bad schema, regex or grammar is a 400
naming its field, not a failed engine step.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from splitserve.core.request import GrammarSpec


class InvalidGrammar(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    # `schema` would shadow a pydantic BaseModel attribute: the field is named schema_ and read as "schema".
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured-output extension: exactly one of its fields."""

    model_config = ConfigDict(strict=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = Field(None, description="EBNF (GBNF) grammar")
    choice: list[str] | None = None
    json_object: bool | None = None


def grammar_spec(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    guided: dict[str, Any],
) -> GrammarSpec | None:
    """The request's one grammar, checked. `guided`: the guided_* fields by name (None when unset)."""
    asked = [(param, spec) for param, spec in _candidates(response_format, structured_outputs, guided) if spec is not None]
    if len(asked) > 1:
        names = ", ".join(p for p, _ in asked)
        raise InvalidGrammar(f"{asked[1][0]}: set one structured-output constraint, not several ({names})", asked[1][0])
    if not asked:
        return None
    param, spec = asked[0]
    _check(spec, param)
    return spec


def _candidates(rf: ResponseFormat | None, so: StructuredOutputs | None, guided: dict[str, Any]):
    if rf is not None:
        if rf.type == "json_object":
            yield "response_format", GrammarSpec("json_object")
        elif rf.type == "json_schema":
            if rf.json_schema is None:
                raise InvalidGrammar("response_format.json_schema: required when type is json_schema", "response_format")
            yield "response_format", GrammarSpec("json_schema", json.dumps(rf.json_schema.schema_))
    if so is not None:
        set_fields = [f for f in ("json_", "regex", "grammar", "choice", "json_object") if getattr(so, f) not in (None, False)]
        if len(set_fields) > 1:
            raise InvalidGrammar("structured_outputs: set exactly one of json, regex, grammar, choice, json_object", "structured_outputs")
        for f in set_fields:
            yield "structured_outputs", _spec(f.rstrip("_"), getattr(so, f), "structured_outputs")
    for name, value in guided.items():
        if value is not None:
            yield name, _spec(name.removeprefix("guided_"), value, name)


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return GrammarSpec("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "regex":
        return GrammarSpec("regex", value)
    if kind == "grammar":
        return GrammarSpec("ebnf", value)
    if kind == "choice":
        if not value:
            raise InvalidGrammar(f"{param}: choice needs at least one string", param)
        # An EBNF alternation of string literals: JSON's string escapes are the grammar's too.
        return GrammarSpec("ebnf", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    raise InvalidGrammar(f"{param}: unknown constraint {kind}", param)


def _check(spec: GrammarSpec, param: str) -> None:
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.spec, any_whitespace=False)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.spec)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.spec)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with the parser's message
        raise InvalidGrammar(f"{param}: cannot be compiled as a {spec.kind.replace('_', ' ')}: {_first_line(exc)}", param) from exc


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
