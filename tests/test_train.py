"""The one AdamW builder, used for pretraining and fine-tuning."""
import torch

from raykd.models import ModelShape, build_masked_lm
from raykd.train import make_optimizer


def test_optimizer_decays_every_matrix_and_no_bias_or_layernorm():
    model = build_masked_lm(ModelShape(1, 8, 2, 16), 20, 8, seed=0)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen: not optimised at all
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.05)
    decayed, plain = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in decayed | plain, name
        elif "LayerNorm" in name or name.endswith("bias"):
            assert id(param) in plain, name
        else:
            assert param.ndim == 2 and id(param) in decayed, name


def test_fine_tuning_keeps_the_fused_update():
    from raykd.evaluation import _optimizer

    optimizer = _optimizer(torch.nn.Linear(4, 2), 1e-4)
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.9, 0.999)
