"""The engine core: model, formats, unified pool, scheduler, sampling, and the offline `LLM` API."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.engine.llm import LLM

__all__ = ["LLM"]


def __getattr__(name: str):
    if name == "LLM":
        from lorafleet.engine.llm import LLM

        return LLM
    raise AttributeError(name)
