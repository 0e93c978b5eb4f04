"""Chat messages as agents send them, normalised to what Hugging Face chat templates expect.

Agents send content as a string or an array of parts, ``developer`` as well as ``system``
roles, assistant turns with ``content: null`` plus ``tool_calls`` (arguments as a JSON
string), ``tool`` results without ``name`` and ``reasoning_content`` on earlier assistant
turns. Templates want plain strings, arguments as objects and the tool's name on its result."""

from __future__ import annotations

import json
from typing import Any

from inhouse.errors import InvalidRequestError
from inhouse.llm.images import IMAGE_MARKER, ImageRef

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PART_TYPES = ("text", "input_text", "output_text")
IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def _bad(msg: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(msg, details={"param": param})


def content_text(content: Any, where: str, model: str, images: list[ImageRef] | None = None) -> str:
    """The text of a message's content: a string, null, or an array of parts. With ``images``,
    image parts are collected into it and stand in the text as ``IMAGE_MARKER`` (the service
    refuses them for a text-only model); other media, and images without it, are refused with a
    clear message (no text-only model may silently drop them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array of content parts.", f"{where}.content")
    texts: list[str] = []
    for i, part in enumerate(content):
        p = f"{where}.content[{i}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise _bad(f"{p} must be an object such as {{\"type\": \"text\", \"text\": \"...\"}}.", p)
        kind = part.get("type")
        if kind in TEXT_PART_TYPES or (kind is None and "text" in part):
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{p}.text must be a string.", f"{p}.text")
            texts.append(text)
        elif kind in IMAGE_PART_TYPES and images is not None:
            images.append(ImageRef(p, str(kind), part))
            texts.append(IMAGE_MARKER)
        elif kind in IMAGE_PART_TYPES or kind in ("input_audio", "audio", "file", "video", "document"):
            raise _bad(
                f"Model '{model}' accepts text only, but {p} is an '{kind}' part. Remove the "
                "image/media part or send it to a vision model.", p)
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise _bad(f"{p} has unknown part type '{kind}'; use 'text'.", f"{p}.type")
    return "\n".join(texts)


def _arguments(raw: Any, where: str) -> Any:
    """Tool-call arguments as templates want them: an object. A JSON string is decoded; text
    that is not JSON is kept as it is (the template shows it verbatim)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return raw
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    raise _bad(f"{where}.function.arguments must be a JSON string.", f"{where}.function.arguments")


def normalize_messages(messages: Any, model: str) -> list[dict[str, Any]]:
    """OpenAI chat messages → template messages."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of messages.", "messages")
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'.", where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role '{role}' is not one of {', '.join(ROLES)}.", f"{where}.role")
        images: list[ImageRef] = []
        text = content_text(m.get("content"), where, model, images if role == "user" else None)
        if role == "developer":
            role = "system"
        msg: dict[str, Any] = {"role": role, "content": text}
        if images:
            msg["images"] = images  # taken out by the service: only an engine that reads images sees them
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                msg["reasoning_content"] = reasoning
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be an array.", f"{where}.tool_calls")
            norm_calls = []
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _bad(f"{cw} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                               "\"arguments\": \"{...}\"}}.", cw)
                call_id = c.get("id") or f"call_{i}_{j}"
                call_names[call_id] = fn["name"]
                norm_calls.append({"id": call_id, "type": "function",
                                   "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"), cw)}})
            if norm_calls:
                msg["tool_calls"] = norm_calls
            fc = m.get("function_call")
            if isinstance(fc, dict) and isinstance(fc.get("name"), str) and not norm_calls:
                args = _arguments(fc.get("arguments"), where)
                msg["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                      "function": {"name": fc["name"], "arguments": args}}]
        elif role in ("tool", "function"):
            msg["role"] = "tool"
            call_id = m.get("tool_call_id")
            if call_id is not None:
                msg["tool_call_id"] = str(call_id)
            name = m.get("name") or (call_names.get(str(call_id)) if call_id is not None else None)
            if name:
                msg["name"] = name
        elif m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def merge_consecutive(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive user (or system) messages merged into one, for templates that insist on
    strictly alternating roles."""
    merged: list[dict[str, Any]] = []
    for m in messages:
        prev = merged[-1] if merged else None
        if (prev is not None and prev["role"] == m["role"] and m["role"] in ("user", "system")
                and set(prev) == {"role", "content"} and set(m) == {"role", "content"}):
            prev["content"] = f"{prev['content']}\n\n{m['content']}"
        else:
            merged.append(dict(m))
    return merged


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI ``tools`` validated lightly: each a function with a name and a JSON Schema."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}.", "tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{w} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                       "\"parameters\": {...}}}}.", w)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"{w}.function.parameters must be a JSON Schema object.", f"{w}.function.parameters")
        entry = {"name": fn["name"], "parameters": params}
        if fn.get("description") is not None:
            entry["description"] = fn["description"]
        out.append({"type": "function", "function": entry})
    return out or None
