"""The federation's keys: a private CA and a TLS server certificate (openssl), and one SSH key pair per SuperNode
for node authentication (ssh-keygen)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from ..errors import FederationError
from .processes import call

LOCAL_HOSTS = ("127.0.0.1", "localhost")  # the server certificate's SANs

# openssl's own config, so the certificates do not depend on the system's openssl.cnf. Python 3.13's default
# TLS context is strict (X509_STRICT): CA flag critical, key identifiers present.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no

[dn]
O = aflora
CN = {common_name}

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def system_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` is needed to create the federation's keys; install it (e.g. `apt-get install {package}`)")
    return found


def make_certificates(folder: Path, hosts: tuple[str, ...] = LOCAL_HOSTS) -> dict[str, Path]:
    """A private CA and a server certificate for `hosts` (IPs and DNS names), EC P-256; kept if present."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if all(p.is_file() for p in paths.values()):
        return paths
    openssl = system_tool("openssl", "openssl")
    san = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    (folder / "ca.cnf").write_text(OPENSSL_CNF.format(common_name="aflora federation CA", san=san))
    (folder / "server.cnf").write_text(OPENSSL_CNF.format(common_name=hosts[-1], san=san))
    for key in ("ca.key", "server.key"):
        call([openssl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key], what="openssl (key)", cwd=folder)
        os.chmod(folder / key, 0o600)
    call([openssl, "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650", "-config", "ca.cnf",
          "-extensions", "ca_ext", "-out", "ca.crt"], what="openssl (CA certificate)", cwd=folder)
    call([openssl, "req", "-new", "-key", "server.key", "-config", "server.cnf", "-out", "server.csr"],
         what="openssl (server request)", cwd=folder)
    call([openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
          "-days", "825", "-sha256", "-extfile", "server.cnf", "-extensions", "server_ext", "-out", "server.pem"],
         what="openssl (server certificate)", cwd=folder)
    return paths


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def make_node_key(private_key: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (what `flower-supernode` and `flwr supernode register` read);
    kept if present. Returns the public key's path."""
    public_key = private_key.with_name(private_key.name + ".pub")
    if private_key.is_file() and public_key.is_file():
        return public_key
    private_key.parent.mkdir(parents=True, exist_ok=True)
    call([system_tool("ssh-keygen", "openssh-client"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C",
          f"aflora-{private_key.name}", "-f", str(private_key)], what="ssh-keygen")
    return public_key
