"""Tokenizer throughput on this machine: images/s for encode and decode, as a table.

    .venv/bin/python benchmarks/encode.py [--device cuda] [--threads 2] [--images 4]

Rows: pixel on the digits images; a tiny random sd-vae (the test stand-in, loaded through
tokenizers.build); and, at 256 px with random weights, the full-size SD VAE architecture (the
baseline) and VA-VAE f16d32's real architecture (ch=128). The ratio column is encode speed
relative to the full-size SD VAE measured in the same run, so it compares like with like.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ddaepp import data, tokenizers, vavae  # noqa: E402
from standins import make_sd_vae  # noqa: E402

SD_VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def images_per_second(fn, x: torch.Tensor, min_seconds: float) -> float:
    fn(x)  # warm-up: allocator, kernels, lazy init
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < min_seconds:
        fn(x)
        runs += 1
    sync()
    return runs * len(x) / (time.perf_counter() - start)


def measure(name: str, tokenizer, x: torch.Tensor, min_seconds: float) -> dict:
    x = x.to(getattr(tokenizer, "device", "cpu"))
    z = tokenizer.encode(x)
    row = {"tokenizer": name, "input": "x".join(map(str, x.shape[1:])), "latent": "x".join(map(str, z.shape[1:])),
           "batch": len(x), "encode": images_per_second(tokenizer.encode, x, min_seconds),
           "decode": images_per_second(tokenizer.decode, z, min_seconds)}
    print(f"  measured {name}", file=sys.stderr)
    return row


def random_vae(name: str, vae, size: int, device: str):
    return tokenizers.VAETokenizer(name, vae, {"name": "imagefolder", "image_size": size}, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--images", type=int, default=4, help="batch of the 256 px VAEs")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    digits = {"name": "digits", "root": None, "image_size": 16, "val_fraction": 0.2, "split_seed": 0}
    images, _ = data.load_images(digits, data.build_index(digits, "train"))
    pixel_x = torch.from_numpy(images).float() / 127.5 - 1
    big_x = torch.rand(args.images, 3, 256, 256) * 2 - 1
    rows = []
    with torch.inference_mode():
        pixel = tokenizers.build({"name": "pixel", "factor": 2}, digits)
        rows.append(measure("pixel f2 (digits)", pixel, pixel_x, args.seconds))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {"name": "sd-vae", "path": str(make_sd_vae(Path(tmp) / "vae"))}
            tiny = tokenizers.build(cfg, {"name": "imagefolder", "image_size": 32}, args.device)
            rows.append(measure("sd-vae tiny random", tiny, torch.rand(64, 3, 32, 32) * 2 - 1, args.seconds))
        from diffusers import AutoencoderKL

        sd_full = random_vae("sd-vae full-size", AutoencoderKL(**SD_VAE_FULL), 256, args.device)
        rows.append(measure("sd-vae full-size (baseline)", sd_full, big_x, args.seconds))
        vavae_tokenizer = random_vae("va-vae", vavae.vavae_autoencoder(vavae.VAVAE_F16D32), 256, args.device)
        rows.append(measure("va-vae f16d32 (ch=128)", vavae_tokenizer, big_x, args.seconds))
    baseline = rows[2]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"\nTokenizer throughput on {device} (torch {torch.__version__}), fp32, images/s\n")
    print("| tokenizer | input | latent | batch | encode img/s | decode img/s | encode vs sd-vae full |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:  # a ratio only between the same inputs (256 px)
        ratio = f"{r['encode'] / baseline['encode']:.3g}x" if r["input"] == baseline["input"] else "-"
        print(f"| {r['tokenizer']} | {r['input']} | {r['latent']} | {r['batch']} | {r['encode']:.4g} | "
              f"{r['decode']:.4g} | {ratio} |")


if __name__ == "__main__":
    main()
