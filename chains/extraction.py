r"""Structured extraction: text in, a pydantic object (or a dict for a JSON schema) out.

Built on ``chat.with_structured_output(schema)``. With ChatMoss the schema becomes a MOSS plugin switch
(``- Person: enabled. API: Person(name, age)``), MOSS writes its inner thoughts, and the command is started for
it (``<|Commands|>: Person("``) so that it only fills in the arguments: one JSON object when the schema has
several fields, the bare value when it has one.

Example:
    .. code-block:: python

        from pydantic import BaseModel, Field
        from moss_agent import ChatMoss
        from moss_agent.chains import create_extraction_chain

        class Person(BaseModel):
            '''A person mentioned in the text.'''

            name: str = Field(description="full name")
            age: int = Field(description="age in years")

        chain = create_extraction_chain(ChatMoss(model="fnlp/moss-moon-003-sft-plugin"), Person)
        chain.invoke("Ann Lee turned 31 last week.")  # Person(name='Ann Lee', age=31)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils.function_calling import convert_to_openai_tool

from moss_agent.chains.conversation import input_text

__all__ = ["DEFAULT_INSTRUCTIONS", "create_extraction_chain"]

DEFAULT_INSTRUCTIONS = "Extract {what} from the text below and pass {how} to {name}.\n{fields}\n\nText: {text}"
"""The default request. Placeholders: ``{text}``, ``{name}``, ``{what}``, ``{how}``, ``{fields}``."""


def _type_name(schema: Mapping[str, Any]) -> str:
    if "type" in schema:
        kind = schema["type"]
        return " or ".join(kind) if isinstance(kind, list) else str(kind)
    options = [_type_name(s) for s in schema.get("anyOf", []) if s.get("type") != "null"]
    return " or ".join(options) or "value"


def _fields(parameters: Mapping[str, Any]) -> list[str]:
    """One line per field: ``- age (integer, required): age in years``."""
    required = set(parameters.get("required") or ())
    lines = []
    for name, schema in (parameters.get("properties") or {}).items():
        note = ", required" if name in required else ""
        description = f": {schema['description']}" if schema.get("description") else ""
        lines.append(f"- {name} ({_type_name(schema)}{note}){description}")
    return lines


def _request(template: str, spec: Mapping[str, Any]) -> Any:
    """A function from the chain input to the messages asking for the extraction."""
    name = spec["name"]
    parameters = spec.get("parameters") or {}
    fields = _fields(parameters)
    description = (spec.get("description") or "").strip().rstrip(".")
    what = (description[:1].lower() + description[1:]) if description else "the fields listed below"
    how = "them as one JSON object" if len(fields) != 1 else "the value"
    values = {"{name}": name, "{what}": what, "{how}": how, "{fields}": "Fields:\n" + "\n".join(fields)}

    def build(value: Any) -> list[BaseMessage]:
        text = input_text(value, ("input", "text", "question", "query"))
        request = template
        for key, replacement in values.items():
            request = request.replace(key, replacement)
        # The text last, so that braces or placeholders inside it are never substituted.
        return [HumanMessage(request.replace("{text}", text))]

    return build


def _failure(raw: Any, name: str) -> OutputParserException:
    """Why nothing was parsed, for an output that held no usable tool call."""
    if isinstance(raw, AIMessage) and raw.invalid_tool_calls:
        errors = "; ".join(str(c.get("error")) for c in raw.invalid_tool_calls)
        detail = f"MOSS wrote a malformed {name} command ({errors})"
    else:
        detail = f"MOSS wrote no {name} command"
    text = str(raw.additional_kwargs.get("moss_commands") or raw.text) if isinstance(raw, AIMessage) else str(raw)
    return OutputParserException(f"extraction failed: {detail}", llm_output=text)


def create_extraction_chain(
    chat: BaseChatModel,
    schema: type | dict[str, Any],
    *,
    instructions: str | None = None,
    include_raw: bool = False,
) -> Runnable[Any, Any]:
    """A Runnable that extracts ``schema`` from a text with ``chat.with_structured_output(schema)``.

    Args:
        chat: The chat model (ChatMoss, or any model with tool calling).
        schema: A pydantic model (the result is an instance) or a JSON schema with a ``title`` (the result is a
            dict). Its docstring or ``description`` says what to extract; field descriptions guide each value.
        instructions: The request sent as the human message, replacing :data:`DEFAULT_INSTRUCTIONS`;
            ``{text}`` stands for the input text, ``{name}``, ``{what}``, ``{how}`` and ``{fields}`` for the
            schema's name, description, argument form and field list.
        include_raw: Return ``{"raw": AIMessage, "parsed": obj or None, "parsing_error": exception or None}``
            instead of raising when the output cannot be parsed.

    Returns:
        A Runnable taking a str (or ``{"input": str}`` / ``{"text": str}``) and returning the parsed object.
        Without ``include_raw`` a malformed or missing answer raises ``OutputParserException`` (which
        ``.with_retry()`` and ``.with_fallbacks()`` handle).

    Raises:
        ValueError: If ``instructions`` has no ``{text}`` placeholder.
    """
    template = DEFAULT_INSTRUCTIONS if instructions is None else instructions
    if "{text}" not in template:
        raise ValueError("instructions must contain the placeholder {text}, where the input text goes")
    spec = convert_to_openai_tool(schema)["function"]
    structured = chat.with_structured_output(schema, include_raw=True)

    def finish(result: dict[str, Any]) -> Any:
        if result.get("parsed") is None and result.get("parsing_error") is None:
            result = {**result, "parsing_error": _failure(result.get("raw"), spec["name"])}
        if include_raw:
            return result
        error = result["parsing_error"]
        if error is not None:
            if isinstance(error, OutputParserException):
                raise error
            raise OutputParserException(f"extraction failed: {error}", llm_output=str(result.get("raw"))) from error
        return result["parsed"]

    chain = RunnableLambda(_request(template, spec), name="extraction_request") | structured | RunnableLambda(finish)
    return chain.with_config(run_name=f"extract_{spec['name']}")
