"""Communication: the bytes a stage step moves over the links inside a node and between nodes, and the
time that communication adds to the compute (imports no torch).

Links. `LINKS` holds nominal figures per GPU kind: inside a node the bus bandwidth NCCL reaches per
GPU over NVLink, between nodes the bandwidth of one node's network adapters together (p4d / p4de:
4 x 100 Gb/s EFA = 400 Gb/s = 50 GB/s; p5: 3.2 Tb/s = 400 GB/s). They are nominal, not measured:
measure the cluster's bus bandwidth with nccl-tests and pass it to `slimmoe plan` with
`--intra-node-gb-per-s` and `--inter-node-gb-per-s` (gigabytes per second).

Collectives follow NCCL's ring algorithm. Over n ranks an all-gather or a reduce-scatter of a
tensor of S bytes makes every rank send S (n-1)/n bytes (its "bus bytes"), an all-reduce 2 S (n-1)/n.
When a ring spans several nodes with r of its ranks on each, r - 1 of each node's r ring edges stay
inside the node and one leaves it: a rank's share of what crosses nodes is bus / r, and a node's
adapters carry r times a rank's share, that is the bus bytes once. Several rings at once (HSDP's
all-reduce: one ring per shard index) add up on the adapters. The figures here are per rank; a
node's adapters carry a rank's `inter` times the ranks on the node.

Time on the links: each kind of link is busy for its bytes over its bandwidth, and the two kinds
work at the same time (NVLink and the network are separate hardware, and FSDP2 issues HSDP's
all-reduce on its own stream), so a piece of communication takes the longer of the two.

What a stage moves, per rank (P parameters, bf16 compute over float32 master weights on GPU):
- fsdp over a shard group of g ranks, per micro-batch: an all-gather of the bf16 parameters in
  forward and again in backward, a reduce-scatter of the float32 gradients: (2 x 2 + 4) P (g-1)/g.
  Full sharding is g = world; HSDP keeps g within a node and adds, once per optimizer step (on the
  last micro-batch's backward; the earlier ones skip it), an all-reduce of the group's float32
  gradient shard across the R replicas: 2 x 4 P/g (R-1)/R per rank.
- ddp: an all-reduce of the float32 gradients on the last micro-batch (`no_sync` before it).
- deepspeed ZeRO-2: a reduce-scatter of the gradients (training dtype) after every backward (ZeRO-2
  keeps only its partition, so it cannot wait for the accumulation boundary), and an all-gather of
  the updated parameters after the optimizer step; ZeRO-1 reduces once, at the boundary.
- scoring under fsdp: every rank of a shard group runs every calibration batch of the group (all of
  them at full sharding), each batch a forward and backward with both all-gathers and the
  reduce-scatter; no gradient crosses groups (the scores are summed once at the end, a few MB).
  ddp and deepspeed score their own batches with no communication.
- a teacher actor split layer by layer over several GPUs of one node: each batch's hidden states
  ([tokens, hidden], bf16) cross each boundary once, one boundary at a time.

Overlap. FSDP2 prefetches the next layer's parameters and reduces a layer's gradients while the next
computes, so a micro-batch's communication hides behind that micro-batch's compute: exposed =
max(0, comm - compute) per micro-batch. The step's once-per-step collectives (HSDP's and ddp's
all-reduce) ride on the last micro-batch. DeepSpeed's all-gather after the optimizer step, and a
split teacher's hand-overs (the next GPU waits for them), hide behind nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

GB = 1e9


@dataclass(frozen=True)
class Links:
    """Bandwidths in GB/s (1e9 bytes): `intra` NCCL's bus bandwidth per GPU inside a node, `inter`
    one node's network adapters together."""

    intra_gb_s: float
    inter_gb_s: float

    def seconds(self, traffic: "Traffic", ranks_per_node: int) -> float:
        """The time `traffic` (one rank's bytes) keeps the busier kind of link busy, every rank of the
        node sending alike."""
        intra = traffic.intra / (self.intra_gb_s * GB)
        inter = traffic.inter * max(1, ranks_per_node) / (self.inter_gb_s * GB)
        return max(intra, inter)


# Nominal; override with `slimmoe plan --intra-node-gb-per-s / --inter-node-gb-per-s` after
# measuring. A100: NVLink 3 (600 GB/s both ways per GPU), p4d/p4de 400 Gb/s between nodes;
# H100/H200: NVLink 4 (900 GB/s both ways), p5/p5e 3.2 Tb/s between nodes.
LINKS = {"a100": Links(300.0, 50.0), "h100": Links(450.0, 400.0), "h200": Links(450.0, 400.0)}


