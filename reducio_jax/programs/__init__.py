"""The compiled inference programs: lowered in one place, compiled once per shape, measured,
planned and kept.

* `lowering`: the programs (content, encode, decode, reconstruct) as pure functions of
  (graphdef, state, inputs) under one `jax.jit` each, and `lower(...)`, the one function that
  lowers them (the memory planner, the `compile` command and the API all go through it).
* `compiled.Programs`: one model's executables, one per input shape/dtype/placement and
  tiling; what `ReducioVAE`'s methods run, and what the planner measures.
* `footprint`: `Footprint` (XLA's memory analysis of a program) and `Plan` (the choice).
* `planner`: the window batch and tiling that fit the memory there is (`plan_memory`,
  `plan_batch`), and the window-batch rule (`parse_window_batch`).
* `budget`: the memory there is (accelerator, RAM, cgroup, address-space limit) and
  `--max_memory`.
* `allocator`: glibc's malloc tuned for XLA:CPU's buffers.
"""
