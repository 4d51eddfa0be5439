"""The GPU-code gate: kernel variants the launchers choose, compiled for sm_80 and sm_90 without a
GPU, must not spill registers and must read (forward) and write (backward) aligned feature maps
with the widest accesses their tile allows.

Which variants exist is checked on the full default set of ``gpu_code`` (cheap: no compiling).
The compiled gate runs on a subset chosen to reach every kind of code at a fraction of the
compile time (a few hundred variants: a minute or two on two cores the first time, seconds once
Triton's cache holds them): every kernel, both architectures, both layouts and token maps, one
split and several, int32 and int64 offsets, all positions, sizes and masks; with fp32, bf16
(16-bit elements and the integer conversions) and fp64 (most registers), on one map per regime:
a ResNet-50 head (one split), an early layer (several splits), a ViT map (unaligned), ViT tokens
and a map past 2**31 elements. ``gmp-triton gpu-code`` compiles the full default set, ``--all``
every tile shape.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from gmp_triton.benchmarking import compile_worker, gpu_code  # noqa: E402
from gmp_triton.benchmarking.cases import Shape  # noqa: E402
from gmp_triton.cli import main  # noqa: E402


def _describe(result: gpu_code.VariantResult) -> str:
    variant = result.variant
    return (
        f"{variant.kernel} sm_{variant.arch} {result.info.dtype} {result.info.layout} "
        f"warps={variant.num_warps} {dict(variant.constexprs)} (e.g. {result.info.examples[0]})"
    )


@pytest.fixture(scope="module")
def variants():
    return gpu_code.discover_variants()


GATE_SHAPES = [
    next(s for s in gpu_code.CUDA_SHAPES if s.size == (32, 2048, 7, 7)),
    next(s for s in gpu_code.CUDA_SHAPES if s.size == (1, 256, 56, 56)),
    next(s for s in gpu_code.CUDA_SHAPES if s.size == (64, 768, 14, 14)),
    next(s for s in gpu_code.COVERAGE_SHAPES if s.size == (64, 768, 197)),
    next(s for s in gpu_code.COVERAGE_SHAPES if math.prod(s.size) > 2**31 and s.n < 8),
]
GATE_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


# The other poolings add statistics to the same loop (more registers) and their own backward: they
# are compiled on the maps and dtypes where that matters most (fp32 and fp64, one and several
# splits, an unaligned map).
FAMILY_SHAPES = GATE_SHAPES[:3]
FAMILY_DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def gate_variants():
    variants = gpu_code.discover_variants(GATE_SHAPES, GATE_DTYPES, pools=["max"])
    family = gpu_code.discover_variants(FAMILY_SHAPES, FAMILY_DTYPES, pools=gpu_code.POOLS[1:])
    for variant, info in family.items():
        variants.setdefault(variant, info)
    return variants


@pytest.fixture(scope="module")
def gate_results(gate_variants):
    return gpu_code.compile_variants(gate_variants)


# --- reading the tools' output ------------------------------------------------------------------


def test_ptx_access_widths_are_vector_length_times_element_width():
    ptx = "\n".join(
        [
            "@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
            "ld.global.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];",
            "ld.global.b16 { %rs1 }, [ %rd3 + 0 ];",
            "@%p2 st.global.v2.b32 [ %rd4 + 0 ], { %r5, %r6 };",
            "ld.shared.v4.b32 { %r7, %r8, %r9, %r10 }, [ %r11 + 0 ];",
        ]
    )
    widths = compile_worker.read_access_widths(ptx)
    assert widths == {
        "LDG": [4 * 32, 2 * 64, 16],
        "LDG masked": [4 * 32],
        "STG": [2 * 32],
        "STG masked": [2 * 32],
    }


def test_sass_access_widths():
    sass = "\n".join(
        [
            "        /*0090*/              @P0 LDG.E.128 R4, desc[UR4][R2.64] ;",
            "        /*00a0*/                  LDG.E.LTC128B.U16 R6, desc[UR4][R8.64] ;",
            "        /*00b0*/             @!P1 STG.E.64 desc[UR4][R2.64], R4 ;",
            "        /*00c0*/                  STG.E desc[UR4][R2.64], R9 ;",
            "        /*00d0*/                  LDL R10, [R1] ;",
        ]
    )
    assert compile_worker.read_sass_widths(sass) == {"LDG": [128, 16], "STG": [64, 32]}


def test_resource_usage_and_spills_are_read():
    usage = compile_worker.read_resource_usage(
        " Function gmp_forward_kernel:\n  REG:96 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:592"
    )
    assert usage == {"registers": 96, "stack_bytes": 8, "local_bytes": 0}
    log = "ptxas info : Function properties\n    8 bytes stack frame, 4 bytes spill stores, 12 "
    log += "bytes spill loads\nptxas info    : Used 96 registers"
    assert compile_worker.read_spill_bytes(log) == 4 + 12


SASS_WITH_A_LOOP = "\n".join(
    [
        "        /*0240*/                   STL [R1], R10 ;",
        "        /*0290*/               @P0 BRA 0x0c90 ;",
        "        /*0480*/                   LDG.E.128 R4, desc[UR4][R2.64] ;",
        "        /*0500*/                   LDL R12, [R1+0x4] ;",
        "        /*0bc0*/              @!P0 BRA 0x480 ;",
        "        /*0c90*/                   LDL.LU.64 R20, [R1] ;",
        "        /*11f0*/                   EXIT ;",
        "        /*1200*/                   BRA 0x1200;",
    ]
)


def test_spill_accesses_are_placed_inside_or_outside_loops():
    # The loop is 0x480..0xbc0 (a backward branch); the forward branch and the final
    # branch-to-itself are not loops.
    counts = compile_worker.count_spill_accesses(SASS_WITH_A_LOOP)
    assert counts == {"in_loops": 1, "outside_loops": 2}
    without_loop_spill = SASS_WITH_A_LOOP.replace("LDL R12, [R1+0x4]", "IADD3 R12, R1, R2, RZ")
    assert compile_worker.count_spill_accesses(without_loop_spill) == {
        "in_loops": 0,
        "outside_loops": 2,
    }


def _result_with_spills(spill_bytes, in_loops, outside_loops) -> gpu_code.VariantResult:
    variant = gpu_code.Variant("pool_stats_kernel", "m", 90, 4, (), (), ())
    info = gpu_code.VariantInfo("float32", "NCHW", "all", ["example"], None)
    return gpu_code.VariantResult(
        variant,
        info,
        registers=40,
        stack_bytes=8,
        spill_bytes=spill_bytes,
        spill_accesses_in_loops=in_loops,
        spill_accesses_outside_loops=outside_loops,
    )


def test_only_spills_outside_every_loop_pass_the_gate():
    assert not _result_with_spills(0, None, None).spills
    outside = _result_with_spills(20, 0, 3)
    assert outside.spills_outside_loops_only and not outside.spills and not outside.problems
    inside = _result_with_spills(20, 1, 2)
    assert inside.spills and "1 spill accesses in loops" in inside.problems[0]
    # Spill bytes without a place found for them count as failing.
    assert _result_with_spills(20, None, None).spills
    assert _result_with_spills(20, 0, 0).spills


# --- which variants exist ---------------------------------------------------------------------


def test_variants_cover_every_kernel_dtype_layout_split_and_offset_width(variants):
    # Every kernel the launchers call, found in the launch module itself.
    assert {v.kernel for v in variants} == set(gpu_code.kernels())
    assert {v.arch for v in variants} == set(gpu_code.ARCHS)
    assert {info.dtype for info in variants.values()} == {
        str(dtype).removeprefix("torch.") for dtype in gpu_code.GATE_DTYPES
    }
    map_variants = [(v, i) for v, i in variants.items() if v.kernel in gpu_code.MAIN_PATH_ACCESS]
    assert {"NCHW", "channels_last"} <= {info.layout for _, info in map_variants}
    assert {dict(v.constexprs)["INDEX_64"] for v, _ in map_variants} == {False, True}
    # One split compiles the split count as the constant 1; several pass it at run time.
    split_counts = {dict(v.constexprs).get("num_splits") for v, _ in map_variants}
    assert 1 in split_counts and None in split_counts
    assert any(info.expected_bits for _, info in map_variants)


def _forward_variant(shape: Shape, layout: str, dtype=torch.float32, arch: int = 90):
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape.size, dtype=dtype, device="meta", memory_format=memory_format)
    launches = gpu_code.record_launches(x, gpu_code.REFERENCE_NUM_SMS[arch])
    forward = [launch for launch in launches if launch.kernel_name == gpu_code.FORWARD_KERNEL]
    assert len(forward) == 1
    return gpu_code.specialise(forward[0], arch)


@pytest.mark.parametrize("shape", gpu_code.CUDA_SHAPES, ids=Shape.label)
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_variants_carry_the_jit_specialisation_of_the_real_launch(shape, layout):
    variant = _forward_variant(shape, layout)
    signature, constexprs = dict(variant.signature), dict(variant.constexprs)
    contiguous, other = (
        ("stride_xs", "stride_xc") if layout == "NCHW" else ("stride_xc", "stride_xs")
    )
    # The stride of the contiguous axis is 1, which the JIT turns into a constant.
    assert signature[contiguous] == "constexpr" and constexprs[contiguous] == 1
    # Integers get the divisibility hint exactly when they are multiples of 16.
    assert ("S" in variant.aligned) == (shape.positions % 16 == 0)
    assert ("C" in variant.aligned) == (shape.c % 16 == 0)
    other_stride = shape.c if layout == "channels_last" else shape.positions
    assert (other in variant.aligned) == (other_stride % 16 == 0)
    assert "x_ptr" in variant.aligned
    assert constexprs["INDEX_64"] is False and constexprs["ACC_DTYPE"] == "fp32"


@pytest.mark.parametrize(
    "shape", [Shape("many maps", 65536, 2048, (7, 7)), Shape("few maps", 8, 2048, (7, 7))]
)
def test_int64_offsets_exactly_past_two_to_the_31_elements(shape):
    for layout in ("NCHW", "channels_last"):
        variant = _forward_variant(shape, layout)
        past_int32 = math.prod(shape.size) > 2**31 - 1
        assert dict(variant.constexprs)["INDEX_64"] is past_int32


# The JIT's own specialisation and cache key, computed in a process without TRITON_INTERPRET
# (where kernels are JIT functions), with its binder and argument packing as a real launch runs
# them; next to the cache key of the source the gate compiles for the same launch.
JIT_SPECIALISATION = """
import importlib, json, sys, torch
import triton
import triton.language as tl
from triton import knobs
from triton._C.libtriton import get_cache_invalidating_env_vars
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import jit
from triton.runtime.cache import get_cache_key
from gmp_triton.benchmarking.compile_worker import build_source

