"""One command that validates and times every fused op and a training step on a CUDA GPU.

Usage::

    python -m mulclip_fast.gpu_check                  # on a CUDA machine, at most ~6 minutes
    python -m mulclip_fast.gpu_check --out DIR        # reports into DIR (default benchmarks/results)
    python -m mulclip_fast.gpu_check --time-limit 200 # start no task after 200 s
    python -m mulclip_fast.gpu_check --sections parity autotune
    python -m mulclip_fast.gpu_check --dry-run        # the same plan at tiny shapes; no GPU needed

It writes ``gpu-check-<UTC timestamp>.json`` and ``.md`` into the output directory, rewritten after every
task so that a killed run still leaves what it had. The plan's sections, in order (the number of tasks and
the estimated seconds of each are printed before it starts). Each section has a share of ``--time-limit``
(default 320 s); it runs its tasks, most important first, until its share and any time earlier sections
left unused are spent, then the next section starts, so every section is represented in a short run. The
report lists what was left out; run those with ``--sections`` (e.g. ``--sections timing scale compiled``):

- **precompile**: the op calls of **parity** and **autotune**, made first by worker processes (one per CPU
  but two) so that the kernel variants and autotune configs they launch compile in parallel into Triton's
  on-disk cache, where the main process's launches then find them (``precompile.py``; a first run otherwise
  compiles them one after another, about a second each); a call that raised in a worker is a failure, a
  worker still running after 90 s is stopped and listed;
- **parity**: every public op on the ``triton`` backend against ``mulclip_fast.reference``, values and
  input gradients, in fp32 (atol 1e-5, rtol 1e-4: the kernels use IEEE fp32 dots), bf16 and fp16 (rtol
  2e-2, against the reference computed from the same rounded inputs), at a small shape and the paper's
  (B = 64, 248 words, 196 patches, 8 subcaptions, k = 49, d = 512), dense and strided inputs (features
  sliced from wider tensors, every other sample of a batch, expanded and transposed masks);
- **autotune**: every config of every autotuned kernel an op launches, pinned one at a time (see
  ``configs.py``) and checked like parity, per dtype; configs no launch reached are reported;
- **determinism**: two forward + backward passes give bitwise equal values and gradients;
- **train_step**: one step of the ``tiny`` preset (MulCLIP, FineLIP, all-pairs SAP) and of ``vit-b-16``,
  fused path vs reference (loss terms and parameter gradients to 1e-4 relative), step time and memory;
- **timing**: forward + backward at the paper shape, ``triton`` vs ``torch`` vs ``reference``
  (``triton.testing.do_bench``; calls as users make them, input validation included), peak memory
  (``torch.cuda.max_memory_allocated``) and NVML telemetry sampled while timing, with the fraction of the
  GPU's peak FLOP/s and bandwidth from each op's cost model (peaks from the device's SM count, its clocks
  read through NVML, and its architecture: ``peaks.py``);
- **text_attention**: the packed text path's attention backends (flash-attn, xformers; imported lazily, a
  recorded skip with the reason when absent) against its torch backend on a MulCLIP batch's pack, for the
  ``tiny`` tower (ALiBi) and a ``vit-b-16`` tower, bf16 and fp16: output and q/k/v gradients against the torch
  backend in fp32 on the same rounded inputs (max error at most 8 unit roundoffs of the largest value), and
  forward + backward time against the torch backend in the same dtype; the dry run checks the torch backend;
- **scale**: the all-pairs ops at FineLIP's gathered batch (B = 4096, 197 tokens, d = 512, bf16), where
  offset products pass 2^31: three rows of scores and their query gradients against the reference on those
  rows (skipped, and said so, when the GPU lacks the memory), each launch running the first config it allows,
  untimed (a launch takes seconds there);
- **extension**: the C++/CUDA extension (``cuda_ext``) on the patch sets the Triton kernels refuse (576 and
  1024 patches), fp32 and bf16, against the reference, and its time against the ``torch`` backend; skipped,
  with the reason, where it cannot be built; the dry run checks its CPU twin (``cpp``). Its build (nvcc: a
  minute or two expected) runs in the background from the start of the run
  (``python -m mulclip_fast.ops.extension``, on the CPU, no GPU visible to it), its tasks wait for it, and it
  is ended with the run if still going;
- **compiled**: ``torch.compile`` of the reference at the paper shape in fp32, checked against the eager
  reference, then timed and measured as in **timing**.

The JSON (``"schema": "mulclip-fast/gpu-check/1"``) holds ``command``, ``mode`` (``gpu`` or ``dry-run``),
``status`` (``passed``, ``failed``, ``incomplete``, ``crashed``) and ``exit_code``, ``elapsed_s`` and
``time_limit_s``, ``machine`` (``profiling.machine_facts``: GPU, versions, NVML), ``peaks``, ``tolerances``,
``plan`` (tasks and estimates per section, their deadlines), ``sections`` (one record per task, each with
``task``, ``seconds``, ``ok`` and ``problems``), ``skipped`` (task and reason), ``failures`` (one line each),
``errors`` (the tasks that raised while the device stayed usable: section, task, op, shape, dtype, error and
traceback), ``crash`` (``None``, or the same for the exception that stopped the run) and ``extension_build``
(``None`` without the extension section, else the background build's ``status``: ``running``, ``built``,
``failed``, ``stopped`` when the run ended first, or ``not started``; its ``exit_code``, ``seconds`` and
``output_tail``); each extension task's record says how long it waited for that build (``build_wait_s``).

A task that raises is an error of that task, and the run goes on, unless the device can run nothing more (a
sticky CUDA error such as an illegal memory access poisons the context): that is a crash, which stops it.
Exit codes: 0 everything planned ran and passed; 1 a check failed or a task raised; 2 bad command line; 3 no
CUDA device (and no ``--dry-run``); 4 the time limit left tasks out (everything that ran passed); 5 a crash
stopped the run — the report's ``crash`` names the section, op, shape and dtype and holds the traceback.

``--dry-run`` on a machine without CUDA sets ``TRITON_INTERPRET=1`` before any kernel is imported and runs
the plan on the CPU through Triton's interpreter, with ``torch.compile``'s ``aot_eager`` backend; the test
suite runs it. It needs the package's own dependencies, no more (the training steps tokenize captions with
ftfy and instant-clip-tokenizer, which ``.ci/gpu-check`` installs from carried wheels), and no network.
"""

from .runner import EXIT_CRASHED, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_NO_CUDA, EXIT_OK, SCHEMA, main

__all__ = ["EXIT_CRASHED", "EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_NO_CUDA", "EXIT_OK", "SCHEMA", "main"]
