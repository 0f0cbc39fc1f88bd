"""Compiles every Triton kernel configuration that autotune can pick, for sm_90 and sm_80, on a
machine without a GPU; prints one JSON line per compile. Run by test_kernel_compile.py in a
process without TRITON_INTERPRET (interpreted functions cannot be compiled)."""
import json
import multiprocessing
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import covariance, infonce  # noqa: E402

ELEMENT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
INT64_POINTERS = {"pos_ptr", "excl_ptr"}
INPUT_POINTERS = {"rows_ptr", "cols_ptr", "x_ptr"}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INPUT_POINTERS:
            sig[name] = "*" + ELEMENT[dtype]
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        else:  # strides are int64 in PyTorch; sizes fit int32 (offsets are widened in-kernel)
            sig[name] = "i64" if "stride" in name else "i32"
    return sig


def cases():
    """Every config x input dtype x arch with the flags the launch uses most; the other flag
    specializations of the gradient kernel (ntxent, transposed pass) in bf16."""
    dtypes = (("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "tf32"), ("float32", "ieee"))
    for config in infonce._lse_configs(False):
        for dtype, precision in dtypes:
            for arch in (90, 80):
                yield "_lse_kernel", config, {}, dtype, precision, arch
    for config in infonce._grad_configs(False):
        for flags in ({"ROW_TERM": True, "COL_TERM": True}, {"ROW_TERM": True, "COL_TERM": False},
                      {"ROW_TERM": False, "COL_TERM": True}):
            for dtype, precision in dtypes if flags["COL_TERM"] and flags["ROW_TERM"] else \
                    dtypes[:1]:
                for arch in (90, 80):
                    yield "_grad_kernel", config, flags, dtype, precision, arch


    for config in covariance._configs(False):
        for dtype in ("bfloat16", "float32"):
            for arch in (90, 80):
                yield "_centered_gram_kernel", config, {}, dtype, None, arch


def compile_one(case):
    name, config, flags, dtype, precision, arch = case
    module = covariance if name == "_centered_gram_kernel" else infonce
    kernel = getattr(module, name)
    constexprs = dict(config.kwargs, **flags)
    if precision is not None:
        constexprs.update(PRECISION=precision, UPCAST=False)
    src = ASTSource(kernel.fn, signature(kernel.fn, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages})
    return json.dumps({"kernel": name, "config": config.kwargs, **flags,
                       "num_warps": config.num_warps, "num_stages": config.num_stages,
                       "dtype": dtype, "precision": precision, "arch": arch,
                       "shared_bytes": compiled.metadata.shared,
                       "wgmma": "wgmma" in compiled.asm["ptx"],
                       "cubin_bytes": len(compiled.asm["cubin"])})


def main():
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for line in pool.imap(compile_one, list(cases())):
            print(line, flush=True)


if __name__ == "__main__":
    main()
