"""Keeping credentials out of what sweeplab prints, logs and tags: every URL shown goes through `redact`, and
every message we did not write (MLflow's, SQLAlchemy's, psycopg's) through `redact_text`.

Passwords come from the environment (PGPASSWORD, ~/.pgpass, MLFLOW_TRACKING_PASSWORD), never from us; when a
user puts one in a URL anyway, it is replaced by *** wherever the URL is shown.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_KEYS = {"password", "passwd", "pwd", "pass", "secret", "token", "access_token", "api_key", "apikey",
               "sslpassword", "client_secret"}
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_KEY_VALUE = re.compile(r"\b(" + "|".join(sorted(SECRET_KEYS, key=len, reverse=True)) + r")(\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,)]+)",
                        re.IGNORECASE)


def redact(url: str) -> str:
    """A URL fit to print or log: the password in its user info and any secret query parameter become ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL (a bad port, say): redact what looks like a secret anyway
        return _KEY_VALUE.sub(r"\1\2***", re.sub(r"(//[^/:@\s]*):[^@/\s]*@", r"\1:***@", url))
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query and any(key.lower() in SECRET_KEYS for key, _ in parse_qsl(query, keep_blank_values=True)):
        query = urlencode([(key, "***" if key.lower() in SECRET_KEYS else value)
                           for key, value in parse_qsl(query, keep_blank_values=True)], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # by hand: urlunsplit drops the empty host of sqlite:///path
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else urlunsplit(parts._replace(netloc=netloc))
    return rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def has_secret(url: str) -> bool:
    return redact(url) != url


def redact_text(text: str) -> str:
    """Every URL in a message redacted, and `password=...`-style pairs outside URLs too (libpq's conninfo)."""
    return _KEY_VALUE.sub(r"\1\2***", _URL.sub(lambda match: redact(match.group(0)), text))
