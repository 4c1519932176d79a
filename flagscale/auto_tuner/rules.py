"""Validity of a candidate, judged before a trial is spent on it: the shared layout rules
(`flagscale.config.layout.problems`, the same function the training program's argument check
calls) applied to exactly the values a trial would write, so the tuner prunes a candidate exactly
when the training program would refuse it. Candidates that only repeat another strategy (sequence
parallelism with tp 1, ...) are folded into it when the space is generated (space.py), not here."""

from __future__ import annotations

from flagscale.auto_tuner.space import Candidate
from flagscale.auto_tuner.workload import Workload
from flagscale.config.layout import Layout, ModelShape, problems


def layout_of(c: Candidate, w: Workload) -> Layout:
    """The layout a trial of c runs: its train values, the derived dp, the job's batch, overlap and expert
    tensor parallel settings."""
    values = {**c.train_values(True), "data_parallel_size": c.dp, "global_batch_size": w.global_batch_size,
              "overlap_param_gather": w.overlap_param_gather,
              "expert_tensor_parallel_size": w.expert_tensor_parallel_size}
    return Layout.from_values(values)


def model_shape(w: Workload) -> ModelShape:
    """The model facts of the workload, as the layout rules name them."""
    return ModelShape(
        num_layers=w.num_layers, num_attention_heads=w.num_attention_heads, num_query_groups=w.num_query_groups,
        ffn_hidden_size=w.ffn_hidden_size, seq_length=w.seq_length, num_experts=w.num_experts,
        decoder_first_pipeline_num_layers=w.first_stage_layers, decoder_last_pipeline_num_layers=w.last_stage_layers,
    )


def check(c: Candidate, w: Workload) -> list[str]:
    """Every rule the candidate breaks (empty: valid)."""
    return problems(layout_of(c, w), model_shape(w), w.world_size, w.device)