def links_for(gpu: Optional[str], intra_gb_s: Optional[float] = None,
              inter_gb_s: Optional[float] = None) -> Optional[Links]:
    """The links of a GPU kind, either bandwidth replaced by a given one; None when a bandwidth is
    neither given nor known for `gpu`."""
    for name, value in (("intra-node", intra_gb_s), ("inter-node", inter_gb_s)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} bandwidth must be positive, got {value}")
    known = LINKS.get((gpu or "").lower())
    intra = intra_gb_s if intra_gb_s is not None else (known.intra_gb_s if known else None)
    inter = inter_gb_s if inter_gb_s is not None else (known.inter_gb_s if known else None)
    if intra is None or inter is None:
        return None
    return Links(float(intra), float(inter))


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends: `intra` to ranks of its own node, `inter` its share of what leaves the node."""

    intra: float = 0.0
    inter: float = 0.0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.intra + other.intra, self.inter + other.inter)

    def __mul__(self, k: float) -> "Traffic":
        return Traffic(self.intra * k, self.inter * k)

    __rmul__ = __mul__


def ring(bus_bytes: float, ranks: int, ranks_per_node: int) -> Traffic:
    """One rank's share of a ring collective whose ranks each send `bus_bytes`, `ranks_per_node` of its
    `ranks` on each node (all of them on one node when it holds them all)."""
    if ranks <= 1 or bus_bytes <= 0:
        return Traffic()
    r = max(1, min(ranks, ranks_per_node))
    if ranks <= r:
        return Traffic(intra=bus_bytes)
    return Traffic(intra=bus_bytes * (r - 1) / r, inter=bus_bytes / r)


def all_gather(tensor_bytes: float, ranks: int, ranks_per_node: int) -> Traffic:
    """Also a reduce-scatter of a tensor of the same size: the same bus bytes."""
    return ring(tensor_bytes * (ranks - 1) / max(1, ranks), ranks, ranks_per_node)


reduce_scatter = all_gather


def all_reduce(tensor_bytes: float, ranks: int, ranks_per_node: int) -> Traffic:
    return ring(2 * tensor_bytes * (ranks - 1) / max(1, ranks), ranks, ranks_per_node)


def nodes_spanned(ranks: int, ranks_per_node: int) -> int:
    """Nodes a group of consecutive ranks covers (Ray Train packs a stage's workers node by node)."""
    return max(1, math.ceil(ranks / max(1, ranks_per_node)))


def fsdp_micro_batch(params: float, group: int, ranks_per_node: int, param_bytes: int = 2,
                     grad_bytes: int = 4) -> Traffic:
    """One micro-batch (or calibration batch) of a model sharded over `group` consecutive ranks: the
    parameters gathered in forward and again in backward, the gradients reduce-scattered."""
    gather = all_gather(param_bytes * params, group, ranks_per_node)
    return gather * 2 + reduce_scatter(grad_bytes * params, group, ranks_per_node)


def hsdp_all_reduce(params: float, group: int, replicas: int, ranks_per_node: int, grad_bytes: int = 4) -> Traffic:
    """Once per optimizer step under HSDP: each rank all-reduces its gradient shard (P / group) with the
    ranks that hold the same shard in the other groups. Groups are consecutive ranks, so the replicas
    of one shard share a node only when a node holds several groups."""
    per_node = max(1, ranks_per_node // group) if group < ranks_per_node else 1
    return all_reduce(grad_bytes * params / max(1, group), replicas, per_node)


def ddp_step(params: float, world: int, ranks_per_node: int, grad_bytes: int = 4) -> Traffic:
    return all_reduce(grad_bytes * params, world, ranks_per_node)


def split_teacher_batch(tokens: int, hidden: int, gpus: int, elem: int = 2) -> Traffic:
    """Bytes a teacher actor split over `gpus` GPUs of one node hands over per batch (all of its GPUs
    together: one boundary at a time, never at once)."""
    return Traffic(intra=max(0, gpus - 1) * tokens * hidden * elem)


@dataclass(frozen=True)
class StepTraffic:
    """What one rank moves in one unit of a phase (an optimizer step, a calibration batch): `each`
    with every micro-batch (hidden behind it), `last` once more on the last micro-batch (hidden behind
    it too), `after` once after them (hidden behind nothing)."""

    each: Traffic = Traffic()
    last: Traffic = Traffic()
    after: Traffic = Traffic()

    def total(self, micro_batches: int) -> Traffic:
        return self.each * micro_batches + self.last + self.after


def stage_step_traffic(strategy: str, params: float, world: int, group: int, ranks_per_node: int, on_gpu: bool,
                       zero_stage: int = 2) -> StepTraffic:
    """One optimizer step's communication for one rank of a stage (`group`: the fsdp shard group)."""
    wide = 2 if on_gpu else 4  # what the layers compute in (fsdp gathers, DeepSpeed's module)
    if world <= 1:
        return StepTraffic()
    if strategy == "fsdp":
        replicas = max(1, world // max(1, group))
        return StepTraffic(each=fsdp_micro_batch(params, group, ranks_per_node, param_bytes=wide),
                           last=hsdp_all_reduce(params, group, replicas, ranks_per_node) if replicas > 1 else Traffic())
    if strategy == "ddp":
        return StepTraffic(last=ddp_step(params, world, ranks_per_node))
    if strategy == "deepspeed":
        grads = reduce_scatter(wide * params, world, ranks_per_node)
        gather = all_gather(wide * params, world, ranks_per_node)
        if zero_stage >= 2:
            return StepTraffic(each=grads, after=gather)
        return StepTraffic(last=grads, after=gather)
    raise ValueError(f"unknown strategy {strategy!r}; choose ddp, deepspeed or fsdp")


def score_batch_traffic(strategy: str, params: float, group: int, ranks_per_node: int, on_gpu: bool) -> Traffic:
    """One calibration batch of scoring for one rank: only fsdp communicates (within its shard group)."""
    if strategy != "fsdp" or group <= 1:
        return Traffic()
    return fsdp_micro_batch(params, group, ranks_per_node, param_bytes=2 if on_gpu else 4)


@dataclass
class PhaseTime:
    """One phase of a node on the clock: `units` units run one after the other on every rank (or
    teacher actor), each `compute_s` of kernels and `comm_s` on the links, of which `exposed_s` is
    not hidden behind the compute. Bytes are per rank and unit (`node_inter` what one node's network
    adapters carry)."""

    phase: str
    unit: str
    units: float
    compute_s: float
    comm_s: float
    exposed_s: float
    intra_bytes: float
    inter_bytes: float
    node_inter_bytes: float
    kernel_efficiency: float
    # Devices held per computing device (a teacher actor split over 2 GPUs computes on one at a time).
    held_per_computing: float = 1.0
    # The share of the compute that is the model's FLOPs (6/8 when activation checkpointing runs each
    # forward twice): recomputation is work, not progress.
    useful: float = 1.0

    @property
    def seconds(self) -> float:
        return self.units * (self.compute_s + self.exposed_s)

    @property
    def effective_mfu(self) -> float:
        """The model's FLOPs over what the held devices could do at their peak in the same time."""
        busy = self.compute_s + self.exposed_s
        return (self.kernel_efficiency * self.useful * self.compute_s / busy / self.held_per_computing
                if busy > 0 else 0.0)

    @property
    def bound_by_communication(self) -> bool:
        return self.exposed_s > self.compute_s

    def as_dict(self) -> dict:
        return {"phase": self.phase, "unit": self.unit, "units": self.units, "compute_seconds": self.compute_s,
                "comm_seconds": self.comm_s, "exposed_comm_seconds": self.exposed_s,
                "comm_bytes_intra": self.intra_bytes, "comm_bytes_inter": self.inter_bytes,
                "node_inter_bytes": self.node_inter_bytes, "seconds": self.seconds,
                "effective_mfu": self.effective_mfu, "bound_by_communication": self.bound_by_communication}


def step_time(phase: str, unit: str, units: float, micro_batches: int, micro_seconds: float, traffic: StepTraffic,
              links: Optional[Links], ranks_per_node: int, kernel_efficiency: float, useful: float = 1.0) -> PhaseTime:
    """A phase whose unit is `micro_batches` micro-batches of `micro_seconds` compute each, moving
    `traffic`; without links the communication is counted in bytes and takes no time."""
    total = traffic.total(micro_batches)
    exposed = comm = 0.0
    if links is not None:
        each = links.seconds(traffic.each, ranks_per_node)
        last = links.seconds(traffic.each + traffic.last, ranks_per_node)
        after = links.seconds(traffic.after, ranks_per_node)
        comm = each * (micro_batches - 1) + last + after
        exposed = ((micro_batches - 1) * max(0.0, each - micro_seconds) + max(0.0, last - micro_seconds) + after)
    return PhaseTime(phase, unit, units, micro_batches * micro_seconds, comm, exposed, total.intra, total.inter,
                     total.inter * max(1, ranks_per_node), kernel_efficiency, useful=useful)


def teacher_batch_time(units: float, compute_s: float, traffic: Traffic, links: Optional[Links], gpus: int,
                       kernel_efficiency: float) -> PhaseTime:
    """A split teacher's batches: the hand-overs go over NVLink one at a time, between its layers' compute."""
    comm = traffic.intra / (links.intra_gb_s * GB) if links is not None else 0.0
    return PhaseTime("forward", "batch per actor", units, compute_s, comm, comm, traffic.intra, 0.0, 0.0,
                     kernel_efficiency, held_per_computing=max(1, gpus))


__all__ = ["GB", "LINKS", "Links", "PhaseTime", "StepTraffic", "Traffic", "all_gather", "all_reduce", "ddp_step",
           "fsdp_micro_batch", "hsdp_all_reduce", "links_for", "nodes_spanned", "reduce_scatter", "ring",
           "score_batch_traffic", "split_teacher_batch", "stage_step_traffic", "step_time", "teacher_batch_time"]
