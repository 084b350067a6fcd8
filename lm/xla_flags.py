"""The XLA flags lm recommends per platform, in one place (launch/slurm.py exports them).

Flags change performance, never results. Each is kept only if it was measured to pay; see
benchmarks/RESULTS.md for what was measured and on which machine.
"""

# From JAX's GPU performance guide; not yet measured in this repository (no GPU was available).
GPU = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # overlap collectives with computation
)


def with_flags(existing: str, flags: tuple[str, ...]) -> str:
  """`existing` XLA_FLAGS plus `flags`, skipping any flag that `existing` already sets."""
  names = {flag.split("=")[0] for flag in existing.split()}
  return " ".join([*existing.split(), *(flag for flag in flags if flag.split("=")[0] not in names)])
