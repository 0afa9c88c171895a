"""What a staging URL names, and how it may be shown.

A URL in a job file never carries credentials (the job file travels; the site's secrets do not): user
information is refused when the job is read, and query strings (a presigned URL's signature) are shown as
``?...`` in every message and in result.json.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

#: URL scheme -> the kind of storage, which picks the fsspec file system (stores.py).
KINDS = {"root": "xrootd", "xroot": "xrootd", "http": "http", "https": "http", "dav": "http", "davs": "http",
         "s3": "s3", "file": "file"}


class BadLocation(ValueError):
    """A URL vjobs cannot use; the message says why (never repeating a credential)."""


@dataclass(frozen=True)
class Location:
    url: str

    @property
    def parts(self):
        return urlsplit(self.url)

    @property
    def kind(self) -> str:
        return KINDS[self.parts.scheme.lower()]

    @property
    def shown(self) -> str:
        """The URL without user information and with its query string elided."""
        parts = self.parts
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))

    def child(self, relative: str) -> "Location":
        """The location of ``relative`` (a checked relative path) under this one, taken as a folder."""
        parts = self.parts
        if self.kind == "http":
            relative = quote(relative)
        path = posixpath.join(parts.path.rstrip("/") or "/", relative)
        if self.kind == "xrootd" and not path.startswith("//"):
            path = "/" + path  # root://host//absolute/path: the double slash is XRootD's absolute path
        return Location(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))


def check(url: str) -> Location:
    """The URL as a Location, or ``BadLocation`` saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise BadLocation(f"not a URL vjobs can read ({exc})") from None
    if parts.scheme.lower() not in KINDS:
        raise BadLocation(f"scheme {parts.scheme!r} is not one of {', '.join(sorted(KINDS))}")
    if parts.username is not None or parts.password is not None:
        raise BadLocation("the URL carries credentials (user:password@); put them in the site config's [staging] "
                          "table or the environment, never in a job file")
    if parts.fragment:
        raise BadLocation("the URL has a #fragment, which no storage understands")
    if parts.query:  # a presigned URL's signature is a credential: those live in the site config
        raise BadLocation("the URL has a ?query; vjobs takes plain URLs and the site's credentials ([staging])")
    kind = KINDS[parts.scheme.lower()]
    if kind == "file" and parts.netloc not in ("", "localhost"):
        raise BadLocation("a file:// URL names a path on this host: file:///absolute/path")
    if kind != "file" and not parts.hostname:
        raise BadLocation("the URL names no host (or, for s3://, no bucket)")
    if ".." in unquote(parts.path).split("/"):
        raise BadLocation("the URL's path has a '..' component")
    return Location(url)


@dataclass(frozen=True)
class Wanted:
    """One remote input of a job (its ``stage_in`` entry)."""

    url: str
    path: str
    adler32: str | None = None
