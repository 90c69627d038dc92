"""The memory planner: what it takes (shapes: the model's config, the step's setup, the micro batch), what a
training step holds on the GPU term by term (memory), those terms added up per rank with a verdict and the levers
that shrink a peak (step), the GPUs it knows (gpus) and its units (units); the report `orpo-tune plan` and `train`
print from it (report), and the tables it generates for docs/qlora-memory.md (docs)."""
