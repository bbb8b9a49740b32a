"""LightningDiT (hustvl/LightningDiT) in plain PyTorch, plus the DDAE++ self-conditioning switch.

The state-dict keys and shapes equal upstream's, so its checkpoints load with strict=True.
Conventions follow upstream: t = 1 is data, t = 0 is noise, the model predicts velocity.

Self-conditioning (off by default; when off the model *is* LightningDiT, same keys): the
token-mean of block `self_cond_layer`'s output is RMS-normalised, sent through a small MLP,
scaled by a gate computed from the timestep embedding, and added to the conditioning vector
c of every later block and of the final layer. The gate starts at zero, so a fresh
self-conditioned model computes exactly what the baseline computes, and gradients flow
through the pooled feature into the earlier blocks (no stop-grad).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed

from ddaepp.config import MODEL_SIZES


class RMSNorm(nn.Module):
    """RMSNorm as upstream (LLaMA's): normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)  # both input projections in one matmul
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Rope2D(nn.Module):
    """2D rotary embedding (EVA-02's VisionRotaryEmbeddingFast): the first half of each head
    rotates with the token's row, the second half with its column; pairs are interleaved."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        dim = head_dim // 2  # channels per axis
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        pos = torch.arange(grid) / grid * grid  # upstream's float positions, bit for bit
        angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, dim)
        rows = angles[:, None, :].expand(grid, grid, dim)
        cols = angles[None, :, :].expand(grid, grid, dim)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())
        # one angle per interleaved pair (upstream's buffers repeat each angle twice); not saved
        self.register_buffer("pair_cos", angles.cos()[:, ::2].contiguous(), persistent=False)
        self.register_buffer("pair_sin", angles.sin()[:, ::2].contiguous(), persistent=False)
        self.register_load_state_dict_post_hook(Rope2D._pairs_from_loaded_tables)

    @staticmethod
    def _pairs_from_loaded_tables(module: Rope2D, incompatible_keys) -> None:
        """Rotate with the tables a checkpoint holds, as upstream does once it loads them (a file
        saved in bf16 holds rounded ones); refuse tables that do not repeat each angle twice."""
        with torch.no_grad():
            for table, pairs in ((module.freqs_cos, module.pair_cos), (module.freqs_sin, module.pair_sin)):
                if not torch.equal(table[:, ::2], table[:, 1::2]):
                    raise ValueError("the checkpoint's RoPE tables (feat_rope.freqs_cos/_sin) do not repeat each "
                                     "angle for the two channels of a pair, as EVA-02's interleaved layout does")
                pairs.copy_(table[:, ::2])

    def forward(self, x):  # x: (..., tokens, head_dim)
        # Rotating each interleaved pair (a, b) by its angle is multiplying a + ib by cos + i sin.
        # Eager: one complex multiply, one kernel (measured on the CPU 2-10x faster forward+backward
        # than real arithmetic, whose unbind/stack launch several strided kernels). Compiled: the
        # same products in real arithmetic, which TorchInductor fuses (it cannot generate code for
        # complex operators and would fall back to eager inside the graph).
        if torch.compiler.is_compiling():
            a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
            cos, sin = self.pair_cos, self.pair_sin
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * torch.complex(self.pair_cos, self.pair_sin)).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda: RMSNorm(self.head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def modulate(x, shift, scale):
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cos half first, as DiT) followed by an MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        # a buffer on the model's device (not saved: the keys stay upstream's), so a forward on the GPU
        # copies nothing from the host; the same float32 values upstream computes per call
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)

    def forward(self, t):
        args = t[:, None].float() * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout_prob > 0 there is one extra row, the null class
    (index num_classes), that training labels are dropped to so CFG has an unconditional model."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y, drop=None):
        """drop: an optional (N,) bool mask of the labels to drop while training, in place of a draw
        from the global RNG (training passes one per sample, the same whatever the process count)."""
        if self.training and self.dropout_prob > 0:
            if drop is None:
                drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift):
        super().__init__()
        norm = (lambda: RMSNorm(dim)) if use_rmsnorm else (lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(dim, num_heads, use_qknorm, use_rmsnorm)
        mlp_hidden = int(dim * mlp_ratio)
        if use_swiglu:  # 2/3 width keeps the parameter count of the GELU MLP
            self.mlp = SwiGLU(dim, int(2 / 3 * mlp_hidden))
        else:
            self.mlp = Mlp(dim, mlp_hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim))

    def forward(self, x, c, rope=None):
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            (scale_msa, gate_msa, scale_mlp, gate_mlp), shift_msa, shift_mlp = mod.chunk(4, dim=1), None, None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, use_rmsnorm):
        super().__init__()
        self.norm_final = RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SelfCondition(nn.Module):
    """DDAE++ self-conditioning: pooled block feature -> RMS norm -> MLP, times a gate of the
    timestep embedding. The gate is zero-initialised, so the addition to c starts at zero."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, pooled, t_emb):
        normed = F.rms_norm(pooled.float(), (pooled.shape[-1],), eps=1e-6).type_as(pooled)
        return self.gate(t_emb) * self.mlp(normed)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos table (grid*grid, dim): first half encodes the column, second the row
    (upstream's meshgrid puts w first); each half is [sin, cos]. Computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class LightningDiT(nn.Module):
    """LightningDiT velocity model. num_classes=0 makes it unconditional (no label embedder)."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 class_dropout_prob=0.1, num_classes=1000, use_qknorm=False, use_swiglu=False, use_rope=False,
                 use_rmsnorm=False, wo_shift=False, self_cond=False, self_cond_layer=1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        head_dim = hidden_size // num_heads
        if use_rope and head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}; change hidden_size/num_heads")
        if self_cond and not 0 <= self_cond_layer < depth - 1:
            raise ValueError(f"self_cond_layer {self_cond_layer} leaves no later block to condition in a model of "
                             f"depth {depth}; use 0..{depth - 2}")
        self.in_channels, self.patch_size, self.hidden_size, self.depth = in_channels, patch_size, hidden_size, depth
        self.num_classes = num_classes
        self.self_cond_layer = self_cond_layer if self_cond else None
        # upstream's use_checkpoint: recompute each block's activations in the backward instead of
        # keeping them (memory for compute; the same numbers). Set by train.activation_checkpointing.
        self.activation_checkpointing = False
        grid = input_size // patch_size
        self.num_patches = grid * grid

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = Rope2D(head_dim, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels, use_rmsnorm)
        if self_cond:
            self.self_cond = SelfCondition(hidden_size)
        # sample.precision bf16 runs the final layer in float32 (the velocity's last rounding); training
        # leaves it to autocast, as upstream
        self.fp32_final_layer = False
        self.initialize_weights()

    def initialize_weights(self):
        """Upstream's init: xavier Linears, frozen sin-cos pos_embed, adaLN-zero, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed(self.hidden_size, int(self.num_patches ** 0.5))[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                self.final_layer.linear]
        if self.self_cond_layer is not None:
            zero.append(self.self_cond.gate[-1])  # training starts exactly at the baseline
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):  # (N, T, p*p*C) -> (N, C, H, W)
        p, c, h = self.patch_size, self.in_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y=None, return_features=False, stop_after=None, label_drop=None):
        """x: (N, C, H, W) noisy latents, t: (N,) in [0, 1] (1 = data), y: (N,) labels (the null
        class is num_classes; ignored when unconditional). Returns the velocity (N, C, H, W), and
        with return_features=True also feats (N, depth, hidden): the token-mean of every block's
        output. feats[:, self_cond_layer] is the pooled self-conditioning feature (before its MLP).
        With stop_after=k only blocks 0..k run and only their feats (N, k + 1, hidden) return:
        what an objective on block k's feature needs, at a fraction of the cost. label_drop: the
        training-time label dropout mask (see LabelEmbedder.forward)."""
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y (num_classes means null)")
            c = c + self.y_embedder(y, label_drop)
        feats = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
            if return_features or i == self.self_cond_layer or stop_after is not None:
                feats.append(x.mean(dim=1))
            if i == stop_after:
                return torch.stack(feats, dim=1)
            if i == self.self_cond_layer:
                c = c + self.self_cond(feats[-1], t_emb)
        if self.fp32_final_layer:
            with torch.autocast(x.device.type, enabled=False):
                v = self.unpatchify(self.final_layer(x.float(), c.float()))
        else:
            v = self.unpatchify(self.final_layer(x, c))
        return (v, torch.stack(feats, dim=1)) if return_features else v

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None, *,
                         guided_channels=3):
        """Classifier-free guidance with upstream's signature and semantics. The batch is [cond; null]
        halves; only the first half of x is read (duplicated), so the second half's state never
        matters. The first `guided_channels` output channels (upstream's 3; None guides all) become
        uncond + cfg_scale * (cond - uncond) in both halves; the other channels stay as the model
        gives them (cond in the first half, uncond in the second). With cfg_interval True, no channel
        is guided where t[0] < cfg_interval_start (upstream decides by the batch's first t; our
        sampler gives every row the same t). Like upstream, both halves always run here, outside the
        interval too; ddaepp.transport.euler_sample calls this only inside the interval and the
        conditional batch alone before it (the same maths, equal to within float32 rounding)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y).float()  # mix in fp32 under autocast too
        n = out.shape[1] if guided_channels is None else guided_channels
        guided, rest = out[:, :n], out[:, n:]
        cond, uncond = guided.chunk(2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        if cfg_interval is True:
            # torch.where rather than `if`: no GPU->CPU sync, no graph break under torch.compile
            mixed = torch.where(t[0] < cfg_interval_start, cond, mixed)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=1)


def build_model(size: str, latent_shape: tuple[int, int, int], num_classes: int, **model_kwargs) -> LightningDiT:
    """A named LightningDiT size ('T/1' .. 'XL/2') on latents of shape (C, H, W)."""
    name, _, patch = size.partition("/")
    if name not in MODEL_SIZES or patch not in ("1", "2"):
        raise ValueError(f"unknown model size {size!r}: use one of {', '.join(MODEL_SIZES)} then /1 or /2, e.g. 'B/1'")
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"LightningDiT needs square latents, got {height}x{width}")
    hidden, depth, heads = MODEL_SIZES[name]
    return LightningDiT(input_size=height, patch_size=int(patch), in_channels=channels, hidden_size=hidden,
                        depth=depth, num_heads=heads, num_classes=num_classes, **model_kwargs)


def model_from_run_config(run_cfg: dict, latent_shape: tuple[int, int, int], num_classes: int) -> LightningDiT:
    """The model of one run (config.run_config output); unconditional settings get no label embedder."""
    kwargs = dict(run_cfg["model"])
    if kwargs["self_cond"] and kwargs["self_cond_layer"] == "auto":
        raise ValueError("model.self_cond_layer is still 'auto': resolve it first (ddaepp.layer_search.resolve; "
                         "ddaepp.states.load_ema does it for a state)")
    size = kwargs.pop("size")
    return build_model(size, latent_shape, num_classes if run_cfg["conditional"] else 0, **kwargs)


def count_flops(model: LightningDiT, batch: int = 1) -> int:
    """Forward matmul FLOPs (2 per multiply-add): per-token Linears/patch conv, attention's two
    token-by-token products, and the per-sample conditioning Linears (t-MLP, adaLN, self-cond)."""
    per_token = per_sample = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if name.startswith(("t_embedder", "self_cond")) or "adaLN_modulation" in name:
                per_sample += m.weight.numel()
            else:
                per_token += m.weight.numel()
    n, d = model.num_patches, model.hidden_size
    attention = model.depth * 2 * n * n * d
    return 2 * batch * (n * per_token + attention + per_sample)
