"""A LoRA adapter named in an OpenAI request's ``model``: ``<model>:<adapter>``.

Ray Serve LLM asks for an adapter as ``<base model id>:<adapter>``, the adapter being a
folder under the deployment's ``llm.lora.adaptersFrom``; the gateway keeps that spelling
with its own names: ``<model>`` is what it routes the base model by (the Model's name, or
a cascade's deployment's), and the replica is sent ``<its served model name>:<adapter>``.
Names the gateway routes by are DNS labels, which hold no ``:``, so the first one starts
the adapter. The adapter's name is checked here, before any replica sees it, because Ray
joins it to the adapters' folder as a path: a ``/`` or a name of dots would reach
folders of other tenants, or the folder above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEPARATOR = ":"
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
