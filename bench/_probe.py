import sys, torch
from vllm_glowq.kernels import w4a16
k, n, t, bn, split, warps, stages = map(int, sys.argv[1:8])
qw = torch.randint(-2**31, 2**31-1, (k//8, n), dtype=torch.int32, device="cuda")
s = (torch.rand(k//128, n, device="cuda")*0.004).to(torch.bfloat16)
x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
w4a16.workspace(x.device).reserve(n, k, 64, torch.bfloat16)
bm = 1 if t == 1 else 16 if t <= 16 else 64
cfg = w4a16.GemmConfig(bm, bn, 128, split, warps, stages)
for _ in range(2):
    w4a16.gemm(x, qw, s, None, None, None, None, 128, cfg)
torch.cuda.synchronize()
