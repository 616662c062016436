"""Ahead-of-time compilation of the loc3r Triton kernels for sm_87 (Jetson Orin) and sm_90.

No GPU is needed: ``triton.compile`` targets a ``GPUTarget`` directly. For a fixed set
of signatures (fp16 activations, the head dims and int4 block sizes the models use) it
writes into ``--out-dir``:

- ``cubin/<variant>.sm<cc>.cubin`` and ``ptx/<variant>.sm<cc>.ptx``;
- ``src/<variant>.c``: the cubins embedded as byte arrays plus a typed C launch stub
  ``loc3r_<variant>(stream, grid_x, grid_y, grid_z, <kernel args>)``;
- ``include/loc3r_aot_kernels.h``: the stubs' prototypes;
- ``manifest.json``: variants, arguments, num_warps, shared memory and cubin sha256.

The stubs use ``kernels/native/loc3r_aot_runtime.{h,c}`` (module loading through a
``dlopen``-ed CUDA driver) and ``kernels/native/loc3r_kernels.{h,c}`` (grids and
dispatch), which CMakeLists.txt builds into ``libloc3r_aot``.

Command line::

    python -m loc3r.kernels.aot --out-dir build/aot [--arch 87 --arch 90] [--kernels 'w4a16_*']
    python -m loc3r.kernels.aot --list-outputs --out-dir build/aot   # for CMake, compiles nothing
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

DEFAULT_ARCHS = (87, 90)
C_TYPES = {"i32": "int32_t", "fp32": "float"}  # pointers are CUdeviceptr


@dataclass(frozen=True)
class AotVariant:
    """One kernel specialization: a C symbol, a Triton kernel and its fixed signature."""

    name: str  # C symbol suffix, e.g. prefill_attention_fp16_d128_causal
    module: str  # python module holding the kernel
    kernel: str  # @triton.jit function name
    types: Tuple[Tuple[str, str], ...]  # non-constexpr args that are not i32: (arg, "*fp16" | "fp32" ...)
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 2

    def jit_function(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.kernel)


@dataclass(frozen=True)
class CompiledVariant:
    """What a compile returns (picklable, crosses the process pool)."""

    name: str
    arch: int
    function_name: str
    shared: int
    num_warps: int
    cubin: bytes
    ptx: str
    args: Tuple[Tuple[str, str], ...] = field(default=())  # (name, triton type) in launch order


def fixed_variants() -> List[AotVariant]:
    """The fixed AOT signature set (fp16 activations; see kernels/README.md)."""
    attn = "loc3r.kernels.prefill_attention"
    dec = "loc3r.kernels.decode_attention"
    gemm = "loc3r.kernels.w4a16_gemm"
    f16 = "*fp16"
    out: List[AotVariant] = []
    for d in (64, 128):
        for causal in (True, False):
            out.append(AotVariant(
                f"prefill_attention_fp16_d{d}_{'causal' if causal else 'full'}", attn, "prefill_attention_kernel",
                (("Q", f16), ("K", f16), ("V", f16), ("O", f16), ("PREFIX_LENS", "*i32"), ("sm_scale", "fp32")),
                (("HEAD_DIM", d), ("BLOCK_M", 64), ("BLOCK_N", 64), ("CAUSAL", causal), ("DOT_PRECISION", "tf32")),
            ))
    for d in (64, 128):
        out.append(AotVariant(
            f"decode_attention_split_fp16_d{d}", dec, "decode_attention_split_kernel",
            (("Q", f16), ("K", f16), ("V", f16), ("O_PART", "*fp32"), ("LSE_PART", "*fp32"),
             ("KV_LENS", "*i32"), ("sm_scale", "fp32")),
            (("HEAD_DIM", d), ("BLOCK_G", 16), ("BLOCK_N", 64), ("DOT_PRECISION", "tf32")),
        ))
        out.append(AotVariant(
            f"decode_attention_reduce_fp16_d{d}", dec, "decode_attention_reduce_kernel",
            (("O_PART", "*fp32"), ("LSE_PART", "*fp32"), ("O", f16)),
            (("HEAD_DIM", d), ("BLOCK_S", 64)), num_stages=1,
        ))
    for qblock in (32, 128):
        for has_zp in (True, False):
            tag = f"fp16_b{qblock}_{'zp' if has_zp else 'nozp'}"
            ptrs = (("X", f16), ("B", "*u8"), ("SCALES", f16), ("ZEROS", "*u8"), ("Y", f16))
            block_k = max(64, qblock)
            out.append(AotVariant(
                f"w4a16_gemm_{tag}", gemm, "w4a16_gemm_kernel", ptrs,
                (("QBLOCK", qblock), ("HAS_ZP", has_zp), ("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", block_k),
                 ("DOT_PRECISION", "tf32")), num_stages=3,
            ))
            out.append(AotVariant(
                f"w4a16_gemv_{tag}", gemm, "w4a16_gemv_kernel", ptrs,
                (("QBLOCK", qblock), ("HAS_ZP", has_zp), ("BLOCK_N", 64), ("BLOCK_K", block_k)), num_stages=3,
            ))
    return out


def select_variants(patterns: Sequence[str]) -> List[AotVariant]:
    """Variants whose name matches any glob pattern (all when none given)."""
    variants = fixed_variants()
    if not patterns:
        return variants
    chosen = [v for v in variants if any(fnmatch.fnmatch(v.name, p) for p in patterns)]
    if not chosen:
        from loc3r.errors import Loc3rError

        raise Loc3rError(f"no AOT kernel matches {list(patterns)}; known: {', '.join(v.name for v in variants)}")
    return chosen


def triton_signature(variant: AotVariant, arg_names: Sequence[str]) -> Dict[str, str]:
    """Full Triton signature: constexprs, the declared types, i32 for every other argument."""
    types = dict(variant.types)
    consts = dict(variant.constexprs)
    return {a: "constexpr" if a in consts else types.get(a, "i32") for a in arg_names}


def compile_variant(variant: AotVariant, arch: int) -> CompiledVariant:
    """triton.compile one variant for sm_<arch>; pointers are assumed 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.jit_function()
    sig = triton_signature(variant, fn.arg_names)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                                     "enable_fp_fusion": True})
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(variant.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{variant.name}: kernels needing global/profile scratch are not supported AOT")
    args = tuple((a, sig[a]) for a in fn.arg_names if sig[a] != "constexpr")
    return CompiledVariant(variant.name, arch, md.name, md.shared, md.num_warps,
                           compiled.asm["cubin"], compiled.asm["ptx"], args)


def c_type(triton_type: str) -> str:
    return "CUdeviceptr" if triton_type.startswith("*") else C_TYPES[triton_type]


def c_prototype(name: str, args: Sequence[Tuple[str, str]]) -> str:
    params = ", ".join(f"{c_type(t)} {a}" for a, t in args)
    return (f"CUresult loc3r_{name}(CUstream stream, unsigned int grid_x, unsigned int grid_y, "
            f"unsigned int grid_z, {params})")


def c_bytes(data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 24):
        lines.append("  " + ", ".join(f"0x{b:02x}" for b in data[i:i + 24]) + ",")
    return "\n".join(lines)


def c_source(variant: AotVariant, builds: Sequence[CompiledVariant]) -> str:
    """One variant's C file: embedded cubins per arch and the typed launch stub."""
    first = builds[0]
    out = [f"/* Generated by loc3r.kernels.aot: {variant.name} ({variant.module}.{variant.kernel}). Do not edit. */",
           "/* constexprs: " + ", ".join(f"{k}={v}" for k, v in variant.constexprs) +
           f"; num_warps={first.num_warps}, num_stages={variant.num_stages} */",
           '#include "loc3r_aot_kernels.h"', ""]
    for b in builds:
        out += [f"static const unsigned char cubin_sm{b.arch}[] = {{", c_bytes(b.cubin), "};", ""]
    images = ", ".join(f"{{{b.arch // 10}, {b.arch % 10}, cubin_sm{b.arch}, sizeof(cubin_sm{b.arch}), {b.shared}}}"
                       for b in builds)
    out += [f"static const Loc3rAotImage images[] = {{{images}}};",
            f'Loc3rAotKernel loc3r_aot_{variant.name} = {{"{variant.name}", "{first.function_name}", '
            f"{first.num_warps}, images, {len(builds)}, LOC3R_AOT_KERNEL_STATE_INIT}};", "",
            c_prototype(variant.name, first.args) + " {",
            "  CUdeviceptr global_scratch = 0, profile_scratch = 0;  /* Triton's trailing scratch params */",
            "  void *params[] = {" + ", ".join([f"&{a}" for a, _ in first.args] + ["&global_scratch", "&profile_scratch"])
            + "};",
            f"  return loc3r_aot_launch(&loc3r_aot_{variant.name}, stream, grid_x, grid_y, grid_z, params);",
            "}", ""]
    return "\n".join(out)


def c_header(variants: Sequence[AotVariant], args_by_name: Dict[str, Sequence[Tuple[str, str]]]) -> str:
    out = ["/* Generated by loc3r.kernels.aot. Do not edit. */", "#ifndef LOC3R_AOT_KERNELS_H",
           "#define LOC3R_AOT_KERNELS_H", "#include <stdint.h>", '#include "loc3r_aot_runtime.h"', "",
           "#ifdef __cplusplus", 'extern "C" {', "#endif", ""]
    for v in variants:
        out += [f"extern Loc3rAotKernel loc3r_aot_{v.name};", c_prototype(v.name, args_by_name[v.name]) + ";", ""]
    out += ["/* Every kernel built into this library, for lookup by name. */",
            "extern Loc3rAotKernel *const loc3r_aot_kernels[];", "extern const int loc3r_aot_kernel_count;", "",
            "#ifdef __cplusplus", "}", "#endif", "#endif", ""]
    return "\n".join(out)


def c_table(variants: Sequence[AotVariant]) -> str:
    entries = "".join(f"  &loc3r_aot_{v.name},\n" for v in variants)
    return ("/* Generated by loc3r.kernels.aot. Do not edit. */\n#include \"loc3r_aot_kernels.h\"\n\n"
            f"Loc3rAotKernel *const loc3r_aot_kernels[] = {{\n{entries}}};\n"
            f"const int loc3r_aot_kernel_count = {len(variants)};\n")


def output_files(out_dir: Path, variants: Sequence[AotVariant]) -> List[Path]:
    """The C sources and header an AOT run writes (what CMake compiles)."""
    return ([out_dir / "include" / "loc3r_aot_kernels.h", out_dir / "src" / "loc3r_aot_table.c"]
            + [out_dir / "src" / f"{v.name}.c" for v in variants])


def write_if_changed(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    if path.exists():
        old = path.read_bytes() if mode == "wb" else path.read_text()
        if old == data:
            return
    with open(path, mode) as f:
        f.write(data)


def _compile_job(job: Tuple[AotVariant, int]) -> CompiledVariant:
    return compile_variant(*job)


def build(out_dir: Path, archs: Sequence[int], patterns: Sequence[str], jobs: int) -> dict:
    """Compile the selected variants for every arch and write all outputs; returns the manifest."""
    from tqdm import tqdm

    variants = select_variants(patterns)
    todo = [(v, a) for v in variants for a in archs]
    results: Dict[Tuple[str, int], CompiledVariant] = {}
    with tqdm(total=len(todo), desc="triton AOT", unit="kernel", file=sys.stderr) as bar:
        if jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for res in pool.map(_compile_job, todo):
                    results[(res.name, res.arch)] = res
                    bar.update()
        else:
            for job in todo:
                res = _compile_job(job)
                results[(res.name, res.arch)] = res
                bar.update()
    manifest = {"archs": list(archs), "variants": []}
    args_by_name = {}
    for v in variants:
        builds = [results[(v.name, a)] for a in archs]
        args_by_name[v.name] = builds[0].args
        for b in builds:
            write_if_changed(out_dir / "cubin" / f"{v.name}.sm{b.arch}.cubin", b.cubin)
            write_if_changed(out_dir / "ptx" / f"{v.name}.sm{b.arch}.ptx", b.ptx)
        write_if_changed(out_dir / "src" / f"{v.name}.c", c_source(v, builds))
        manifest["variants"].append({
            "name": v.name, "kernel": f"{v.module}.{v.kernel}", "function": builds[0].function_name,
            "args": [list(a) for a in builds[0].args], "constexprs": {k: val for k, val in v.constexprs},
            "num_warps": builds[0].num_warps, "num_stages": v.num_stages,
            "builds": [{"arch": b.arch, "shared": b.shared, "cubin_sha256": hashlib.sha256(b.cubin).hexdigest()}
                       for b in builds],
        })
    write_if_changed(out_dir / "include" / "loc3r_aot_kernels.h", c_header(variants, args_by_name))
    write_if_changed(out_dir / "src" / "loc3r_aot_table.c", c_table(variants))
    write_if_changed(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loc3r.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True, help="where to write cubins, C sources and the manifest")
    p.add_argument("--arch", type=int, action="append", help="compute capability as 87 or 90 (repeatable; "
                   "default: 87 and 90)")
    p.add_argument("--kernels", action="append", default=[], help="glob over variant names (repeatable; "
                   "default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    p.add_argument("--list-outputs", action="store_true", help="print the C files a build writes, one per line "
                   "(';'-separated with --cmake), and compile nothing")
    p.add_argument("--cmake", action="store_true", help="with --list-outputs: one ';'-separated line")
    return p.parse_args(argv)


def main(argv: Sequence[str] = None) -> int:
    from loc3r.errors import Loc3rError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        archs = args.arch or list(DEFAULT_ARCHS)
        bad = [a for a in archs if a < 80]
        if bad:
            raise Loc3rError(f"AOT targets need sm_80 or newer (the kernels use tl.dot on fp16), got {bad}")
        if args.list_outputs:
            files = [str(f) for f in output_files(args.out_dir, select_variants(args.kernels))]
            print(";".join(files) if args.cmake else "\n".join(files))
            return 0
        manifest = build(args.out_dir, archs, args.kernels, max(1, args.jobs))
    except Loc3rError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(manifest['variants'])} kernels x {len(archs)} archs to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
