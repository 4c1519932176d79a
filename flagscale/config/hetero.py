"""Heterogeneous training layouts (upstream FlagScale's `train.system.hetero`): several process meshes, each with its
own tensor/context/expert/data/pipeline sizes and device type, chained into one pipeline.

    hetero:
      enable_hetero: true
      hetero_process_meshes: [2, 1, 1, 1, 1,  1, 1, 1, 1, 1]   # five numbers per mesh: tp, cp, ep, dp, pp
      hetero_device_types: [A, B]                              # one per mesh, matched to the hostfile's type=
      hetero_pipeline_layer_split: [3, 1]                      # layers per pipeline stage, all meshes together
      hetero_use_cpu_communication: true                       # cross-mesh traffic over CPU/gloo

`HeteroLayout` is the validated form (every problem one line naming the key): ranks are numbered mesh after mesh,
inside a mesh in Megatron's order (tensor fastest, then context, data, pipeline), and `places()` says what each
rank holds (mesh, tensor/context/data rank, global pipeline stage, its layers). `assign_hosts` gives each mesh hosts
of its device type, in hostfile order, and checks their process counts add up. Torch-free: the runner (dryrun's
rank map) and, later, the training program read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError

MESH_FIELDS = ("tp", "cp", "ep", "dp", "pp")
KEYS = ("enable_hetero", "hetero_process_meshes", "hetero_device_types", "hetero_current_device_type",
        "hetero_pipeline_layer_split", "hetero_use_cpu_communication", "expert_tensor_parallel_size_per_process_mesh")
"""The training arguments of heterogeneous training (Megatron-LM as FlagScale extends it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """One process mesh: its sizes, device type and where its ranks and stages begin."""

    index: int
    device_type: str
    tp: int
    cp: int
    ep: int
    dp: int
    pp: int
    first_rank: int
    first_stage: int

    @property
    def size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def describe(self) -> str:
        return f"mesh {self.index} ({self.device_type}): tp{self.tp} cp{self.cp} ep{self.ep} dp{self.dp} pp{self.pp}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPlace:
    """What one global rank holds."""

    rank: int
    mesh: int
    device_type: str
    tp_rank: int
    cp_rank: int
    dp_rank: int
    stage: int
    """Global pipeline stage (0 = the embedding's)."""
    layers: tuple[int, int]
    """[first, last) transformer layers of the stage."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeteroLayout:
    meshes: tuple[Mesh, ...]
    layer_split: tuple[int, ...]
    use_cpu_communication: bool = False

    @property
    def world_size(self) -> int:
        return sum(m.size for m in self.meshes)

    @property
    def num_stages(self) -> int:
        return sum(m.pp for m in self.meshes)

    def stage_layers(self, stage: int) -> tuple[int, int]:
        start = sum(self.layer_split[:stage])
        return start, start + self.layer_split[stage]

    def places(self) -> list[RankPlace]:
        out = []
        for m in self.meshes:
            for local in range(m.size):
                tp, rest = local % m.tp, local // m.tp
                cp, rest = rest % m.cp, rest // m.cp
                dp, pp = rest % m.dp, rest // m.dp
                stage = m.first_stage + pp
                out.append(RankPlace(rank=m.first_rank + local, mesh=m.index, device_type=m.device_type, tp_rank=tp,
                                     cp_rank=cp, dp_rank=dp, stage=stage, layers=self.stage_layers(stage)))
        return out

    def need(self) -> dict[str, int]:
        """Processes each device type must run."""
        out: dict[str, int] = {}
        for m in self.meshes:
            out[m.device_type] = out.get(m.device_type, 0) + m.size
        return out


def _ints(value: Any, key: str, minimum: int) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty list of whole numbers, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise ConfigError(f"{key} must hold whole numbers >= {minimum}, got {list(value)}")
    return list(value)


def hetero_layout(values: Mapping[str, Any], path: Callable[[str], str] = lambda name: name) -> HeteroLayout | None:
    """The layout of the training arguments `values` (name -> value), None unless enable_hetero is set. `path(name)`
    names where an argument was set (for the one-line errors)."""
    if not values.get("enable_hetero"):
        stray = [k for k in KEYS[1:] if values.get(k) not in (None, False, [])]
        if stray:
            raise ConfigError(f"{path(stray[0])} is set but enable_hetero is not; set {path('enable_hetero')}: true "
                              "or remove it")
        return None
    if values.get("expert_tensor_parallel_size_per_process_mesh"):
        raise ConfigError(f"{path('expert_tensor_parallel_size_per_process_mesh')}: a per-mesh expert tensor "
                          "parallel size is not implemented; remove it (each mesh's expert tensor size is 1)")
    numbers = _ints(values.get("hetero_process_meshes"), path("hetero_process_meshes"), 1)
    if len(numbers) % 5:
        raise ConfigError(f"{path('hetero_process_meshes')} needs five numbers per mesh (tp, cp, ep, dp, pp); got "
                          f"{len(numbers)}")
    count = len(numbers) // 5
    types = values.get("hetero_device_types")
    if not isinstance(types, Sequence) or isinstance(types, str) or len(types) != count:
        raise ConfigError(f"{path('hetero_device_types')} needs one device type per mesh ({count}), got {types!r}")
    meshes, rank, stage = [], 0, 0
    for i in range(count):
        tp, cp, ep, dp, pp = numbers[5 * i:5 * i + 5]
        mesh = Mesh(index=i, device_type=str(types[i]), tp=tp, cp=cp, ep=ep, dp=dp, pp=pp, first_rank=rank,
                    first_stage=stage)
        meshes.append(mesh)
        rank, stage = rank + mesh.size, stage + pp
    split = values.get("hetero_pipeline_layer_split")
    layers = _ints(split, path("hetero_pipeline_layer_split"), 1) if split is not None else None
    if layers is None:
        num_layers = int(values.get("num_layers") or 0)
        if num_layers % stage:
            raise ConfigError(f"{path('hetero_pipeline_layer_split')} is needed: num_layers {num_layers} does not "
                              f"split evenly over the {stage} pipeline stages of the meshes")
        layers = [num_layers // stage] * stage
    if len(layers) != stage:
        raise ConfigError(f"{path('hetero_pipeline_layer_split')} has {len(layers)} stages, the meshes have {stage} "
                          f"(the sum of their pp: {' + '.join(str(m.pp) for m in meshes)})")
    return HeteroLayout(meshes=tuple(meshes), layer_split=tuple(layers),
                        use_cpu_communication=bool(values.get("hetero_use_cpu_communication")))


def model_problems(layout: HeteroLayout, values: Mapping[str, Any], path: Callable[[str], str] = lambda n: n
                   ) -> list[str]:
    """What the model and batch settings `values` make impossible for the layout, one line each."""
    problems = []
    num_layers = int(values.get("num_layers") or 0)
    if sum(layout.layer_split) != num_layers:
        problems.append(f"{path('hetero_pipeline_layer_split')} {list(layout.layer_split)} sums to "
                        f"{sum(layout.layer_split)}, num_layers is {num_layers}")
    heads = int(values.get("num_attention_heads") or 0)
    groups = int(values.get("num_query_groups") or heads) if values.get("group_query_attention") else heads
    ffn = int(values.get("ffn_hidden_size") or 4 * int(values.get("hidden_size") or 0))
    gbs, mbs = values.get("global_batch_size"), int(values.get("micro_batch_size") or 1)
    experts = int(values.get("num_experts") or 0)
    for m in layout.meshes:
        where = f"{path('hetero_process_meshes')} {m.describe()}"
        for what, size in (("num_attention_heads", heads), ("num_query_groups", groups), ("ffn_hidden_size", ffn)):
            if size % m.tp:
                problems.append(f"{where}: tp {m.tp} does not divide {what} {size}")
        if m.cp > 1:
            problems.append(f"{where}: context parallelism needs TransformerEngine attention (not used here); "
                            "set cp to 1")
        if m.ep > 1 and (not experts or experts % m.ep or (m.dp * m.cp) % m.ep):
            problems.append(f"{where}: ep {m.ep} needs a MoE model whose num_experts and dp x cp it divides")
        if gbs is not None and int(gbs) % (mbs * m.dp):
            problems.append(f"{where}: global_batch_size {gbs} is not a multiple of micro_batch_size {mbs} x dp "
                            f"{m.dp}")
    return problems


def assign_hosts(layout: HeteroLayout, hosts: Sequence[Host], nproc: Callable[[Host], int]) -> list[Host]:
    """The hosts in node-rank order: each mesh's ranks on hosts of its device type, hostfile order, mesh after mesh
    (torchrun numbers ranks node after node). Hosts of each type must run exactly the processes its meshes need."""
    if all(h.is_local for h in hosts):
        return list(hosts)
    by_type: dict[str, list[Host]] = {}
    for h in hosts:
        by_type.setdefault(h.type or "", []).append(h)
    need = layout.need()
    for device_type, count in need.items():
        offered = sum(nproc(h) for h in by_type.get(device_type, []))
        if offered != count:
            names = ", ".join(f"{h.name} (line {h.line})" for h in by_type.get(device_type, [])) or "none"
            raise ConfigError(f"the meshes of device type {device_type} need {count} processes; the hostfile's hosts "
                              f"of type={device_type} run {offered} ({names}): set their slots (or "
                              "experiment.runner.device_type_specific nproc_per_node) to match")
    extra = [h for h in hosts if (h.type or "") not in need]
    if extra:
        raise ConfigError(f"host {extra[0].name} (hostfile line {extra[0].line}) has type={extra[0].type or 'none'}, "
                          f"which no mesh uses (hetero_device_types: {', '.join(need)}); remove it or give it a type")
    ordered: list[Host] = []
    for m in layout.meshes:
        for h in by_type[m.device_type]:
            if h not in ordered:
                ordered.append(h)
    return ordered


def rank_table(layout: HeteroLayout, hosts: Sequence[Host], nproc: Callable[[Host], int]) -> list[str]:
    """rank -> host, mesh, device type, tp/cp/dp rank, pipeline stage and its layers, one line each."""
    owner = [h for h in hosts for _ in range(nproc(h))]
    lines = []
    for place in layout.places():
        host = owner[place.rank].name if place.rank < len(owner) else "?"
        first, last = place.layers
        lines.append(f"rank {place.rank:>3} on {host}: mesh {place.mesh} ({place.device_type}) tp {place.tp_rank} "
                     f"cp {place.cp_rank} dp {place.dp_rank}, stage {place.stage} (layers {first}-{last - 1})")
    return lines
