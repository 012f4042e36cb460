"""A respawn on a GPU: CUDA init and the weight copy, and who holds GPU memory.

Runs where a GPU is lent (nothing here works without one but the checks that
say so). With a model folder in the HF layout (`--model DIR`, or
`--build-full-size DIR` to save VibeVoice-1.5B's architecture with random
weights there first, about 5 GB, with bench_gpu_1p5b.full_size_config; with
`--shape large` VibeVoice-Large's, about 18.7 GB):

    0. first, in a fresh interpreter, imports the zygote's preload one module at a
       time and reports which one (if any) leaves the CUDA driver mapped, with the
       stack of the first torch.cuda device query (cuda_touch_probe);
    1. starts the zygote as a pool does and checks it: no CUDA driver or
       /dev/nvidia* mapped, one thread (when it has the driver, the pool does not
       use it, and the worker below spawns instead: `worker_forked` says which);
    2. holds the weights in memory as a pool does (vibevoice_pool/pool/warm_weights.py);
    3. forks a worker from the zygote (spawns one, see 1) that pins its GPU, then times
       - CUDA init: the first CUDA call (driver, context) to a synchronised op,
       - weight copy: the held safetensors mapped and copied to the GPU (bytes/s),
       - the engine's whole load() as a worker runs it (from the held folder);
    4. while that worker holds its context, asks nvidia-smi which processes hold
       GPU memory: only the worker may (not the parent, not the zygote).

    python bench/gpu_respawn.py --build-full-size /tmp/vv15 --out gpu_respawn.json
    python bench/gpu_respawn.py --model DIR --out gpu_respawn.json
    python bench/gpu_respawn.py --tiny /tmp/tiny --gpu -1 --out dry.json   # CPU dry run

`respawn_on_gpu(model_dir)` and `gpu_memory_holders()` are the functions other
benchmarks (bench_gpu_1p5b.py) can call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_memory_holders() -> dict[int, int] | None:
    """{pid: MiB} of the processes holding GPU memory, from nvidia-smi; None when
    nvidia-smi is missing or fails. (In a container with its own pid namespace
    nvidia-smi may list no process, or host pids: the caller says so.)"""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    holders: dict[int, int] = {}
    for line in out.strip().splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit():
            holders[int(pid)] = int(mib.strip() or 0) if mib.strip().isdigit() else 0
    return holders


_TOUCH_PROBE = r"""
import json, os, sys, traceback
preload = sys.argv[1:]
first = {}
def maps():
    from workers.zygote.probe import cuda_mappings
    with open("/proc/self/maps") as f:
        return cuda_mappings(f.read())
def watch(mod, name):
    orig = getattr(mod, name, None)
    if orig is None:
        return
    def wrapped(*a, **k):
        if name not in first:
            first[name] = traceback.format_stack(limit=12)[:-1]
        return orig(*a, **k)
    setattr(mod, name, wrapped)
out = {"env_nvml_check": None, "after": {}}
for i, modname in enumerate(preload):
    __import__(modname)
    if modname == "workers.zygote.preload" or i == 0:
        import torch
        out["env_nvml_check"] = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        for n in ("is_available", "device_count", "_lazy_init", "init", "current_device",
                  "get_device_capability", "get_device_properties", "is_bf16_supported"):
            watch(torch.cuda, n)
        watch(torch._C, "_cuda_getDeviceCount")
        watch(torch._C, "_cuda_init")
    out["after"][modname] = maps()
out["first_calls"] = {k: "".join(v) for k, v in first.items()}
print("TOUCH " + json.dumps(out))
"""


def start_touch_probe(preload: list[str]) -> subprocess.Popen:
    """In a fresh interpreter (as the zygote starts), import the zygote's preload one
    module at a time: which one leaves the CUDA driver mapped, and the first call into
    torch.cuda's device queries with its stack (wrapped after torch is imported).
    Started apart from its reading (finish_touch_probe) so it can overlap other work."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _TOUCH_PROBE, *preload]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root
    )


