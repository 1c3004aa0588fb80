"""Peer benchmark: one training step of the seed models in PyTorch (CPU).

Usage: python peer_torch.py --model {cnn,dcgan,vae} --batch 128 --steps 30 --warmup 3 [--compile]
Prints one JSON line. The layers are those of shapes.py (genimg-jax's nets);
layouts are NCHW, paddings chosen so every tensor has the Flax/Keras
'same'/'valid' shape (see README.md).
"""
import argparse, json
import torch
import torch.nn as nn
import torch.nn.functional as F
import harness
import shapes

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["cnn", "dcgan", "vae"], required=True)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--compile", action="store_true", help="torch.compile the models and the optimizer steps")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
B = a.batch


def n_params(*ms):
    return sum(q.numel() for m in ms for q in m.parameters() if q.requires_grad)


class Crop(nn.Module):  # ConvTranspose k4 s1 'same' == torch padding=1 then drop last row/col (exactly TF's padding)
    def forward(self, x):
        return x[:, :, :-1, :-1]


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 3 * 128, 512), nn.ReLU(), nn.Linear(512, 10))


def generator():
    lrelu = lambda: nn.LeakyReLU(0.3)  # genimg-jax's generator
    return nn.Sequential(
        nn.Linear(100, 7 * 7 * 256, bias=False), nn.BatchNorm1d(7 * 7 * 256), lrelu(),
        nn.Unflatten(1, (256, 7, 7)),
        nn.ConvTranspose2d(256, 128, 4, 1, padding=1, bias=False), Crop(), nn.BatchNorm2d(128), lrelu(),
        nn.ConvTranspose2d(128, 64, 4, 2, padding=1, bias=False), nn.BatchNorm2d(64), lrelu(),
        nn.ConvTranspose2d(64, 1, 4, 2, padding=1, bias=False), nn.Tanh())


def discriminator():
    return nn.Sequential(
        nn.Conv2d(1, 64, 4, 2, padding=1), nn.LeakyReLU(0.2), nn.Dropout(0.3),
        nn.Conv2d(64, 128, 4, 2, padding=1), nn.LeakyReLU(0.2), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(7 * 7 * 128, 1))


class VAE(nn.Module):
    def __init__(self, latent=32):
        super().__init__()
        self.latent = latent
        self.enc = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 256), nn.ReLU(), nn.Linear(256, 2 * latent))
        self.dec = nn.Sequential(
            nn.Linear(latent, 7 * 7 * 64), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 64, 3, 2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, 2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 3, 1, padding=1))

    def forward(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.dec(z), mean, logvar


maybe_compile = torch.compile if a.compile else (lambda f: f)

if a.model == "cnn":
    net = cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    params, detail = n_params(net), None
    x, y = torch.randn(B, 1, 28, 28), torch.randint(0, 10, (B,))
    fwd, opt_step = maybe_compile(net), maybe_compile(opt.step)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt_step()
        return loss.item()

elif a.model == "dcgan":
    G, D = generator(), discriminator()
    optG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optD = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    params, detail = n_params(G, D), {"G": n_params(G), "D": n_params(D)}
    real = torch.rand(B, 1, 28, 28) * 2 - 1
    ones, zeros = torch.ones(B, 1), torch.zeros(B, 1)
    g, d = maybe_compile(G), maybe_compile(D)
    optG_step, optD_step = maybe_compile(optG.step), maybe_compile(optD.step)
    bce = F.binary_cross_entropy_with_logits

    def step():
        # discriminator update: real batch + fake batch (generator not updated)
        optD.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = g(torch.randn(B, 100))
        d_loss = bce(d(real), ones) + bce(d(fake), zeros)
        d_loss.backward()
        optD_step()
        # generator update with fresh noise, non-saturating loss
        optG.zero_grad(set_to_none=True)
        g_loss = bce(d(g(torch.randn(B, 100))), ones)
        g_loss.backward()
        optG_step()
        return d_loss.item() + g_loss.item()

else:
    net = VAE()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    params, detail = n_params(net), {"encoder": n_params(net.enc), "decoder": n_params(net.dec)}
    x = torch.rand(B, 1, 28, 28)
    fwd, opt_step = maybe_compile(net), maybe_compile(opt.step)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, mean, logvar = fwd(x)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3))
        kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)
        loss = (rec + kl).mean()
        loss.backward()
        opt_step()
        return loss.item()

res = harness.time_steps(step, B, a.steps, a.warmup)
out = {"framework": "torch-compile" if a.compile else "torch-eager", "model": a.model, "batch": B, "params": params,
       "params_match": params == shapes.param_count(a.model), **res,
       "threads": {"intra": torch.get_num_threads(), "interop": torch.get_num_interop_threads()},
       "version": torch.__version__}
if detail:
    out["params_detail"] = detail
print(json.dumps(out), flush=True)
