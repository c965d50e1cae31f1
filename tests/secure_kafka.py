"""The project's own broker with a SASL_SSL listener: certificates made with the JDK's keytool, SCRAM users added
when the log directory is formatted. For the secure-transport tests (tests/e2e/test_secure_transport.py).

The broker keeps a PLAINTEXT listener for itself (inter-broker traffic and LocalKafka's readiness probe); every
tally client in the tests connects through the SASL_SSL one.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ops.kafka_local import LocalKafka
from tally.config import Settings
from tally.kafka_auth import KafkaAuth

STORE_PASSWORD = "tally-test-store"  # noqa: S105 - the test keystores' own password
USER = "tally"
PASSWORD = "scram-password-for-tests"  # noqa: S105 - the test broker's own SCRAM user
MECHANISM = "SCRAM-SHA-512"


def keytool(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["keytool", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"keytool {' '.join(args[:2])} failed: {proc.stdout}{proc.stderr}")


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A test CA and a broker key pair it signs for 127.0.0.1 and localhost: (broker PKCS12 keystore, CA PEM).

    Valid from a day before the real now for ten years, so a suite run with the clock moved ahead still trusts them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    common = ("-storetype", "PKCS12", "-storepass", STORE_PASSWORD)
    validity = ("-startdate", "-1d", "-validity", "3650")
    keytool(directory, "-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048",
            "-dname", "CN=tally test CA", "-ext", "bc:c", *validity, "-keystore", "ca.p12", *common)
    keytool(directory, "-exportcert", "-alias", "ca", "-keystore", "ca.p12", *common, "-rfc", "-file", "ca.pem")
    keytool(directory, "-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048",
            "-dname", "CN=localhost", *validity, "-keystore", "broker.p12", *common)
    keytool(directory, "-certreq", "-alias", "broker", "-keystore", "broker.p12", *common, "-file", "broker.csr")
    keytool(directory, "-gencert", "-alias", "ca", "-keystore", "ca.p12", *common, "-infile", "broker.csr",
            "-outfile", "broker.pem", "-rfc", *validity, "-ext", "SAN=ip:127.0.0.1,dns:localhost",
            "-ext", "EKU=serverAuth")
    keytool(directory, "-importcert", "-alias", "ca", "-file", "ca.pem", "-keystore", "broker.p12", *common,
            "-noprompt")
    keytool(directory, "-importcert", "-alias", "broker", "-file", "broker.pem", "-keystore", "broker.p12",
            *common)
    return directory / "broker.p12", directory / "ca.pem"


@dataclass
class SecureBroker:
    broker: LocalKafka
    auth: KafkaAuth  # how tally's clients reach it: SASL_SSL, SCRAM-SHA-512, the test CA

    def wrong_password(self) -> KafkaAuth:
        return KafkaAuth(self.auth.bootstrap, "SASL_SSL", MECHANISM, USER, "not-the-password",
                         self.auth.ssl_cafile)


def start_secure_broker(directory: Path, plain: int, secure: int, controller: int, partitions: int,
                        extra: dict[str, str]) -> SecureBroker:
    """Start a broker with a SASL_SSL listener on 127.0.0.1:`secure` (SCRAM user USER/PASSWORD)."""
    keystore, ca = make_certificates(directory / "tls")
    settings = Settings(data_dir=directory / "broker", kafka_bootstrap=f"127.0.0.1:{plain}",
                        kafka_controller_port=controller, partitions=partitions)
    listeners = f"PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{secure},CONTROLLER://127.0.0.1:{controller}"
    properties = {
        **extra,
        "listeners": listeners,
        "advertised.listeners": listeners,
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(keystore),
        "ssl.keystore.password": STORE_PASSWORD,
        "ssl.key.password": STORE_PASSWORD,
    }
    broker = LocalKafka(settings, properties, ["--add-scram", f"{MECHANISM}=[name={USER},password={PASSWORD}]"])
    broker.start(timeout=120.0)
    return SecureBroker(broker, KafkaAuth(f"127.0.0.1:{secure}", "SASL_SSL", MECHANISM, USER, PASSWORD, str(ca)))
