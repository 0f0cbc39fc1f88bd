"""Static GPU report: what the Triton kernels will cost on an H200, measured on any CPU machine.

    python -m directclr.gpu_report              # every case, table, rows -> bench/results/
    python -m directclr.gpu_report --out rows.jsonl --cases cross:360:bfloat16

For every case (variant x subvector width x dtype) it runs the real op, forward + backward, on
CPU tensors of N = 65,536 rows with Triton's driver replaced by one that compiles for sm_90a or
sm_80 and launches nothing (`capture`). So every kernel is the specialization the JIT builds for
those real arguments (dtypes, 16-byte alignment and divisibility of each pointer and integer,
constexprs), with the grid the host code computes. For each launch (`census`):

* ptxas -v on the PTX: registers, spill bytes, stack; shared memory from Triton's metadata;
* cuobjdump -sass, read as a census: the loops (backward branches), the tensor instructions
  (HGMMA/HMMA shapes) and how many of them wait for the previous one (serialized), the global
  loads by width (LDGSTS = cp.async, UTMALDG = TMA, LDG.E.128 = 16-byte vector), the issued
  instructions of the tile loop per logit (all warps, 4 schedulers per SM) beside the tensor
  clocks per logit (2048 bf16 / 1024 tf32 multiply-adds per clock per SM);
* the multiply-adds the hardware issues: HGMMA shapes x warpgroups x trips, per launch.

Then, in a subprocess under TRITON_INTERPRET=1 with the GPU tile configurations, it counts the
``tl.dot`` multiply-adds and ``exp2``s of one forward + backward at a small N (plus the cuBLAS
products of the wide-subvector path), in GEMM-equivalents (1 = 2 R C dim FLOPs, R x C logits).

The H200 time estimate (`cost`; ``--n``, default 65,536, bf16) sums, per launch, the largest of
its tensor time (SASS multiply-adds at TRITON_TENSOR_EFFICIENCY of the bf16 peak), its issue
time, its exp2 time and its compulsory HBM traffic; cuBLAS products and O(N dim) host-side
tensor ops add their own. The eager reference is the same model applied to its aten ops, traced
on meta tensors: matrix products at CUBLAS_EFFICIENCY of the peak, every other op reading its
inputs and writing its outputs once through HBM. Assumptions, not measurements:
bench/gpu_check.sh measures what a lent GPU can.

Importing the package imports no triton (directclr works without it); what needs it imports it.
"""
