"""Which store a command uses (SPEC section 14): ``--store URL``, else ``KMPWM_STORE``, else
``[store] url`` in ``config.toml``, else the embedded journal.

The journal's paths import nothing more: the PostgreSQL store (``storage.pgstore``, psycopg) loads
only when a URL names it.
"""

from __future__ import annotations

import os

from kmpwm.core.exitcodes import ConfigError
from kmpwm.storage.paths import Paths

JOURNAL_NAMES = ("", "journal")


def store_url(paths: Paths) -> str | None:
    """The URL of the shared store this home uses, None for the embedded journal."""
    url = os.environ.get("KMPWM_STORE")
    if url is None:
        url = _config_url(paths)
    if url is None or url.strip() in JOURNAL_NAMES:
        return None
    return url.strip()


def _config_url(paths: Paths) -> str | None:
    try:
        raw = paths.config_file.read_bytes()
    except OSError:
        return None
    if b"[store" not in raw:
        return None  # the common case: no [store] table, no TOML parsing on this path
    import tomllib

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{paths.config_file}: invalid TOML: {exc}") from None
    table = doc.get("store")
    check_store_table(paths.config_file, table)
    return table.get("url") if table else None


def check_store_table(path, table) -> None:
    if table is None:
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [store] must be a table with a url key")
    unknown = set(table) - {"url"}
    if unknown:
        raise ConfigError(f"{path}: [store]: unknown key {sorted(unknown)[0]!r} (expected url)")
    if not isinstance(table.get("url", ""), str):
        raise ConfigError(f"{path}: [store] url must be a string (postgresql://... or 'journal')")


def open_store(paths: Paths):
    """The store of ``paths``: a ``storage.store.Store`` (the journal) or a ``PgStore``."""
    url = store_url(paths)
    if url is None:
        from kmpwm.storage.store import Store

        return Store(paths)
    from kmpwm.storage.pgstore import PgStore

    return PgStore(paths, url)


def named_store(paths: Paths, url: str):
    """The store a ``--to``/``--from`` URL names: 'journal' is this home's journal."""
    if url.strip() in JOURNAL_NAMES:
        from kmpwm.storage.store import Store

        return Store(paths)
    from kmpwm.storage.pgstore import PgStore

    return PgStore(paths, url.strip())
