"""GPT-1 pretraining exactly as in the paper (Section 4.1) and the original release.

    python -m gptjax.main --config=configs/gpt1.py --workdir=runs/gpt1 \
        --config.data.books='/data/bookcorpus/*.txt'

Every value below is the paper's unless its comment says otherwise.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()

    config.model = config_dict.ConfigDict()
    config.model.vocab_size = 40478  # BPE ids of the original release (40,000 merges)
    config.model.n_ctx = 512
    config.model.n_layer = 12
    config.model.n_head = 12
    config.model.d_model = 768
    config.model.d_mlp = 3072
    config.model.dropout = 0.1  # embeddings, attention probabilities, residual branches

    config.train = config_dict.ConfigDict()
    config.train.batch_size = 64  # sequences of n_ctx tokens per update
    config.train.epochs = 100
    config.train.num_steps = config_dict.placeholder(int)  # when set, wins over epochs
    config.train.lr = 2.5e-4  # peak learning rate
    config.train.warmup_steps = 2000  # linear warmup from 0, then cosine to 0
    config.train.warmup_fraction = config_dict.placeholder(float)  # when set, wins over steps
    config.train.schedule = "cosine"  # after warmup: "cosine" or "linear" decay to 0
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.weight_decay = 0.01  # decoupled; matrices and embeddings (optim.decay_mask)
    config.train.grad_clip = 1.0  # global norm
    # A NaN/Inf loss or gradient: "skip" the update (counted and logged) or "stop"; when
    # skipping, this many non-finite steps in a row stop the run (it has diverged).
    config.train.nonfinite = "skip"
    config.train.nonfinite_limit = 100
    config.train.seed = 0
    # Memory levers: gradient accumulation over this many slices of each batch (the same
    # update, but each slice draws its own dropout mask), and rematerialisation of each
    # block, which changes no value: "none", "full" or "save_dots".
    config.train.microbatches = 1
    config.train.remat = "none"
    # Parameters stacked per kind of layer (under `h`) and the blocks applied by nn.scan,
    # with scan_unroll blocks per loop iteration: 0 = all of them, no loop (see
    # docs/scaling.md and docs/benchmarks.md for what each setting costs).
    config.train.scan_layers = True
    config.train.scan_unroll = 0
    # Compute levers: "float32" or "bfloat16" matmuls (parameters stay float32), and the
    # attention kernel: "auto" (the fastest here for the backend: "pallas" on GPUs,
    # "xla" elsewhere), "xla", "fused" (cuDNN flash attention on GPUs in bfloat16; needs
    # dropout 0) or "pallas" (gptjax/flash.py: xla's values and dropout mask in one
    # flash-attention kernel for GPUs: the H200's bfloat16 step 1.20x faster than "xla"
    # in two blocks). "xla" (and "auto" where it runs "xla") computes the causal attention
    # in attention_blocks blocks of queries, skipping most of the scores the mask
    # discards (docs/benchmarks.md).
    config.train.compute_dtype = "float32"
    config.train.attention = "auto"
    config.train.attention_blocks = 1
    # Queries and keys per block of the "pallas" kernel (a power of two, at least 16;
    # 128 ran 1.02-1.03x faster than 64 on an H200; 256 does not fit its shared memory).
    config.train.flash_block = 128
    # The LM head's backward matmuls: "compute" (the logits' gradient rounded to
    # compute_dtype first, so that with bfloat16 they run in bfloat16, as under PyTorch's
    # autocast: the H200's bfloat16 step 1.14x faster) or "float32" (the gradient as the
    # float32 loss gives it: TF32 matmuls on a GPU). The same values with float32.
    config.train.lm_head_backward = "compute"
    # The LM head's matmuls over the vocabulary padded with zero rows to a multiple of
    # this, the extra logits dropped (the same values): 128 gives GPU tiles an aligned
    # 40,576 instead of 40,478 (the H200's bfloat16 step 1.07x faster; on CPUs within
    # the noise). 1: no padding.
    config.train.lm_head_pad_to = 128
    # The library of the train step's matmuls on CPUs: "xla" (XLA's choice, YNNPACK) or
    # "onednn" (faster for attention's batched products: configs/bench_cpu.py sets it;
    # no gain at this config's batch 1, and the step is then never compiled from the
    # persistent cache). Ignored on GPUs and TPUs.
    config.train.cpu_matmuls = "xla"
    # Bits of the vectors XLA's CPU compiler prefers for element-wise code (its default:
    # 256). 512 uses AVX-512's full width where the CPU has it (dropout's masks, the
    # softmax: `bench-cpu` ~2% faster on an AVX-512 Xeon); no change elsewhere.
    config.train.cpu_vector_width = 512
    # Bookkeeping (not from the paper).
    config.train.log_every = 100
    config.train.eval_every = 5000
    config.train.eval_batches = config_dict.placeholder(int)  # unset: the whole validation split
    config.train.ckpt_every = 5000
    config.train.keep_checkpoints = 3

    config.data = config_dict.ConfigDict()
    config.data.corpus = "books"  # "books": a directory or glob of .txt books; "demo": Shakespeare
    config.data.books = ""  # e.g. /data/bookcorpus or '/data/bookcorpus/**/*.txt'
    config.data.encoding = "utf-8"
    config.data.validation_fraction = 0.01  # books held out for held-out perplexity
    config.data.cache_dir = ""  # prepared TFDS datasets; empty: $GPTJAX_CACHE or ~/.cache/gptjax
    # SentencePiece BPE: lines sampled from the training books to learn the merges.
    config.data.tokenizer_sample_lines = 5_000_000

    # --mode=generate (not from the paper): continue prompts with the workdir's model.
    config.generate = config_dict.ConfigDict()
    config.generate.prompt = ""
    config.generate.prompts_file = ""  # one prompt per line
    config.generate.max_new_tokens = 64
    config.generate.temperature = 1.0  # 0: greedy
    config.generate.top_k = 0  # 0: no top-k cut
    config.generate.top_p = 1.0  # 1: no nucleus cut
    config.generate.seed = 0
    config.generate.stop = ""  # comma-separated stop strings; "\n" is a line break, "\," a comma
    config.generate.step = config_dict.placeholder(int)  # unset: the latest checkpoint
    config.generate.batch_size = 32  # prompts decoded together (each batch printed when done)

    # --mode=zeroshot: the paper's zero-shot heuristics (Section 5, Figure 2 right) on the
    # workdir's LM alone; see gptjax/zeroshot.py for the heuristics and the file formats.
    config.zeroshot = config_dict.ConfigDict()
    config.zeroshot.tasks = "sst2,cola,race"  # comma-separated: sst2, cola, race, dprd
    config.zeroshot.all_checkpoints = False  # True: every checkpoint (the Figure 2 curve)
    config.zeroshot.max_examples = 0  # per split, a fixed random sample (not the paper's); 0: all
    config.zeroshot.batch_size = 16  # sequences per forward pass
    # Your JSON-lines files instead of TFDS's validation splits; DPRD has no TFDS source.
    config.zeroshot.sst2_path = ""
    config.zeroshot.cola_path = ""
    config.zeroshot.cola_train_path = ""  # labelled sentences CoLA's threshold is chosen on
    config.zeroshot.race_path = ""
    config.zeroshot.dprd_path = ""  # the pronoun marked by "_", two candidates, a label

    # --mode=estimate (not from the paper): what this run costs, computed without running it.
    config.estimate = config_dict.ConfigDict()
    # H100, H100 PCIe, H100 NVL, H200, H200 NVL, GH200, A100, A100 40GB, v4, v5e, v5p, v6e
    # (or a device_kind)
    config.estimate.accelerator = "H100"
    config.estimate.devices = 8  # the paper trained on 8 GPUs
    config.estimate.mfu = 0.4  # model FLOP utilisation against the bf16 peak
    # Tokens per epoch for runs set by train.epochs: BookCorpus, ~985M words x ~1.3 BPE tokens.
    config.estimate.tokens_per_epoch = 1_280_000_000
    # A TPU slice to compile for ahead of time, on this machine ("v5litepod-8", "v4-32",
    # "v5e:2x4"; needs libtpu: pip install -e ".[tpu]"). Set, it names the accelerator
    # and the devices; "" compiles for this machine's devices.
    config.estimate.topology = ""

    # Data parallelism over every device; -1 means "all the devices left".
    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config
