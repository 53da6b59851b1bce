"""script/benchmark gpu (this package; script/benchmark_gpu.py runs it): this container against its peers on one GPU, in one run that ends by its deadline.

  script/gpu-benchmark                                     the prepared command for a lent GPU machine (no network):
                                                           installs the device kit, runs this, ends within 8 minutes
  script/benchmark gpu [--budget 450] [--out DIR]          on an H100 or H200: the full-size FLUX.1-dev
  script/benchmark gpu --tiny [--size 256x256 --steps 4]   the same sequence on the tiny FLUX, on a CPU
  script/benchmark gpu --plan                              what each section holds on the GPU, on 78 and 139 GiB
  script/benchmark gpu --only 'LoRA switch,4 outputs'      only the sections whose names start with these

The model is the full-size FLUX.1-dev architecture with random weights built on the GPU (flux/fakes/fullsize.py: no
download, deterministic, seeded). Every timing is the whole pipeline call (text encoders, 28 denoising steps, VAE
decode, PIL images) at 1024x1024, the median of --repeats calls after one untimed call; that first call also checks
that the latents stay finite at every step (no NaN, no inf) and records their spread.

Sections, key rows first (docs/benchmarks.md gives each one's H100 time estimate and GPU memory):

  bare diffusers, 1 output       FluxPipeline in bf16, eager
  ours: setup                    this engine as setup() builds it, every setting at its default, warming up only the
                                 sizes this run measures (setup() warms 22 sizes; the boot section measures that)
  ours, 1 output                 bf16 compiled, go_fast, Juiced on go_fast, Blink of an eye
  diffusers-torchao, 1 output    the published recipe: fused QKV, torchao's dynamic per-row float8 quantize_,
                                 torch.compile (fullgraph, mode="max-autotune" when its estimate fits, else the
                                 default mode: the row says which) of the transformer and the VAE decode, with the
                                 recipe's inductor flags
  LoRA switch                    a rank-16 then a rank-64 LoRA on every attention and MLP linear, from the disk
                                 cache, on go_fast then bf16, and the prediction right after (checked: no recompile)
  4 outputs                      ours (after compiling its batch-2+ graphs), bare diffusers, the torchao peer
  other speed modes              Lightly Juiced and Juiced on bf16, Lightly Juiced on go_fast, Extra Juiced
  offload                        the small-GPU cost model: T5 streamed, the fp8 transformer moved, the fp8 copy
                                 quantized from bf16 on the GPU and from CPU memory
  switch: ...                    each optimization off (or changed) on go_fast, one engine each
  boot                           a fresh process booting this engine from the compile bundle ours wrote, with the
                                 full warm-up of setup() (every size), this process's GPU memory released first

Deadline: --deadline (seconds since the epoch; script/gpu-benchmark passes its own start + 8 minutes less a margin)
or --budget seconds from this process's start. A section starts only when its estimated time fits in what is left
and its GPU memory fits in what is free (each skip is a row saying why); at the deadline the section running is cut
(a "stopped" row) and the run ends. Every row is written as soon as it exists (DIR/results.jsonl, DIR/results.md),
with the torch, torchao, diffusers and pruna versions it ran.

Every section is guarded: an exception (out of memory included) becomes an error row with its message and the GPU
memory in use, what the section held is freed, and the run goes on. FLUX_BENCHMARK_FAIL=<section name> makes that
section raise at its start (for tests).

GPU memory: one engine at a time. The shared pipeline's bf16 transformer (the pristine source every contender copies)
leaves the GPU while a contender holds its own copy; each engine is freed before the next contender is built.

Modules, each readable alone: names (the rows and sections), schedule (deadline, estimates, the gate and guard),
measure (a timed call, GPU memory), memory_model (--plan), report (results.md), machine (the shared model, versions),
ours (our engine), peers (bare diffusers, diffusers-torchao), sections (LoRA switch, offload, switches), boot.
"""
