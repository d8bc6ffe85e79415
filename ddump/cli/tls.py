"""TLS client contexts: verification always on, trust roots chosen like other TLS tools."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from ddump.errors import UsageError


@dataclass(frozen=True)
class TlsFiles:
    """The files one context is made of; None means "the default"."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def make_context(files: TlsFiles, environ: Mapping[str, str] = os.environ) -> ssl.SSLContext:
    """A verifying client context; errors in the files are reported before anything connects.

    Trust roots: `ca` if given, else SSL_CERT_FILE / SSL_CERT_DIR, else the system store,
    else certifi's bundle.
    """
    if (files.cert is None) != (files.key is None):
        given, missing = ("--cert", "--key") if files.cert else ("--key", "--cert")
        raise UsageError(f"{given} needs {missing}: mutual TLS takes a certificate and its key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check and CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.ca is not None:
        _load_roots(context, files.ca, "--ca")
    elif environ.get("SSL_CERT_FILE") or environ.get("SSL_CERT_DIR"):
        cafile, capath = environ.get("SSL_CERT_FILE") or None, environ.get("SSL_CERT_DIR") or None
        try:
            context.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot load trust roots from SSL_CERT_FILE={cafile} SSL_CERT_DIR={capath}: "
                f"{_why(exc)}"
            ) from None
    elif _system_store_present():
        context.load_default_certs()
    else:
        # Here, not at the top: certifi loads importlib.resources and tempfile (~5 ms), which
        # merging capture files, or any host with a system store, never needs.
        import certifi

        context.load_verify_locations(cafile=certifi.where())
    if files.cert is not None and files.key is not None:
        _load_client_pair(context, files.cert, files.key)
    return context


def _load_roots(context: ssl.SSLContext, path: str, flag: str) -> None:
    try:
        if os.path.isdir(path):
            context.load_verify_locations(capath=path)
        else:
            context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load {flag} {path}: {_why(exc)}") from None


def _load_client_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    for flag, path in (("--cert", cert), ("--key", key)):
        if not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {flag} {path}: no such file or no permission")
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise UsageError(f"--cert {cert} and --key {key} do not belong together") from None
        raise UsageError(f"cannot load --cert {cert} / --key {key}: {_why(exc)}") from None
    except OSError as exc:
        raise UsageError(f"cannot load --cert {cert} / --key {key}: {_why(exc)}") from None


def _system_store_present() -> bool:
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        return True
    return bool(paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class ContextCache:
    """One context per distinct set of files, so a fleet shares a handful of contexts."""

    def __init__(self, defaults: TlsFiles, environ: Mapping[str, str] = os.environ) -> None:
        self.defaults = defaults
        self.environ = environ
        self._contexts: dict[TlsFiles, ssl.SSLContext] = {}

    def get(self, ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
        files = TlsFiles(
            ca if ca is not None else self.defaults.ca,
            cert if cert is not None else self.defaults.cert,
            key if key is not None else self.defaults.key,
        )
        if files not in self._contexts:
            self._contexts[files] = make_context(files, self.environ)
        return self._contexts[files]
