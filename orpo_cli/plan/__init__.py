"""The memory planner: what a training step holds on the GPU (memory), the report `orpo-tune plan` and
`train` print from it (report), and the tables it generates for docs/qlora-memory.md (docs)."""
