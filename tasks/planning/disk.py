"""The bytes a stage writes to disk: Ray Train checkpoints, pruned/ and final/ in its work dir, and the
output the driver publishes. `slimmoe plan` reports them and the stage checks the free space against
them before it starts, so both read them from here.

A checkpoint holds the student's float32 weights and AdamW's two float32 moments (every engine's
`save`); the models are written in their config's dtype. Ray Train keeps `CHECKPOINTS_KEPT` and
uploads the next one before it deletes the oldest.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINTS_KEPT = 2  # the stage's CheckpointConfig(num_to_keep=...)
CHECKPOINT_BYTES_PER_PARAM = 4 + 8  # float32 weights + AdamW's exp_avg and exp_avg_sq
MOMENTS_BYTES_PER_PARAM = 8  # keep_optimizer_state: the final moments beside the model


@dataclass(frozen=True)
class StageDisk:
    checkpoint_bytes: int  # the Ray Train checkpoints on disk at once
    work_model_bytes: int  # pruned/ and final/ in the work dir
    output_bytes: int  # the published output: the model, pruned/, kept moments

    @property
    def work_bytes(self) -> int:
        return self.checkpoint_bytes + self.work_model_bytes


def stage_disk(trained_params: int, model_bytes: int, out_params: int, total_steps: int, checkpoint_interval: int,
               keep_optimizer_state: bool = False) -> StageDisk:
    """`trained_params`: the largest student trained (a gradual cut's first); `model_bytes`: the output
    model's files; `out_params`: its parameters."""
    reported = max(0, (total_steps - 1) // checkpoint_interval)  # none at the last step: the final save follows
    on_disk = min(reported, CHECKPOINTS_KEPT + 1)
    moments = out_params * MOMENTS_BYTES_PER_PARAM if keep_optimizer_state else 0
    return StageDisk(checkpoint_bytes=on_disk * trained_params * CHECKPOINT_BYTES_PER_PARAM,
                     work_model_bytes=2 * model_bytes + moments, output_bytes=2 * model_bytes + moments)


__all__ = ["CHECKPOINTS_KEPT", "StageDisk", "stage_disk"]
