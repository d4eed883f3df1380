"""BERT-style teacher and student, and the one forward pass every strategy reads.

Models are plain `transformers.BertForMaskedLM` instances (built from a
`BertConfig`, never from the hub), so a student round-trips through
`save_pretrained` / `AutoModelForMaskedLM.from_pretrained`. `encode` runs the
same computation as the model's own forward, but it can stop at a layer,
keep what a strategy needs (hidden states, pre-softmax attention scores,
Q/K/V), and runs the LM head only at masked positions. Attention is fused
(`scaled_dot_product_attention`) in every layer whose scores are not kept;
only those layers materialise the (B, heads, L, L) score tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from raykd.config import ModelShape  # noqa: F401  (the one shape type; the config's, re-exported for the models)


def bert_config(shape: ModelShape, vocab_size: int, max_positions: int, dropout: float = 0.1) -> BertConfig:
    """A post-LN BERT config; scratch and KD students share it exactly."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
        type_vocab_size=2,
        # Our forward (`encode`) computes attention itself; "eager" keeps HF's own
        # forward returning attentions if a user asks (sdpa silently returns none).
        # Fine-tuning switches to sdpa when it loads a student.
        attn_implementation="eager",
    )


def build_masked_lm(shape: ModelShape, vocab_size: int, max_positions: int, seed: int, dropout: float = 0.1) -> BertForMaskedLM:
    """A freshly initialised masked LM; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(bert_config(shape, vocab_size, max_positions, dropout))
    return model


@dataclass(frozen=True)
class ForwardNeeds:
    """What a forward pass must produce for a strategy; nothing else is computed.

    Layer 0 is the embedding output; layers 1..n are encoder layers.
    """

    hidden_layers: tuple[int, ...] = ()
    score_layers: tuple[int, ...] = ()
    qkv_layers: tuple[int, ...] = ()
    masked_logits: bool = False

    def upto_layer(self, layers: int) -> int:
        """Highest layer the forward must reach (the LM head needs all of them)."""
        if self.masked_logits:
            return layers
        return max((*self.hidden_layers, *self.score_layers, *self.qkv_layers), default=0)

    def union(self, other: "ForwardNeeds") -> "ForwardNeeds":
        """Everything either of two needs asks for."""
        def merged(a, b):
            return tuple(sorted(set(a) | set(b)))

        return ForwardNeeds(merged(self.hidden_layers, other.hidden_layers), merged(self.score_layers, other.score_layers),
                            merged(self.qkv_layers, other.qkv_layers), self.masked_logits or other.masked_logits)

    def top_is_qkv_only(self, layers: int) -> bool:
        """True when the top layer is needed only for its Q/K/V projections (MiniLM)."""
        top = self.upto_layer(layers)
        return (not self.masked_logits and top in self.qkv_layers
                and top not in self.hidden_layers and top not in self.score_layers)


@dataclass
class Captured:
    """What one forward pass kept. Layer 0 is the embedding output."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # l -> (B, L, d)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # l -> (B, heads, L, L), before mask and softmax
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # l -> 3 x (B, L, d)
    masked_logits: torch.Tensor | None = None  # (M, V) at positions where labels != -100


def encode(
    model: BertForMaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    needs: ForwardNeeds,
    masked_positions: torch.Tensor | None = None,
    fused_attention: bool = True,
) -> Captured:
    """Run `model` on a batch, computing only what `needs` asks for.

    The forward stops at the highest layer needed (layers above it are not
    run); a top layer needed only for Q/K/V stops after its projections.
    masked_positions: (B, L) bool, required when `needs.masked_logits`; the LM
    head runs on those positions only. fused_attention=False runs every
    layer's attention as explicit matmuls (the reference the fused path is tested against).
    """
    bert = model.bert
    n_layers = len(bert.encoder.layer)
    top = needs.upto_layer(n_layers)
    out = Captured()
    x = bert.embeddings(input_ids=input_ids)
    if 0 in needs.hidden_layers:
        out.hidden[0] = x
    # Additive key mask: 0 where attended, a large negative number at padding.
    key_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    # The fused kernel takes a boolean mask (any dtype under autocast); with no padding
    # (packed pretraining batches) it gets none, which lets CUDA pick flash attention.
    key_keep = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
    for index, layer in enumerate(bert.encoder.layer[:top], start=1):
        if index == top and needs.top_is_qkv_only(n_layers):
            attn = layer.attention.self
            out.qkv[index] = (attn.query(x), attn.key(x), attn.value(x))
            break
        keep_scores = index in needs.score_layers
        fused = fused_attention and not keep_scores
        x = _layer_forward(layer, x, key_keep if fused else key_bias, index, out, keep_scores,
                           index in needs.qkv_layers, fused)
        if index in needs.hidden_layers:
            out.hidden[index] = x
    if needs.masked_logits:
        out.masked_logits = model.cls(x[masked_positions])
    return out


def _layer_forward(layer: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None, index: int, out: Captured,
                   keep_scores: bool, keep_qkv: bool, fused: bool) -> torch.Tensor:
    """One post-LN BERT layer, numerically the same as `BertLayer.forward`.

    fused: attention by `scaled_dot_product_attention`, key_mask a boolean
    keep-mask (B, 1, 1, L) or None; otherwise explicit matmuls (needed to keep
    the pre-softmax scores), key_mask an additive float bias (B, 1, 1, L).
    """
    attn = layer.attention.self
    batch, length, width = x.shape
    heads = attn.num_attention_heads
    q, k, v = attn.query(x), attn.key(x), attn.value(x)
    if keep_qkv:
        out.qkv[index] = (q, k, v)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, -1).transpose(1, 2)

    dropout = attn.dropout.p if attn.training else 0.0  # on the attention probabilities, both paths
    if fused:
        context = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=key_mask,
                                                             dropout_p=dropout, scale=attn.scaling)
    else:
        scores = torch.matmul(split(q), split(k).transpose(-1, -2)) * attn.scaling
        if keep_scores:
            out.scores[index] = scores
        probs = torch.softmax(scores + key_mask, dim=-1)
        context = torch.matmul(nn.functional.dropout(probs, p=dropout), split(v))
    context = context.transpose(1, 2).reshape(batch, length, width)
    attended = layer.attention.output(context, x)
    return layer.output(layer.intermediate(attended), attended)
