#!/usr/bin/env python
"""Throughput and peak memory of the VQ bottleneck: our hard EM / soft EM against vector-quantize-pytorch.

One training step = forward + backward + codebook update, for N tokens of dimension D and K codes:

  matmul   the machine bound: the one distance matmul (N x D) @ (D x K) alone, fp32, into a preallocated
           output (2*N*K*D flops), i.e. the work no nearest-code search over a dense codebook can avoid
  hard     vq_nat VectorQuantizer(assignment="hard", update="ema")  (VQ-VAE / hard EM, Roy et al. 2018)
  soft     vq_nat VectorQuantizer(assignment="soft", num_samples=m, update="ema")  (soft EM, section 3.2)
  vqp      vector_quantize_pytorch.VectorQuantize(codebook_size=K, dim=D, decay=0.999, commitment_weight=0.25,
           kmeans_init=False, rotation_trick=False)  (EMA codebook update; straight-through gradient as ours)

Every step (except matmul) runs in train mode with z_e.requires_grad, and backpropagates
``(quantized * g).sum() + loss`` for a fixed random upstream gradient g (as ``torch.autograd.backward((quantized,
loss), (g, 1))``: the same gradients without timing the benchmark's own N x D product), so the forward, the backward
and the EMA update are all timed. Each step starts from the module's initial codebook and EMA state (restored,
untimed, before every step), so every round times the same computation on the same data. After warm-up the methods
are timed interleaved (matmul hard soft vqp, matmul hard soft vqp, ...) for --repeats rounds; the report gives
medians with min..max, tokens/s = N / median time, and the target ratios as the median over rounds of the per-round
(paired) ratio, with its min..max (and the ratio of the medians).

Peak memory: each method is run in a fresh process before the timing (CPU: a child forked before any tensor op;
CUDA: a new interpreter). On CUDA it is torch.cuda.max_memory_allocated() during one step minus memory_allocated()
before it. On CPU it is the increase of the process's resident set during one step: after a warm-up step, glibc's
free heap pages are returned (malloc_trim), VmRSS is read, the kernel's RSS high-water mark is reset
(/proc/self/clear_refs, mode 5) and VmHWM is read after the step; glibc is told to mmap every allocation >= 64 KiB
(mallopt M_MMAP_THRESHOLD, or MALLOC_MMAP_THRESHOLD_ for a new interpreter) so that freed tensors leave the resident
set at once and the high-water mark tracks the live tensors (plus page-granular overhead; the kernel's RSS counters
are exact to a few hundred KiB). The matmul row's memory is that of the distance matrix itself (torch.mm without a
preallocated output).

    python scripts/bench_quantizer.py                    # K=4096, D=512, N=8192, m=10, 7 rounds
    python scripts/bench_quantizer.py --quick            # tiny sizes, seconds (used by the tests)
    python scripts/bench_quantizer.py --device cuda --num-tokens 65536
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

METHODS = ("matmul", "hard", "soft", "vqp")
TARGETS = {
    # name: (numerator, denominator, comparison, threshold, meaning)
    "speedup_hard_vs_vqp": ("vqp", "hard", ">=", 2.5, "vector-quantize-pytorch time / our hard EM time"),
    "hard_vs_matmul_bound": ("hard", "matmul", "<=", 1.5, "our hard EM time / distance-matmul time"),
    "soft_vs_hard": ("soft", "hard", "<=", 1.5, "our soft EM (m samples) time / our hard EM time"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-codes", "-K", type=int, default=4096)
    p.add_argument("--dim", "-D", type=int, default=512)
    p.add_argument("--num-tokens", "-N", type=int, default=8192)
    p.add_argument("--num-samples", "-m", type=int, default=10, help="soft EM samples per position")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of every method first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-vqp", action="store_true", help="skip vector-quantize-pytorch")
    p.add_argument("--quick", action="store_true",
                   help="K=256, D=64, N=1024, 3 rounds, 1 warm-up: a smoke test that runs in seconds")
    p.add_argument("--_memory-worker", dest="memory_worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.num_codes, args.dim, args.num_tokens = 256, 64, 1024
        args.repeats, args.warmup = 3, 1
    for option, value, low in (("--num-codes", args.num_codes, 1), ("--dim", args.dim, 1),
                               ("--num-tokens", args.num_tokens, 1), ("--num-samples", args.num_samples, 1),
                               ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--threads", 1 if args.threads is None else args.threads, 1)):
        if value < low:
            p.error(f"{option} must be >= {low}, got {value}")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method, args, device, for_memory=False):
    """Return a zero-argument function that runs one step of ``method`` (setup is not timed)."""
    n, k, d = args.num_tokens, args.num_codes, args.dim
    # data from its own stream: the global seed below also draws our codebook (N(0, I) init), which must not
    # equal the first K encoder outputs
    gen = torch.Generator().manual_seed(1_000_003 + args.seed)
    # encoder outputs with unit variance per coordinate (layer-normalised; the scale of our N(0, I) codebook)
    z_data = torch.randn(1, n, d, generator=gen).to(device)

    if method == "matmul":
        x = z_data.reshape(n, d)
        codebook = torch.randn(k, d, generator=gen).to(device)
        if for_memory:  # the distance matrix itself
            return lambda: torch.mm(x, codebook.t())
        out = torch.empty(n, k, device=device)
        return lambda: torch.mm(x, codebook.t(), out=out)

    g = torch.randn(1, n, d, generator=gen).to(device)  # fixed upstream gradient of the quantized output
    one = torch.ones((), device=device)
    z_e = z_data.clone().requires_grad_(True)
    torch.manual_seed(args.seed)
    if method in ("hard", "soft"):
        from vq_nat.modules import VectorQuantizer

        vq = VectorQuantizer(num_codes=k, dim=d, assignment=method, num_samples=args.num_samples,
                             update="ema", decay=0.999, beta=0.25).to(device).train()

        def step():
            z_e.grad = None
            out = vq(z_e)
            torch.autograd.backward((out.quantized, out.loss), (g, one))
            step.codes = out.codes  # kept (not inspected) for the codes-used sanity column
    else:
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=k, decay=0.999, commitment_weight=0.25, kmeans_init=False,
                            rotation_trick=False).to(device).train()

        def step():
            z_e.grad = None
            quantized, codes, loss = vq(z_e)
            torch.autograd.backward((quantized, loss), (g, one))
            step.codes = codes

    # every timed step starts from the same codebook (the initial one): the EMA update would otherwise let the
    # codebook drift, over the repeated steps on one batch, into a state that differs between methods and rounds
    initial = {name: t.clone() for name, t in vq.state_dict().items()}
    step.reset = lambda: vq.load_state_dict(initial)
    step.z_e = z_e
    return step


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_of_step(method, args):
    """Peak memory (bytes) that one step of ``method`` adds; call in a process that has run no step yet."""
    device = torch.device(args.device)
    fn = build(method, args, device, for_memory=True)
    reset = getattr(fn, "reset", lambda: None)
    fn()  # warm-up: lazy library initialisation, first touch of code pages
    if hasattr(fn, "z_e"):
        fn.z_e.grad = None
    reset()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        _malloc_trim()  # give back free heap pages: a reused free chunk must show up as a resident-set increase
        base = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
        fn()
        peak = _status_kib("VmHWM") * 1024
    return max(peak - base, 0)


def memory_worker(args):
    """``--_memory-worker METHOD``: runs in a fresh interpreter, prints the result as JSON."""
    print(json.dumps({"method": args.memory_worker, "peak_bytes": peak_memory_of_step(args.memory_worker, args)}))


def _mmap_large_allocations():
    """glibc: serve every allocation >= 64 KiB by mmap (freed at once); as MALLOC_MMAP_THRESHOLD_=65536."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536) != 1:
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")


