"""Every config field with its default. Other configs start from this one and change a few fields.

Override any field from the command line: `--config.model.num_layers=4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config: a small Llama-style model on synthetic data."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  # Decoders: "llama" (RMSNorm, rotary, SwiGLU, no biases), "gpt2" (LayerNorm, learned positions, GELU, biases);
  # encoder: "bert" (bidirectional, post-LayerNorm, learned positions, exact GELU, biases, MLM head);
  # encoder-decoder: "t5" (T5 v1.1: RMSNorm, relative position buckets, gated GELU, no biases).
  model.family = "llama"
  model.vocab_size = 0  # embedding rows; 0: the tokenizer's vocabulary rounded up to vocab_multiple
  model.vocab_multiple = 128  # with vocab_size 0, round the vocabulary up to a multiple of this (faster matmuls)
  model.num_layers = 12  # Transformer blocks
  model.embed_dim = 768  # width of the residual stream; head_dim = embed_dim // num_heads
  model.num_heads = 12  # query heads
  model.num_kv_heads = 12  # key/value heads; fewer than num_heads is grouped-query attention
  model.mlp_dim = 3072  # hidden width of the MLP (of each expert's, in a mixture of experts)
  # Mixture of experts (llama family, Mixtral's block): every block's MLP becomes num_experts SwiGLU
  # experts, of which a router picks experts_per_token for each token (0: a dense MLP).
  model.num_experts = 0
  model.experts_per_token = 2
  model.expert_capacity_factor = 0.0  # 0: dropless; c > 0: c * T * k / E token slots per expert per row
  model.router_aux_loss_weight = 0.01  # load-balancing loss (Switch Transformer's), per scored token
  model.head_dim = 0  # width of one attention head; 0: embed_dim // num_heads (T5 sets it apart)
  model.num_decoder_layers = 0  # t5: blocks of the decoder; 0: as many as the encoder's num_layers
  model.relative_buckets = 32  # t5: relative position buckets of each stack's attention bias
  model.relative_max_distance = 128  # t5: distances past this share the last bucket
  model.type_vocab_size = 2  # bert: token-type (segment A/B) embeddings; lm trains with type 0 only
  model.max_seq_len = 2048  # longest sequence the model accepts (size of GPT-2's position table)
  model.rope_theta = 10000.0  # rotary base frequency (llama family)
  model.rope_scaling = "none"  # rotary frequencies stretched for longer contexts: "none", "linear", "llama3" (3.1's)
  model.rope_scaling_factor = 8.0  # linear, llama3: how many times longer the context gets (frequencies / factor)
  model.rope_low_freq_factor = 1.0  # llama3: wavelengths over original_max_seq_len / this are divided by the factor
  model.rope_high_freq_factor = 4.0  # llama3: wavelengths under original_max_seq_len / this are kept; between, blended
  model.rope_original_max_seq_len = 8192  # llama3: the context length the model was pretrained with
  model.norm_eps = 1e-5  # epsilon of RMSNorm / LayerNorm
  model.tie_embeddings = True  # the output projection reuses the token embedding
  model.dropout_rate = 0.0  # dropout on the embeddings and both residual branches
  model.init_std = 0.02  # std of the normal init; residual output projections get init_std / sqrt(2 * num_layers)
  model.dtype = "bfloat16"  # compute dtype of activations and matmuls
  model.param_dtype = "float32"  # storage dtype of parameters (and so of the optimizer state)
  # Projections (attention, MLP; not the embedding or output layer) in fp8 with per-tensor scales: e4m3 forward,
  # e5m2 gradients. XLA makes them fp8 matmuls on Hopper GPUs; elsewhere it only costs time.
  model.fp8_matmuls = False
  # Attention kernel: "auto" (cuDNN's fused kernel on NVIDIA GPUs, Pallas splash attention on TPUs, XLA elsewhere),
  # "xla" (einsum softmax), "dot_product" (jax.nn.dot_product_attention, left to choose), "cudnn" (cuDNN, XLA where
  # it cannot run) or "splash" (the Pallas TPU kernel; interpreted, slowly, off a TPU).
  model.attention = "auto"
  model.cudnn_max_documents = 32  # cuDNN: packed documents per row it keeps apart; more are joined into the last
  model.loss_chunk_len = 128  # the loss computes logits this many positions at a time ([B, T, V] never whole); 0: all
  model.scan_layers = True  # stack the layers on a "layers" axis and run them with nn.scan (fast compiles)
  # With scan_layers, layers per loop iteration (num_layers: no loop, same parameters); 0: every layer on
  # GPUs (the loop cost a quarter of the speed on an H100), one elsewhere.
  model.scan_unroll = 0
  model.remat_policy = "none"  # "none", "full", "save_dots" (keep every projection output) or "save_qkv_proj"
  # With mesh.stage > 1 (pipeline parallelism): microbatches in flight through the stages; 0: 2 x stages.
  # The pipeline idles (stages - 1) / (microbatches + stages - 1) of the time (its bubble).
  model.pipeline_microbatches = 0

  config.objective = objective = ml_collections.ConfigDict()
  # What the model learns (lm/objectives/): "causal_lm" (every next token of plain text), "sft" (the responses of
  # prompt/response pairs or chats in .jsonl), "classification" (a label per .jsonl text, read at its last token,
  # or at its first for an encoder), "mlm" (masked tokens of plain text; encoders) or "span_corruption" (dropped
  # spans of plain text, written by the decoder; encoder-decoders).
  objective.name = "causal_lm"
  objective.chat_template = "auto"  # sft: "auto" (llama3 when the tokenizer has its header tokens, else plain), "llama3", "plain"
  objective.num_classes = 0  # classification: labels are 0 .. num_classes - 1 (or the names in class_names)
  objective.class_names = ""  # classification: comma-separated label names, when the data's labels are names
  objective.mask_rate = 0.15  # mlm: share of tokens chosen for prediction (of those 80% [MASK], 10% random, 10% kept)
  objective.noise_density = 0.15  # span_corruption: share of tokens dropped from the input for the decoder to write
  objective.mean_span_length = 3.0  # span_corruption: mean length of a dropped span

  config.mesh = mesh = ml_collections.ConfigDict()
  # The device mesh's axes, outermost first (the innermost get the fastest links), each sized below.
  mesh.axes = ("stage", "data", "fsdp", "expert", "tensor", "sequence")
  # Device mesh axis sizes within one slice / host; -1 takes all remaining devices.
  mesh.data = -1  # pure data parallelism (parameters replicated)
  mesh.fsdp = 1  # data parallelism with parameters, gradients and optimizer state sharded
  mesh.tensor = 1  # tensor parallelism over heads, MLP and vocabulary
  mesh.sequence = 1  # sequence parallelism over the activation length
  mesh.expert = 1  # expert parallelism: a mixture of experts' experts split over devices (data parallel elsewhere)
  mesh.stage = 1  # pipeline parallelism: the layers split into this many stages (GPipe)
  # Across slices / hosts (data-center network); these multiply the sizes above.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  # Logical axis name -> mesh axes. Changing parallelism strategy is editing these, never the code.
  mesh.logical_axis_rules = (
      ("activation_batch", ("data", "fsdp", "expert")),
      ("activation_expert_batch", ("data", "fsdp")),
      ("activation_expert", "expert"),
      ("expert", "expert"),
      ("activation_length", "sequence"),
      ("activation_embed", None),
      ("activation_heads", "tensor"),
      ("activation_kv_heads", "tensor"),
      ("activation_head_dim", None),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("layers", "stage"),
      ("stage", "stage"),
      ("activation_stage", "stage"),
      ("norm", None),
  )

  config.data = data = ml_collections.ConfigDict()
  # "builtin": this Python's standard library (sources and text), no download needed;
  # "text:<dir or glob>": local .txt, .md, .py and .jsonl files, recursively;
  # "tfds:<name>[:<version>]": a TFDS text dataset prepared in array_record format under tfds_data_dir;
  # "synthetic": a deterministic, learnable token stream with no tokenizer (benchmarks, tests).
  data.source = "builtin"
  data.seq_len = 1024  # tokens per training row
  data.batch_size = 8  # global batch, in rows, across all devices and processes
  data.seed = 0  # the batch at step k is a pure function of (seed, k)
  data.data_dir = "~/.cache/lm"  # where tokenizers and tokenized shards are built
  data.tokenizer = ""  # a sentencepiece .model or a Hugging Face tokenizer.json to use; empty: train one on the source
  data.tokenizer_type = "bpe"  # "bpe" or "unigram", when training a tokenizer
  data.tokenizer_vocab_size = 32000  # pieces, when training a tokenizer (synthetic data: its vocabulary size)
  data.tokenizer_sample_bytes = 50_000_000  # text the tokenizer is trained on
  data.validation_fraction = 0.01  # documents held out (by a stable hash of their content)
  data.max_document_chars = 1_000_000  # longer documents are split into pieces this long
  data.text_key = "text"  # the text field of .jsonl lines and TFDS examples
  data.tfds_data_dir = ""  # where tfds: datasets live; empty: TFDS's default (~/tensorflow_datasets)
  data.tfds_split = "train"  # the split of a tfds: dataset to read

  config.optimizer = opt = ml_collections.ConfigDict()
  opt.learning_rate = 3e-4  # peak learning rate
  opt.schedule = "cosine"  # after warmup: "cosine", "linear", "constant" or "wsd" (warmup-stable-decay)
  opt.warmup_steps = 100  # linear warmup from 0 to the peak
  opt.min_learning_rate_ratio = 0.1  # final learning rate as a fraction of the peak (cosine, linear, wsd)
  opt.decay_fraction = 0.2  # wsd: fraction of train.steps spent in the final linear decay
  opt.b1 = 0.9
  opt.b2 = 0.95
  opt.eps = 1e-8
  opt.weight_decay = 0.1  # decoupled (AdamW) weight decay
  opt.no_weight_decay = ("norm", "bias", "embedding")  # parameter kinds excluded from weight decay
  opt.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 turns clipping off

  config.train = train = ml_collections.ConfigDict()
  train.steps = 1000  # optimizer updates in the whole run
  train.microbatches = 1  # gradient accumulation: the global batch is split into this many scan steps
  train.z_loss_weight = 0.0  # weight of log(Z)^2 added to the loss (1e-4 is common at scale)
  train.seed = 0  # parameter init and dropout
  train.log_every = 10  # steps between metrics lines
  train.max_bad_steps = 10  # stop after this many steps in a row with NaN / Inf gradients (each is skipped)
  train.profile_steps = 0  # trace this many steps (from the second on) into tensorboard/ for its profile tab; 0: none

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every = 1000  # steps between evaluations on the validation split (and at the end); 0: never
  evaluation.steps = 20  # batches per evaluation; 0: the whole validation split

  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.every = 1000  # steps between checkpoints (also saved at the end and when preempted); 0: end only
  checkpoint.keep = 3  # newest checkpoints kept
  checkpoint.keep_period = 0  # also keep every checkpoint whose step is a multiple of this, forever; 0: none
  checkpoint.async_save = True  # write in the background while training goes on
  checkpoint.init_from = ""  # another run's workdir (or checkpoints dir): start from its latest params
  checkpoint.init_opt_state = False  # with init_from: take its optimizer state too
  # With init_from: take the model (model.*, but for how it computes: dtype, attention, remat, dropout ...) and
  # the tokenizer (unless data.tokenizer names one) from that run, as fine-tuning does.
  checkpoint.init_model = False

  return config
