"""The original loralib recipe: LoRA on query/value of a RoBERTa classifier (the real ``loralib.Linear``),
the classification head trained fully and saved next to ``lora_A``/``lora_B`` in one state dict. lora-ckpt
reads the head as modules_to_save, writes it where the target can hold it (PEFT, native, loralib) and
refuses where it cannot (torchtune, mistral, LLMBook) unless --allow-lossy; the PEFT output computes the
logits of the loralib model."""

import json

import loralib
import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from lora_ckpt.cli import main
from lora_ckpt.conversion import convert
from lora_ckpt.errors import LossyConversionError
from lora_ckpt.layouts import detect_layout, load_adapter

pytestmark = pytest.mark.filterwarnings("ignore")

R, ALPHA = 4, 8
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base model dir, lora_state_dict.pt, the loralib model's logits)."""
    root = tmp_path_factory.mktemp("loralib-head")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    base = RobertaForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    model = RobertaForSequenceClassification(cfg)
    model.load_state_dict(base.state_dict())
    for layer in model.roberta.encoder.layer:  # loralib's README: swap nn.Linear for lora.Linear
        for name in ("query", "value"):
            old = getattr(layer.attention.self, name)
            new = loralib.Linear(old.in_features, old.out_features, r=R, lora_alpha=ALPHA)
            new.weight.data.copy_(old.weight.data)
            new.bias.data.copy_(old.bias.data)
            setattr(layer.attention.self, name, new)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": LoRA factors and the whole head move
        for n, p in model.named_parameters():
            if "lora_" in n or n.startswith("classifier."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    sd = loralib.lora_state_dict(model)
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    torch.save(sd, root / "lora_state_dict.pt")
    model.eval()  # loralib merges B@A*alpha/r into the weight here
    with torch.no_grad():
        logits = model(IDS).logits
    assert (logits - base(IDS).logits).abs().max() > 0.1  # neither the LoRA nor the head is a no-op
    return root / "base", root / "lora_state_dict.pt", logits


def test_loralib_head_is_read_as_modules_to_save(trained):
    _, sd, _ = trained
    det = detect_layout(sd)
    assert det.layout.name == "loralib" and "full tensor(s)" in det.reason
    ad = load_adapter(sd, alpha=ALPHA)
    assert sorted(ad.extra) == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                                "classifier.out_proj.weight"]
    assert len(ad.modules) == 4 and any("modules_to_save" in n for n in ad.meta.notes)


def test_loralib_head_to_peft_computes_the_loralib_logits(trained, tmp_path):
    from peft import PeftModel

    base_dir, sd, want = trained
    out = tmp_path / "peft"
    convert(sd, out, to="peft", from_="loralib", alpha=ALPHA, base_config=base_dir / "config.json")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]
    base = RobertaForSequenceClassification.from_pretrained(base_dir)
    peft = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = peft(IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("via", ["native", "loralib", "peft"])
def test_loralib_head_round_trips_bit_exact(trained, tmp_path, via):
    _, sd, _ = trained
    convert(sd, tmp_path / "mid", to=via, from_="loralib", alpha=ALPHA)
    convert(tmp_path / "mid", tmp_path / "back", to="loralib")
    a = torch.load(sd, weights_only=True)
    b = torch.load(tmp_path / "back" / "lora_state_dict.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("to", ["torchtune", "llmbook"])
def test_loralib_head_refused_where_it_cannot_be_held(trained, tmp_path, capsys, to):
    _, sd, _ = trained
    with pytest.raises(LossyConversionError, match=r"full tensors .*--allow-lossy"):
        convert(sd, tmp_path / "x", to=to, from_="loralib", alpha=ALPHA)
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(sd), "--from", "loralib", "--alpha", str(ALPHA), "--to", to,
                 "-o", str(tmp_path / "x")]) == 1
    assert "--allow-lossy" in capsys.readouterr().err and not (tmp_path / "x").exists()
