"""A LoRA adapter named in an OpenAI request's ``model``: ``<model>:<adapter>``.

Ray Serve LLM asks for an adapter as ``<base model id>:<adapter>``, the adapter being a
folder under the deployment's ``llm.lora.adaptersFrom``; the gateway keeps that spelling
with its own names: ``<model>`` is what it routes the base model by (the Model's name, or
a cascade's deployment's), and the replica is sent ``<its served model name>:<adapter>``.
Names the gateway routes by are DNS labels, which hold no ``:``, so the first one starts
the adapter. The adapter's name is checked here, before any replica sees it, because Ray
joins it to the adapters' folder as a path: a ``/`` or a name of dots would reach
folders of other tenants, or the folder above.

An adapter whose folder is not in the bucket is not there for any replica: Ray's 404 for it
(:func:`missing`) is the caller's answer, in the gateway's words (:func:`not_found`), which
name the adapter and not the bucket; no other replica is asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SEPARATOR = ":"
#: The file Ray Serve LLM reads first from an adapter's folder; its 404 names it when it is not there.
ADAPTER_CONFIG = "adapter_config.json"
#: A folder's name as an adapter's: no ``/``, and not starting with a dot.
ADAPTER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}")


@dataclass(frozen=True)
class Named:
    """The name a request routes by, and the adapter it asks for (None: the base model)."""

    name: str
    adapter: str | None = None

    def asked(self, name: str) -> str:
        """``name`` with this request's adapter, as Ray Serve LLM spells it."""
        return name if self.adapter is None else f"{name}{SEPARATOR}{self.adapter}"


def parse(model: str) -> Named | str:
    """What ``model`` asks for, or (a str) why it is no name the gateway can route."""
    name, sep, adapter = model.partition(SEPARATOR)
    if not sep:
        return Named(model)
    if not name:
        return f"model {model!r} names no model before ':': ask for '<model>:<adapter>'"
    if not adapter:
        return f"model {model!r} names no adapter after ':': ask for '{name}:<adapter>', or '{name}' for the base model"
    if not ADAPTER_PATTERN.fullmatch(adapter):
        return (f"model {model!r} names adapter {adapter!r}, which is no adapter's name: the name of its folder, of letters, "
                "digits, '_', '.', '-' and ':', starting with a letter or digit (no '/')")
    return Named(name, adapter)


def _message(answer: bytes) -> str:
    """The message of an OpenAI-style error ``answer`` ("" when it is none)."""
    try:
        message = json.loads(answer)["error"]["message"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return ""
    return message if isinstance(message, str) else ""


def missing(answer: bytes) -> bool:
    """Whether a replica's 404 ``answer`` is Ray Serve LLM's for an adapter whose folder holds
    no :data:`ADAPTER_CONFIG` (its LoRA loader's ``HTTPException``), not one for a model the
    replica no longer serves."""
    message = _message(answer)
    return "LoRA adapter config file" in message and ADAPTER_CONFIG in message


def not_found(named: Named) -> str:
    """Why a request for ``named``'s adapter, which :func:`missing` says is not in the bucket, is refused."""
    return (f"adapter {named.adapter!r} of model {named.name!r} was not found: the model's llm.lora.adaptersFrom holds no "
            f"folder {named.adapter!r} with an {ADAPTER_CONFIG}; ask for an adapter that is there, or {named.name!r} for the base model")


def unknown(status: int, answer: bytes, asked: str) -> bool:
    """Whether a replica's answer to ``GET /v1/models/<asked>`` is Ray Serve LLM's 404 for a
    model card it cannot make: for an adapter, no :data:`ADAPTER_CONFIG` in its folder."""
    return status == 404 and f"Unable to find {asked}." in _message(answer)
