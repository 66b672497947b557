"""Shared fixtures: small real models and paths to the optional ../shared data."""

from __future__ import annotations

import copy
import datetime
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # train.py / test.py live at the repo root

from models.checkpoint import checkpoint_metadata, save_checkpoint  # noqa: E402
from models.identity import model_digest  # noqa: E402
from models.datasets import Preprocess  # noqa: E402
from models.bottleneck import BottleneckConfig  # noqa: E402
from models.early_exit import EarlyExitMobileNetV2, ModelConfig  # noqa: E402

SIZE = 32  # input size of the small test checkpoint
NAMES = [f"c{i}" for i in range(10)]
PREPROCESS = Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3)  # the small test checkpoint's
BOTTLENECK_SPLIT = 8  # small_model at 32 px: activation (24, 2, 2) here
BOTTLENECK = BottleneckConfig(split_point=BOTTLENECK_SPLIT, channels=4, hidden=8, code_max=15)


def digest_of(model: EarlyExitMobileNetV2, names: list[str] = NAMES, preprocess: Preprocess = PREPROCESS) -> str:
    """The content digest of ``model`` saved as the test checkpoint (what a device's requests name)."""
    return model_digest(checkpoint_metadata(model, names, preprocess), model.state_dict())


@pytest.fixture
def small_model() -> EarlyExitMobileNetV2:
    """A narrow 10-class model with three exits, in eval mode, deterministic weights."""
    torch.manual_seed(0)
    model = EarlyExitMobileNetV2(ModelConfig(width_mult=0.35, num_classes=10, exits=[0.15, 0.45, 0.75],
                                             exit_channels=16))
    # Random BN statistics so that eval mode is not the identity (a stronger equivalence check).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def with_bottleneck(model: EarlyExitMobileNetV2, config: BottleneckConfig = BOTTLENECK) -> EarlyExitMobileNetV2:
    """``model`` with a bottleneck whose BN statistics are random (so eval mode is not the identity)."""
    torch.manual_seed(1)
    model.attach_bottleneck(config)
    for m in model.bottleneck.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # A wider encoder output than at init, so that codes take many values, some clamped.
    with torch.no_grad():
        model.bottleneck.encoder[1].weight.mul_(20)
    return model.eval()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (real data and weights) is not present")
    return SHARED


@pytest.fixture
def checkpoint(small_model, tmp_path) -> Path:
    """``small_model`` saved as a train.py checkpoint (32 px input, classes c0..c9)."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, small_model, NAMES, PREPROCESS)
    return path


@pytest.fixture
def other_checkpoint(small_model, tmp_path) -> Path:
    """Another version of ``checkpoint``'s model: the same architecture, a retrained final classifier (as a user
    retrains and redeploys), saved beside it."""
    other = copy.deepcopy(small_model)
    with torch.no_grad():
        torch.manual_seed(7)
        other.final.classifier[-1].weight.copy_(torch.randn_like(other.final.classifier[-1].weight))
    path = tmp_path / "other.pt"
    save_checkpoint(path, other, NAMES, PREPROCESS)
    return path


def make_cert(tmp_path: Path, ip: str | None = None) -> tuple[Path, Path]:
    """A self-signed CA certificate for "localhost" (and ``ip`` when given) and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost")] + ([x509.IPAddress(ipaddress.ip_address(ip))] if ip else [])),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


