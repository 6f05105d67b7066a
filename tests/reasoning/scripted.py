"""A tiny Qwen3 checkpoint (transformers' save_pretrained) whose greedy output is scripted:
every layer's residual branch is zeroed, so the last hidden state is the current token's
embedding, and the output layer maps each token of a chain to the next one. From the last
prompt token ("\\n", where a Qwen3-style template ends its generation prompt) it writes
`<think>hm</think>ok` and stops; `<think>` / `</think>` are single added tokens as in Qwen3's
vocabulary. Its template follows Qwen3's: `enable_thinking: false` closes an empty think
block in the prompt."""

from __future__ import annotations

import itertools
import json

import torch

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
REASONING, CONTENT = "hm", "ok"


def _tokenizer(out_dir):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a b c"], trainer)  # bytes only: every letter its own token
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE}))
    return tok


def make_scripted_qwen3(out_dir):
    """Save the checkpoint in `out_dir`; returns the transformers model."""
    import transformers

    tok = _tokenizer(out_dir)
    ids = {t: tok.token_to_id(t) for t in ("<think>", "</think>", "<|im_end|>")}
    byte = {c: tok.encode(c).ids[0] for c in "\nhmok"}
    chain = [byte["\n"], ids["<think>"], byte["h"], byte["m"], ids["</think>"], byte["o"], byte["k"],
             ids["<|im_end|>"]]
    assert len(set(chain)) == len(chain)
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=4096, tie_word_embeddings=False,
                                   eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # no residual updates: hidden state = token embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.normal_(0, 0.02)
        head.zero_()
        for i, (t, nxt) in enumerate(itertools.pairwise(chain)):
            emb[t] = 0
            emb[t, i] = 1.0
            head[nxt, i] = 10.0
    model.save_pretrained(out_dir)
    return model
