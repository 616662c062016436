"""loc3r against the runtimes users would pick instead, and against this machine's roofline, in one run.

    python bench/peers.py [--shapes qwen2-0.5b,loc3r-tiny] [--systems ...] [--repeats 3] [--quick]
                          [--workdir DIR] [--json bench-peers.json]

For each model shape (:mod:`peers_models`) it builds random-weight
checkpoints and packages: the Hugging Face checkpoints, ``loc3r export
convert`` + ``loc3r export onnx`` at fp32, then int8 and int4 by the
quantizer ``loc3r export onnx`` runs (on copies of the fp32 package), and
onnxruntime-genai's model builder at fp32 and int4 on the same decoder. Then
it starts one worker process per system (so each system's peak RSS is its
own), warms every system up and measures them alternately, operation by
operation, taking the p50 over ``--repeats``:

- prefill tokens/s at 256 and 1024 tokens;
- decode tokens/s at a context of 1024 (right after that prefill);
- vision tower ms per frame;
- the time to answer a question about a 32-frame video: loc3r streams (the
  frames were ingested before; time from question to answer), peers process
  the video at question time;
- peak RSS of the worker.

The machine's roofline (:mod:`loc3r.runtime.roofline`) turns decode into a
percentage of the memory-bandwidth bound (weight + KV bytes per token) and
prefill into a percentage of the fp32 GEMM FLOP bound. It prints a markdown
table per shape with the issue's targets checked, and writes everything as
JSON. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers_models import (SHAPES, ModelArtifacts, build_genai_model, build_hf_checkpoints,  # noqa: E402
                          convert_checkpoint, export_package, get_shape, quantize_fp32_copy)
from peers_report import checks_text, markdown_table, summarize, table_columns, target_checks, write_json  # noqa: E402
from peers_systems import SYSTEMS  # noqa: E402

DEFAULT_SHAPES = ("qwen2-0.5b", "loc3r-tiny")
DECODE_SAMPLE_S = 3.0  # aim for decode samples about this long (tokens/s of a slow system need fewer tokens)


@dataclass(frozen=True)
class BenchOptions:
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    systems: tuple[str, ...] = SYSTEMS
    repeats: int = 3
    warmup: int = 1
    prefill_lengths: tuple[int, ...] = (256, 1024)
    decode_steps: int = 8
    video_frames: int = 32
    answer_tokens: int = 16
    answer_repeats: int = 1  # a peer's answer recomputes the whole video: the costliest op by far
    threads: int = os.cpu_count() or 1

    @property
    def decode_context(self) -> int:
        return max(self.prefill_lengths)


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- building
def build_artifacts(root: Path, shape_name: str, systems: tuple[str, ...], threads: int) -> ModelArtifacts:
    """Every checkpoint and package ``systems`` need, reusing what an earlier run left in ``root``."""
    arts = ModelArtifacts(root / shape_name, get_shape(shape_name))
    arts.root.mkdir(parents=True, exist_ok=True)
    steps = [("Hugging Face checkpoints", arts.hf_qwen2 / "config.json", lambda: build_hf_checkpoints(arts)),
             ("loc3r checkpoint", arts.ckpt / "config.json", lambda: convert_checkpoint(arts))]
    precisions = {s.split("-")[-1] for s in systems if s.startswith("loc3r-")}
    if precisions or ("torch-fp32" in systems and not arts.shape.is_llava):  # torch-fp32 reads its manifest
        steps.append(("loc3r export onnx --precision fp32", arts.package("fp32") / "loc3r.json",
                      lambda: export_package(arts, "fp32")))
    for p in sorted(precisions - {"fp32"}):
        steps.append((f"quantize the fp32 package to {p}", arts.package(p) / "loc3r.json",
                      lambda p=p: quantize_fp32_copy(arts, p)))
    for p in sorted({s.rsplit("-", 1)[1] for s in systems if s.startswith("ort-genai-")}):
        steps.append((f"onnxruntime-genai builder -p {p}", arts.genai_dir(p) / "genai_config.json",
                      lambda p=p: build_genai_model(arts, p, threads)))
    for what, marker, fn in steps:
        if marker.is_file():
            log(f"{shape_name}: {what}: reused from {marker.parent}")
            continue
        t0 = time.perf_counter()
        fn()
        log(f"{shape_name}: {what}: {time.perf_counter() - t0:.0f} s")
    return arts


# ---------------------------------------------------------------- workers
class Worker:
    """One system loaded in its own process; ``call`` sends an operation and waits for its answer."""

    def __init__(self, system: str, arts: ModelArtifacts, threads: int, work_root: Path):
        self.system = system
        self.log_path = arts.root / f"worker_{system}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--shapes", arts.shape.name,
               "--workdir", str(work_root), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log_path, "w"), text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"{self.system} worker exited: {' | '.join(tail)}")
        return json.loads(line)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        final = self.call("rss")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return final


def worker_main(system: str, shape_name: str, work_root: Path, threads: int) -> None:
    """The worker's loop: one JSON request per stdin line, one JSON answer per line on the real stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to the log, never into the protocol
    from peers_systems import NotSupported, open_system

    arts = ModelArtifacts(work_root / shape_name, get_shape(shape_name))
    t0 = time.perf_counter()
    sys_ = open_system(system, arts, threads)
    out.write(json.dumps({"load_s": time.perf_counter() - t0, "rss_mb": process_peak_rss_mb()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            if op == "rss":
                res = {"peak_rss_mb": process_peak_rss_mb()}
            elif op == "prefill":
                res = {"seconds": sys_.prefill(req["n"])}
            elif op == "decode":
                res = {"seconds": sys_.decode(req["steps"])}
            elif op == "vision":
                res = {"seconds": sys_.vision()}
            elif op == "prepare_video":
                res = sys_.prepare_video(req["frames"])
            elif op == "answer":
                seconds, tokens = sys_.answer(req["max_new_tokens"])
                res = {"seconds": seconds, "tokens": tokens}
            else:
                res = {"error": f"unknown op {op}"}
        except NotSupported as exc:
            res = {"na": str(exc)}
        except Exception as exc:  # reported in the table's JSON, the run goes on
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")


def process_peak_rss_mb() -> float:
    """This process's own peak RSS in MB.

    ``/proc/self/status`` VmHWM belongs to the process image, unlike
    ``ru_maxrss``, which a child started with fork + exec inherits from the
    parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    from loc3r.runtime.profiler import peak_rss_mb

    return peak_rss_mb()


# ---------------------------------------------------------------- measuring
def measure_shape(arts: ModelArtifacts, opts: BenchOptions, work_root: Path) -> dict:
    """Samples per system: all workers alive, each operation run on every system in turn, order rotating.

    Streaming systems ingest the video first (ingest ms/frame reported, not
    timed in the answer). Warm-up runs every operation once untimed, except a
    peer's answer: recomputing a whole video has nothing left to warm.
    """
    workers, info = {}, {}
    for name in opts.systems:
        log(f"{arts.shape.name}: loading {name}")
        try:
            workers[name] = Worker(name, arts, opts.threads, work_root)
            info[name] = {"load_s": workers[name].ready["load_s"], "notes": []}
        except RuntimeError as exc:
            log(f"{arts.shape.name}: {name} failed to load: {exc}")
            info[name] = {"error": str(exc), "notes": []}
    samples = {name: {} for name in workers}
    supported = {name: set() for name in workers}

    def run(name: str, op: str, key: Optional[str], record: bool, **args) -> Optional[dict]:
        if key is not None and key in info[name].get("unsupported", ()):
            return None
        res = workers[name].call(op, **args)
        if "na" in res or "error" in res:
            info[name].setdefault("unsupported", []).append(key or op)
            info[name]["notes"].append(f"{key or op}: {res.get('na') or res.get('error')}")
            return None
        if record and key is not None:
            samples[name].setdefault(key, []).append(res["seconds"])
            supported[name].add(key)
        return res

    names = list(workers)
    streaming = set()
    for name in names:  # streaming systems ingest the video now, before any question
        res = run(name, "prepare_video", "answer", False, frames=opts.video_frames)
        if res and "ingest_ms_per_frame" in res:
            info[name]["ingest_ms_per_frame"] = res["ingest_ms_per_frame"]
            streaming.add(name)
    if opts.warmup:
        log(f"{arts.shape.name}: warm-up")
    steps = {name: opts.decode_steps for name in names}
    for _ in range(opts.warmup):  # every kernel once, untimed
        for name in names:
            run(name, "prefill", f"prefill_{min(opts.prefill_lengths)}", False, n=min(opts.prefill_lengths))
            res = run(name, "decode", "decode", False, steps=2)
            if res:  # a slow system decodes fewer tokens per sample: about DECODE_SAMPLE_S, at least 2
                steps[name] = max(2, min(opts.decode_steps, math.ceil(DECODE_SAMPLE_S / res["seconds"])))
            run(name, "vision", "vision", False)
            if name in streaming:
                run(name, "answer", "answer", False, max_new_tokens=opts.answer_tokens)
    for r in range(opts.repeats):
        log(f"{arts.shape.name}: round {r + 1}/{opts.repeats}")
        order = names[r % len(names):] + names[:r % len(names)]
        for n in sorted(opts.prefill_lengths):
            for name in order:
                run(name, "prefill", f"prefill_{n}", True, n=n)
                if n == opts.decode_context:  # decode right after the longest prefill: context = n
                    run(name, "decode", "decode", True, steps=steps[name])
        for name in order:
            run(name, "vision", "vision", True)
        for name in order:  # a peer recomputes the whole video per answer: --answer-repeats of those
            if name in streaming or r < opts.answer_repeats:
                res = run(name, "answer", "answer", True, max_new_tokens=opts.answer_tokens)
                if res:
                    info[name]["answer_tokens"] = res["tokens"]
    for name, w in workers.items():
        info[name]["peak_rss_mb"] = w.close()["peak_rss_mb"]
        info[name]["decode_steps"] = steps[name]
    return {"samples": samples, "info": info}


def measure_machine_roofline(threads: int) -> dict:
    """STREAM bandwidth and the GEMM peak (the better of numpy's BLAS and onnxruntime's MLAS), as a dict."""
    from loc3r.runtime.roofline import measure_ort_matmul_gflops, measure_roofline

    roofline = measure_roofline(matmul_n=2048).to_dict()
    roofline["numpy_matmul_gflops"] = roofline["matmul_gflops"]
    roofline["ort_matmul_gflops"] = measure_ort_matmul_gflops(2048, repeats=5, threads=threads)
    roofline["matmul_gflops"] = max(roofline["numpy_matmul_gflops"], roofline["ort_matmul_gflops"])
    return roofline


def op_profile(arts: ModelArtifacts, system: str, opts: BenchOptions) -> dict:
    """ms per decode step of ``system`` by operator type (onnxruntime's profiler)."""
    from peers_opprofile import decode_op_profile

    log(f"{arts.shape.name}: onnxruntime profile of a {system} decode step")
    return decode_op_profile(arts.package(system.split("-", 1)[1]), opts.decode_context, steps=8,
                             threads=opts.threads)


def system_cost(arts: ModelArtifacts, system: str):
    """The decoder cost per token the roofline uses for ``system`` (torch runs the fp32 weights)."""
    from loc3r.runtime.profile_cli import DecoderCost, graph_cost, package_decoder_cost

    if system.startswith("loc3r-"):
        return package_decoder_cost(arts.package(system.split("-", 1)[1]))
    if system.startswith("ort-genai-"):
        d = arts.genai_dir(system.rsplit("-", 1)[1])
        cfg = json.loads((d / "genai_config.json").read_text())["model"]["decoder"]
        g = graph_cost(d / cfg["filename"])
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_size"] * 4
        return DecoderCost(g.weight_bytes, g.matmul_flops, g.attention_heads, cfg["head_size"], kv)
    if arts.package("fp32").is_dir():
        return package_decoder_cost(arts.package("fp32"))
    return None


def machine_description() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        info["load_avg"] = os.getloadavg()
    except (OSError, ValueError):
        pass
    import onnxruntime
    info["onnxruntime"] = onnxruntime.__version__
    try:
        import onnxruntime_genai
        info["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        info["onnxruntime_genai"] = None
    import torch
    import transformers
    info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    return info


def parse_args(argv=None) -> tuple[argparse.Namespace, BenchOptions]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of systems (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per operation (p50)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed warm-up passes first (the shortest prefill, 2 decode steps, one frame, one answer)")
    ap.add_argument("--answer-repeats", type=int, default=1,
                    help="timed answers about the video for peers, which recompute the whole video each time "
                         "(by far the costliest operation); loc3r answers every round")
    ap.add_argument("--prefill", default="256,1024",
                    help="prompt lengths for prefill tokens/s; decode runs at the longest")
    ap.add_argument("--decode-steps", type=int, default=8, help="tokens per decode sample")
    ap.add_argument("--frames", type=int, default=32, help="video length for the time to answer")
    ap.add_argument("--answer-tokens", type=int, default=16, help="tokens generated per answer")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for every system")
    ap.add_argument("--quick", action="store_true",
                    help="loc3r-tiny only, 2 repeats, 8 decode steps: a smoke run in about a minute")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep checkpoints and packages here and reuse them next time (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=Path("bench-peers.json"), help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = tuple(s for s in args.shapes.split(",") if s)
    systems = tuple(s for s in args.systems.split(",") if s)
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system '{s}'; known: {', '.join(SYSTEMS)}")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape '{s}'; known: {', '.join(SHAPES)}")
    try:
        prefill = tuple(sorted({int(x) for x in args.prefill.split(",") if x}))
    except ValueError:
        ap.error(f"--prefill must be a comma list of token counts, got {args.prefill!r}")
    if (args.repeats < 1 or args.warmup < 0 or args.decode_steps < 1 or args.answer_repeats < 1 or args.frames < 1
            or args.answer_tokens < 1 or not prefill or prefill[0] < 1):
        ap.error("--repeats, --decode-steps, --answer-repeats, --frames, --answer-tokens and --prefill lengths "
                 "must be >= 1, --warmup >= 0")
    opts = BenchOptions(shapes=shapes, systems=systems, repeats=args.repeats, warmup=args.warmup,
                        prefill_lengths=prefill, decode_steps=args.decode_steps, video_frames=args.frames,
                        answer_tokens=args.answer_tokens, answer_repeats=min(args.answer_repeats, args.repeats),
                        threads=args.threads)
    if args.quick:
        opts = BenchOptions(shapes=("loc3r-tiny",), systems=systems, repeats=2, warmup=1, prefill_lengths=prefill,
                            decode_steps=8, video_frames=args.frames, answer_tokens=args.answer_tokens,
                            answer_repeats=1, threads=args.threads)
    return args, opts


def main(argv=None) -> dict:
    import tempfile

    args, opts = parse_args(argv)
    if args.worker:
        worker_main(args.worker, opts.shapes[0], args.workdir, opts.threads)
        return {}
    t_start = time.perf_counter()
    machine = machine_description()
    log(f"{machine.get('cpu', '?')}, {machine['cores']} cores, load {machine.get('load_avg')}")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="loc3r-peers-")
        work_root = Path(tmp.name)
    else:
        work_root = args.workdir.resolve()
    try:
        log("measuring the roofline (STREAM copy/triad, fp32 GEMM)")
        roofline = measure_machine_roofline(opts.threads)
        log(f"roofline: {roofline['bandwidth_gbps']:.1f} GB/s, {roofline['matmul_gflops']:.1f} GFLOP/s")
        result = {"command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": machine, "options": asdict(opts), "shapes": {}}
        measured_shapes = {}
        for shape_name in opts.shapes:
            t0 = time.perf_counter()
            arts = build_artifacts(work_root, shape_name, opts.systems, opts.threads)
            build_s = time.perf_counter() - t0
            measured = measure_shape(arts, opts, work_root)
            profiled = next((s for s in ("loc3r-int4", "loc3r-int8", "loc3r-fp32") if s in measured["samples"]), None)
            per_op = op_profile(arts, profiled, opts) if profiled else None
            measured_shapes[shape_name] = (arts, build_s, measured, profiled, per_op)
        log("measuring the roofline again (on a shared machine the better of both is the bound)")
        again = measure_machine_roofline(opts.threads)
        result["roofline_start"], result["roofline_end"] = roofline, again
        roofline = result["roofline"] = {k: max(roofline[k], again[k]) for k in roofline}
        for shape_name, (arts, build_s, measured, profiled, per_op) in measured_shapes.items():
            rows = {}
            model_flops = system_cost(arts, "torch-fp32")  # the model's FLOPs, whoever runs them
            for name, samples in measured["samples"].items():
                row = summarize(samples, opts.prefill_lengths, system_cost(arts, name), roofline,
                                opts.decode_context, prefill_cost=model_flops)
                row["peak_rss_mb"] = measured["info"][name].get("peak_rss_mb")
                row["ingest_ms_per_frame"] = measured["info"][name].get("ingest_ms_per_frame")
                rows[name] = row
            entry = result["shapes"][shape_name] = {
                "description": arts.shape.description, "build_s": build_s, "rows": rows,
                "checks": target_checks(rows), "info": measured["info"], "samples": measured["samples"]}
            print(f"\n### {shape_name}: {arts.shape.description}\n")
            print(markdown_table(rows, table_columns(opts.prefill_lengths)))
            notes = [f"- {n}: {note}" for n, i in measured["info"].items() for note in dict.fromkeys(i["notes"])]
            if notes:
                print("\n" + "\n".join(notes))
            if entry["checks"]:
                print("\n" + checks_text(entry["checks"]))
            if per_op:
                entry["decode_op_profile"] = {"system": profiled, "ms_per_step": per_op}
                total = sum(per_op.values())
                top = ", ".join(f"{k} {ms:.1f} ms ({100 * ms / total:.0f}%)" for k, ms in list(per_op.items())[:5])
                print(f"\n{profiled} decode step at context {opts.decode_context}, onnxruntime profile: "
                      f"{total:.1f} ms of kernels: {top}")
        machine["load_avg_end"] = os.getloadavg()
        result["total_s"] = time.perf_counter() - t_start
        print(f"\nroofline: {roofline['bandwidth_gbps']:.1f} GB/s STREAM, {roofline['matmul_gflops']:.1f} GFLOP/s "
              f"fp32 GEMM (numpy {roofline['numpy_matmul_gflops']:.1f}, "
              f"onnxruntime {roofline['ort_matmul_gflops']:.1f}); "
              f"{machine.get('cpu', '?')}, {machine['cores']} cores, {machine.get('ram_gb')} GB; "
              f"load {machine.get('load_avg')} -> {machine['load_avg_end']}; total {result['total_s']:.0f} s")
        log(f"wrote {write_json(args.json, result)}")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
