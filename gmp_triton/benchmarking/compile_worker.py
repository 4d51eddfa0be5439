"""Worker process of the GPU-code gate (``gpu_code``): compile kernel variants ahead of time and
read the result with the tools that ship in Triton's wheel.

Registers, stack and local memory come from ``cuobjdump --dump-resource-usage`` on the cubin;
spill bytes from ``ptxas -v`` (Triton's own ptxas step, run again with its log kept) when there
is any stack or local memory, and where there are spills, whether they lie in a loop (from the
SASS); access widths from the PTX, where each vector access is one instruction of known width
(on request also from the SASS, to check that the two agree).

Reads a JSON list of variants on stdin and prints one JSON line per variant as it finishes, so
the parent can show progress. It must run without ``TRITON_INTERPRET``: under the interpreter
the kernels are not compilable objects. Needs no GPU.
"""

import contextlib
import importlib
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESOURCE_PATTERN = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
SPILL_PATTERN = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# A global access in PTX: "ld.global.v4.b32", "st.global.b16", "ld.global.L1::evict_last.v2.b64",
# with its guard predicate if it has one ("@%p1 ld.global...").
ACCESS_PATTERN = re.compile(r"(@!?%p\w+\s+)?\b(ld|st)\.global((?:\.[\w:]+)*)")
VECTOR_PATTERN = re.compile(r"^v(\d+)$")
ELEMENT_PATTERN = re.compile(r"^[bsuf](\d+)$")
OPCODES = {"ld": "LDG", "st": "STG"}
# A SASS instruction, "/*0090*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;": its address (0x90),
# opcode ("LDG"), modifiers (".E.128") and operands, its guard predicate left out.
SASS_PATTERN = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.\w+)*)\s*([^;]*)"
)
# Width modifiers of LDG/STG; without one (".E" and cache hints only) an access is 32 bits.
SASS_WIDTHS = {"256": 256, "128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
BRANCH_TARGET_PATTERN = re.compile(r"\b0x([0-9a-f]+)\b")


def read_resource_usage(text: str) -> dict:
    """Registers, stack and local memory of the (single) function in ``cuobjdump`` output."""
    match = RESOURCE_PATTERN.search(text)
    if match is None:
        raise ValueError(f"no resource usage in cuobjdump output: {text[:200]!r}")
    registers, stack, _static_shared, local = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack, "local_bytes": local}


def read_spill_bytes(ptxas_log: str) -> int:
    """Bytes of register spill stores plus loads in a ``ptxas -v`` log."""
    match = SPILL_PATTERN.search(ptxas_log)
    if match is None:
        raise ValueError(f"no spill line in the ptxas log: {ptxas_log[:300]!r}")
    return int(match.group(1)) + int(match.group(2))


def read_access_widths(ptx: str) -> dict[str, list[int]]:
    """Width in bits of every global load ("LDG") and store ("STG") in PTX: vector length times
    element width, so ``ld.global.v4.b32`` is 128 and ``ld.global.b16`` is 16. The accesses
    guarded by a predicate are also listed under "LDG masked" and "STG masked": the kernels'
    tile accesses are all masked, while a per-program scalar (GeM's exponent, say) is not."""
    widths: dict[str, list[int]] = {}
    for predicate, kind, modifiers in ACCESS_PATTERN.findall(ptx):
        lanes, bits = 1, None
        for modifier in modifiers.split(".")[1:]:
            if vector := VECTOR_PATTERN.match(modifier):
                lanes = int(vector.group(1))
            elif element := ELEMENT_PATTERN.match(modifier):
                bits = int(element.group(1))
        if bits is not None:
            widths.setdefault(OPCODES[kind], []).append(lanes * bits)
            if predicate:
                widths.setdefault(OPCODES[kind] + " masked", []).append(lanes * bits)
    return widths


def sass_instructions(sass: str) -> list[tuple[int, str, list[str], str]]:
    """``(address, opcode, modifiers, operands)`` of each instruction in ``cuobjdump
    --dump-sass`` output."""
    instructions = []
    for line in sass.splitlines():
        match = SASS_PATTERN.match(line)
        if match:
            address, opcode, modifiers, operands = match.groups()
            instructions.append((int(address, 16), opcode, modifiers.split(".")[1:], operands))
    return instructions


def read_sass_widths(sass: str) -> dict[str, list[int]]:
    """Width in bits of every LDG and STG instruction in ``cuobjdump --dump-sass`` output."""
    widths: dict[str, list[int]] = {}
    for _, opcode, modifiers, _ in sass_instructions(sass):
        if opcode in ("LDG", "STG"):
            width = next((SASS_WIDTHS[m] for m in modifiers if m in SASS_WIDTHS), 32)
            widths.setdefault(opcode, []).append(width)
    return widths


