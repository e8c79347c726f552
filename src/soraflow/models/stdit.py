"""STDiT: the Open-Sora 1.0 spatial-temporal diffusion transformer.

PixArt-alpha's DiT (adaLN-single timestep conditioning, cross-attention to T5 tokens)
with a temporal self-attention inserted after each spatial self-attention. Weights load
from a PixArt image checkpoint (soraflow.models.checkpoint): the temporal output projections
start at zero, so a fresh STDiT computes exactly the image model on every frame.

Module and state-dict key names follow Open-Sora/PixArt so their checkpoints load.
Shapes: B batch, C latent channels, T/H/W latent frames/height/width, t/s = T and H*W
after patching (tokens per frame S = s), N = T*S tokens, L text tokens, D hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd  # differentiable collectives
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# PRESETS and PRESET_DEFAULTS are read from here too; they live in torch-free stdit_config for planning
from soraflow.models.stdit_config import PRESET_DEFAULTS, PRESETS, patch_grid, stdit_kwargs  # noqa: F401

# --------------------------------------------------------------------------------------
# Sin-cos position embeddings (MAE/PixArt layout, so PixArt weights see what they expect)
# --------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[n] positions -> [n, dim]: sin of all frequencies, then cos."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # [n, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def spatial_sincos(dim: int, grid_h: int, grid_w: int, scale: float) -> torch.Tensor:
    """[grid_h*grid_w, dim], tokens row-major. Positions are divided by `scale` (Open-Sora's
    space_scale: 0.5 at 256px makes a 16x16 grid span PixArt-512's 32x32 range).
    As in MAE's code, the first half of the channels encodes the column, the second the row."""
    rows = torch.arange(grid_h, dtype=torch.float64) / scale
    cols = torch.arange(grid_w, dtype=torch.float64) / scale
    row, col = torch.meshgrid(rows, cols, indexing="ij")  # [grid_h, grid_w] each
    return torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1)


def temporal_sincos(dim: int, num_frames: int, scale: float) -> torch.Tensor:
    """[num_frames, dim]; Open-Sora's time_scale divides the frame index."""
    return sincos_1d(dim, torch.arange(num_frames, dtype=torch.float64) / scale)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's Mlp, whose key names PixArt checkpoints use)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def seq_all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Ulysses exchange: split `scatter_dim` into one chunk per rank, send chunk r to rank r,
    and concatenate what arrives along `gather_dim`. Differentiable (the backward is the
    inverse exchange). One all_to_all_single, which gloo implements too (torch's list
    all_to_all emulates it on gloo with scatters that fail in a group without rank 0)."""
    chunks = torch.stack(x.chunk(dist.get_world_size(group), dim=scatter_dim))  # [world, *chunk]: r-th to rank r
    received = dist_autograd.all_to_all_single(torch.empty_like(chunks), chunks, group=group)  # r-th from rank r
    return torch.cat(received.unbind(0), dim=gather_dim)


class GatherSequence(torch.autograd.Function):
    """All-gather along `dim` whose backward keeps only this rank's slice of the gradient:
    every rank computes the same loss on the gathered output, so the slices' gradients
    must not be summed over ranks (Open-Sora's gather_forward_split_backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)]
        return local.contiguous(), None, None


class Attention(nn.Module):
    """Multi-head self-attention over [B, N, D] (qkv with bias).

    With a sequence-parallel group, each rank holds N/world tokens: heads are exchanged
    for tokens before attention (each rank then sees all N tokens for H/world heads) and
    back after it, so the result equals single-process attention.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sequence_parallel_group=None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        if sequence_parallel_group is not None:  # [B, N/w, 3, H, Dh] -> [B, N, 3, H/w, Dh]
            qkv = seq_all_to_all(qkv, sequence_parallel_group, scatter_dim=3, gather_dim=1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, tokens, Dh]
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [B, tokens, heads, Dh]
        if sequence_parallel_group is not None:  # [B, N, H/w, Dh] -> [B, N/w, H, Dh]
            x = seq_all_to_all(x, sequence_parallel_group, scatter_dim=1, gather_dim=2)
        return self.proj(x.reshape(B, N, D))


class MultiHeadCrossAttention(nn.Module):
    """Video tokens [B, N, D] attend to text tokens [B, L, D]; padded text tokens
    (mask False) are excluded, as Open-Sora's packed xformers BlockDiagonalMask does."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        L, head_dim = y.shape[1], D // self.num_heads
        q = self.q_linear(x).reshape(B, N, self.num_heads, head_dim).transpose(1, 2)  # [B, H, N, Dh]
        k, v = self.kv_linear(y).reshape(B, L, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L] bool
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, Dh]
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class TimestepEmbedder(nn.Module):
    """Diffusion step [B] -> [B, D]: 256-d sinusoid (cos then sin) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # [B, 128]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [B, 256]
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Text-encoder tokens [B, L, Ccap] -> [B, L, D]. During training whole captions are
    replaced by the null caption `y_embedding` with probability `uncond_prob`, which is
    what classifier-free guidance samples against. `y_embedding` is a buffer: PixArt
    stores a fixed random caption there, never trained."""

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.uncond_prob = uncond_prob
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.to(caption.device) == 1
        elif self.training and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = None
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


