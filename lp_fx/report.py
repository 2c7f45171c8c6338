"""Per-graph reports: what the backend found in each compiled graph and what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Pair


@dataclass
class LayerInfo:
    """One decoder layer found in a graph."""

    index: int
    path: str
    cls: str
    sub_blocks: int
    note: str | None = None


@dataclass
class GraphReport:
    """What happened to one graph Dynamo handed to the backend."""

    index: int  # the graph's place among those its backend object compiled, from 0
    stack: str | None = None
    layers: list[LayerInfo] = field(default_factory=list)
    pairs_rewritten: list[tuple[Pair, str]] = field(default_factory=list)
    pairs_skipped: list[tuple[Pair, str]] = field(default_factory=list)
    shuffled: tuple[int, ...] | None = None  # the shuffled range's layers in the order they run
    shuffle_skipped: str | None = None
    rank: int | None = None
    collectives: int | None = None
    param_bytes: int | None = None
    released_bytes: int | None = None
    gemms: tuple[int, int] | None = None  # GEMM calls in the graph before and after fuse=True
    fuse_bytes: tuple[int, int] | None = None  # parameter bytes the graph reads, before and after fusing
    pairs_fused: list[tuple[Pair, int]] = field(default_factory=list)  # (pair, batched GEMMs it runs)
    fuse_skipped: list[tuple[Pair, str]] = field(default_factory=list)
    parameter_use: dict[int, str] | None = field(default=None, repr=False)  # id(param) -> "whole" | "slice"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few human-readable lines."""
        found = f"{len(self.layers)} layers in {self.stack or 'the model object'}" if self.layers else "no layers"
        lines = [f"graph {self.index}: {found}"]
        if self.pairs_rewritten:
            lines.append("  rewritten: " + ", ".join(f"{p} {m}" for p, m in self.pairs_rewritten))
        lines += [f"  skipped {p}: {why}" for p, why in self.pairs_skipped]
        if self.shuffled:
            lines.append(
                f"  shuffled layers {min(self.shuffled)}..{max(self.shuffled)}: run in the order "
                + ", ".join(map(str, self.shuffled))
            )
        if self.shuffle_skipped:
            lines.append(f"  shuffle not applied: {self.shuffle_skipped}")
        if self.gemms is not None:
            fused = ", ".join(f"{p} ({n} GEMMs)" for p, n in self.pairs_fused) or "none"
            lines.append(f"  fused pairs: {fused}; GEMMs {self.gemms[0]} -> {self.gemms[1]}; parameter bytes "
                         f"{self.fuse_bytes[0]} -> {self.fuse_bytes[1]}")
        lines += [f"  not fused in {p}: {why}" for p, why in self.fuse_skipped]
        if self.collectives is not None:
            lines.append(f"  rank {self.rank}: {self.collectives} collectives, {self.param_bytes} parameter bytes")
        if self.released_bytes:
            lines.append(f"  released {self.released_bytes} bytes of parameters this rank does not compute with")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
