"""The one exception hierarchy: every user-facing failure is a DdumpError."""

from __future__ import annotations


class DdumpError(Exception):
    """A failure to report to the user as `prog: message`, without a traceback."""


class UsageError(DdumpError):
    """Bad command line, URL or inventory: nothing was started."""


class PcapFormatError(DdumpError):
    """Bytes that are not a pcap stream, or a record that cannot be valid.

    `records` holds the good records parsed before the bad bytes, which must not be lost.
    """

    def __init__(self, message: str, records: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.records = records if records is not None else []
