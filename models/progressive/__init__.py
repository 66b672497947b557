"""Progressive weight package: per-output-channel sign-magnitude bit planes, most significant first.

One implementation for both sides: the cloud builds a ``Package`` from a model's state dict; the device feeds
its chunks, in order, to a ``Decoder`` and reads the current (partially refined) weights after each one.

Coding, per conv/linear weight ``w`` of shape ``(C_out, ...)``, with ``B`` bits (default 16):

- ``scale[c] = max|w[c]| / (2**(B-1) - 1)`` (float32), ``q = round(|w| / scale)`` (``B-1`` magnitude bits),
  plus a sign. Magnitudes travel as ``B-1`` bit planes, MSB first.
- Sign-magnitude keeps a weight exactly 0 until its first 1 bit arrives; its sign travels in that plane, once.
  With ``r`` planes still missing, a weight with known top bits ``t != 0`` is reconstructed at the middle of
  its interval by default, ``t * 2**r + (2**r - 1) / 2``; a package built here sends, per layer and per
  number of planes known, the mean of the missing low bits over the layer's significant weights
  (``offsets``, a few floats per layer in the manifest), which is where the weights are (magnitudes are peaked
  near 0, so the true values sit below the middle): measured on the quickstart model, with 4 planes of every
  layer, 0.882 top-1 against 0.862 at the middle (full precision 0.895). With all planes, exactly ``q``.
- A plane is coded in three sections (the split that makes entropy coding pay): significance bits of weights
  still zero (sparse in early planes: zstd shrinks them), signs of weights that became significant, and
  refinement bits of weights already significant (near random: sent raw). Each section is zstd-compressed
  only when that makes it smaller.
- Small tensors (BatchNorm parameters and statistics, biases) travel with the first plane of the weight they
  follow in the state dict (they are useless without it), byte-shuffled then zstd. A float32 one travels in two
  halves: its high 16 bits (sign, exponent, 7 mantissa bits: relative error < 2**-8) with that first plane, its
  low 16 bits with plane ``raw_low_plane`` (the first plane past ``usable_planes``); until they arrive the
  missing bits sit at the middle of their interval. On the quickstart model the small tensors are 4.5 % of the
  float32 bytes coded whole, 1.9 % as high halves (and 2.6 % for the low ones, later).

- Output-bias correction (``models/bias_correction.py``): while a layer has 1..``corrected_planes`` planes,
  the unit that brings its p-th plane ends with the expected shift of its outputs caused by the weights'
  error so far (data-free input means), which the decoder adds to the BatchNorm's ``running_mean`` that
  follows (a linear layer's bias: subtracted). Before a BatchNorm the shift is coded per channel as int16 steps
  of 1/32 of that BatchNorm's standard deviation (``spread``): a shift the BatchNorm would not notice is code 0,
  which zstd makes nearly free (StanfordCars dev model: 39 KB of shifts in the first 12.5 % of the stream
  instead of 70 KB as one float32 scale and an int8 per channel, which a linear layer still uses). Past that
  plane the shift is dropped, so the final weights are exactly the B-bit ones.

A *unit* is (group, plane); a *chunk* is a run of consecutive units in the package's order, at most about
``chunk_bytes`` long (a unit is never cut). Orders (``ORDERS``):

- ``split`` (default): the device's head (blocks before ``split_point`` and its exits) to ``usable_planes``,
  plane by plane across its layers; then the head to full precision; then the rest of the network the same
  way. A device at that split is usable early and eventually holds the whole model.
- ``value``: for a device that must also answer alone with the final classifier. The head to ``usable_planes``
  (as ``split``), one plane of every backbone layer, then the head's and the backbone's remaining planes by
  value per byte: the drop of the layer's mean per-channel relative squared weight error
  (``||w_c - w^_c||^2 / ||w_c||^2``, a proxy for output noise since a BatchNorm follows every conv) divided by
  the unit's bytes; the exits past the split point last.
- ``whole``: the final classifier soonest, for a device that expects to answer alone: one plane of every
  backbone layer, then all their remaining planes by value per byte as in ``value`` (the head is not served
  first), then every exit. Its device answers through split point 0 until its head and exits are usable, which
  in this order is near the end.

Plane coders (``PLANE_CODERS``, the manifest's ``plane_coder``): ``zstd`` codes each section as above;
``context`` codes every bit with constriction's ANS coder under a probability chosen by what the device already
holds (``context``). Delta packages (``delta``): a device holding v1 whole receives the difference to v2 on v2's
grid, its head first, and ends bit-exact on v2's package weights; the manifest names its base. The cloud offers one
to a device that names the weights it holds (cloud/delivery.py ``offered_package``).

Files: ``format`` (constants, manifest, package), ``sections`` (byte-level pieces), ``planes`` (one tensor's bit
planes), ``context`` (the context-modelled plane coder), ``ordering`` (orders and chunks), ``build`` (the cloud:
``build_package``), ``delta`` (``build_delta_package``), ``decoder`` (the device: ``Decoder``), ``swap``
(``updated_model``).
"""

from models.progressive.build import build_package, code_units, describe_tensors, tensor_part, usable_chunk
from models.progressive.decoder import Decoder, Progress, state_digest
from models.progressive.format import (DEFAULT_BITS, DEFAULT_CHUNK_BYTES, DEFAULT_CORRECTED_PLANES,
                                       DEFAULT_USABLE_PLANES, ORDERS, PLANE_CODERS, ChunkInfo, Manifest, Package,
                                       ProgressiveError, TensorInfo, raw_low_plane)
from models.progressive.planes import dequantize, fill_offsets, quantize
from models.progressive.swap import updated_model

__all__ = [
    "DEFAULT_BITS", "DEFAULT_CHUNK_BYTES", "DEFAULT_CORRECTED_PLANES", "DEFAULT_USABLE_PLANES", "ORDERS",
    "PLANE_CODERS",
    "ChunkInfo", "Decoder", "Manifest", "Package", "Progress", "ProgressiveError", "TensorInfo", "build_package",
    "code_units", "dequantize", "describe_tensors", "fill_offsets", "quantize", "raw_low_plane", "state_digest",
    "tensor_part", "updated_model", "usable_chunk",
]
