"""Text prompts built from tags, byte-exact with each method's inference script.

The templates differ only in punctuation, but the text encoder sees every comma, so each is kept verbatim:
OSEDiff `test_osediff.py` (`--prompt ''` by default) and GDPO-SR (same code, its `test.sh` passes
`GDPO_USER_PROMPT`) build "{tags}, {prompt},"; SeeSR `test_seesr.py` appends `--added_prompt` right after
that comma.
"""

from __future__ import annotations

GDPO_USER_PROMPT = "clean, high-resolution, 8k"
"""`--prompt` of GDPO-SR's published `test.sh`."""

SEESR_ADDED_PROMPT = "clean, high-resolution, 8k"
"""SeeSR's default `--added_prompt`."""


def osediff_prompt(tags: str, user_prompt: str = "") -> str:
    """OSEDiff / GDPO-SR: "{tags}, {user_prompt},"."""
    return f"{tags}, {user_prompt},"


def gdpo_prompt(tags: str, user_prompt: str = GDPO_USER_PROMPT) -> str:
    """GDPO-SR runs OSEDiff's template with its script's `--prompt`."""
    return osediff_prompt(tags, user_prompt)


def seesr_prompt(tags: str, user_prompt: str = "", added_prompt: str = SEESR_ADDED_PROMPT) -> str:
    """SeeSR: "{tags}, {user_prompt}," followed directly by the added prompt (no separator)."""
    return osediff_prompt(tags, user_prompt) + added_prompt
