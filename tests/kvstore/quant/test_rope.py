import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore.quant.rope import Rope


def test_apply_matches_the_model_and_invert_undoes_it():
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 500.0})
    model = LlamaForCausalLM(cfg).eval()
    rope = Rope.from_model(model)
    x = torch.randn(1, 2, 40, 16)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    pos = torch.arange(7, 47)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = rope.apply(x, 7, 0)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(rope.invert(got, 7, 0), x, atol=1e-5)
    assert not torch.allclose(rope.invert(got, 8, 0), x, atol=1e-2)  # positions matter
