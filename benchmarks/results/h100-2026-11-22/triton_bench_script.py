import sys, time, torch, torch.nn.functional as F, triton
from triton.testing import do_bench
sys.path.insert(0, ".")
from sparsegen_kernels import reference as R
from sparsegen_kernels.triton import PROVIDERS as P, sparse_conv as SC
dev = "cuda"
rows = []
def bench(name, fn, ref_ms=None, nbytes=None):
    try:
        fn(); torch.cuda.synchronize()
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:
        rows.append(f"{name:60s} FAILED {type(e).__name__}: {str(e)[:200]}"); print(rows[-1], flush=True); return None
    extra = f" {nbytes/ms/1e6:8.0f} GB/s" if nbytes else ""
    sp = f"  x{ref_ms/ms:6.2f} vs baseline" if ref_ms else ""
    rows.append(f"{name:60s} {ms*1000:9.1f} us{extra}{sp}"); print(rows[-1], flush=True); return ms
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
# ---- topk
for shape, k, mode in [((64, 3200, 4, 4), 8, "channel"), ((64, 256, 16, 16), 64, "spatial"),
                       ((64, 128, 32, 32), 256, "spatial"), ((64, 64, 64, 64), 1024, "spatial"),
                       ((16, 128, 32, 32), 6553, "global"), ((64, 512, 32, 32), 26214, "global")]:
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device=dev, dtype=dt); b = torch.randn(shape[1], device=dev, dtype=dt)
        base = bench(f"torch topk+scatter {mode} {shape} k={k} {dt}", lambda: R.topk_mask_torch_baseline(x, k, mode, b, True))
        nb = x.numel() * x.element_size() * 2
        bench(f"triton topk_mask {mode} {shape} k={k} {dt}", lambda: P["topk_mask"](x, k, mode, b, True), base, nb)
        bench(f"triton topk_compact {mode} {shape} k={k} {dt}", lambda: P["topk_compact"](x, k, mode, b, True), base, x.numel()*x.element_size())
# ---- conv
for (N, Cin, H, W), Cout, mode, k in [((64, 3200, 4, 4), 512, "channel", 8), ((64, 512, 8, 8), 256, "spatial", 16),
                                     ((64, 256, 16, 16), 128, "spatial", 64), ((64, 128, 32, 32), 64, "spatial", 256)]:
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(N, Cin, H, W, device=dev, dtype=dt)
        w3 = torch.randn(Cout, Cin, 3, 3, device=dev, dtype=dt) / (9 * Cin) ** 0.5
        w4 = R.fold_upsample_weight(w3); b = torch.randn(Cout, device=dev, dtype=dt)
        v, i = P["topk_compact"](x, k, mode, None, False)
        dense = P["compact_to_dense"](v, i, mode, [N, Cin, H, W])
        tag = f"{mode} {(N,Cin,H,W)}->{Cout} k={k} {dt}"
        base = bench(f"dense up+conv2d {tag}", lambda: R.sparse_upsample_conv2d_ref(dense, w3, b))
        bench(f"dense conv_t(w4) {tag}", lambda: F.conv_transpose2d(dense, w4, b, 2, 1), base)
        ref = F.conv_transpose2d(dense.double(), w4.double(), b.double(), 2, 1)
        for st in (["gather", "scatter"] if mode == "channel" else []) + ["gemm"]:
            out = SC.sparse_conv_transpose2d(v, i, mode, [N, Cin, H, W], w4, b, [2, 2], [1, 1], [0, 0], strategy=st)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            bench(f"fwd {st:8s} {tag} err={err:.1e}", lambda: SC.sparse_conv_transpose2d(v, i, mode, [N, Cin, H, W], w4, b, [2, 2], [1, 1], [0, 0], strategy=st), base)
        go = torch.randn(N, Cout, 2 * H, 2 * W, device=dev, dtype=dt)
        dd = dense.detach().clone().requires_grad_(); ww = w4.detach().clone().requires_grad_()
        def dense_bwd():
            out = F.conv_transpose2d(dd, ww, None, 2, 1); return torch.autograd.grad(out, (dd, ww), go)
        baseb = bench(f"dense conv_t bwd (both grads) {tag}", dense_bwd)
        for st in ("entries", "gemm"):
            bench(f"igrad {st:8s} {tag}", lambda: SC.sparse_conv_transpose2d_input_grad(go, i, mode, [N, Cin, H, W], w4, [2, 2], [1, 1], strategy=st))
        for st in (("segment", "gemm") if mode == "channel" else ("gemm",)):
            bench(f"wgrad {st:8s} {tag}", lambda: SC.sparse_conv_transpose2d_weight_grad(go, v, i, mode, [N, Cin, H, W], list(w4.shape), [2, 2], [1, 1], strategy=st))
print("\n".join(rows))
