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

The H200 estimates (`cost`, at N = 4,096, 16,384 and 65,536, bf16) cost every launch by its
SASS: per tile, tensor time plus issue time plus exp2 time (the sum the tutorials' kernels fit),
in waves of the programs an SM holds, with the pipeline fill each program pays, or its
compulsory HBM traffic where that is longer; cuBLAS products in their own waves; eager PyTorch
as its aten ops traced on meta tensors (products by cuBLAS, every other op through HBM once),
and a torch.compile-like fusion as those products plus one pass over the logits per direction.
The constants are fitted to published Hopper timings of kernels others wrote, re-implemented in
`references` and compiled and read like ours; each estimate is a band, the model's spread of
predicted / measured over those references. Estimates from counts, not measurements:
bench/gpu_check.sh measures the same cases where a GPU is lent.

Importing the package imports no triton (directclr works without it); what needs it imports it.
"""