def count_spill_accesses(sass: str) -> dict[str, int]:
    """Local-memory accesses (``LDL``/``STL``, where spilled registers go) inside and outside
    the loops of ``cuobjdump --dump-sass`` output. A loop is the address range from a backward
    branch's target to the branch. A spill inside a loop costs on every iteration; one outside
    every loop (a value stored before the main loop and loaded after it) costs once per
    program."""
    instructions = sass_instructions(sass)
    loops = []
    for address, opcode, _, operands in instructions:
        target = BRANCH_TARGET_PATTERN.search(operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    counts = {"in_loops": 0, "outside_loops": 0}
    for address, opcode, _, _ in instructions:
        if opcode in ("LDL", "STL"):
            inside = any(start <= address <= end for start, end in loops)
            counts["in_loops" if inside else "outside_loops"] += 1
    return counts


def _cuobjdump(flag: str, cubin: bytes, workdir: Path) -> str:
    from triton import knobs

    path = workdir / "variant.cubin"
    path.write_bytes(cubin)
    return subprocess.run(
        [knobs.nvidia.cuobjdump.path, flag, str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _ptxas_log(backend, ptx: str, options, arch: int) -> str:
    """Run Triton's own ptxas step again with its log printed, to read the spill counts."""
    from triton import knobs

    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:
            backend.make_cubin(ptx, {}, options, arch)
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    return log.getvalue()


def decode_constexpr(value):
    """A constexpr value as ``gpu_code.specialise`` encodes it: Triton dtypes by name, values
    the launcher wrapped in ``tl.constexpr`` as ``["constexpr", value]``."""
    import triton.language as tl

    if isinstance(value, str):
        return tl.dtype(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "constexpr":
        return tl.constexpr(value[1])
    return value


def build_source(spec: dict):
    """``(source, target, options)`` for ``triton.compile``: the same source, constants, hints and
    options as the JIT builds for the launch, so that the cache key is the JIT's too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    target = GPUTarget("cuda", spec["arch"], 32)
    backend = make_backend(target)
    options = {"num_warps": spec["num_warps"]}
    signature = spec["signature"]
    constexprs = {name: decode_constexpr(value) for name, value in spec["constexprs"].items()}
    names = list(signature)
    if hasattr(kernel, "_pack_args"):
        # The JIT's own packing of a specialisation; Triton versions differ in which arguments
        # it lists hints for, and the cache key sees the difference.
        specialization = [
            ("constexpr", constexprs[name])
            if kind == "constexpr"
            else (kind, spec["hints"].get(name))
            for name, kind in signature.items()
        ]
        bound = {name: constexprs.get(name) for name in names}
        _, signature, constants, attrs = kernel._pack_args(
            backend, dict(options), bound, specialization, None
        )
    else:
        constants = constexprs
        attrs = {
            (names.index(name),): backend.parse_attr(hint) for name, hint in spec["hints"].items()
        }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return source, target, options


def compile_and_inspect(spec: dict, workdir: Path) -> dict:
    import triton
    from triton.compiler import make_backend

    source, target, options = build_source(spec)
    backend = make_backend(target)
    compiled = triton.compile(source, target=target, options=options)

    cubin = compiled.asm["cubin"]
    usage = read_resource_usage(_cuobjdump("--dump-resource-usage", cubin, workdir))
    spill_bytes = 0
    # Spilled registers live in local memory, so a kernel with no stack and no local memory has
    # none; otherwise only ptxas can tell spills from a call frame (fp64 division calls a
    # subroutine, for instance).
    if usage["stack_bytes"] or usage["local_bytes"]:
        log = _ptxas_log(backend, compiled.asm["ptx"], backend.parse_options(options), spec["arch"])
        spill_bytes = read_spill_bytes(log)
    spill_accesses = {"in_loops": None, "outside_loops": None}
    if spill_bytes:
        spill_accesses = count_spill_accesses(_cuobjdump("--dump-sass", cubin, workdir))
    result = {
        **usage,
        "spill_bytes": spill_bytes,
        "spill_accesses_in_loops": spill_accesses["in_loops"],
        "spill_accesses_outside_loops": spill_accesses["outside_loops"],
        # Triton's kernels take their shared memory dynamically; the launch asks for this much.
        "shared_bytes": compiled.metadata.shared,
        "access_widths": read_access_widths(compiled.asm["ptx"]),
    }
    # Disassembling is slower than compiling, so the SASS is read only on request, to check
    # that the widths read from the PTX are those of the machine code.
    if spec.get("sass"):
        result["sass_widths"] = read_sass_widths(_cuobjdump("--dump-sass", cubin, workdir))
    return result


def main() -> int:
    specs = json.load(sys.stdin)
    with tempfile.TemporaryDirectory(prefix="gmp-gpu-code-") as workdir:
        for spec in specs:
            try:
                result = compile_and_inspect(spec, Path(workdir))
            except Exception as error:  # one broken variant must not hide the others' results
                result = {"error": f"{type(error).__name__}: {error}"}
            print(json.dumps(dict(result, index=spec["index"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
