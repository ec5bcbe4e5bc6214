"""Models of the training-dynamics experiments (Hu et al., 2023): the one-layer modular-addition transformer and the
reference's single-output MLP with Xavier initialisation.

The transformer follows Nanda et al.'s grokking model as the reference builds it: learned token and position
embeddings, attention weights stored per head as ``(heads, d_head, d_model)`` parameters (so weight statistics can
split Q/K/V per head), a ReLU MLP, optional post-residual LayerNorm, causal attention, logits read at the last position.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from datamatters.errors import UserError


class Attention(nn.Module):
    """Causal multi-head attention with per-head ``W_Q/W_K/W_V`` of shape (heads, d_head, d_model), no biases."""

    def __init__(self, d_model: int, num_heads: int, d_head: int, n_ctx: int):
        super().__init__()
        scale = 1 / math.sqrt(d_model)
        self.W_K = nn.Parameter(torch.randn(num_heads, d_head, d_model) * scale)
        self.W_Q = nn.Parameter(torch.randn(num_heads, d_head, d_model) * scale)
        self.W_V = nn.Parameter(torch.randn(num_heads, d_head, d_model) * scale)
        self.W_O = nn.Parameter(torch.randn(d_model, d_head * num_heads) * scale)
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)), persistent=False)
        self.d_head = d_head

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``last_only``: queries of the last position only (all that a final layer's logits depend on)."""
        n = x.shape[-2]
        k = torch.einsum("ihd,bpd->biph", self.W_K, x)
        v = torch.einsum("ihd,bpd->biph", self.W_V, x)
        q = torch.einsum("ihd,bpd->biph", self.W_Q, x[:, -1:] if last_only else x)
        scores = torch.einsum("biph,biqh->biqp", k, q) / math.sqrt(self.d_head)
        mask = self.mask[n - 1:n, :n] if last_only else self.mask[:n, :n]
        z = torch.einsum("biph,biqp->bqih", v, scores.masked_fill(~mask, float("-inf")).softmax(-1))
        return z.flatten(-2) @ self.W_O.T


class MLPBlock(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(d_mlp, d_model) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_model, d_mlp) / math.sqrt(d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.W_in.T + self.b_in) @ self.W_out.T + self.b_out


class Block(nn.Module):
    """Residual attention then residual MLP; with ``layernorm`` a LayerNorm after each residual sum (the reference's
    placement, which is post-LN)."""

    def __init__(self, d_model, d_mlp, d_head, num_heads, n_ctx, layernorm: bool):
        super().__init__()
        self.attn = Attention(d_model, num_heads, d_head, n_ctx)
        self.mlp = MLPBlock(d_model, d_mlp)
        self.ln1 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.ln2 = nn.LayerNorm(d_model) if layernorm else nn.Identity()

    def forward(self, x, last_only: bool = False):
        x = self.ln1((x[:, -1:] if last_only else x) + self.attn(x, last_only))
        return self.ln2(x + self.mlp(x))


class Transformer(nn.Module):
    """Token ids (batch, n_ctx) -> logits (batch, num_classes) at the last position."""

    def __init__(self, n_ctx: int, num_classes: int, d_vocab: int, d_model: int = 128, num_heads: int = 4,
                 d_head: int = 32, d_mlp: int = 512, num_layers: int = 1, layernorm: bool = False,
                 init_scaling: float = 1.0):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(d_vocab, d_model) / math.sqrt(d_model))
        self.pos_embed = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList(
            [Block(d_model, d_mlp, d_head, num_heads, n_ctx, layernorm) for _ in range(num_layers)])
        self.unembed = nn.Parameter(torch.randn(d_model, num_classes) / math.sqrt(d_vocab))
        self.d_vocab = d_vocab
        if init_scaling != 1.0:
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(init_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed[x.long()] + self.pos_embed[: x.shape[-1]]
        for i, block in enumerate(self.blocks):
            # the last block only feeds the logits at the last position: skip the other positions' queries and MLP
            h = block(h, last_only=i == len(self.blocks) - 1)
        return h[:, -1] @ self.unembed


def transformer(input_shape: Sequence[int], num_classes: int, d_model: int = 128, num_heads: int = 4,
                d_head: int | None = None, d_mlp: int | None = None, num_layers: int = 1, layernorm: bool = False,
                d_vocab: int | None = None, init_scaling: float = 1.0) -> Transformer:
    """The reference's modular-addition transformer. ``d_vocab`` defaults to ``num_classes + 1`` (the numbers and the
    ``=`` token); ``d_head`` to ``d_model // num_heads``; ``d_mlp`` to ``4 * d_model``.

    One deliberate difference: the unembedding has ``num_classes`` outputs instead of ``d_vocab`` (the reference
    also scores the ``=`` token, which is never a target)."""
    if len(input_shape) != 1:
        raise UserError(f"transformer expects token sequences of shape (n_ctx,), got input_shape={tuple(input_shape)}")
    if d_model % num_heads and d_head is None:
        raise UserError(f"transformer: d_model={d_model} is not divisible by num_heads={num_heads}; set d_head")
    return Transformer(n_ctx=int(input_shape[0]), num_classes=num_classes, d_vocab=int(d_vocab or num_classes + 1),
                       d_model=d_model, num_heads=num_heads, d_head=int(d_head or d_model // num_heads),
                       d_mlp=int(d_mlp or 4 * d_model), num_layers=num_layers, layernorm=layernorm,
                       init_scaling=init_scaling)


class RefMLP(nn.Module):
    """The reference's MLP (``kaiming_uniform=False``): Xavier-uniform weights, zero biases, ReLU hidden layers."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.0):
        super().__init__()
        dims = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        layers.append(nn.Linear(dims[-1], out_features))
        self.layers = nn.Sequential(*layers)
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.layers(x)


def ref_mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (800,), dropout: float = 0.0,
            single_logit: bool = False) -> RefMLP:
    """``single_logit=True`` gives one output for the hinge loss (sparse parities, 40-1000-1); it needs 2 classes."""
    if single_logit and num_classes != 2:
        raise UserError(f"ref_mlp: single_logit needs a binary task, this dataset has {num_classes} classes")
    return RefMLP(math.prod(input_shape), list(hidden), 1 if single_logit else num_classes, dropout)
