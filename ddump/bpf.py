"""Capture filter syntax, checked here with libpcap, the library tcpdump compiles it with.

Only a check for the user's sake (Wireshark colours its capture filter field with it): the
worker still validates each filter with its own tcpdump and answers 400 with tcpdump's message.
Without libpcap on this host, every filter passes here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from ddump.pcap import DEFAULT_SNAPLEN, LINKTYPE_LINUX_SLL2

_NETMASK_UNKNOWN = 0xFFFFFFFF


class _Program(ctypes.Structure):
    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p))


@functools.cache
def _libpcap() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("pcap")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
    lib.pcap_compile.argtypes = (
        ctypes.c_void_p, ctypes.POINTER(_Program), ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32,
    )  # fmt: skip
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
    lib.pcap_freecode.argtypes = (ctypes.POINTER(_Program),)
    lib.pcap_close.argtypes = (ctypes.c_void_p,)
    return lib


def filter_error(text: str, linktype: int = LINKTYPE_LINUX_SLL2) -> str | None:
    """libpcap's message if `text` is not a valid filter for `linktype`; None if it is."""
    lib = _libpcap()
    if lib is None or not text.strip():
        return None
    handle = lib.pcap_open_dead(linktype, DEFAULT_SNAPLEN)
    if not handle:
        return None
    try:
        program = _Program()
        encoded = text.encode("utf-8", "replace")
        if lib.pcap_compile(handle, ctypes.byref(program), encoded, 1, _NETMASK_UNKNOWN) != 0:
            message: bytes = lib.pcap_geterr(handle) or b"invalid filter"
            return message.decode("utf-8", "replace")
        lib.pcap_freecode(ctypes.byref(program))
        return None
    finally:
        lib.pcap_close(handle)
