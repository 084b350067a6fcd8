"""The PyTorch peer: a nanoGPT-style GPT-2 trained the fast PyTorch way, timed like benchmarks/throughput.py.

    python benchmarks/peers/torch_gpt2.py --n_layer=12 --n_head=12 --n_embd=768 --seq_len=1024 \
        --batch_size=64 --vocab_size=50304 --json=torch_gpt2_124m.json

On CUDA: bf16 autocast, fused AdamW, F.scaled_dot_product_attention (flash kernels) and
torch.compile; on a CPU, float32 (and --no-compile to skip the slow CPU compile). Same shapes,
same synthetic tokens per step, same FLOP accounting as lm, so the two JSON files compare.
"""

import argparse
import datetime
import json
import statistics
import sys
import time

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from lm import metrics


class Block(nn.Module):
  def __init__(self, n_embd: int, n_head: int):
    super().__init__()
    self.n_head = n_head
    self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
    self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
    self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

  def forward(self, x):
    batch, length, width = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
    q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
    x = x + self.c_proj(attended)
    return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
  def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, n_embd: int):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(seq_len, n_embd)
    self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd)
    self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    self.lm_head.weight = self.wte.weight  # tied, as GPT-2

  def forward(self, tokens, targets):
    x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in (("n_layer", 12), ("n_head", 12), ("n_embd", 768), ("seq_len", 1024), ("batch_size", 8),
                        ("vocab_size", 50304), ("warmup", 3), ("windows", 5), ("steps", 10)):  # fmt: skip
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--peak_flops", type=float, default=0.0, help="Per-device peak FLOP/s if lm does not know it.")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  model = GPT(args.vocab_size, args.seq_len, args.n_layer, args.n_head, args.n_embd).to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
  step_model = torch.compile(model) if args.compile else model
  tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

  def train_step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
      loss = step_model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  def sync():
    if cuda:
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    train_step()
  sync()
  window_seconds = []
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.steps):
      train_step()
    sync()
    window_seconds.append((time.perf_counter() - start) / args.steps)

  step_seconds = statistics.median(window_seconds)
  tokens_per_second = args.batch_size * args.seq_len / step_seconds
  shape = ml_collections.ConfigDict(dict(family="gpt2", num_layers=args.n_layer, embed_dim=args.n_embd,
                                         num_heads=args.n_head, num_kv_heads=args.n_head, mlp_dim=4 * args.n_embd,
                                         vocab_size=args.vocab_size))  # fmt: skip
  kind = torch.cuda.get_device_name() if cuda else "cpu"
  peak = args.peak_flops or metrics.peak_flops(type("Device", (), {"device_kind": kind})())
  result = {
      "date": datetime.date.today().isoformat(),
      "command": " ".join(sys.argv),
      "device": kind,
      "torch_version": torch.__version__,
      "compiled": args.compile,
      "parameters": sum(p.numel() for p in model.parameters()),
      "tokens_per_step": args.batch_size * args.seq_len,
      "step_seconds": step_seconds,
      "tokens_per_second_per_device": tokens_per_second,
      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
  }
  if peak:
    result["mfu"] = tokens_per_second * metrics.flops_per_token(shape, args.seq_len) / peak
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
