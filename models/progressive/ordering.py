"""The order units travel in (``ORDERS``) and their packing into chunks."""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

from models.progressive.format import ChunkInfo, TensorInfo, raw_low_plane

@dataclass
class Units:
    """Coded units of one checkpoint, shared by every order: ``units[(group, plane)]`` bytes (raw tensors
    of the group included at plane 0), the quantised magnitudes and the per-layer error proxy."""

    infos: list[TensorInfo]
    data: dict[tuple[int, int], bytes]
    distortion: dict[int, list[float]]  # group -> mean per-channel relative squared error after p planes
    # (times the layer's weight when build_package is given layer_weights)


def plane_major(groups: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(g, p) for p in range(lo, hi) for g in groups]


def greedy_by_value(units: Units, start: dict[int, int], planes: int) -> list[tuple[int, int]]:
    """Units from plane ``start[g]`` of each group on, largest distortion drop per byte first (a group's planes
    stay in order: its next unit enters the queue when the previous one is taken)."""
    def priority(g: int, p: int) -> float:
        gain = units.distortion[g][p] - units.distortion[g][p + 1]
        return -gain / max(1, len(units.data[(g, p)]))

    heap = [(priority(g, p), g, p) for g, p in start.items() if p < planes]
    heapq.heapify(heap)
    out = []
    while heap:
        _, g, p = heapq.heappop(heap)
        out.append((g, p))
        if p + 1 < planes:
            heapq.heappush(heap, (priority(g, p + 1), g, p + 1))
    return out


def stages(units: Units, order: str, planes: int, usable: int) -> list[tuple[str, list[tuple[int, int]]]]:
    head = [i for i, t in enumerate(units.infos) if t.kind == "planes" and t.part == "head"]
    rest = [i for i, t in enumerate(units.infos) if t.kind == "planes" and t.part == "rest"]
    if order == "split":
        return [("head-usable", plane_major(head, 0, usable)), ("head-refine", plane_major(head, usable, planes)),
                ("rest-usable", plane_major(rest, 0, usable)), ("rest-refine", plane_major(rest, usable, planes))]
    # value: the head usable first (the device answers at its split), then one plane of every other backbone
    # layer (a layer still all zero kills the whole network, which the additive proxy underrates), then the
    # head's refinement and the backbone's by value per byte, and last the exits past the split point, which
    # the final classifier does not use.
    later_exits = [g for g in rest if units.infos[g].name.startswith("exits.")]
    backbone = [g for g in rest if g not in later_exits]
    if order == "whole":
        head_exits = [g for g in head if units.infos[g].name.startswith("exits.")]
        backbone = [g for g in head if g not in head_exits] + backbone
        return [("first", plane_major(backbone, 0, 1)),
                ("value", greedy_by_value(units, dict.fromkeys(backbone, 1), planes)),
                ("exits", plane_major(head_exits + later_exits, 0, planes))]
    start = {**dict.fromkeys(head, usable), **dict.fromkeys(backbone, 1)}
    return [("head-usable", plane_major(head, 0, usable)), ("rest-first", plane_major(backbone, 0, 1)),
            ("value", greedy_by_value(units, start, planes)), ("later-exits", plane_major(later_exits, 0, planes))]


def pack_chunks(stages, units: Units, chunk_bytes: int, bits: int,
                 usable_planes: int) -> tuple[list[ChunkInfo], list[bytes]]:
    raw_of: dict[int, tuple[int, ...]] = {}
    for i, t in enumerate(units.infos):
        if t.kind == "raw":
            raw_of[t.group] = raw_of.get(t.group, ()) + (i,)
    chunks: list[ChunkInfo] = []
    payloads: list[bytes] = []
    for stage, seq in stages:
        current: list[tuple[int, int]] = []
        size = 0
        for unit in seq + [None]:  # None flushes the stage's last chunk
            data = units.data.get(unit, b"") if unit is not None else b""
            if current and (unit is None or size + len(data) > chunk_bytes):
                payload = b"".join(units.data[u] for u in current)
                low_plane = raw_low_plane(bits, usable_planes)
                raw = tuple(r for g, p in current if p in (0, low_plane) for r in raw_of.get(g, ())
                            if p == 0 or units.infos[r].dtype == "float32")
                chunks.append(ChunkInfo(len(chunks), tuple(current), raw, len(payload),
                                        hashlib.sha256(payload).hexdigest(), stage))
                payloads.append(payload)
                current, size = [], 0
            if unit is not None:
                current.append(unit)
                size += len(data)
    return chunks, payloads