# --------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------


class STDiTBlock(nn.Module):
    """One transformer block on B videos of T frames x S tokens, flattened to [B, T*S, D].

    spatial_temporal (Open-Sora):                     full (PixArt-alpha over all tokens):
      1. x += gate_msa * attn(modulate(norm1(x)))       1. the same attention, but over all
         within each frame: [(B T), S, D]                  T*S tokens: [B, T*S, D]
      2. x += gate_msa * attn_temp(x [+ temporal pos])  2. (none)
         across frames at each place: [(B S), T, D]
      3. x += cross_attn(x, text)                       3. same
      4. x += gate_mlp * mlp(modulate(norm2(x)))        4. same
    Step 2 reuses gate_msa and has no norm: Open-Sora's quirk, kept for its checkpoints.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if temporal:
            self.attn_temp = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,  # [B, T*S, D]
        y: torch.Tensor,  # [B, L, D] text tokens
        t0: torch.Tensor,  # [B, 6*D] shared adaLN-single timestep projection
        mask: torch.Tensor | None,  # [B, L] bool, True = real text token
        num_frames: int,
        temporal_pos: torch.Tensor | None = None,  # [1, T, D], first block only
        sequence_parallel_group=None,  # splits S across ranks (each holds S/world tokens per frame)
    ) -> torch.Tensor:
        B, N, D = x.shape
        T, S = num_frames, N // num_frames
        modulation = self.scale_shift_table[None] + t0.reshape(B, 6, D)  # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # [B, 1, D]

        # 1. self-attention: within each frame, or over the whole video for `full`
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            x_s = self.attn(x_m.reshape(B * T, S, D), sequence_parallel_group)  # [(B T), S, D]
            x = x + gate_msa * x_s.reshape(B, N, D)
        else:
            x = x + gate_msa * self.attn(x_m, sequence_parallel_group)  # [B, T*S, D]

        # 2. temporal self-attention: each spatial place attends over the T frames
        if self.temporal:
            x_t = x.reshape(B, T, S, D).transpose(1, 2).reshape(B * S, T, D)  # [(B S), T, D]
            if temporal_pos is not None:
                x_t = x_t + temporal_pos
            x_t = self.attn_temp(x_t).reshape(B, S, T, D).transpose(1, 2).reshape(B, N, D)
            x = x + gate_msa * x_t

        # 3. cross-attention to the caption (ungated)
        x = x + self.cross_attn(x, y, mask)

        # 4. feed-forward
        return x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class T2IFinalLayer(nn.Module):
    """[B, N, D] -> [B, N, prod(patch) * out_channels], modulated by the raw timestep embedding."""

    def __init__(self, hidden_size: int, num_patch_values: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch_values)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PatchEmbed3D(nn.Module):
    """[B, C, T, H, W] -> [B, t*h*w, D] by a Conv3d with kernel = stride = patch."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def caption_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """[n, L] or [n, 1, 1, L] bool/int (1 = real token) -> [batch, L] bool; one mask may
    serve a whole batch (n = 1) or n a divisor of it, as Open-Sora repeats it for CFG."""
    mask = mask.reshape(mask.shape[0], -1).bool()
    if batch % mask.shape[0]:
        raise ValueError(f"{mask.shape[0]} caption masks for a batch of {batch}")
    mask = mask.repeat(batch // mask.shape[0], 1)
    if not mask.any(dim=1).all():  # attention to nothing would give NaN
        raise ValueError("every caption needs at least one unmasked token")
    return mask


class STDiT(nn.Module):
    """x_embedder -> + pos-emb -> blocks (conditioned on t_block(t) and the caption) ->
    final_layer -> unpatchify. Predicts eps and the variance interpolation (learned sigma)."""

    def __init__(
        self,
        input_size: tuple[int, int, int],  # latent (T, H, W) the pos-emb buffers are built for
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        class_dropout_prob: float = 0.1,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        attention: str = "spatial_temporal",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if attention not in ("spatial_temporal", "full"):
            raise ValueError(f"attention must be 'spatial_temporal' or 'full', not {attention!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # eps and the learned-variance interpolation
        self.patch_size = tuple(patch_size)
        self.hidden_size = hidden_size
        self.model_max_length = model_max_length
        self.space_scale, self.time_scale = space_scale, time_scale
        self.attention = attention
        self.grad_checkpointing = grad_checkpointing
        self.sequence_parallel_group = None  # set by enable_sequence_parallel

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, mlp_ratio, temporal=attention == "spatial_temporal")
            for _ in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(self.patch_size) * self.out_channels)

        # Deterministic functions of the grid, so not saved: a checkpoint loads at any size.
        self.grid = self.patch_grid(input_size)
        spatial, temporal = self.make_pos_embeds(self.grid)
        self.register_buffer("pos_embed", spatial, persistent=False)
        self.register_buffer("pos_embed_temporal", temporal, persistent=False)
        self.initialize_weights()

    def patch_grid(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (T, H, W) -> token grid (t, h, w)."""
        return patch_grid(size, self.patch_size)

    def make_pos_embeds(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial [1, 1, h*w, D] and temporal [1, t, D] sin-cos embeddings for a token grid."""
        t, h, w = grid
        spatial = spatial_sincos(self.hidden_size, h, w, self.space_scale)[None, None]
        return spatial, temporal_sincos(self.hidden_size, t, self.time_scale)[None]

    def pos_embeds(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers for the built size; computed afresh for any other (e.g. 1-frame) input."""
        if grid == self.grid:
            return self.pos_embed, self.pos_embed_temporal
        spatial, temporal = self.make_pos_embeds(grid)
        return spatial.to(self.pos_embed.device), temporal.to(self.pos_embed.device)

    def initialize_weights(self):
        """Open-Sora's init: xavier Linear layers, N(0, 0.02) for the embedders, and zeros for
        the temporal and cross-attention output projections and the final linear."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        zero_init = [self.final_layer.linear] + [block.cross_attn.proj for block in self.blocks]
        zero_init += [block.attn_temp.proj for block in self.blocks if block.temporal]
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def enable_sequence_parallel(self, group) -> None:
        """Sequence parallelism over the ranks of `group` (Ulysses): each rank holds 1/size of
        every frame's S spatial tokens. The spatial attention exchanges heads for tokens
        (all-to-all) so each rank attends over all S tokens with 1/size of the heads, then
        exchanges back; the temporal attention (each place across the T frames), the
        cross-attention and the MLP work on the rank's own tokens and exchange nothing.

        Open-Sora 1.0's zero2-seq split the other way, along the frames
        (split_forward_gather_backward(x, dim=1) of the frame-major [B, T*S, D] tokens, needing
        T divisible by the size). soraflow splits S because stage 1 trains on single images
        (T = 1 does not split), and S is the long axis (256 tokens per frame at 256 px against
        16 frames) whose attention dominates the cost.

        All ranks pass the same full inputs and get the full output; each computes parameter
        gradients from its own tokens only, so they must be summed over the group (the trainer
        folds that into the engines' gradient averaging). Needs S and the head count divisible
        by the group's size."""
        self.sequence_parallel_group = group

    def forward(
        self,
        x: torch.Tensor,  # [B, C, T, H, W] noisy latents
        timestep: torch.Tensor,  # [B]
        y: torch.Tensor,  # [B, L, Ccap] or [B, 1, L, Ccap] text-encoder tokens, L = model_max_length
        mask: torch.Tensor | None = None,  # [B, L] bool/int, 1 = real token; None = all real
        force_drop_ids: torch.Tensor | None = None,  # [B], 1 = use the null caption
    ) -> torch.Tensor:  # [B, 2C, T, H, W]: eps, then the variance interpolation
        B, _, T, H, W = x.shape
        t, h, w = self.patch_grid((T, H, W))
        S = h * w

        spatial_pos, temporal_pos = self.pos_embeds((t, h, w))  # [1, 1, S, D], [1, t, D]
        spatial_pos, temporal_pos = spatial_pos.to(x.dtype), temporal_pos.to(x.dtype)
        x = self.x_embedder(x).reshape(B, t, S, self.hidden_size)  # [B, t, S, D]
        x = x + spatial_pos
        if self.attention == "full":  # PixArt-style baseline: every token gets its frame index
            x = x + temporal_pos[:, :, None]

        timestep_emb = self.t_embedder(timestep)  # [B, D]
        t0 = self.t_block(timestep_emb)  # [B, 6D]
        if y.dim() == 4:
            y = y.squeeze(1)
        if y.shape[1] != self.model_max_length:
            raise ValueError(f"captions have {y.shape[1]} tokens; the model takes {self.model_max_length}")
        y = self.y_embedder(y, force_drop_ids)  # [B, L, D]
        if mask is not None:
            mask = caption_mask(mask, B)

        group = self.sequence_parallel_group
        if group is not None:  # keep this rank's share of each frame's tokens
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if S % world or self.blocks[0].attn.num_heads % world:
                raise ValueError(f"sequence parallel over {world} ranks needs S={S} and the heads divisible by it")
            x = x.chunk(world, dim=2)[rank]
        x = x.reshape(B, -1, self.hidden_size)  # [B, t*S_local, D]

        for i, block in enumerate(self.blocks):
            args = (x, y, t0, mask, t, temporal_pos if (i == 0 and block.temporal) else None, group)
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)

        x = self.final_layer(x, timestep_emb)  # [B, t*S_local, pt*ph*pw*2C]
        if group is not None:  # reassemble the full frames on every rank
            x = x.reshape(B, t, -1, x.shape[-1])
            x = GatherSequence.apply(x, group, 2)  # [B, t, S, P]
        return self.unpatchify(x, (t, h, w))

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, t*h*w, pt*ph*pw*C] -> [B, C, t*pt, h*ph, w*pw]."""
        (t, h, w), (pt, ph, pw) = grid, self.patch_size
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, t, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], self.out_channels, t * pt, h * ph, w * pw)

    def forward_with_cfg(
        self,
        x: torch.Tensor,  # [B, C, T, H, W]
        timestep: torch.Tensor,  # [B]
        y: torch.Tensor,  # [B, L, Ccap] or [B, 1, L, Ccap]
        mask: torch.Tensor | None = None,  # [B, L]; None = all tokens real
        cfg_scale: float = 7.0,
        null_mask: torch.Tensor | None = None,  # mask for the null caption; default `mask`, as Open-Sora
    ) -> torch.Tensor:  # [B, 2C, T, H, W]
        """Classifier-free guidance: the caption and the null caption (`y_embedding`) run as one
        batch; eps = uncond + cfg_scale * (cond - uncond) on all C channels (Open-Sora 1.0
        guided only the first 3), and the variance half comes from the conditional branch."""
        B = x.shape[0]
        if y.dim() == 4:
            y = y.squeeze(1)
        null_y = self.y_embedder.y_embedding[None].expand(B, -1, -1).to(y.dtype)
        if mask is not None or null_mask is not None:
            all_real = torch.ones(B, y.shape[1], dtype=torch.bool, device=y.device)
            cond_mask = all_real if mask is None else caption_mask(mask, B)
            uncond_mask = cond_mask if null_mask is None else caption_mask(null_mask, B)
            mask = torch.cat([cond_mask, uncond_mask])
        out = self.forward(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([y, null_y]), mask)
        cond, uncond = out.chunk(2)  # [B, 2C, ...] each
        C = self.in_channels
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1)


# --------------------------------------------------------------------------------------
# Construction (checkpoints: soraflow.models.checkpoint)
# --------------------------------------------------------------------------------------


def build_model(cfg: dict, input_size: tuple[int, int, int], caption_channels: int | None = None) -> STDiT:
    """cfg = {preset, optional overrides (see stdit_config.CONFIG_KEYS)}; input_size is the latent
    (T, H, W). `caption_channels` is the text encoder's width; it overrides the preset's."""
    return STDiT(input_size=tuple(input_size), **stdit_kwargs(cfg, caption_channels))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (buffers such as the null caption are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
