"""The study storage's password travels beside its URL, never in it.

A URL is printed, logged to MLflow, stored as a Prefect flow-run parameter and written into the
job file the workers read, so it must not hold a password. Passwords live in files in libpq's
passfile format (`host:port:database:user:password`, mode 0600), which `PGPASSFILE=FILE psql`
and optuna-dashboard read too:

    $SAOFU_HOME/.saofu/search/pgpass     passwords taken out of `saofu search --storage` URLs
    $SAOFU_HOME/.saofu/postgres/pgpass   the local server's role (`saofu up postgres` writes it)

`make_storage` looks a password-less postgresql URL up in them; when none matches, libpq's own
lookup (PGPASSFILE, ~/.pgpass, PGPASSWORD) still applies.
"""

from __future__ import annotations

import os
from pathlib import Path

from saofu.errors import SaofuError
from saofu.settings import get_settings

DEFAULT_PG_PORT = 5432


def search_passfile() -> Path:
    """Where `remember_password` keeps passwords taken out of storage URLs."""
    return get_settings().home / ".saofu" / "search" / "pgpass"


def _passfiles() -> list[Path]:
    from services.postgres import passfile

    return [search_passfile(), passfile()]


def _split_fields(line: str) -> list[str]:
    """A passfile line's fields: `:` separates, `\\` escapes the next character (libpq's rules)."""
    fields, current, escaped = [], [], False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _key(url: str) -> tuple[str, str, str, str] | None:
    """(host, port, database, user) of a postgresql URL, as a passfile matches them; None for others."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql") or not parsed.host or not parsed.username:
        return None
    return parsed.host, str(parsed.port or DEFAULT_PG_PORT), parsed.database or parsed.username, parsed.username


def has_password(url: str | None) -> bool:
    """True when the URL carries a password (`user:secret@`)."""
    if not url:
        return False
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:  # not a URL SQLAlchemy parses: `make_storage` says so later
        return False


def without_password(url: str) -> str:
    """The URL with its password removed (not masked: it stays usable)."""
    from sqlalchemy.engine import URL, make_url

    u = make_url(url)  # URL.set(password=None) would leave it: None there means "unchanged"
    bare = URL.create(u.drivername, u.username, None, u.host, u.port, u.database, u.query)
    return bare.render_as_string(hide_password=False)


def find_password(url: str) -> tuple[str, Path] | None:
    """(password, file) for a password-less postgresql URL from saofu's passfiles; None when none matches."""
    key = _key(url)
    if key is None:
        return None
    for path in _passfiles():
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = _split_fields(line)
            if line.startswith("#") or len(fields) != 5:
                continue
            if all(f in ("*", want) for f, want in zip(fields[:4], key, strict=True)):
                return fields[4], path
    return None


def remember_password(url: str) -> str:
    """Move a URL's password into `search_passfile()` (0600 from creation); returns the URL without it.

    Raises:
        SaofuError: the URL has a password but no host, port, database or user to file it under.
    """
    if not has_password(url):
        return url
    from sqlalchemy.engine import make_url

    key = _key(url)
    if key is None:
        raise SaofuError("a storage URL with a password must be postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE")
    path = search_passfile()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefix = ":".join(_escape(f) for f in key) + ":"
    try:
        kept = [line for line in path.read_text().splitlines() if not line.startswith(prefix)]
    except OSError:
        kept = []
    kept.append(prefix + _escape(make_url(url).password))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # private from its first byte: a chmod after writing leaves a moment when others may read it
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write("\n".join(kept) + "\n")
    os.replace(tmp, path)
    return without_password(url)


def refuse_password(url: str | None) -> str | None:
    """Pydantic validator body: storage URLs in parameters and job files must not carry a password."""
    if has_password(url):
        raise ValueError(
            "the storage URL holds a password, which would be stored with the run's parameters: drop it from the "
            f"URL and put it in a passfile ({search_passfile()}, PGPASSFILE or ~/.pgpass; `saofu search --storage` "
            "does this itself)"
        )
    return url


def dashboard_command(storage: str) -> str:
    """The command that browses the study: the passfile named, never the password."""
    found = find_password(storage) if storage.startswith("postgresql") and not has_password(storage) else None
    if found:
        return f"PGPASSFILE={found[1]} optuna-dashboard {storage}"
    from sqlalchemy.engine import make_url

    return f"optuna-dashboard {make_url(storage).render_as_string(hide_password=True)}"
