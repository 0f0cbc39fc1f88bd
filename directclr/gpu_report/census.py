"""Reading what ptxas and cuobjdump say about one compiled kernel: registers, spills and stack
from ``ptxas -v``; from the SASS, its loops, tensor instructions, global loads by width and the
instructions one logits tile issues. Uses the ptxas and cuobjdump that ship with Triton."""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

TENSOR_CORE_OPS = ("HGMMA", "HMMA")


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack frame, as ptxas -v prints them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                               "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas -arch=sm_{arch} failed: {proc.stderr[-2000:]}")
    text = proc.stderr + proc.stdout
    number = lambda pattern: int(re.search(pattern, text).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "serialized_wgmma_note": "wgmma.mma_async instructions are serialized" in text}


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
TENSOR_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
HMMA_SHAPE = re.compile(r"HMMA\.(16816|1688|884)")
HMMA_MNK = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def sass(cubin: bytes) -> list[tuple[int, str, str, bool]]:
    """(address, opcode, operands, predicated) of every instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    return parse_sass(text)


def parse_sass(text: str) -> list[tuple[int, str, str, bool]]:
    return [(int(m.group(1), 16), m.group(3), m.group(4), bool(m.group(2)))
            for m in SASS_LINE.finditer(text)]


def loops(code):
    """(first, last) instruction indices of every loop: a branch back to an earlier address."""
    index = {address: i for i, (address, *_) in enumerate(code)}
    found = []
    for i, (address, opcode, operands, _) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            found.append((index[int(target.group(1), 16)], i))
    return found


def _tensor_work(opcode: str, operands: str, num_warps: int) -> tuple[int, int]:
    """Multiply-adds of one issued tensor instruction for the whole CTA, and the shared-memory
    bytes its operands read (wgmma: B always, A unless it comes from registers)."""
    shape = TENSOR_SHAPE.match(opcode)
    if shape:  # one wgmma per warpgroup: every warp of it issues the same instruction
        m, n, k = map(int, shape.groups())
        groups = num_warps // 4
        element = 4 if ".TF32" in opcode else 2
        a_from_smem = operands.split(",")[1].strip().startswith("gdesc")
        smem = (m * k * element if a_from_smem else 0) + k * n * element
        return m * n * k * groups, smem * groups
    shape = HMMA_SHAPE.match(opcode)
    if shape:  # mma.sync: per warp, operands already in registers
        m, n, k = HMMA_MNK[shape.group(1)]
        return m * n * k * num_warps, 0
    return 0, 0


def tile_census(code, num_warps: int, k_steps: int) -> dict:
    """What one tile costs: the tile scope is the innermost loop holding the exp2s (one trip
    per logits tile), or the whole program where a program is one tile. A K loop inside it runs
    k_steps trips less those the pipeliner peeled (their tensor instructions sit outside it)."""
    every_loop = loops(code)
    exps = [i for i, (_, op, *_) in enumerate(code) if op.startswith("MUFU.EX2")]
    holding = [(a, b) for a, b in every_loop if exps and all(a <= i <= b for i in exps)]
    scope = min(holding, key=lambda ab: ab[1] - ab[0]) if holding else (0, len(code) - 1)
    # The K loop holds the products: tensor instructions, or FFMAs where IEEE fp32 has none.
    products = TENSOR_CORE_OPS if any(op.startswith(TENSOR_CORE_OPS) for _, op, *_ in code) \
        else ("FFMA",)
    inner = [(a, b) for a, b in every_loop if scope[0] <= a and b <= scope[1] and (a, b) != scope
             and any(code[i][1].startswith(products) for i in range(a, b + 1))]
    k_loop = max(inner, key=lambda ab: ab[1] - ab[0]) if inner else None
    in_k = set(range(k_loop[0], k_loop[1] + 1)) if k_loop else set()

    def work(indices):
        macs = smem = 0
        for i in indices:
            m, b = _tensor_work(code[i][1], code[i][2], num_warps)
            macs, smem = macs + m, smem + b
        return macs, smem

    outside = [i for i in range(scope[0], scope[1] + 1) if i not in in_k]
    (out_macs, out_smem), (k_macs, k_smem) = work(outside), work(sorted(in_k))
    trips = (k_steps - out_macs // k_macs) if k_macs else (k_steps if k_loop else 0)
    weight = {i: (trips if i in in_k else 1) for i in range(scope[0], scope[1] + 1)}
    # Bodies of ifs inside the tile (a predicated branch over them, no tensor instructions):
    # edge tiles (padding, excluded or positive columns), a few per row block. Interior tiles,
    # the bulk at large N, skip them.
    index = {address: i for i, (address, *_) in enumerate(code)}
    edge_only = set()
    for i in weight:
        address, op, operands, predicated = code[i]
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and predicated and target and int(target.group(1), 16) > address:
            body = range(i + 1, index.get(int(target.group(1), 16), i + 1))
            if all(j in weight and not code[j][1].startswith(TENSOR_CORE_OPS) for j in body):
                edge_only.update(body)
    serialized = sum(1 for i in range(len(code) - 1) if code[i][1].startswith("HGMMA")
                     and code[i + 1][1].startswith("WARPGROUP.DEPBAR")
                     and code[i + 1][2].strip().endswith("0x0"))
    loads, wide_bytes, narrow_bytes = {}, 0, 0
    for i, w in weight.items():
        op = code[i][1]
        if op.startswith(("LDG", "UTMALDG")) and not op.startswith("LDGDEPBAR"):
            loads[op] = loads.get(op, 0) + 1
            width = LOAD_BYTES.get(op.rsplit(".", 1)[-1], 4)
            if width >= 16 or op.startswith("UTMALDG"):
                wide_bytes += w * width * 32 * num_warps
            else:
                narrow_bytes += w * width * 32 * num_warps
    return {
        "tile_instructions": sum(w for i, w in weight.items() if i not in edge_only),
        "tile_instructions_all_paths": sum(weight.values()),
        "tile_macs": out_macs + k_macs * trips,
        "tile_smem_bytes": out_smem + k_smem * trips,
        "k_loop_trips": trips if k_loop else None,
        "tensor_shapes": sorted({code[i][1] for i in weight
                                 if code[i][1].startswith(TENSOR_CORE_OPS)}),
        "serialized_tensor_instructions": serialized,
        "tile_loads": loads,
        "tile_wide_load_bytes": wide_bytes,
        "tile_narrow_load_bytes": narrow_bytes,
        "tile_exp2": sum(w for i, w in weight.items()
                         if code[i][1].startswith("MUFU.EX2") and i not in edge_only),
        "tile_scope_is_loop": bool(holding),
    }
