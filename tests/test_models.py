"""Every zoo model builds and runs a forward pass on a tiny batch; the HF classifier works offline."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.models import build_model

TINY_BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


@pytest.mark.parametrize("name,shape,kw", [
    ("mlp", (40,), {"hidden": [8, 8], "dropout": 0.1}),
    ("logistic", (1, 8, 8), {}),
    ("cnn", (1, 28, 28), {"channels": [4, 8]}),
    ("cnn", (3, 32, 32), {}),
    ("resnet18", (3, 32, 32), {"width": 8}),
    ("resnet18", (3, 32, 32), {"width": 8, "batchnorm": False, "residual": False}),
    ("torchvision", (3, 32, 32), {"arch": "resnet18"}),
])
def test_zoo_models_forward(name, shape, kw):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **kw)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cifar_resnet18_has_3x3_stem_and_no_maxpool():
    model = build_model("resnet18", (3, 32, 32), 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n_params < 11.3e6  # the CIFAR ResNet-18: about 11.17M parameters
    tv = build_model("torchvision", (3, 224, 224), 10, arch="resnet18")
    assert tv.conv1.kernel_size == (7, 7) and any(isinstance(m, nn.MaxPool2d) for m in tv.modules())


def test_unknown_models_are_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        build_model("vit_giant", (3, 32, 32), 10)
    with pytest.raises(UserError, match="torchvision has no model"):
        build_model("torchvision", (3, 32, 32), 10, arch="resnet9000")


def _tokens(batch=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (batch, length), generator=g)
    lengths = torch.tensor([3, 5, 2, 4])[:batch]
    mask = (torch.arange(length) < lengths.view(-1, 1)).long()
    ids = ids * mask  # pad id 0 after each sentence
    return torch.stack([ids, mask, torch.zeros_like(ids)], dim=1).int()  # (B, 3, L): data.glue's ids, mask, types


def test_hf_classifier_random_init_from_config_and_padding_trim():
    torch.manual_seed(0)
    model = build_model("hf", (3, 9), 3, config=TINY_BERT).eval()
    assert model.model.config.num_labels == 3 and model.model.config.hidden_size == 16
    x = _tokens()
    logits = model(x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    # trimming all-padding columns changes nothing: same logits as the HF model on the full padded batch
    full = model.model(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long(), token_type_ids=x[:, 2].long()).logits
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert model.unpack(x)["input_ids"].shape == (4, 5)  # the longest sentence has 5 tokens
    as_dict = {"input_ids": x[:, 0].long(), "attention_mask": x[:, 1].long(), "token_type_ids": x[:, 2].long()}
    torch.testing.assert_close(model(as_dict), full, atol=1e-5, rtol=1e-5)
    # (B, 2, L) = ids + mask, the layout of tokenizers without token types
    two = x[:, :2]
    torch.testing.assert_close(model(two), full, atol=1e-5, rtol=1e-5)
    model.train()
    model(x).logsumexp(1).sum().backward()
    assert model.model.classifier.weight.grad is not None


def test_hf_classifier_from_local_path_offline(tmp_path):
    torch.manual_seed(0)
    src = build_model("hf", (3, 9), 2, config=TINY_BERT).eval()
    src.model.save_pretrained(str(tmp_path / "tiny"))
    same = build_model("hf", (3, 9), 2, path=str(tmp_path / "tiny")).eval()
    x = _tokens()
    torch.testing.assert_close(same(x), src(x))  # the whole model, head included, round-trips
    other = build_model("hf", (3, 9), 5, path=str(tmp_path / "tiny")).eval()  # a new head for 5 classes
    assert other(x).shape == (4, 5)
    torch.testing.assert_close(other.model.bert.embeddings.word_embeddings.weight,
                               src.model.bert.embeddings.word_embeddings.weight)


def test_hf_classifier_bad_input():
    with pytest.raises(UserError, match="exactly one"):
        build_model("hf", (2, 8), 2)
    with pytest.raises(UserError, match="exactly one"):
        build_model("hf", (2, 8), 2, path="x", config=TINY_BERT)
    with pytest.raises(UserError, match="config.json"):
        build_model("hf", (2, 8), 2, path="/nonexistent/model")
    with pytest.raises(UserError, match="model_type"):
        build_model("hf", (2, 8), 2, config={"hidden_size": 8})
    with pytest.raises(UserError, match="model.config"):
        build_model("hf", (2, 8), 2, config={"model_type": "no-such-architecture"})


def test_hf_classifier_runs_on_a_glue_datamodule_batch(tmp_path):
    """The tokenized GLUE batch from data.glue feeds the HF model directly (the rho/irreducible jobs' path)."""
    import datasets

    from datamatters.data.glue import GLUEDataModule
    from test_data_loaders import _glue_dict as sample_rows, make_tokenizer  # tests/ is on sys.path (no package)

    tok = make_tokenizer(tmp_path / "tok")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(sample_rows(12)),
                          "validation": datasets.Dataset.from_dict(sample_rows(4))}).save_to_disk(
        str(tmp_path / "glue" / "cola"))
    dm = GLUEDataModule(task="cola", data_dir=tmp_path, tokenizer_path=str(tmp_path / "tok"))
    dm.setup()
    model = build_model("hf", dm.input_shape, dm.num_classes, config={**TINY_BERT, "vocab_size": len(tok)})
    idx, x, y = next(iter(dm.loader("train", batch_size=4)))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