def finish_touch_probe(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": "timed out"}
    for line in stdout.splitlines():
        if line.startswith("TOUCH "):
            return json.loads(line[6:])
    return {"error": f"rc {proc.returncode}: {stderr[-2000:]}"}


def cuda_touch_probe(preload: list[str]) -> dict:
    return finish_touch_probe(start_touch_probe(preload))


def worker_measure(model_dir: str, device: int, results, release) -> None:
    """In a worker forked from the zygote: pin, init CUDA, copy the weights, load. With
    device < 0 (a CPU dry run) the same steps on the CPU, CUDA init left out."""
    if device >= 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)  # before any CUDA call
    import torch
    from safetensors.torch import load_file

    out: dict = {"pid": os.getpid(), "cuda_initialized_at_fork": torch.cuda.is_initialized()}
    target = "cuda:0" if device >= 0 else "cpu"
    t0 = time.monotonic()
    if device >= 0:
        torch.cuda.init()
        torch.empty(1, device=target)
        torch.cuda.synchronize()
    out["cuda_init_s"] = time.monotonic() - t0 if device >= 0 else 0.0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    t0 = time.monotonic()
    state = {}
    for f in files:
        state.update(load_file(str(f)))  # mapped from the held memory files
    out["map_s"] = time.monotonic() - t0
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    t0 = time.monotonic()
    on_gpu = {k: t.to(target, copy=True) for k, t in state.items()}
    if device >= 0:
        torch.cuda.synchronize()
    out["copy_s"] = time.monotonic() - t0
    out["weight_bytes"] = nbytes
    out["copy_gb_per_s"] = nbytes / out["copy_s"] / 1e9 if out["copy_s"] > 0 else None
    del on_gpu, state
    if device >= 0:
        torch.cuda.empty_cache()
    from workers.engines.contract import EngineSpec
    from workers.engines.factory import build_engine

    t0 = time.monotonic()
    spec = EngineSpec(engine="vibevoice", model_path=model_dir, device=target.split(":")[0])
    engine = build_engine(spec)
    info = engine.load()
    if device >= 0:
        torch.cuda.synchronize()
    out["engine_load_s"] = time.monotonic() - t0
    from workers.engines.vibevoice.engine import direct_load

    out["direct_load"] = direct_load(target)  # weights straight onto the GPU (accelerate)
    out["device"] = info.name
    results.send(out)
    release.recv()  # hold the context while the parent asks nvidia-smi


def respawn_on_gpu(model_dir: str, device: int = 0, probe: subprocess.Popen | None = None) -> dict:
    """The whole check; a dict of figures and verdicts (see the module doc). `probe`: a
    start_touch_probe already running (else one is run here)."""
    from vibevoice_pool.pool.warm_weights import WarmWeights
    from vibevoice_pool.pool.zygote import Zygote
    from workers.zygote.probe import cuda_mappings, thread_count

    res: dict = {"model": model_dir, "gpu": device}
    zygote = Zygote("vibevoice")
    probe = probe or start_touch_probe(zygote.preload)
    res["cuda_touch_probe"] = finish_touch_probe(probe)
    print(json.dumps(res["cuda_touch_probe"], indent=1), flush=True)
    t0 = time.monotonic()
    zygote.start(wait_s=300)
    res["zygote_warm_s"] = time.monotonic() - t0
    res["zygote_usable"] = zygote.warm  # not: the worker below spawns (and says why)
    res["zygote_off_reason"] = zygote.off_reason
    if zygote.pid is None:
        res["error"] = f"the zygote did not start ({zygote.off_reason or 'timeout'})"
        return res
    with open(f"/proc/{zygote.pid}/maps") as f:
        res["zygote_cuda_mappings"] = cuda_mappings(f.read())
    res["zygote_threads"] = thread_count(zygote.pid)
    held = WarmWeights.hold(model_dir)
    res["held_bytes"] = held.nbytes if held else 0
    res["hold_s"] = held.copy_s if held else None
    path = held.path if held else model_dir
    ctx, res["worker_forked"] = zygote.context()
    results_r, results_w = ctx.Pipe(duplex=False)
    release_r, release_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=worker_measure, args=(path, device, results_w, release_r))
    try:
        child.start()
        results_w.close()
        deadline = time.monotonic() + 600
        while not results_r.poll(1):
            if not child.is_alive() or time.monotonic() > deadline:
                res["error"] = f"the worker ended or hung without a result ({child.exitcode})"
                return res
        try:
            res["worker"] = results_r.recv()
        except EOFError:
            res["error"] = f"the worker died before its result (exit {child.exitcode})"
            return res
        holders = gpu_memory_holders()
        res["gpu_memory_holders"] = holders
        others = {zygote.pid: "zygote", os.getpid(): "parent"}
        if holders is None:
            res["only_workers_hold_gpu_memory"] = "unknown: nvidia-smi missing or failed"
        elif not holders:
            res["only_workers_hold_gpu_memory"] = "unknown: nvidia-smi lists no process"
        else:
            wrong = [others[p] for p in holders if p in others]
            res["only_workers_hold_gpu_memory"] = not wrong and child.pid in holders
            res["gpu_memory_wrong_holders"] = wrong
        with open(f"/proc/{zygote.pid}/maps") as f:  # still clean after forking a CUDA worker
            res["zygote_cuda_mappings_after"] = cuda_mappings(f.read())
    finally:
        release_w.send(True)
        child.join(60)
        if child.is_alive():
            child.kill()
        zygote.close()
        if held:
            held.close()
    w = res["worker"]
    res["respawn_estimate_s"] = w["cuda_init_s"] + w["engine_load_s"]
    return res


