"""Minitron width pruning: importance over real tokens, exactly-dead units ranked last and removed without changing
the logits, parameter counts against a hand formula, generate and save/load of the pruned model, one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models.prune_lm import LMImportance, lm_importance, prune_lm, pruned_params

V, D, HEADS, KV, INTER, LAYERS, HEAD_DIM = 101, 32, 4, 2, 48, 3, 8


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight (norms included) random and O(1), so that removing a live unit visibly moves the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A tiny random Llama with tied embeddings and GQA (2 query heads per KV head). rms_norm_eps is 1e-3 so that
    pruning hidden channels without rescaling it would move the logits by ~2e-3, not by float noise; the exactness
    tests run in float64 (transformers still computes RMSNorm in float32: ~5e-7 of noise on the logits)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-3,
    )
    return randomize(LlamaForCausalLM(config)).to(dtype)


def calibration(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (2, 10), generator=g) for _ in range(n)]


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.arange(3, 19).view(2, 8) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:k].tolist())


def flipped(importance: LMImportance, field: str) -> LMImportance:
    """The same importance with one field negated: pruning then keeps the units it would have removed."""
    value = getattr(importance, field)
    negated = -value if isinstance(value, torch.Tensor) else tuple(-v for v in value)
    return dataclasses.replace(importance, **{field: negated})


def test_pruning_nothing_keeps_the_model():
    model = tiny_llama()
    importance = lm_importance(model, calibration())
    for sizes in ({}, {"intermediate_size": INTER, "num_key_value_heads": KV, "hidden_size": D}):
        pruned = prune_lm(model, importance, **sizes)
        assert torch.equal(logits(pruned), logits(model))
        assert pruned.config.to_dict() == model.config.to_dict()


def test_importance_shapes_and_model_left_as_it_was():
    model = tiny_llama().train()
    importance = lm_importance(model, calibration())
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert importance.tokens == 2 * 2 * 10
    assert [s.shape for s in importance.mlp] == [(INTER,)] * LAYERS
    assert [s.shape for s in importance.heads] == [(KV,)] * LAYERS
    assert importance.hidden.shape == (D,)
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in (*importance.mlp, importance.hidden))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_importance_matches_a_hand_computation():
    model = tiny_llama()
    ids = calibration(1)[0]
    captured = {}  # module → its input, from hooks of our own

    def keep(module, args):
        captured[module] = args[0].detach()

    modules = [
        model.model.norm,
        *(
            m
            for layer in model.model.layers
            for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.o_proj)
        ),
    ]
    hooks = [m.register_forward_pre_hook(keep) for m in modules]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    eps = model.config.rms_norm_eps
    norms = [m for m in modules if not isinstance(m, torch.nn.Linear)]
    hidden = sum(rms_norm(captured[m], m.weight, eps).abs().mean((0, 1)) for m in norms)
    importance = lm_importance(model, [ids])
    torch.testing.assert_close(importance.hidden, hidden, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        x = rms_norm(captured[layer.post_attention_layernorm], layer.post_attention_layernorm.weight, eps)
        act = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        torch.testing.assert_close(importance.mlp[i], act.abs().mean((0, 1)), atol=1e-5, rtol=1e-5)
        z = captured[layer.self_attn.o_proj]  # (B, T, heads * head_dim)
        per_head = [z[..., h * HEAD_DIM : (h + 1) * HEAD_DIM].norm(dim=-1).mean() for h in range(HEADS)]
        groups = torch.stack([per_head[0] + per_head[1], per_head[2] + per_head[3]])  # 2 query heads per KV head
        torch.testing.assert_close(importance.heads[i], groups, atol=1e-5, rtol=1e-5)


def test_dead_mlp_channels_rank_last_and_prune_away_exactly():
    model = tiny_llama(torch.float64)
    dead = {0: [1, 7, 30], 1: [0, 2, 47], 2: [5, 6, 40]}  # a different set in every layer
    with torch.no_grad():
        for i, channels in dead.items():
            model.model.layers[i].mlp.up_proj.weight[channels] = 0.0
    importance = lm_importance(model, calibration())
    for i, channels in dead.items():
        assert lowest(importance.mlp[i], 3) == set(channels)
        assert importance.mlp[i][channels].eq(0).all() and importance.mlp[i].gt(0).sum() == INTER - 3
    pruned = prune_lm(model, importance, intermediate_size=INTER - 3)
    assert pruned.config.intermediate_size == INTER - 3
    assert pruned.model.layers[0].mlp.up_proj.weight.shape == (INTER - 3, D)
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-6, rtol=0)
    # Control: keeping the dead channels instead (removing live ones) does move the logits.
    wrong = prune_lm(model, flipped(importance, "mlp"), intermediate_size=INTER - 3)
    assert (logits(wrong) - logits(model)).abs().max() > 1e-3


def test_dead_kv_group_ranks_last_and_prunes_away_exactly():
    model = tiny_llama(torch.float64)
    dead = {0: 1, 1: 0, 2: 1}  # the dead KV group of each layer
    rep = HEADS // KV
    with torch.no_grad():
        for i, group in dead.items():
            attn = model.model.layers[i].self_attn
            # Zero values make the attention output of the group's query heads zero (importance 0); o_proj columns
            # of those heads are zeroed too, as a group that contributes nothing.
            attn.v_proj.weight[group * HEAD_DIM : (group + 1) * HEAD_DIM] = 0.0
            attn.o_proj.weight[:, group * rep * HEAD_DIM : (group + 1) * rep * HEAD_DIM] = 0.0
    importance = lm_importance(model, calibration())
    for i, group in dead.items():
        assert importance.heads[i][group] == 0 and importance.heads[i][1 - group] > 0
    pruned = prune_lm(model, importance, num_key_value_heads=1)
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads, pruned.config.head_dim) == (1, 2, 8)
    attn = pruned.model.layers[1].self_attn
    kept = model.model.layers[1].self_attn  # layer 1 keeps group 1: query heads 2, 3
    assert torch.equal(attn.k_proj.weight, kept.k_proj.weight[HEAD_DIM:])
    assert torch.equal(attn.q_proj.weight, kept.q_proj.weight[2 * HEAD_DIM :])
    assert torch.equal(attn.o_proj.weight, kept.o_proj.weight[:, 2 * HEAD_DIM :])
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-6, rtol=0)
    wrong = prune_lm(model, flipped(importance, "heads"), num_key_value_heads=1)
    assert (logits(wrong) - logits(model)).abs().max() > 1e-3


def test_dead_hidden_channels_rank_last_and_prune_away_exactly():
    model = tiny_llama(torch.float64)
    dead = [3, 17, 22, 30]  # 4: LlamaConfig wants hidden_size a multiple of the 4 heads
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0.0  # tied: lm_head columns too
        model.model.norm.weight[dead] = 0.0
        for layer in model.model.layers:
            # The residual stream stays zero in these channels: nothing writes into them.
            layer.self_attn.o_proj.weight[dead] = 0.0
            layer.mlp.down_proj.weight[dead] = 0.0
            layer.input_layernorm.weight[dead] = 0.0
            layer.post_attention_layernorm.weight[dead] = 0.0
    importance = lm_importance(model, calibration())
    assert lowest(importance.hidden, 4) == set(dead)
    assert importance.hidden[dead].eq(0).all() and importance.hidden.gt(0).sum() == D - 4
    pruned = prune_lm(model, importance, hidden_size=D - 4)
    assert pruned.model.embed_tokens.weight.shape == (V, D - 4)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert pruned.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * D / (D - 4))
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-6, rtol=0)
    wrong = prune_lm(model, flipped(importance, "hidden"), hidden_size=D - 4)
    assert (logits(wrong) - logits(model)).abs().max() > 1e-3


def test_pruned_model_shares_nothing_and_leaves_the_original_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_lm(model, lm_importance(model, calibration()), intermediate_size=40, num_key_value_heads=1)
    ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not ptrs & ({p.data_ptr() for p in pruned.parameters()} | {b.data_ptr() for b in pruned.buffers()})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.intermediate_size == INTER and model.config.num_key_value_heads == KV


@pytest.mark.parametrize("padding", ["right", "left"])
def test_importance_ignores_padding(padding):
    model = tiny_llama()
    a, b = torch.arange(5, 12), torch.arange(40, 44)  # lengths 7 and 4
    pad = torch.zeros(3, dtype=torch.long)
    row_b = torch.cat([b, pad]) if padding == "right" else torch.cat([pad, b])
    mask_b = (row_b != 0).long()
    batch = {"input_ids": torch.stack([a, row_b]), "attention_mask": torch.stack([torch.ones(7).long(), mask_b])}
    padded = lm_importance(model, [batch])
    alone = lm_importance(model, [a[None], b[None]])
    assert padded.tokens == alone.tokens == 11
    for got, want in zip((*padded.mlp, *padded.heads, padded.hidden), (*alone.mlp, *alone.heads, alone.hidden)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Control: the same rows counted with their padding give other numbers.
    unmasked = lm_importance(model, [batch["input_ids"]])
    assert unmasked.tokens == 14 and not torch.allclose(unmasked.hidden, alone.hidden, atol=1e-4)


def test_parameter_count_against_a_hand_formula():
    model = tiny_llama()
    pruned = prune_lm(
        model, lm_importance(model, calibration()), intermediate_size=20, num_key_value_heads=1, hidden_size=24
    )
    d, heads, kv, inter = 24, 2, 1, 20
    per_layer = d * heads * HEAD_DIM + 2 * d * kv * HEAD_DIM + heads * HEAD_DIM * d + 3 * d * inter + 2 * d
    formula = V * d + LAYERS * per_layer + d  # tied lm_head counted once; final norm
    assert formula == 10368
    assert sum(p.numel() for p in pruned.parameters()) == formula
    assert pruned_params(model.config, 20, 1, 24) == formula


@pytest.mark.parametrize(
    "sizes",
    [
        {},
        {"intermediate_size": 7},
        {"num_key_value_heads": 1},
        {"hidden_size": 12},
        {"hidden_size": 20, "num_key_value_heads": 1, "intermediate_size": 33},
    ],
)
def test_pruned_params_matches_the_pruned_model(sizes):
    model = tiny_llama()
    pruned = prune_lm(model, lm_importance(model, calibration(1)), **sizes)
    assert sum(p.numel() for p in pruned.parameters()) == pruned_params(model, **sizes)


def test_generate_matches_greedy_decoding():
    model = tiny_llama()
    pruned = prune_lm(
        model, lm_importance(model, calibration()), intermediate_size=30, num_key_value_heads=1, hidden_size=20
    )
    prompt = torch.tensor([[5, 9, 33, 60]])
    out = pruned.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = prompt
    for _ in range(6):  # the same tokens without a KV cache
        seq = torch.cat([seq, logits(pruned, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_llama()
    pruned = prune_lm(
        model, lm_importance(model, calibration()), intermediate_size=30, num_key_value_heads=1, hidden_size=20
    )
    pruned.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.hidden_size, loaded.config.head_dim, loaded.config.num_attention_heads) == (20, 8, 2)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(pruned))


def test_qwen2_with_attention_biases():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=INTER,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = randomize(Qwen2ForCausalLM(config))
    importance = lm_importance(model, calibration())
    assert torch.equal(logits(prune_lm(model, importance)), logits(model))
    pruned = prune_lm(model, importance, intermediate_size=30, num_key_value_heads=1, hidden_size=16)
    assert pruned.model.layers[0].self_attn.q_proj.bias.shape == (2 * HEAD_DIM,)
    assert pruned.lm_head.weight.shape == (V, 16) and pruned.lm_head.weight is not pruned.model.embed_tokens.weight
    assert sum(p.numel() for p in pruned.parameters()) == pruned_params(config, 30, 1, 16)
    assert torch.isfinite(logits(pruned)).all()


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"intermediate_size": 0}, "prune.intermediate_size: 0; expected 1..48"),
        ({"intermediate_size": 49}, "prune.intermediate_size: 49; expected 1..48"),
        ({"intermediate_size": 2.5}, "prune.intermediate_size: 2.5; expected 1..48"),
        ({"num_key_value_heads": 3}, "prune.num_key_value_heads: 3; expected 1..2"),
        ({"hidden_size": 0}, "prune.hidden_size: 0; expected 1..32"),
        (
            {"hidden_size": 30},
            "prune: The hidden size (30) is not a multiple of the number of attention heads (4). (after pruning to "
            "hidden_size 30, num_key_value_heads 2); choose sizes that LlamaConfig accepts",
        ),
    ],
)
def test_sizes_out_of_range_are_one_line_errors(sizes, message):
    model = tiny_llama()
    importance = lm_importance(model, calibration(1))
    for call in (lambda: prune_lm(model, importance, **sizes), lambda: pruned_params(model.config, **sizes)):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == message


def test_other_families_and_foreign_importance_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    expected = (
        "prune: GPT2LMHeadModel (model_type 'gpt2') is not a Llama-family causal LM; width pruning supports "
        "model_type llama, mistral, qwen2"
    )
    with pytest.raises(CompatibilityError) as info:
        lm_importance(gpt2, calibration(1), where="prune")
    assert str(info.value) == expected
    with pytest.raises(CompatibilityError, match="GPT2Config .*not a Llama-family"):
        pruned_params(gpt2.config)
    model = tiny_llama()
    importance = lm_importance(model, calibration(1))
    short = dataclasses.replace(importance, mlp=importance.mlp[:2], heads=importance.heads[:2])
    with pytest.raises(CompatibilityError) as info:
        prune_lm(model, short, intermediate_size=10)
    assert str(info.value).startswith("prune.importance: measured on another shape") and "\n" not in str(info.value)
