"""Text distillation with Hugging Face models, on tiny random-init BERTs and a tokenizer trained here (offline):
dynamic padding and truncation counts, DistilBERT-style students copy the chosen layers exactly, the pipeline runs
end to end, and the student folder and the HF export reload with the same logits."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kdkit.config import load_config  # noqa: E402
from kdkit.data import build_data  # noqa: E402
from kdkit.models import load_model_folder  # noqa: E402
from kdkit.models.hf import build_hf_classifier, student_from_teacher  # noqa: E402

WORDS = {
    "sport": "match goal team player score win league coach season ball",
    "tech": "software chip data network computer code phone internet robot cloud",
    "politics": "vote party election minister law government policy debate bill senate",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    texts = root / "texts"
    for label, words in WORDS.items():
        (texts / label).mkdir(parents=True)
        vocab = words.split()
        for i in range(24):
            n = rng.randint(4, 40)  # some texts longer than max_length below
            (texts / label / f"{i:03d}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(n)))
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    # A fixed vocabulary (specials, then the words sorted): WordPieceTrainer breaks frequency ties differently in each
    # process, and other token ids give the tiny teacher another training run (its test accuracy moved 0.53-0.93).
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for ws in WORDS.values() for w in ws.split()})
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(special + words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = transformers.BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    encoder_dir = root / "tiny-bert"
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(encoder_dir))
    fast.save_pretrained(str(encoder_dir))
    return root, texts, encoder_dir


def _config(texts, encoder_dir, **extra):
    raw = {
        "run": {"seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "text_folder", "path": str(texts), "tokenizer": str(encoder_dir), "max_length": 16},
        "teacher": {
            "members": [{"model": {"source": "hf", "path": str(encoder_dir)}}],
            "train": {"epochs": 10, "batch_size": 8, "lr": 0.003},
        },
        "student": {"model": {"source": "hf", "path": str(encoder_dir), "teacher_layers": [1]}},
        "train": {"epochs": 3, "batch_size": 8, "lr": 0.003},
        "eval": {"latency_repeats": 2, "latency_warmup": 0},
    }
    return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in extra.items()])


def test_text_data_pads_per_batch_and_counts_truncation(assets):
    _, texts, encoder_dir = assets
    data = build_data("text_folder", path=str(texts), tokenizer=str(encoder_dir), max_length=16)
    assert data.modality == "text" and data.class_names == ["politics", "sport", "tech"]
    lengths = [len(data.train[i][0]) for i in range(len(data.train))]
    assert max(lengths) == 16 and min(lengths) < 16 and data.truncated > 0
    batch = data.collate([data.train[i] for i in range(4)])
    assert batch.inputs.shape == (4, max(lengths[:4]))
    assert torch.equal(batch.attention_mask.sum(1), torch.tensor(lengths[:4]))
    assert (batch.inputs[batch.attention_mask == 0] == data.train.pad_id).all()


def test_distilbert_style_student_copies_the_chosen_layers(assets):
    _, _, encoder_dir = assets
    teacher = build_hf_classifier(str(encoder_dir), 3, {}, True, "teacher")
    student = student_from_teacher(teacher, [1])
    t, s = teacher.hf.state_dict(), student.hf.state_dict()
    assert student.hf.config.num_hidden_layers == 1
    for key, value in s.items():
        source = key.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(value, t[source]), key
    with pytest.raises(Exception, match=r"teacher_layers: \[5\]; the teacher has 2 layers"):
        student_from_teacher(teacher, [5])


def test_text_pipeline_end_to_end_and_reload(assets, tmp_path, monkeypatch):
    from kdkit.export import export_run
    from kdkit.pipeline import distill, evaluate_run

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    _, texts, encoder_dir = assets
    r = distill(_config(texts, encoder_dir), out=tmp_path / "run", log=lambda m: None)
    m = r.metrics
    assert m["teacher"]["accuracy"] > 0.6  # the words separate the classes
    assert m["cost"]["student"]["params"] < m["cost"]["teacher"]["params"]
    assert m["data"]["truncated_texts"] > 0 and "token_dropout" in m["robustness"]
    saved = load_model_folder(tmp_path / "run" / "student")
    x = torch.tensor([[2, 10, 11, 12, 3, 0, 0]])
    torch.testing.assert_close(saved(x), r.student.eval()(x))
    assert evaluate_run(tmp_path / "run")["student"]["accuracy"] == pytest.approx(m["student"]["accuracy"])
    out = export_run(tmp_path / "run", "hf")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(out.path)).eval()
    with torch.no_grad():
        ref = reloaded(input_ids=x, attention_mask=(x != 0).long()).logits
    torch.testing.assert_close(ref, r.student(x), atol=1e-5, rtol=1e-5)


def test_text_errors_are_clear(assets, tmp_path):
    from kdkit.errors import ConfigError, DataError

    _, texts, encoder_dir = assets
    with pytest.raises(DataError, match="data.tokenizer: text data needs a tokenizer"):
        build_data("text_folder", path=str(texts))
    with pytest.raises(ConfigError, match=r"data.tokenizer: could not load 'no/such-model'.*local folder"):
        build_data("text_folder", path=str(texts), tokenizer="no/such-model")
    with pytest.raises(ConfigError, match=r"student.model.kwargs.num_layerz: not a field of BertConfig"):
        build_hf_classifier(str(encoder_dir), 3, {"num_layerz": 1}, False, "student.model")


def test_hidden_state_and_attention_map_losses_on_hf_models_in_the_pipeline(assets, tmp_path, monkeypatch):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    _, texts, encoder_dir = assets
    cfg = _config(
        texts,
        encoder_dir,
        **{
            "teacher.members": [
                {"model": {"source": "hf", "path": str(encoder_dir), "kwargs": {"attn_implementation": "eager"}}}
            ],
            "teacher.train.epochs": 2,
            "train.epochs": 1,
            "student.baseline": False,
            "eval.robustness": False,
            "distill.losses": [
                {"name": "ce", "weight": 0.5},
                {"name": "soft_kl", "weight": 0.5},
                {"name": "hidden_state", "weight": 1.0, "params": {"layer_map": "uniform"}},
                {"name": "attention_map", "weight": 1.0, "params": {"layer_map": "uniform"}},
            ],
        },
    )
    logs = []
    r = distill(cfg, out=tmp_path / "run", log=logs.append)
    assert any("hidden_state" in line and "attention_map" in line for line in logs)  # the printed formula
    history = json.loads((tmp_path / "run" / "history.json").read_text())["student-s0"]
    parts = [h for h in history if "train/hidden_state" in h]
    assert parts and all(h["train/hidden_state"] > 0 and h["train/attention_map"] >= 0 for h in parts)
    assert r.metrics["student"]["accuracy"] >= 0
