"""Delta upgrades (models/progressive/delta.py): a device holding v1 ends bit-exact on v2's package weights, starts
from v1's, and refuses a delta whose base it does not hold."""

from __future__ import annotations

import copy

import pytest
import torch

from models.progressive import Decoder, ProgressiveError
from models.progressive.delta import build_delta_package, final_weights
from proto.manifest import manifest_from_message, manifest_message, seal
from tests.test_progressive import package_of
from models.checkpoint import checkpoint_metadata
from models.datasets import Preprocess
from tests.conftest import NAMES, SIZE


def fine_tuned(model, scale: float = 0.02, seed: int = 5):
    """``model`` with every float tensor moved by ``scale`` of its own spread, as a short fine-tune moves it."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.dtype == torch.float32 and t.numel() > 1:
                t.add_(torch.randn(t.shape, generator=g) * scale * t.std())
    return other


def delta_of(v1, v2, plane_coder="zstd"):
    meta = checkpoint_metadata(v2, NAMES, Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3))
    package = build_delta_package(v2.state_dict(), final_weights(v1.state_dict()), meta, "spinn", "2", 7,
                                  v2.exit_points, chunk_bytes=2048, plane_coder=plane_coder)
    seal(package.manifest)
    return package


@pytest.mark.parametrize("plane_coder", ["zstd", "context"])
def test_a_delta_ends_bit_exact_on_v2_and_starts_on_v1(small_model, plane_coder):
    v2 = fine_tuned(small_model)
    package = delta_of(small_model, v2, plane_coder)
    m = manifest_from_message(manifest_message(package.manifest))  # as a device reads it
    base = final_weights(small_model.state_dict())
    decoder = Decoder(m, base)
    start = decoder.state_dict()
    for name, t in base.items():  # before any chunk: v1's weights (on v2's grid: within half a step)
        info = next(i for i in m.tensors if i.name == name)
        if info.kind == "planes":
            step = torch.from_numpy(info.scales).reshape(-1, *[1] * (t.dim() - 1))
            inside = t.abs() <= step * (2 ** 15 - 1)  # beyond v2's range a base weight saturates
            assert inside.float().mean() > 0.9
            assert ((start[name] - t).abs()[inside] <= (step / 2 + 1e-7).expand_as(t)[inside]).all(), name
        else:
            assert torch.equal(start[name], t), name
    for i, payload in enumerate(package.payloads):
        decoder.apply(i, payload)
    target = final_weights(v2.state_dict())
    assert all(torch.equal(decoder.state_dict()[n], target[n]) for n in target)
    full = package_of(v2, plane_coder=plane_coder)
    assert decoder.digest() == m.final_sha256 == full.manifest.final_sha256


def test_a_small_change_costs_a_fraction_of_the_full_package(small_model):
    v2 = fine_tuned(small_model, scale=0.002)
    delta = delta_of(small_model, v2).manifest.total_bytes
    full = package_of(v2).manifest.total_bytes
    assert delta < 0.8 * full, (delta, full)


def test_a_delta_for_other_weights_is_refused_before_any_chunk(small_model):
    package = delta_of(small_model, fine_tuned(small_model))
    base = final_weights(small_model.state_dict())
    other = dict(base)
    name = next(n for n, t in base.items() if t.dim() >= 2)
    other[name] = other[name].clone()
    other[name].view(-1)[0] += 1.0
    for held in (other, None, {k: v for k, v in base.items() if k != name}):
        with pytest.raises(ProgressiveError, match="base_sha256"):
            Decoder(package.manifest, held)


def test_a_delta_manifest_names_its_base_and_only_a_delta_does(small_model):
    msg = manifest_message(delta_of(small_model, fine_tuned(small_model)).manifest)
    assert msg.order == "delta" and len(msg.base_sha256) == 64
    for change in ({"base_sha256": ""}, {"base_sha256": "xyz"}):
        bad = type(msg)()
        bad.CopyFrom(msg)
        for key, value in change.items():
            setattr(bad, key, value)
        with pytest.raises(ProgressiveError, match="base_sha256"):
            manifest_from_message(bad)
    full = manifest_message(package_of(small_model).manifest)
    full.base_sha256 = "ab" * 32
    with pytest.raises(ProgressiveError, match="base_sha256"):
        manifest_from_message(full)


def test_a_delta_needs_the_same_architecture(small_model):
    v2 = fine_tuned(small_model)
    base = final_weights(small_model.state_dict())
    name = next(iter(base))
    base[name] = torch.zeros(3)
    meta = checkpoint_metadata(v2, NAMES, Preprocess(SIZE, SIZE, (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(ValueError, match="same architecture"):
        build_delta_package(v2.state_dict(), base, meta, "spinn", "2", 7, v2.exit_points)


@pytest.mark.parametrize("kind", ["zstd", "context", "delta"])
def test_random_chunks_that_pass_their_hash_are_refused_or_decode_within_bounds(small_model, kind):
    """A hostile cloud can make any bytes match a chunk's hash (it writes the manifest): random payloads of the
    chunk's own size go into the decoder, which refuses them (ProgressiveError) or decodes bounded weights."""
    import dataclasses
    import hashlib
    import random

    if kind == "delta":
        package, base = delta_of(small_model, fine_tuned(small_model)), final_weights(small_model.state_dict())
    else:
        package, base = package_of(small_model, plane_coder=kind), None
    rng, refused, decoded = random.Random(0), 0, 0
    for _ in range(60):
        index = rng.randrange(min(8, len(package.payloads)))
        decoder = Decoder(package.manifest, base)
        for i in range(index):
            decoder.apply(i, package.payloads[i])
        payload = rng.randbytes(package.manifest.chunks[index].size)
        decoder.manifest = dataclasses.replace(package.manifest, chunks=[
            dataclasses.replace(c, sha256=hashlib.sha256(payload).hexdigest()) if c.index == index else c
            for c in package.manifest.chunks])
        try:
            changed = decoder.apply(index, payload)
        except ProgressiveError:
            refused += 1
            continue
        decoded += 1
        for name in changed:
            value = decoder.tensors([name]).get(name)
            assert value is None or value.shape == dict(small_model.state_dict())[name].shape
    assert refused + decoded == 60 and refused > 0
