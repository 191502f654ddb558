import sys, torch, triton
from triton.testing import do_bench
sys.path.insert(0, ".")
from sparsegen_kernels import reference as R
from sparsegen_kernels.triton import PROVIDERS as P, sparse_conv as SC, topk as T
dev = "cuda"; torch.manual_seed(0)
def t(fn):
    try:
        fn(); torch.cuda.synchronize(); return f"{do_bench(fn, warmup=20, rep=60, return_mode='median')*1000:8.1f}"
    except Exception as e: return f"ERR {type(e).__name__} {str(e)[:80]}"
print("== topk tile sweep (us): TILE_ELEMS, warps")
cases = [((64, 3200, 4, 4), 8, "channel"), ((64, 256, 16, 16), 64, "spatial"), ((64, 64, 64, 64), 1024, "spatial")]
xs = [(torch.randn(s, device=dev), k, m) for s, k, m in cases]
for tile in (1024, 2048, 4096, 8192):
    for w in (2, 4, 8, 16):
        T.TILE_ELEMS, T.TILE_WARPS = tile, w
        print(tile, w, [t(lambda: P["topk_compact"](x, k, m, None, True)) for x, k, m in xs], flush=True)
T.TILE_ELEMS, T.TILE_WARPS = 4096, None
print("== fwd gemm sweep (us) bf16 / fp32")
convs = []
for (N, Cin, H, W), Cout, k in [((64, 512, 8, 8), 256, 16), ((64, 256, 16, 16), 128, 64), ((64, 128, 32, 32), 64, 256)]:
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(N, Cin, H, W, device=dev, dtype=dt)
        w4 = R.fold_upsample_weight(torch.randn(Cout, Cin, 3, 3, device=dev, dtype=dt) / (9 * Cin) ** 0.5)
        v, i = P["topk_compact"](x, k, "spatial", None, False)
        dense = P["compact_to_dense"](v, i, "spatial", [N, Cin, H, W])
        convs.append((v, i, [N, Cin, H, W], w4, dense))
print("decompress only", [t(lambda: SC._dense_channels_last(v, i, "spatial", *s)) for v, i, s, w4, d in convs])
print("dense input    ", [t(lambda: SC.sparse_conv_transpose2d(d, None, "spatial", s, w4, None, [2,2],[1,1],[0,0])) for v, i, s, w4, d in convs])
for bp, bco, bci in ((64, 64, 32), (128, 64, 32), (64, 128, 32), (128, 128, 32), (64, 64, 64), (128, 64, 64)):
    for w, st in ((4, 3), (8, 3), (4, 4), (8, 2)):
        SC.FWD_GEMM_CONFIG = dict(BLOCK_P=bp, BLOCK_CO=bco, BLOCK_CI=bci, num_warps=w, num_stages=st)
        print(bp, bco, bci, w, st, [t(lambda: SC.sparse_conv_transpose2d(v, i, "spatial", s, w4, None, [2,2],[1,1],[0,0], strategy="gemm")) for v, i, s, w4, d in convs], flush=True)
