"""Pretraining configs: ``--config=experiments/configs/pretrain.py:<preset>``.

Presets:
  tiny  (default) The demo of ``python run.py``: the associative-pairs corpus (keys Zipf(1.2)
        over V = 1024, a fixed random permutation as the answer), a 2-layer width-32 GPT with an
        untied unembedding and weight decay 0.5 on matrices, 3,000 steps of batch 32 x 64 tokens.
        This setting shows all three geometric phases (warmup collapse, entropy-seeking,
        compression-seeking; measured numbers in docs/phases.md). About 2-3 minutes on 2 CPU
        cores; the loss should end within about 0.01 nats/token of the corpus optimum.
          python experiments/pretrain.py --config=experiments/configs/pretrain.py:tiny --workdir=/tmp/tiny
  small A 4-layer width-128 model on a first-order Zipf(1.1) Markov chain over V = 1024, sequence
        256, batch 32 (8k tokens per step); for GPUs or long CPU runs.
          python experiments/pretrain.py --config=experiments/configs/pretrain.py:small \
              --workdir=/tmp/small --config.train.steps=20000
  uniform  Control for tiny: the same corpus with uniform key frequencies (the Tracing paper
        attributes the phases to skewed frequencies; expect a weaker collapse, then a rise).
          python run.py --config=experiments/configs/pretrain.py:uniform --workdir=runs/uniform
  wide  Control for tiny: vocabulary 32 = width 32, i.e. no bottleneck (expect collapse, then
        saturation without a compression phase).
          python run.py --config=experiments/configs/pretrain.py:wide --workdir=runs/wide
  test  A 1-layer width-16 model and 80 steps on a V = 64 Markov chain: what the tests run
        (ends about 0.35 nats/token above the entropy rate).

Every key can be overridden on the command line, e.g. ``--config.train.steps=200``.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def representation_probe(position: str, inputs: str = "probe_set") -> ml_collections.ConfigDict:
    """Spectra of the residual stream at the last token ("last") or averaged over tokens ("mean"), of
    the probe set's sequences or (``inputs="task_prompts"``, fine-tuning stages) the held-out task prompts."""
    return ml_collections.ConfigDict(dict(
        type="representation", position=position, inputs=inputs,
        in_training=True,  # also computed by the training process at its probe steps (train.probe_every)
        alpha_fit_range=placeholder(tuple),  # (start, stop) 0-based ranks; None: library default for the width
        # Diffusion spectral entropy (docs/metrics.md): dse_bits at the median pairwise distance of
        # dse_samples rows (a seeded draw; rows dse_sigma, dse_n) and dse_bits_sigma10 at the official
        # fixed width; exact up to dse_exact_max rows, the matrix-free SLQ estimate above.
        dse_samples=512,  # rows used (a fixed, seeded draw when there are more); 0 = no DSE rows
        dse_seed=0,
        dse_sigma=10.0,  # fixed kernel width of the dse_bits_sigma<width> row (official default 10); 0 = none
        dse_exact_max=8192,
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # model initialisation and data order
    c.stage = "pretrain"  # pretrain | finetune | sft | dpo | rlvr: recorded in checkpoints and results
    # Start from another run's checkpoint (parameters and model state; fresh optimiser, step 0).
    # Ignored when --workdir already holds checkpoints (the run resumes them).
    c.init_from = ml_collections.ConfigDict()
    c.init_from.workdir = ""  # "" = train from scratch
    c.init_from.step = -1  # -1 = the parent's latest checkpoint

    c.data = ml_collections.ConfigDict()
    c.data.name = "assoc_pairs"  # markov | markov_mixture | assoc_pairs | text_folder | lm1b | tiny_shakespeare
    c.data.vocab_size = 1024  # synthetic corpora only; text is byte-level (256)
    c.data.zipf_exponent = 1.2
    c.data.order = 1  # Markov chain order
    c.data.successors = 16  # allowed next tokens per Markov state
    c.data.num_topics = 8  # markov_mixture: number of chains
    c.data.uniform = False  # control: uniform instead of Zipf-skewed frequencies
    c.data.num_train = 100_000  # sequences
    c.data.num_val = 2_048
    c.data.data_seed = 0  # the corpus itself
    c.data.data_dir = ""  # "" -> TFDS default (~/tensorflow_datasets)
    c.data.text_dir = ""  # text_folder: a folder of .txt/.md/.py files
    c.data.download = True  # lm1b / tiny_shakespeare: let TFDS download them when not yet prepared

    c.model = ml_collections.ConfigDict()  # see entropy_jax.models.ModelConfig
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.d_ff = 0  # 0 -> 4 * d_model
    c.model.positions = "learned"  # learned | rope
    c.model.norm = "layernorm"  # layernorm | rmsnorm
    c.model.activation = "gelu"  # gelu | relu | silu
    c.model.tie_embeddings = False
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.arch = "transformer"  # a registered architecture (entropy_jax.models.register_architecture)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3_000
    c.train.batch_size = 32  # global, over all devices and processes
    c.train.seq_len = 64
    c.train.lr = 3e-3
    c.train.warmup_steps = 150
    c.train.end_lr = 3e-4  # cosine decay from lr to end_lr after warmup
    c.train.weight_decay = 0.5  # decoupled (AdamW), on parameters with ndim >= 2 only
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.train.log_every = 1  # steps between rows of metrics.jsonl
    # Steps per jitted call: a lax.scan of this many steps between checkpoints; the same numbers as
    # one step per call, with less host work per step (the tiny demo: 1.4x the step rate at 8).
    c.train.steps_per_call = 8
    c.train.loss = ml_collections.ConfigDict(dict(
        name="next_token",  # a loss registered in entropy_jax.train.objective.LOSSES
        skip_first=0,  # next_token: positions at the start of each sequence that carry no loss
        chunk=0,  # next_token: > 0 unembeds this many positions at a time (large vocabularies)
    ))
    # Probes with in_training=True run inside training: -1 at every checkpoint, 0 never, N every N steps.
    c.train.probe_every = -1
    c.train.tensorboard = False  # also write TensorBoard scalars (needs tensorboardX)
    c.train.kappatune = 0  # > 0: update only the N weight matrices of lowest condition number (KappaTune)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dense_until = 512  # save at every power of two up to here (and step 0)...
    c.checkpoint.every = 1_000  # ...then every this many steps, and at the last step
    c.checkpoint.max_to_keep = 0  # 0 keeps all (the probe sweep needs them)

    # Probes run by experiments/probe.py over every checkpoint; type = a registered evaluator
    # (entropy_jax/sweep/evaluators.py). in_training=True entries also run inside training.
    c.probe_set = ml_collections.ConfigDict()
    c.probe_set.num_sequences = 1_024  # fixed validation sequences; >= 10 x d_model
    c.probe_set.batch_size = 256  # global forward batch
    c.probes = ml_collections.ConfigDict()
    # Final layer after the final norm, last token: the Tracing paper's probe.
    c.probes.last_token = representation_probe("last")
    c.probes.mean_token = representation_probe("mean")
    # norm="certified": upper bounds on the bounds' spectral norms, O(T^2); "exact": eigenvalues, O(T^3)
    c.probes.attention = dict(type="attention", num_examples=128, norm="certified")
    c.probes.weights = dict(type="weights")
    # Predictive entropy, read from the representation probes' forward pass: free inside training.
    c.probes.output = dict(type="output", in_training=True)
    return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    if preset == "tiny":
        pass
    elif preset == "uniform":
        c.data.uniform = True
    elif preset == "wide":
        c.data.vocab_size = 32
    elif preset == "small":
        c.data.name = "markov"
        c.data.zipf_exponent = 1.1
        c.model.d_model = 128
        c.model.num_layers = 4
        c.model.num_heads = 4
        c.train.seq_len = 256
        c.train.steps = 20_000
        c.train.lr = 1e-3
        c.train.warmup_steps = 500
        c.train.end_lr = 1e-4
        c.train.weight_decay = 0.1
        c.train.log_every = 10
        c.probe_set.num_sequences = 2_048
    elif preset == "test":
        c.train.steps_per_call = 1  # the tests' reference runs step by step (tests/test_train_blocks.py)
        c.data.name = "markov"
        c.data.vocab_size = 64
        c.data.zipf_exponent = 1.1
        c.data.successors = 4
        c.data.num_train = 2_048
        c.data.num_val = 256
        c.model.d_model = 16
        c.model.num_layers = 1
        c.model.num_heads = 2
        c.train.steps = 80
        c.train.batch_size = 32
        c.train.seq_len = 16
        c.train.warmup_steps = 5
        c.train.lr = 3e-2
        c.train.end_lr = 3e-3
        c.train.weight_decay = 0.0
        c.checkpoint.dense_until = 16
        c.checkpoint.every = 40
        c.probe_set.num_sequences = 64
        c.probe_set.batch_size = 32
    else:
        raise ValueError(f"unknown preset {preset!r}; choose tiny, uniform, wide, small or test")
    return c
