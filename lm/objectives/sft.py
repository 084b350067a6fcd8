"""Supervised fine-tuning: learn the responses of prompt/response pairs and chats, never the prompts.

A .jsonl record is either {"prompt": ..., "response": ...} or {"messages": [{"role": ..., "content":
...}, ...]} with roles system, user and assistant. A chat template (objective.chat_template) turns it
into tokens; the loss covers the assistant's tokens and the token that ends each of its turns.

  llama3  <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|> per message,
          as Llama 3's tokenizer_config.json writes it (the tokenizer must have those tokens);
  plain   EOS, then "### Role:\\nCONTENT\\n" per message, and each assistant turn ends with EOS, for
          tokenizers without chat tokens (those lm trains).
  auto    llama3 when the tokenizer has its header tokens, else plain.

On device it is causal LM with those weights, so it evaluates the same way: loss, perplexity and
bits per byte of the response tokens.
"""

import numpy as np

from lm.objectives import base, causal_lm

ROLES = ("system", "user", "assistant")
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def messages_of(record: dict) -> list[dict] | None:
  """The record's messages ({role, content}), or None when it is neither a prompt/response pair nor a chat."""
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    return None
  for message in messages:
    if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
      return None
  if not any(message["role"] == "assistant" for message in messages):
    return None
  return messages


def template_name(chat_template: str, tokenizer) -> str:
  """"llama3" or "plain": what `chat_template` means for this tokenizer."""
  has_llama3_tokens = all(tokenizer.token_id(piece) is not None for piece in LLAMA3_TOKENS)
  if chat_template == "auto":
    return "llama3" if has_llama3_tokens else "plain"
  if chat_template == "llama3" and not has_llama3_tokens:
    from lm.config import ConfigError

    raise ConfigError(f"objective.chat_template: the tokenizer {tokenizer.path} lacks Llama 3's {', '.join(LLAMA3_TOKENS)}")
  return chat_template


def chat_tokens(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[bool]]:
  """The tokens of a chat under `template`, and for each whether it is learned (an assistant turn's)."""
  tokens, learned = [], []

  def add(ids: list[int], learn: bool) -> None:
    tokens.extend(ids)
    learned.extend([learn] * len(ids))

  if template == "llama3":
    begin, start_header, end_header, end_of_turn = (tokenizer.token_id(piece) for piece in LLAMA3_TOKENS)
    add([begin], False)
    for message in messages:
      add([start_header] + tokenizer.encode(message["role"]) + [end_header] + tokenizer.encode("\n\n"), False)
      add(tokenizer.encode(message["content"]) + [end_of_turn], message["role"] == "assistant")
  else:
    add([tokenizer.eos_id], False)
    for message in messages:
      add(tokenizer.encode(f"### {message['role'].capitalize()}:\n"), False)
      if message["role"] == "assistant":
        add(tokenizer.encode(message["content"]) + [tokenizer.eos_id], True)
        add(tokenizer.encode("\n"), False)
      else:
        add(tokenizer.encode(message["content"] + "\n"), False)
  return tokens, learned


def reply_prompt(prompt: str, tokenizer, template: str) -> tuple[list[int], int]:
  """The tokens that ask for the assistant's reply to `prompt` (a user message), and the token that ends a reply."""
  tokens, _ = chat_tokens([{"role": "user", "content": prompt}], tokenizer, template)
  if template == "llama3":
    _, start_header, end_header, end_of_turn = (tokenizer.token_id(piece) for piece in LLAMA3_TOKENS)
    return tokens + [start_header] + tokenizer.encode("assistant") + [end_header] + tokenizer.encode("\n\n"), end_of_turn
  return tokens + tokenizer.encode("### Assistant:\n"), tokenizer.eos_id


class SFT(causal_lm.CausalLM):
  """Causal LM on chat examples, weighted to the responses."""

  name = "sft"
  reads_examples = True

  def example(self, record, tokenizer, seq_len):
    messages = messages_of(record)
    if messages is None:
      return "not_an_example"
    tokens, learned = chat_tokens(messages, tokenizer, template_name(self.config.chat_template, tokenizer))
    cut = len(tokens) > seq_len + 1  # seq_len inputs, each scored on the token after it
    tokens, learned = tokens[: seq_len + 1], learned[: seq_len + 1]
    if not any(learned[1:]):  # the prompt fills the row: nothing of the response is left to learn
      return "no_response"
    return base.Example(
        inputs=np.asarray(tokens[:-1], np.int32),
        targets=np.asarray(tokens[1:], np.int32),
        weights=np.asarray(learned[1:], np.float32),
        cut=cut,
    )
