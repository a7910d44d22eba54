"""Prompts and trigger words: whether a prompt carries the trigger, and the prompt with it removed."""

from __future__ import annotations

import re


def remove_trigger(prompt: str, trigger: str) -> str:
    """The prompt without the trigger word ("a sks dog" -> "a dog"; "sks, 1girl" -> "1girl")."""
    if not trigger:
        return prompt
    text = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", " ", prompt)
    text = re.sub(r"\s*,\s*(?:,\s*)+", ", ", text)
    text = re.sub(r"^\s*,\s*|\s*,\s*$", "", text)
    return re.sub(r"\s+,", ",", re.sub(r"\s+", " ", text)).strip()


def has_trigger(prompt: str, trigger: str) -> bool:
    return bool(trigger) and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt) is not None
