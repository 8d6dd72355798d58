"""Compare MAE reconstruction targets on real ssTEM (VNC stack 2), tiny ViT, 2x8x8 patches at 9.2 nm."""
import argparse, json, math, time
import numpy as np, torch, torch.nn.functional as F
import ssl_em.models
from ssl_em.pretrain.mae import MaskedAutoencoder3D

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--depth", type=int, default=4)
p.add_argument("--patch-size", "--patch", dest="patch", default="2,8,8", help="the ViT's token patch z,y,x")
p.add_argument("--targets", default="raw,normalized,lowpass")
p.add_argument("--embed", type=int, default=96)
p.add_argument("--crop", default="8,64,64")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--lr", type=float, default=1e-3)
args = p.parse_args()
torch.set_num_threads(args.threads)
patch = tuple(int(v) for v in args.patch.split(","))
D = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data") + "/"

def prep(raw):  # (Z, Y, X) uint8 -> float32 z-scored, 2x in-plane mean-pooled (4.6 -> 9.2 nm)
    x = torch.from_numpy(raw).float()
    x = F.avg_pool2d(x[:, None], 2)[:, 0]
    return (x - x.mean()) / x.std()

with np.load(D + "vnc_gerhard2013_stack2.npz") as d:
    pre = prep(d["raw"])                      # (20, 512, 512)
with np.load(D + "vnc_gerhard2013.npz") as d:
    ev_raw = prep(d["raw"])
    ev_lab = {k: F.avg_pool2d(torch.from_numpy(d[k]).float()[:, None], 2)[:, 0] for k in ("mito", "membrane")}

CROP = tuple(int(v) for v in args.crop.split(','))
def crop(vol, g, n):
    Z, Y, X = vol.shape
    out = []
    for _ in range(n):
        z, y, x = (int(torch.randint(0, s - c + 1, (1,), generator=g)) for s, c in zip((Z, Y, X), CROP))
        out.append((z, y, x))
    return out

def batch_from(vol, corners):
    return torch.stack([vol[z:z + CROP[0], y:y + CROP[1], x:x + CROP[2]] for z, y, x in corners])[:, None]

# probe data: train on left half (x < 256), test on right half of stack 1
g = torch.Generator().manual_seed(1)
def probe_set(xlo, xhi, n):
    out = []
    for _ in range(n):
        z = int(torch.randint(0, 20 - CROP[0] + 1, (1,), generator=g)); y = int(torch.randint(0, 512 - 64 + 1, (1,), generator=g))
        x = int(torch.randint(xlo, xhi - 64 + 1, (1,), generator=g)); out.append((z, y, x))
    return out
tr_c, te_c = probe_set(0, 256, 24), probe_set(256, 512, 12)

def patch_frac(lab, corners):
    v = batch_from(lab, corners)  # (B,1,16,64,64)
    return F.avg_pool3d(v, patch).flatten(1)  # (B, N)

@torch.no_grad()
def feats(enc, corners):
    return torch.cat([enc.forward_features(batch_from(ev_raw, corners[i:i + 4])).flatten(0, 1) for i in range(0, len(corners), 4)])

def ridge_r2(ftr, ytr, fte, yte, lam=1e-1):
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    A = torch.cat([(ftr - mu) / sd, torch.ones(len(ftr), 1)], 1).double()
    B = torch.cat([(fte - mu) / sd, torch.ones(len(fte), 1)], 1).double()
    w = torch.linalg.solve(A.T @ A + lam * len(A) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ ytr.double())
    res = ((B @ w - yte.double()) ** 2).sum(); tot = ((yte - yte.mean()) ** 2).sum()
    return float(1 - res / tot)

def probe(enc):
    enc.eval()
    ftr, fte = feats(enc, tr_c), feats(enc, te_c)
    enc.train()
    return {k: round(ridge_r2(ftr, patch_frac(ev_lab[k], tr_c).flatten(), fte, patch_frac(ev_lab[k], te_c).flatten()), 3)
            for k in ("mito", "membrane")}

# baseline probe features: per-patch intensity mean + std (what any model gets for free)
def stats_feats(corners):
    v = batch_from(ev_raw, corners)
    m = F.avg_pool3d(v, patch).flatten(1); s = (F.avg_pool3d(v * v, patch).flatten(1) - m * m).clamp_min(0).sqrt()
    return torch.stack([m.flatten(), s.flatten()], 1)
res = {"patch_stats_probe": {k: round(ridge_r2(stats_feats(tr_c), patch_frac(ev_lab[k], tr_c).flatten(), stats_feats(te_c),
                                               patch_frac(ev_lab[k], te_c).flatten()), 3) for k in ("mito", "membrane")}}
print(json.dumps(res), flush=True)

for target in args.targets.split(","):
    torch.manual_seed(0)
    enc = ssl_em.models.create_encoder("vit3d_tiny_patch2x8", patch_size=patch, depth=args.depth, embed_dim=args.embed, num_heads=3)
    if target == args.targets.split(",")[0]:
        res["random_init_probe"] = probe(enc); print("random init probe", res["random_init_probe"], flush=True)
    mae = MaskedAutoencoder3D(enc, decoder_dim=64, decoder_depth=1, decoder_heads=4, target=target)
    opt = torch.optim.AdamW(mae.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    gd = torch.Generator().manual_seed(0)
    rel, t0 = [], time.time()
    for step in range(args.steps):
        lr = args.lr * min(1, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for gr in opt.param_groups: gr["lr"] = lr
        x = batch_from(pre, crop(pre, gd, args.batch))
        loss, pred, mask = mae(x)
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            t = mae.target_patches(x)
            m = mask[..., None]
            c = (t * m).sum() / (m.sum() * t.shape[-1])
            base = (((t - c) ** 2) * m).sum() / (m.sum() * t.shape[-1])
        rel.append(float(loss.detach() / base))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"{target} step {step} loss {loss.item():.4f} baseline {base.item():.4f} rel {rel[-1]:.3f} {time.time()-t0:.0f}s", flush=True)
    res[target] = {"final_rel_loss": round(float(np.mean(rel[-20:])), 3), "probe": probe(enc), "s": round(time.time() - t0)}
    print(target, res[target], flush=True)
print(json.dumps(res))
