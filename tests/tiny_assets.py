"""Tiny random models with tiny tokenizers, saved as transformers directories, for CLI and data tests.

The tokenizer is a word-level one trained in-process on a few sentences (plus any words the test needs), with a
ChatML chat template, so the whole pipeline (template, response masking, generation) runs in seconds; the
encoder-decoders get transformers' byte-level ByT5 tokenizer, which ends every sequence with ``</s>`` as T5's does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "What is AI ? AI is the study of machines that think .",
    "Do you like movies ? Yes , I like good movies a lot .",
    "Hello , how are you ? I am fine , thank you .",
    "the film is fresh , funny and moving", "a rotten , dull and tedious movie",
    "What language are you written in ? Python .",
]


def tiny_tokenizer(chat_template: str | None = CHATML, extra: list[str] = ()) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(SENTENCES + list(extra), trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="<|im_end|>", model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = chat_template
    return fast


def save_tiny_causal_lm(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with its tokenizer, saved to ``path``."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                      max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (no head: the classification head is created at load) with its tokenizer."""
    tokenizer = tiny_tokenizer(chat_template=None)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                     pad_token_id=tokenizer.pad_token_id)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_seq2seq(path: Path, family: str = "t5", seed: int = 0, **overrides) -> Path:
    """A 2+2-layer T5 or BART without dropout (losses repeat exactly) and with a byte-level ByT5 tokenizer (which
    needs no trained vocabulary), saved to ``path``."""
    tokenizer = transformers.ByT5Tokenizer()
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if family == "t5":
        kwargs = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id)
    else:
        kwargs = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                      dropout=0.0, bos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                      forced_eos_token_id=tokenizer.eos_token_id)
    config_class = transformers.T5Config if family == "t5" else transformers.BartConfig
    config = config_class(**{**special, **kwargs, **overrides})
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