if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
    print("MISSING")
    sys.exit(0)

def value(item):
    if isinstance(item, dict) and "tensor" in item:
        dtype = getattr(torch, item["tensor"])
        return torch.empty_strided(item["size"], item["stride"], dtype=dtype, device="meta")
    if isinstance(item, dict) and "tl" in item:
        return tl.dtype(item["tl"])
    if isinstance(item, dict) and "constexpr" in item:
        return tl.constexpr(item["constexpr"])
    return item

def encode(v):
    if isinstance(v, tl.dtype):
        return v.name
    if isinstance(v, tl.constexpr):
        return ["constexpr", v.value]
    return v

env = get_cache_invalidating_env_vars()
found = []
for call in json.load(sys.stdin):
    backend = make_backend(GPUTarget("cuda", call["arch"], 32))
    module = importlib.import_module(call["variant"]["module"])
    kernel = getattr(module, call["kernel"])
    args = [value(a) for a in call["args"]]
    kwargs = {k: value(v) for k, v in call["kwargs"].items()}
    # What JITFunction.run adds to the launch's keywords before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    jit_key = get_cache_key(source, backend, backend.parse_options(options.__dict__), env)
    gate_source, _, gate_options = build_source(call["variant"])
    gate_key = get_cache_key(gate_source, backend, backend.parse_options(gate_options), env)
    names = list(signature)
    found.append({
        "signature": signature,
        "constexprs": {names[k[0]]: encode(v) for k, v in constexprs.items()},
        "attrs": {names[k[0]]: v for k, v in attrs.items()},
        "same_cache_key": jit_key == gate_key,
    })
