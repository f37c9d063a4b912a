"""Credentials stay out of output: the password of a user:password@ URI is masked before it is printed or logged."""

from __future__ import annotations

import re

# scheme://user:password@host (an MLflow server behind basic auth, a database URI): the password part.
_URI_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]+:)[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the password of every scheme://user:password@host URI in it replaced by ***."""
    return _URI_CREDENTIALS.sub(r"\1***@", str(text))
