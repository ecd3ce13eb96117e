"""URLs as messages may show them: the password of a `user:password@` part masked.

Every URL saofu prints, logs, stores in a run's parameters or puts into an error goes through
`hide_password` (the search storage, a MLFLOW_TRACKING_URI with credentials, a service's URL).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def hide_password(url: str) -> str:
    """`url` with its password replaced by `***` (the user, host, port, path and query kept).

    Works for any scheme with an authority part (`postgresql+psycopg2://`, `http://`, ...); text
    that is not such a URL comes back unchanged, and a malformed one loses everything before `@`.
    """
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:  # e.g. a port that is not a number: keep only what follows the credentials
        return url.rsplit("@", 1)[-1]
    if password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc))