print(json.dumps(found))
"""


def _as_json(value):
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return {"tensor": dtype, "size": list(value.shape), "stride": list(value.stride())}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if isinstance(value, tl.constexpr):
        return {"constexpr": value.value}
    return value


def test_gate_compiles_what_the_jit_compiles():
    launches = []
    for arch in gpu_code.ARCHS:
        for shape in GATE_SHAPES[:2] + GATE_SHAPES[3:4]:
            for dtype in (torch.float32, torch.bfloat16):
                for memory_format in (torch.contiguous_format, torch.channels_last):
                    if len(shape.size) != 4 and memory_format == torch.channels_last:
                        continue
                    x = torch.empty(
                        shape.size, dtype=dtype, device="meta", memory_format=memory_format
                    )
                    for kwargs in gpu_code.forward_options(x).values():
                        recorded = gpu_code.record_launches(
                            x, gpu_code.REFERENCE_NUM_SMS[arch], **kwargs
                        )
                        launches += [(arch, launch) for launch in recorded]
    variants = [gpu_code.specialise(launch, arch) for arch, launch in launches]
    calls = [
        {
            "arch": arch,
            "kernel": launch.kernel_name,
            "args": [_as_json(a) for a in launch.args],
            "kwargs": {k: _as_json(v) for k, v in launch.kwargs.items()},
            "variant": variant.to_json(),
        }
        for (arch, launch), variant in zip(launches, variants, strict=True)
    ]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-c", JIT_SPECIALISATION],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    if completed.stdout.strip() == "MISSING":
        pytest.skip("this Triton's JIT has no create_function_from_signature/_pack_args")
    jit_found = json.loads(completed.stdout.strip().splitlines()[-1])

    assert len(jit_found) == len(launches)
    for variant, call, expected in zip(variants, calls, jit_found, strict=True):
        where = f"sm_{call['arch']} {call['kernel']} {call['kwargs']}"
        assert dict(variant.signature) == expected["signature"], where
        constexprs = json.loads(json.dumps(dict(variant.constexprs)))
        assert constexprs == expected["constexprs"], where
        hinted = [name for name in expected["attrs"] if expected["signature"][name] != "constexpr"]
        assert list(dict(variant.hints)) == hinted, where
        aligned = [name for name, attr in expected["attrs"].items() if attr]
        assert list(variant.aligned) == aligned, where
        # Same source, hints and options: the gate's compile is the launch's compile.
        assert expected["same_cache_key"], where


# --- the gate ---------------------------------------------------------------------------------


def test_every_variant_compiles(gate_results):
    failed = [f"{_describe(r)}: {r.error}" for r in gate_results if r.error]
    assert not failed, "\n".join(failed)


def test_no_variant_spills_registers_in_a_loop(gate_results):
    spilling = [
        f"{_describe(r)}: {r.spill_bytes} B spilled, {r.registers} registers"
        for r in gate_results
        if r.error is None and r.spills
    ]
    assert not spilling, f"{len(spilling)} variants spill:\n" + "\n".join(spilling)
    for result in gate_results:
        if result.spills_outside_loops_only:
            assert result.spill_accesses_outside_loops > 0 and result.spill_accesses_in_loops == 0


def test_a_spill_ptxas_places_outside_the_loop_is_found_there():
    # With Triton 3.9 / ptxas 13, this sm_90 variant (int64 offsets, channels_last, a mask) keeps
    # two values live across its loop in local memory, stored before it and loaded after it.
    huge = next(s for s in gpu_code.COVERAGE_SHAPES if s.size == (2, 64, 16384, 16384))
    found = gpu_code.discover_variants([huge], [torch.float32], [90], pools=["avg"])
    chosen = {
        v: i
        for v, i in found.items()
        if v.kernel == "pool_stats_kernel" and i.layout == "channels_last" and i.positions == "mask"
    }
    assert chosen
    for result in gpu_code.compile_variants(chosen):
        assert result.error is None, result.error
        if result.spill_bytes:
            assert result.spill_accesses_in_loops == 0, _describe(result)
            assert result.spill_accesses_outside_loops > 0, _describe(result)
            assert not result.problems


def test_aligned_maps_are_accessed_at_full_width(gate_results):
    checked = [r for r in gate_results if r.error is None and r.info.expected_bits]
    assert checked
    narrow = [
        f"{_describe(r)}: widths {sorted(set(r.main_path_widths))}, {r.info.expected_bits} expected"
        for r in checked
        if not r.main_path_widths or min(r.main_path_widths) < r.info.expected_bits
    ]
    assert not narrow, f"{len(narrow)} variants are not vectorised:\n" + "\n".join(narrow)


def test_ptx_widths_are_the_machine_code_widths(gate_variants):
    # One aligned and one unaligned variant of each feature-map kernel and layout on sm_90.
    picked = {}
    for variant, info in gate_variants.items():
        if variant.kernel in gpu_code.MAIN_PATH_ACCESS and variant.arch == 90:
            key = (variant.kernel, info.layout, bool(info.expected_bits))
            picked.setdefault(key, (variant, info))
    assert len(picked) >= 6
    results = gpu_code.compile_variants(dict(picked.values()), with_sass=True)
    for result in results:
        assert result.error is None, result.error
        for opcode in ("LDG", "STG"):
            ptx = sorted(result.access_widths.get(opcode, []))
            sass = sorted(result.sass_widths.get(opcode, []))
            assert ptx == sass, f"{_describe(result)} {opcode}: PTX {ptx}, SASS {sass}"


def test_gpu_code_command_reports_the_same_verdicts(tmp_path, gate_results):
    shapes = [GATE_SHAPES[0].label(), GATE_SHAPES[1].label()]
    output = tmp_path / "gate.json"
    status = main(
        ["gpu-code", "--arch", "90", "--dtypes", "fp32", "--shapes", *shapes, "--json", str(output)]
    )
    rows = json.loads(output.read_text())
    assert status == (1 if any(row["problems"] for row in rows) else 0)

    def key(variant_json: dict) -> str:
        return json.dumps(variant_json, sort_keys=True)

    # The command compiles exactly the variants of those maps, with the test's verdicts.
    expected_variants = gpu_code.discover_variants(GATE_SHAPES[:2], [torch.float32], [90])
    assert {key(row["variant"]) for row in rows} == {key(v.to_json()) for v in expected_variants}
    verdicts = {key(r.variant.to_json()): r.problems for r in gate_results}
    for row in rows:
        assert row["problems"] == verdicts[key(row["variant"])]
