"""The search space: a Candidate is one parallel strategy; `generate` expands the `space` block
(`auto` ranges, explicit lists, or the config's own value) into every combination. Validity is
not judged here (see rules.py): data parallel size is derived, the rest is a plain product in
which settings that change nothing are spelled as their plain equivalent (`canonical`)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from dataclasses import dataclass, fields
from typing import Any

from flagscale.auto_tuner.config import AUTO, SpaceConfig
from flagscale.auto_tuner.workload import Workload
from flagscale.exceptions import ConfigError

RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One parallel strategy for the user's training job."""

    dp: int
    tp: int
    pp: int
    mbs: int
    cp: int = 1
    ep: int = 1
    sp: bool = False
    vpp_layers: int | None = None
    """num_layers_per_virtual_pipeline_stage (None: no interleaving)."""
    recompute: str | None = None
    """recompute_granularity: None, selective or full."""
    recompute_method: str | None = None
    recompute_layers: int | None = None
    dist_opt: bool = False

    @property
    def key(self) -> str:
        """A stable, readable id (history.csv rows are matched by it)."""
        recompute = "-".join(str(v) for v in (self.recompute, self.recompute_method, self.recompute_layers) if v)
        return (f"dp{self.dp}.tp{self.tp}.pp{self.pp}.cp{self.cp}.ep{self.ep}.sp{int(self.sp)}."
                f"vpl{self.vpp_layers or 0}.mbs{self.mbs}.rc-{recompute or 'none'}.do{int(self.dist_opt)}")

    @property
    def model_parallel(self) -> int:
        """Processes one model replica spans (tp × pp × cp)."""
        return self.tp * self.pp * self.cp

    def vpp_size(self, num_layers: int) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        if not self.vpp_layers:
            return 1
        return max(1, num_layers // self.pp // self.vpp_layers)

    def num_microbatches(self, global_batch_size: int) -> int:
        """Micro batches each data parallel rank runs per step."""
        return max(1, global_batch_size // (self.dp * self.mbs))

    def train_values(self, with_experts: bool) -> dict[str, Any]:
        """The Megatron arguments this candidate sets (None/False: the flag is left out)."""
        values: dict[str, Any] = {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "context_parallel_size": self.cp,
            "sequence_parallel": self.sp,
            "num_layers_per_virtual_pipeline_stage": self.vpp_layers,
            "virtual_pipeline_model_parallel_size": None,
            "micro_batch_size": self.mbs,
            "recompute_granularity": self.recompute,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_layers,
            "use_distributed_optimizer": self.dist_opt,
        }
        if with_experts:
            values["expert_model_parallel_size"] = self.ep
        return values

    def describe(self) -> str:
        """Short text for tables: only what differs from the plain default."""
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += ["sp"] if self.sp else []
        parts += [f"vpl{self.vpp_layers}"] if self.vpp_layers else []
        parts.append(f"mbs{self.mbs}")
        if self.recompute == "full":
            parts.append(f"rc-{self.recompute_method}{self.recompute_layers}")
        elif self.recompute:
            parts.append("rc-sel")
        parts += ["distopt"] if self.dist_opt else []
        return " ".join(parts)


CANDIDATE_FIELDS = tuple(f.name for f in fields(Candidate))


def divisors(n: int) -> list[int]:
    """Every positive divisor of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def current_values(args: argparse.Namespace) -> dict[str, Any]:
    """The user's own setting of each dimension (what an unset dimension keeps)."""
    vpp_layers = args.num_layers_per_virtual_pipeline_stage
    if vpp_layers is None and args.virtual_pipeline_model_parallel_size:
        vpp_layers = args.num_layers // (args.pipeline_model_parallel_size * args.virtual_pipeline_model_parallel_size)
    return {
        "data_parallel_size": args.data_parallel_size,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "context_parallel_size": args.context_parallel_size,
        "expert_model_parallel_size": getattr(args, "expert_model_parallel_size", 1) or 1,
        "sequence_parallel": bool(args.sequence_parallel),
        "num_layers_per_virtual_pipeline_stage": vpp_layers,
        "micro_batch_size": args.micro_batch_size,
        "recompute_granularity": args.recompute_granularity,
        "recompute_method": args.recompute_method,
        "recompute_num_layers": args.recompute_num_layers,
        "use_distributed_optimizer": bool(args.use_distributed_optimizer),
    }


def auto_range(name: str, work: Workload) -> list[Any]:
    """The full range `auto` stands for (invalid members are removed by the rules)."""
    world = work.world_size
    ranges: dict[str, list[Any]] = {
        "data_parallel_size": divisors(world),
        "tensor_model_parallel_size": divisors(world),
        "pipeline_model_parallel_size": divisors(world),
        "context_parallel_size": divisors(world),
        "expert_model_parallel_size": expert_range(work),
        "sequence_parallel": [False, True],
        "num_layers_per_virtual_pipeline_stage": [None, *divisors(work.num_layers)[:-1]],
        "micro_batch_size": divisors(work.global_batch_size),
        "recompute_granularity": list(RECOMPUTE_GRANULARITIES),
        "recompute_method": list(RECOMPUTE_METHODS),
        "recompute_num_layers": list(range(1, work.num_layers + 1)),
        "use_distributed_optimizer": [False, True],
    }
    return ranges[name]


def expert_range(work: Workload) -> list[int]:
    """`auto` expert parallel sizes: divisors of num_experts that divide the world size ([1] for a dense model)."""
    if not work.num_experts:
        return [1]
    return [d for d in divisors(work.num_experts) if work.world_size % d == 0]


def expand(space: SpaceConfig, work: Workload, current: dict[str, Any]) -> dict[str, list[Any]]:
    """Each dimension's values: `auto` -> full range, list -> itself, unset -> the config's value.
    With full recompute in the space and no method/layers anywhere: uniform, 1 layer."""
    values: dict[str, list[Any]] = {}
    for name, setting in space.dimensions().items():
        if setting == AUTO:
            values[name] = auto_range(name, work)
        elif setting is None:
            values[name] = [current[name]]
        else:
            values[name] = list(dict.fromkeys(setting))
    if "full" in values["recompute_granularity"]:  # Megatron needs both with full recompute: sensible defaults
        values["recompute_method"] = [m for m in values["recompute_method"] if m] or ["uniform"]
        values["recompute_num_layers"] = [n for n in values["recompute_num_layers"] if n] or [1]
    if values["expert_model_parallel_size"] != [1] and not work.num_experts:
        raise ConfigError("experiment.auto_tuner.space.expert_model_parallel_size is set but the model has no "
                          "experts (no num_experts in train.*); remove it")
    return values


MAX_CANDIDATES = 100_000


def recompute_options(v: dict[str, list[Any]]) -> list[tuple[str | None, str | None, int | None]]:
    """(granularity, method, layers): method and layers only matter with full recompute."""
    options: list[tuple[str | None, str | None, int | None]] = []
    for gran in v["recompute_granularity"]:
        if gran == "full":
            options += [("full", m, n) for m in v["recompute_method"] for n in v["recompute_num_layers"]]
        else:
            options.append((gran, None, None))
    return list(dict.fromkeys(options))


def generate(space: SpaceConfig, work: Workload, current: dict[str, Any]) -> list[Candidate]:
    """Every combination of the space, data parallel size derived (world / (tp × pp × cp)), deduplicated."""
    v = expand(space, work, current)
    layouts = [(tp, pp, cp) for tp, pp, cp in itertools.product(
        v["tensor_model_parallel_size"], v["pipeline_model_parallel_size"], v["context_parallel_size"])
        if work.world_size % (tp * pp * cp) == 0 and work.world_size // (tp * pp * cp) in v["data_parallel_size"]]
    knobs = list(itertools.product(
        v["expert_model_parallel_size"], v["sequence_parallel"], v["num_layers_per_virtual_pipeline_stage"],
        v["micro_batch_size"], recompute_options(v), v["use_distributed_optimizer"]))
    if len(layouts) * len(knobs) > MAX_CANDIDATES:
        raise ConfigError(f"experiment.auto_tuner.space has {len(layouts) * len(knobs):,} combinations (more than "
                          f"{MAX_CANDIDATES:,}); give lists instead of 'auto' for some dimensions")
    seen: dict[str, Candidate] = {}
    for (tp, pp, cp), (ep, sp, vpl, mbs, (gran, method, layers), dist) in itertools.product(layouts, knobs):
        candidate = Candidate(
            dp=work.world_size // (tp * pp * cp), tp=int(tp), pp=int(pp), cp=int(cp), ep=int(ep), sp=bool(sp),
            vpp_layers=vpl, mbs=int(mbs), recompute=gran, recompute_method=method, recompute_layers=layers,
            dist_opt=bool(dist),
        )
        candidate = canonical(candidate, work)
        seen.setdefault(candidate.key, candidate)
    return list(seen.values())


def expert_data_parallel(c: Candidate, work: Workload) -> int:
    """Ranks an expert parameter is replicated over: world / (ep × etp × pp) (1 for a dense model)."""
    if not work.num_experts:
        return 1
    return max(1, work.world_size // (c.ep * work.expert_tp(c.tp) * c.pp))


def canonical(c: Candidate, work: Workload) -> Candidate:
    """c with the settings that change nothing spelled as their plain equivalent, as Megatron-LM treats them:
    sequence parallelism with tp 1 (switched off), the distributed optimizer with no data parallel ranks to
    shard over (neither dense nor expert; overlap_param_gather needs it set regardless), a virtual pipeline
    of one chunk per rank, recompute_num_layers beyond a model chunk."""
    changes: dict[str, Any] = {}
    if c.sp and c.tp == 1:
        changes["sp"] = False
    if c.dist_opt and c.dp * c.cp == expert_data_parallel(c, work) == 1 and not work.overlap_param_gather:
        changes["dist_opt"] = False
    even = work.first_stage_layers is None and work.last_stage_layers is None and work.num_layers % c.pp == 0
    stage_layers = work.num_layers // c.pp if even else None
    if c.vpp_layers and c.pp > 1 and c.vpp_layers == stage_layers:
        changes["vpp_layers"] = None
    chunk_layers = changes.get("vpp_layers", c.vpp_layers) or stage_layers
    if c.recompute == "full" and chunk_layers and (c.recompute_layers or 0) > chunk_layers:
        changes["recompute_layers"] = chunk_layers
    return dataclasses.replace(c, **changes) if changes else c
