"""Secure defaults, shared by both daemons: where a bearer token comes from, and which exposures a config may ask
for (a port off loopback needs TLS and a way to authenticate callers, unless the config says ``insecure: true``).

A token is never a config value: on the command line (``key=value``) it would be visible to every user in
``ps``. It comes from a file (``auth_token_file``) or the environment (``SPINN_AUTH_TOKEN``).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Mapping, Optional

from models.config import ConfigError

#: Environment variable holding the bearer token when no ``auth_token_file`` is given.
TOKEN_ENV = "SPINN_AUTH_TOKEN"
#: A token file larger than this is not a token (a wrong path, e.g. a certificate bundle).
MAX_TOKEN_BYTES = 4096


def is_loopback(address: str) -> bool:
    """True when ``host:port`` names this machine only: ``localhost``, 127.0.0.0/8 or ``[::1]``.

    Anything else (``0.0.0.0``, ``[::]``, an empty host, a name, another address) counts as reachable from
    other hosts: a name may resolve anywhere, so it is not trusted to be local.
    """
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: Optional[str], environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The bearer token: the stripped contents of ``token_file`` when given, else ``$SPINN_AUTH_TOKEN``, else None.

    Raises ConfigError naming ``auth_token_file`` for a file that is missing, unreadable, empty, larger than
    MAX_TOKEN_BYTES or not one line of printable ASCII (gRPC metadata allows nothing else), and naming the
    variable for an empty or malformed environment value.
    """
    if token_file is not None:
        path = Path(token_file)
        try:
            if path.stat().st_size > MAX_TOKEN_BYTES:
                raise ConfigError(f"config key 'auth_token_file': {token_file!r} is over {MAX_TOKEN_BYTES} bytes; "
                                  "a token file holds one line")
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config key 'auth_token_file': cannot read {token_file!r} ({err})") from None
        _check_token(text, "config key 'auth_token_file'")
        return text
    value = environ.get(TOKEN_ENV)
    if value is None:
        return None
    value = value.strip()
    _check_token(value, f"environment variable {TOKEN_ENV}")
    return value


def _check_token(token: str, where: str) -> None:
    if not token:
        raise ConfigError(f"{where}: the token is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError(f"{where}: a token is one word of printable ASCII (no spaces, no line breaks)")


def token_file_is_private(token_file: str) -> bool:
    """False when others than the owner may read ``token_file`` (the daemons log a warning then)."""
    try:
        return not (Path(token_file).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return True


def check_server_exposure(address: str, key: str, tls: bool, authenticated: bool, token: bool,
                          insecure: bool) -> None:
    """Refuse a server config that would expose the port without protection.

    Off loopback: without TLS the port is refused unless ``insecure`` (a trusted network, e.g. a test
    namespace); a bearer token without TLS is refused even then (it would travel in the clear and could be
    replayed); with TLS but no way to authenticate callers (``authenticated``: a token or client certificates)
    the port is refused unless ``insecure``. On loopback everything is allowed.

    Raises ConfigError naming ``key`` or ``insecure``.
    """
    if is_loopback(address):
        return
    if token and not tls:
        raise ConfigError(f"config key '{key}': {address!r} is reachable from other hosts and a bearer token is "
                          "set without TLS (it would travel in the clear); set tls_cert and tls_key")
    if insecure:
        return
    if not tls:
        raise ConfigError(f"config key 'insecure': {key} {address!r} is reachable from other hosts without TLS; "
                          "set tls_cert and tls_key (and auth_token_file or tls_client_ca), or insecure: true on "
                          "a network you trust")
    if not authenticated:
        raise ConfigError(f"config key 'insecure': {key} {address!r} is reachable from other hosts and anyone may "
                          f"call it; set auth_token_file (or {TOKEN_ENV}) or tls_client_ca, or insecure: true")


def check_client_exposure(addresses: list[str], tls: bool, token: bool, insecure: bool) -> None:
    """Refuse a client config that would send work or a token to another host in the clear.

    Raises ConfigError naming ``cloud`` (a token without TLS off loopback, always) or ``insecure`` (plaintext
    off loopback without ``insecure: true``).
    """
    remote = [a for a in addresses if not is_loopback(a)]
    if not remote or tls:
        return
    if token:
        raise ConfigError(f"config key 'cloud': {remote[0]!r} is another host and a bearer token is set without "
                          "TLS (it would travel in the clear); set tls_ca")
    if not insecure:
        raise ConfigError(f"config key 'insecure': cloud {remote[0]!r} is another host and the channel has no TLS; "
                          "set tls_ca, or insecure: true on a network you trust")
