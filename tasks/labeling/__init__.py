"""Human labeling through Label Studio.

- `service`: Label Studio as a local service (its own virtual env, started and stopped by saofu),
  and the URL/token settings that also point at a team's existing server.
- `client`: projects, tasks with pre-annotations and completed annotations, through
  `label-studio-sdk` 2.x.
- `simulated_labeler`: a plainly-labelled simulation of human labelers for demos, tests and
  benchmarks; it never runs unless asked.
"""