def _malloc_trim():
    """glibc malloc_trim(0): unmap (MADV_DONTNEED) every free page of the heap; no-op without glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _forked_memory(args, method):
    """Peak memory of ``method`` in a forked child (modules already imported, no step run in this process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            _mmap_large_allocations()
            os.write(w, str(peak_memory_of_step(method, args)).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"memory measurement of {method} failed in the child: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        raise RuntimeError(f"child exited with status {status}")
    return int(text)


def measure_memory(args, methods):
    """Peak memory per method, each in its own fresh process (before any timing); None where it failed.

    CPU on Linux: a child forked from this process (which has imported everything but has not run a single
    tensor op yet, so no OpenMP pool or allocator state is inherited), one at a time. Otherwise (CUDA, which
    must not be forked): a new interpreter per method (``--_memory-worker``), run concurrently.
    """
    result = {}
    if torch.device(args.device).type == "cpu" and sys.platform.startswith("linux"):
        for method in methods:
            try:
                result[method] = _forked_memory(args, method)
            except Exception as e:  # noqa: BLE001
                print(f"warning: memory measurement of {method} failed: {e}", file=sys.stderr)
                result[method] = None
        return result
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    common = ["-K", str(args.num_codes), "-D", str(args.dim), "-N", str(args.num_tokens),
              "-m", str(args.num_samples), "--device", args.device, "--seed", str(args.seed)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    procs = {
        m: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_memory-worker", m] + common, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for m in methods
    }
    for method, proc in procs.items():
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"warning: memory measurement of {method} failed: {err.strip()[-500:]}", file=sys.stderr)
            result[method] = None
        else:
            result[method] = json.loads(lines[-1])["peak_bytes"]
    return result


# ----------------------------------------------------------------------------------------------- timing
def time_methods(args, methods, device):
    steps = {m: build(m, args, device) for m in methods}
    resets = {m: getattr(steps[m], "reset", lambda: None) for m in methods}
    for _ in range(args.warmup):
        for m in methods:
            resets[m]()
            steps[m]()
    sync(device)
    times = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:  # interleaved: drift and noise from other jobs hit every method alike
            resets[m]()  # untimed
            sync(device)
            t0 = time.perf_counter()
            steps[m]()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    codes_used = {m: steps[m].codes.unique().numel() / args.num_codes for m in methods if hasattr(steps[m], "codes")}
    return times, codes_used


def fmt_spread(values, scale=1.0, digits=1):
    return f"{min(values) * scale:.{digits}f}..{max(values) * scale:.{digits}f}"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but CUDA is not available")
    methods = [m for m in METHODS if not (m == "vqp" and args.no_vqp)]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"machine: os.cpu_count={os.cpu_count()} sched_affinity={len(os.sched_getaffinity(0))} "
          f"torch.get_num_threads={torch.get_num_threads()} torch={torch.__version__} "
          f"device={device} ({dev_name})")
    import vq_nat.modules  # noqa: F401  (imported before the memory children are forked)

    try:
        import vector_quantize_pytorch  # noqa: F401
        from importlib.metadata import version

        vqp_version = version("vector-quantize-pytorch")
    except Exception:  # noqa: BLE001
        vqp_version = "not installed"
        methods = [m for m in methods if m != "vqp"]
    print(f"vector-quantize-pytorch={vqp_version}")
    print(f"sizes: N={args.num_tokens} tokens, K={args.num_codes} codes, D={args.dim}, soft EM m={args.num_samples}; "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds; fp32")
    flops = 2.0 * args.num_tokens * args.num_codes * args.dim

    memory = {} if args.no_memory else measure_memory(args, methods)
    times, codes_used = time_methods(args, methods, device)

    labels = {"matmul": "matmul bound (N x D @ D x K)", "hard": "ours hard EM (ema)",
              "soft": f"ours soft EM m={args.num_samples} (ema)", "vqp": "vector-quantize-pytorch (ema)"}
    mem_what = "cuda max_memory_allocated" if device.type == "cuda" else "RSS increase"
    print()
    print(f"{'method':<34} {'median ms':>10} {'min..max ms':>19} {'tokens/s':>12} {'peak MiB':>9} {'codes used':>10}")
    for m in methods:
        med = statistics.median(times[m])
        mem = memory.get(m)
        mem_s = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
        print(f"{labels[m]:<34} {med * 1e3:>10.2f} {fmt_spread(times[m], 1e3, 2):>19} "
              f"{args.num_tokens / med:>12.0f} {mem_s:>9} {codes_used.get(m, float('nan')):>10.3f}")
    print(f"(matmul: {flops / statistics.median(times['matmul']) / 1e9:.1f} GFLOP/s; "
          f"peak MiB = {mem_what} during one step, fresh process per method; "
          f"codes used = fraction of the K codes drawn in the last timed step, a sanity check)")
    print()
    for name, (num, den, cmp, thr, meaning) in TARGETS.items():
        if num not in times or den not in times:
            continue
        per_round = [a / b for a, b in zip(times[num], times[den])]
        r = statistics.median(per_round)
        ok = r >= thr if cmp == ">=" else r <= thr
        print(f"RATIO {name} = {r:.3f} (rounds {fmt_spread(per_round, digits=3)}; "
              f"medians {statistics.median(times[num]) / statistics.median(times[den]):.3f}) "
              f"target {cmp} {thr} -> {'PASS' if ok else 'MISS'}   [{meaning}]")


if __name__ == "__main__":
    main()
