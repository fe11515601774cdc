"""What an API key looks like, so that one never reaches a message, a log or a file by mistake.

Used where text from outside is kept (a server's error message, a config value echoed in an error) and where
a config field must hold the *name* of an environment variable, never its value.
"""

from __future__ import annotations

import re

# OpenAI sk-/sk-proj-, Anthropic sk-ant-, Hugging Face hf_, and bearer tokens in echoed headers.
KEY_SHAPES = re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{16,})|(?i:bearer\s+)[A-Za-z0-9._\-]{8,}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def mask_keys(text: str) -> str:
    """``text`` with every key-shaped substring replaced by ``***``."""
    return KEY_SHAPES.sub("***", text)


def looks_like_key(value: str) -> bool:
    """A key-shaped value, or a long random-looking token (upper, lower and digits mixed) no one names a
    variable by."""
    if KEY_SHAPES.search(value):
        return True
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return len(value) >= 24 and mixed and "_" not in value


def check_env_name(value: str | None) -> str | None:
    """A field holding an environment variable's *name*: refuse anything else, without echoing it."""
    if value is None:
        return None
    if looks_like_key(value):
        raise ValueError("this looks like an API key itself; give the NAME of the environment variable that holds "
                         "it (e.g. OPENAI_API_KEY) and export the key there. The value is not shown here")
    if not ENV_NAME.fullmatch(value):
        raise ValueError("must be the name of an environment variable (letters, digits and _, e.g. OPENAI_API_KEY); "
                         "the value is not shown here")
    return value