def build_full_size(folder: str, model: str = "1.5b") -> str:
    """Save VibeVoice-1.5B's architecture (or `model` "large": VibeVoice-Large's) with
    random weights (bf16) to `folder`, in a process of its own (built on the GPU when
    there is one, for speed): its CUDA context is gone before the checks start."""
    code = (
        "import sys; sys.path[:0] = sys.argv[4:]; "
        "from gpu_respawn import _build; _build(sys.argv[1], sys.argv[2], sys.argv[3])"
    )
    bench, root = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])
    device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    argv = [sys.executable, "-c", code, folder, device, model, bench, root]
    subprocess.run(argv, check=True)
    return folder


def _build(folder: str, device: str, shape: str = "1.5b") -> None:
    import torch
    from bench_gpu_1p5b import full_size_config
    from transformers import VibeVoiceForConditionalGeneration

    from workers.checkpoints.tiny import configure_generation, make_tiny_model

    make_tiny_model(folder)  # the tokenizer, the processor's files, the chat template
    for f in Path(folder).glob("*.safetensors"):
        f.unlink()
    (Path(folder) / "TINY_MODEL").unlink(missing_ok=True)
    # The tiny tokenizer numbers the special tokens its own way: the model uses its ids,
    # so prompts, voice slots and the audio token agree (the vocabulary stays 151,936).
    tiny = json.loads((Path(folder) / "config.json").read_text())
    names = ("pad", "eos", "audio_bos", "audio_eos", "audio")
    ids = {k: tiny[f"{k}_token_id"] for k in names}
    with torch.device(device):
        model = VibeVoiceForConditionalGeneration._from_config(
            full_size_config(ids, model=shape), dtype=torch.bfloat16
        )
    # Random weights never pick the audio token: the sequence_bias makes every token audio.
    configure_generation(model.generation_config, ids["audio"], bias=True)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a VibeVoice folder in the HF layout")
    ap.add_argument("--build-full-size", metavar="DIR", help="save the 1.5B architecture here")
    ap.add_argument("--shape", choices=("1.5b", "large"), default="1.5b", help="which, built")
    ap.add_argument("--gpu", type=int, default=0, help="-1: the CPU (a dry run, with --tiny)")
    ap.add_argument("--tiny", metavar="DIR", help="build the tiny model here (a CPU dry run)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    model = args.model
    probe = None
    if args.build_full_size:  # the import probe runs beside the build (its own process)
        from vibevoice_pool.pool.zygote import Zygote

        probe = start_touch_probe(Zygote("vibevoice").preload)
        t0 = time.monotonic()
        model = build_full_size(args.build_full_size, args.shape)
        print(f"built {model} in {time.monotonic() - t0:.0f} s", flush=True)
    if args.tiny:
        from workers.checkpoints.tiny import ensure_tiny_model

        model = ensure_tiny_model(args.tiny)
    if not model:
        ap.error("give --model DIR, --build-full-size DIR or --tiny DIR")
    res = respawn_on_gpu(model, args.gpu, probe)
    print(json.dumps(res, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
