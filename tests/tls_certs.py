"""A throwaway certificate authority and a server certificate for a made-up name, for TLS tests.

Made with the `openssl` command line (the `cryptography` package is not a dependency): a CA,
and a leaf for one DNS name signed by it, with the extensions strict verification expects.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    name: str  # the only name the server certificate is valid for (no IP address)
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """Trusts the test CA only, and checks host names, like any client should."""
        return ssl.create_default_context(cafile=str(self.ca))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path, name: str) -> Certificates:
    """A CA and a server certificate for `name`, written under `directory`."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=omnidaemon test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    (directory / "leaf.ext").write_text(
        f"subjectAltName=DNS:{name}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
        cwd=directory,
    )  # fmt: skip
    return Certificates(name, directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key")
