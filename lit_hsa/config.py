"""Configuration schemas, named model presets, and validation with clear messages.

YAML files are merged onto these dataclasses with OmegaConf (``load_config``), so an unknown or mistyped key fails
at start-up with the key's name. ``ModelConfig.from_name`` gives the named presets (litgpt style).
"""
from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from data_modules.curriculum import seq_len_stages
from data_modules.ruler_tasks import RULER_TASKS
from data_modules.sources import DataError
from data_modules.synthetic import TASKS
from lit_hsa.model.config import (  # noqa: F401
    ATTENTION_KINDS,
    ATTN_BACKENDS,
    FUSIONS,
    HSA_RESIDUALS,
    LORA_TARGETS,
    PRESETS,
    ROPE_SCALING_KEYS,
    ConfigError,
    ModelConfig,
    check_choice,
    check_rope_scaling,
)

LR_SCHEDULES = ("constant", "cosine")
FINETUNE_METHODS = ("none", "full", "lora")
SYNTHETIC_FORMATS = ("ours", "ruler")


@dataclass
class SourceConfig:
    """One document source of the training mixture."""

    kind: str = "files"  # files: `paths` (.txt and other text files, .jsonl, .parquet) | stdlib: the embedded corpus
    format: str = "text"  # text | chat: jsonl records {"messages": [{"role", "content"}]}, loss on assistant turns
    paths: list[str] = field(default_factory=list)  # files, directories or globs
    weight: float = 1.0  # relative share of documents drawn from this source
    text_field: str = "text"  # jsonl key / parquet column holding the text
    min_chars: int = 0  # drop shorter documents
    long_doc_chars: int = 0  # documents at least this long are repeated `long_doc_repeat` times per epoch
    long_doc_repeat: int = 1

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, ("files", "stdlib"))
        check_choice(f"{key}.format", self.format, ("text", "chat"))
        if self.kind == "files" and not self.paths:
            raise ConfigError(f"{key}.paths is empty (a 'files' source needs at least one file, folder or glob)")
        if self.weight <= 0:
            raise ConfigError(f"{key}.weight must be > 0, got {self.weight}")
        if self.long_doc_repeat < 1 or self.min_chars < 0 or self.long_doc_chars < 0:
            raise ConfigError(f"{key}: min_chars, long_doc_chars must be >= 0 and long_doc_repeat >= 1")


@dataclass
class DataConfig:
    """Where training text comes from, how it is tokenized and packed."""

    paths: list[str] = field(default_factory=list)  # shorthand for one 'files' source; overrides `sources`
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(kind="stdlib")])
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    eos_token: Optional[str] = None  # end-of-document token of a tokenizer.json (default: found by name)
    seq_len: int = 256
    batch_size: int = 8
    num_workers: int = 1
    # Batches each worker may have ready. Batches are taken from the workers in turn (a timing-independent order,
    # for exact resume), so a worker whose documents tokenize faster stalls once it is this far ahead.
    prefetch_factor: int = 8
    shuffle_buffer: int = 64  # documents held for the seeded shuffle within each shard
    val_fraction: float = 0.02  # share of records held out (deterministic, by name + position hash)
    val_samples: int = 64  # packed validation sequences (split evenly over ranks)
    document_masking: bool = False  # emit doc_ids so SWA and retrieval never cross document boundaries
    align_docs_to_chunks: bool = False  # pad each document to a multiple of model.chunk_size (a chunk = one document)
    skip_bad_records: bool = False  # skip and count malformed records instead of stopping with file:line
    synthetic_fraction: float = 0.0  # share of windows turned into a retrieval task over their own text (paper: 1%)
    synthetic_tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multiquery", "vt"])
    # ours: the tasks of data_modules/synthetic.py over the window's own text; ruler: NVIDIA RULER's tasks as
    # `main.py eval --suite ruler` builds them (data_modules/ruler_tasks.py; synthetic_tasks then names RULER tasks,
    # e.g. [niah_single_1, niah_multikey_2, niah_multiquery, vt]), to train on the format a model is scored on
    synthetic_format: str = "ours"
    answer_only_loss: bool = False  # synthetic windows: loss on the answer tokens only (authors: every token)
    # Loss weight of retrieval-task answer tokens (a few among thousands of text tokens); self_copy keeps weight 1.
    answer_loss_weight: float = 1.0
    seed: int = 1234

    def resolved_sources(self) -> list[SourceConfig]:
        return [SourceConfig(kind="files", paths=list(self.paths))] if self.paths else list(self.sources)

    def validate(self) -> None:
        if not self.resolved_sources():
            raise ConfigError("data.sources is empty")
        for i, src in enumerate(self.resolved_sources()):
            src.validate("data.paths" if self.paths else f"data.sources[{i}]")
        for key in ("seq_len", "batch_size", "val_samples", "shuffle_buffer", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ConfigError(f"data.synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.answer_loss_weight <= 0:
            raise ConfigError(f"data.answer_loss_weight must be > 0, got {self.answer_loss_weight}")
        check_choice("data.synthetic_format", self.synthetic_format, SYNTHETIC_FORMATS)
        for task in self.synthetic_tasks:
            check_choice("data.synthetic_tasks", task, TASKS if self.synthetic_format == "ours" else tuple(RULER_TASKS))


def parse_length(text: str | int) -> int:
    """A length in tokens: '4k' → 4096, '1m' → 1048576, '300' or 300 → 300; a bad one is a ``ValueError``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    text = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"bad length '{text}': use a number with an optional k or m suffix") from None


@dataclass
class RetrievalEvalOptions:
    """One retrieval evaluation (tasks × lengths × depths, ``samples`` each), checked by one set of rules wherever it
    comes from: ``main.py eval``'s options, an experiment's ``eval`` section, the in-training probe
    (``trainer.eval_*``). ``names`` maps each field to the key the user wrote, so a message names it (``--lengths``,
    ``eval.lengths``, ``trainer.eval_lengths``)."""

    MIN_LENGTH = 64  # below this no task fits its needle, question and answer in any tokenizer

    tasks: list[str]
    lengths: list[int | str]  # tokens, or strings with k/m suffixes
    depths: Optional[list[float]] = None  # None: drawn at random per sample
    samples: int = 1
    segment_size: int = 4096
    names: dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.names.get(name, name)

    def token_lengths(self) -> list[int]:
        """The lengths in tokens; a malformed one is a ConfigError naming its key."""
        try:
            return [parse_length(n) for n in self.lengths]
        except ValueError as e:
            raise ConfigError(f"{self.key('lengths')}: {e}") from None

    def validate(self) -> "RetrievalEvalOptions":
        for task in self.tasks:
            check_choice(self.key("tasks"), task, TASKS)
        short = [n for n in self.token_lengths() if n < self.MIN_LENGTH]
        if short:
            raise ConfigError(f"{self.key('lengths')} must be >= {self.MIN_LENGTH} tokens, got {short[0]}")
        if self.depths is not None and (not self.depths or any(not 0 <= d <= 1 for d in self.depths)):
            raise ConfigError(f"{self.key('depths')} must be non-empty and lie in [0, 1], got {self.depths}")
        for name in ("samples", "segment_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.key(name)} must be >= 1, got {getattr(self, name)}")
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # linear warm-up, then constant | cosine (to min_lr at trainer.max_steps)
    # [[pattern, scale], ...]: parameters whose name (as the LightningModule's `named_parameters()` gives it)
    # matches the regex `pattern` train at lr × scale (the first match wins; the schedule scales every group alike),
    # e.g. the parts a dense → HSA conversion adds: [['retrieval|memory|upper\.\d+\.(o_proj|gate)', 10]]
    lr_scale: list[list[Any]] = field(default_factory=list)

    def validate(self) -> None:
        check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        for entry in self.lr_scale:
            if len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], (int, float)) \
                    or isinstance(entry[1], bool) or entry[1] <= 0:
                raise ConfigError(f"optim.lr_scale entries are [pattern, scale > 0], got {list(entry)}")
            try:
                re.compile(entry[0])
            except re.error as e:
                raise ConfigError(f"optim.lr_scale: bad pattern '{entry[0]}': {e}") from None
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainerConfig:
    max_steps: int = 300
    max_time: Optional[str] = None  # also stop after this wall time, "DD:HH:MM:SS" (Lightning's format)
    accelerator: str = "auto"
    devices: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    val_check_interval: int = 100  # steps between validations
    limit_val_batches: int = 8
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    root_dir: str = "runs"
    run_name: str = "default"
    seed: int = 1234
    deterministic: bool = False
    enable_progress_bar: bool = True
    strategy: str = "auto"  # auto (one device / DDP) | ddp | fsdp (FSDP2 fully_shard per block, ModelParallelStrategy)
    num_nodes: int = 1
    # ranks that split one sequence (context parallelism, docs/scaling.md): groups of N consecutive ranks read the
    # same batches and each holds seq_len / N contiguous tokens of them; data parallel over the devices / N groups
    context_parallel: int = 1
    activation_checkpointing: bool = False  # recompute each block in backward (long sequences)
    compile: bool = False  # torch.compile each block
    nan_policy: str = "stop"  # non-finite loss or gradient norm: stop (with a message) | skip the optimizer step
    max_consecutive_nonfinite: int = 5  # nan_policy=skip: stop with a message after this many skipped steps in a row
    retrieval_stats_every: int = 50  # steps between retrieval statistics + heat-map (HSA models)
    topk_schedule: list[list[int]] = field(default_factory=list)  # [[step, topk], ...], e.g. dense → sparse
    swa_window_schedule: list[list[int]] = field(default_factory=list)  # [[step, window], ...]
    # [[step, seq_len], ...]: context-length curriculum; batch size follows at data.batch_size × data.seq_len tokens
    seq_len_schedule: list[list[int]] = field(default_factory=list)
    eval_every_n_steps: int = 0  # in-training retrieval eval (0: off)
    eval_tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multiquery"])
    eval_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    eval_samples: int = 2  # per task × length (depth drawn at random)

    def retrieval_eval(self) -> RetrievalEvalOptions:
        """The in-training retrieval probe's options (depth drawn at random per sample)."""
        return RetrievalEvalOptions(self.eval_tasks, self.eval_lengths, None, self.eval_samples,
                                    names={k: f"trainer.eval_{k}" for k in ("tasks", "lengths", "samples")})

    def validate(self) -> None:
        check_choice("trainer.nan_policy", self.nan_policy, ("stop", "skip"))
        check_choice("trainer.strategy", self.strategy, ("auto", "ddp", "fsdp"))
        for key in ("topk_schedule", "swa_window_schedule", "seq_len_schedule"):
            entries = getattr(self, key)
            if any(len(e) != 2 or e[0] < 0 or e[1] < 1 for e in entries):
                raise ConfigError(f"trainer.{key} must be [[step, value], ...] with step >= 0 and value >= 1")
            if [e[0] for e in entries] != sorted(e[0] for e in entries):
                raise ConfigError(f"trainer.{key} steps must be increasing")
        if self.eval_every_n_steps < 0:
            raise ConfigError(f"trainer.eval_every_n_steps must be >= 0, got {self.eval_every_n_steps}")
        self.retrieval_eval().validate()
        self._validate_context_parallel()
        for key in ("max_steps", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps",
                    "checkpoint_every_n_steps", "retrieval_stats_every", "max_consecutive_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")

    def _validate_context_parallel(self) -> None:
        n = self.context_parallel
        if n < 1:
            raise ConfigError(f"trainer.context_parallel must be >= 1, got {n}")
        if n == 1:
            return
        if not str(self.devices).isdigit():
            raise ConfigError(f"trainer.context_parallel={n} needs trainer.devices as a number of devices per node, "
                              f"got '{self.devices}'")
        devices = int(self.devices) * self.num_nodes
        if devices % n:
            raise ConfigError(f"trainer.context_parallel ({n}) must divide the number of devices (trainer.devices × "
                              f"trainer.num_nodes = {devices})")


@dataclass
class FinetuneConfig:
    """Fine-tuning of a trained checkpoint (``init_from``): ``none`` = ordinary training, ``full`` = every weight
    trains, ``lora`` = the checkpoint's weights are frozen and low-rank adapters (``lit_hsa/model/lora.py``) train on
    the module groups in ``lora_targets`` (see ``LORA_TARGETS``)."""

    method: str = "none"  # none | full | lora
    lora_rank: int = 16
    lora_alpha: float = 32.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "retrieval"])
    lora_base_dtype: str = "fp32"  # fp32 | bf16: frozen base matrices in bf16, half their memory (bf16 precision)

    def validate(self, cfg: "Config") -> None:
        check_choice("finetune.method", self.method, FINETUNE_METHODS)
        for target in self.lora_targets:
            check_choice("finetune.lora_targets", target, LORA_TARGETS)
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("finetune: lora_rank must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
        if self.method != "none" and not (cfg.init_from or cfg.ckpt_path):
            raise ConfigError(f"finetune.method={self.method} fine-tunes a trained model: set init_from=<checkpoint> "
                              "(or ckpt_path=<fine-tuning checkpoint> to resume)")
        if self.method == "lora" and not self.lora_targets:
            raise ConfigError(f"finetune.lora_targets is empty; choose from {', '.join(LORA_TARGETS)}")
        check_choice("finetune.lora_base_dtype", self.lora_base_dtype, ("fp32", "bf16"))
        if self.lora_base_dtype == "bf16" and (self.method != "lora" or not cfg.trainer.precision.startswith("bf16")):
            raise ConfigError("finetune.lora_base_dtype=bf16 keeps a LoRA run's frozen base in bf16: it needs "
                              f"finetune.method=lora and a bf16 trainer.precision, got {self.method} and "
                              f"{cfg.trainer.precision}")
        if self.method == "lora" and cfg.trainer.strategy == "fsdp":
            raise ConfigError("finetune.method=lora runs on one device (or DDP), not with trainer.strategy=fsdp")


@dataclass
class Config:
    """Everything one run needs; ``configs/*.yaml`` files are partial views of this."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ckpt_path: Optional[str] = None  # resume a run (model, optimizer, scheduler, data position)
    init_from: Optional[str] = None  # start from a checkpoint's weights only (next training stage, fine-tuning)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.trainer.validate()
        chunked = self.model.attention == "hsa" or self.data.align_docs_to_chunks
        if chunked and self.data.seq_len % self.model.chunk_size:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) must be a multiple of model.chunk_size ({self.model.chunk_size})"
            )
        if self.model.attention == "hsa" and self.data.document_masking and not self.data.align_docs_to_chunks:
            raise ConfigError("data.document_masking with model.attention=hsa needs data.align_docs_to_chunks=true: "
                              "a chunk straddling two documents is encoded across both, so no document may retrieve it")
        self._validate_seq_len_schedule()
        self._validate_context_parallel()
        for key in ("ckpt_path", "init_from"):
            if getattr(self, key) is not None and not Path(getattr(self, key)).exists():
                raise ConfigError(f"{key} '{getattr(self, key)}' does not exist")
        if self.init_from is not None and Path(self.init_from).is_dir():
            raise ConfigError(f"init_from '{self.init_from}' is a sharded checkpoint folder; "
                              "make one file with `python main.py consolidate` first")
        # A LoRA resume may name both: init_from is then the frozen base the adapters were trained on.
        if self.ckpt_path and self.init_from and self.finetune.method != "lora":
            raise ConfigError("set either ckpt_path (full resume) or init_from (weights only), not both")
        self.finetune.validate(self)

    def _validate_seq_len_schedule(self) -> None:
        chunked = self.model.attention == "hsa" or self.data.align_docs_to_chunks
        for _, seq_len in self.trainer.seq_len_schedule:
            if chunked and seq_len % self.model.chunk_size:
                raise ConfigError(f"trainer.seq_len_schedule: seq_len {seq_len} must be a multiple of "
                                  f"model.chunk_size ({self.model.chunk_size})")
        try:
            seq_len_stages(self.trainer.seq_len_schedule, self.data.seq_len, self.data.batch_size)
        except DataError as e:
            raise ConfigError(str(e)) from None

    def _validate_context_parallel(self) -> None:
        n = self.trainer.context_parallel
        if n == 1:
            return
        # a slice of an HSA model's sequence holds whole chunks: the rank holding a chunk encodes it
        unit, what = (n * self.model.chunk_size, f"trainer.context_parallel × model.chunk_size = {n} × "
                      f"{self.model.chunk_size}") if self.model.attention == "hsa" else (n, "trainer.context_parallel")
        for key, seq_len in [("data.seq_len", self.data.seq_len),
                             *(("trainer.seq_len_schedule", s) for _, s in self.trainer.seq_len_schedule)]:
            if seq_len % unit:
                raise ConfigError(f"{key}: seq_len {seq_len} must be a multiple of {what} = {unit}")
        if self.model.aux_loss_coef > 0:  # each rank's would be its slice's balance loss, not the sequence's
            raise ConfigError(f"trainer.context_parallel={n} does not run the MoE aux loss (model.aux_loss_coef="
                              f"{self.model.aux_loss_coef:g}): set it to 0 (balancing by expert bias still runs)")

    def to_dict(self) -> dict:
        return asdict(self)


def load_yaml(path: str):
    """A YAML file as an OmegaConf node; a missing file or a syntax error is one ConfigError naming the file."""
    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return with_config_dir(OmegaConf.load(path), Path(path).resolve().parent)
    except Exception as e:  # yaml syntax errors come in many types; report the file and the parser's first line
        mark = getattr(e, "problem_mark", None)
        if mark is not None:  # PyYAML's MarkedYAMLError: where the parser gave up, and what it was reading then
            start = getattr(e, "context_mark", None)
            context = f" ({e.context} at line {start.line + 1}, column {start.column + 1})" if start else ""
            raise ConfigError(f"config file '{path}' is not valid YAML: line {mark.line + 1}, column "
                              f"{mark.column + 1}: {e.problem}{context}") from None
        key = f" (key '{e.full_key}')" if getattr(e, "full_key", None) else ""  # OmegaConf's own parse errors
        raise ConfigError(f"config file '{path}' is not valid YAML{key}: {str(e).splitlines()[0]}") from e


CONFIG_DIR = "${config_dir:}"  # in a config file's strings: that file's folder (files that travel with their data)


def with_config_dir(node, folder: Path):
    """``node`` with ``${config_dir:}`` in its strings replaced by ``folder`` (other interpolations left alone)."""
    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value.replace(CONFIG_DIR, str(folder)) if isinstance(value, str) else value

    raw = OmegaConf.to_container(node, resolve=False)
    return OmegaConf.create(walk(raw)) if CONFIG_DIR in repr(raw) else node


# A model section holding these describes a whole network by itself: its name need not be a preset.
MODEL_SHAPE_KEYS = frozenset({"vocab_size", "d_model", "n_lower_layers", "n_groups", "swa_layers_per_group", "n_heads",
                              "n_kv_heads", "head_dim", "attention", "ffn_hidden", "moe"})


def load_config(path: str | list[str] | None = None, overrides: list[str] | None = None, base: Any = None) -> Config:
    """Merge YAML files (``path``: one, or several merged in order, later keys winning; or ``base``: a dict /
    OmegaConf node of the same shape, e.g. a section of an experiment file) and ``dotted.key=value`` overrides onto
    the schema; validate; return a ``Config``.

    The model preset is chosen first (``model.name`` from the overrides, else the files, else ``tiny``) and the
    remaining ``model.*`` keys override it. A name that is no preset is accepted when the files give every key of
    ``MODEL_SHAPE_KEYS`` (as the ``.yaml`` that ``main.py convert`` writes beside its checkpoint does; keys left out
    take the schema's defaults). Raises ``ConfigError`` with a
    one-line message naming the bad key.
    """
    paths = [path] if isinstance(path, str) else list(path or [])
    file_cfg = (OmegaConf.merge(*(load_yaml(p) for p in paths)) if paths
                else OmegaConf.create(base if base is not None else {}))
    cli_cfg = parse_overrides(overrides)
    preset = str(OmegaConf.select(cli_cfg, "model.name") or OmegaConf.select(file_cfg, "model.name") or "tiny")
    given = set(OmegaConf.select(file_cfg, "model") or {}) | set(OmegaConf.select(cli_cfg, "model") or {})
    complete = preset not in PRESETS and given >= MODEL_SHAPE_KEYS
    model = ModelConfig(name=preset) if complete else ModelConfig.from_name(preset)
    schema = OmegaConf.structured(Config(model=model))
    cfg: Config = merge_onto(schema, file_cfg, overrides=overrides,
                             unknown_key=lambda key: f"unknown config key '{key}'{_suggest_key(key)}")
    cfg.validate()
    return cfg


def parse_overrides(overrides: list[str] | None):
    """``dotted.key=value`` strings → an OmegaConf node; an item without ``=`` is one ConfigError."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like dotted.key=value")
    return OmegaConf.from_dotlist(list(overrides or []))


def merge_onto(schema, *nodes, overrides: list[str] | None = None, unknown_key: Callable[[str], str]):
    """Merge ``nodes`` onto a structured ``schema``, then apply ``dotted.key=value`` ``overrides`` one by one by key
    path (so list items can be addressed: ``phases.1.max_steps=5``, ``data.sources.0.weight=2``) → its dataclass.
    An unknown key is one ConfigError with the message ``unknown_key(full key)``; a value of the wrong type names
    its key."""
    parse_overrides(overrides)  # an item without '=' is one ConfigError
    key = None
    try:
        schema = schema.copy()
        writable(schema)  # (OmegaConf 2.3 refuses to merge a file's values onto a frozen dataclass's nodes)
        node = OmegaConf.merge(schema, *nodes)
        for item in overrides or []:
            key = item.split("=", 1)[0]
            check_list_indices(node, key)
            OmegaConf.update(node, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), merge=True)
        return OmegaConf.to_object(node)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ConfigError(unknown_key(e.full_key or key or str(e.key))) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for '{e.full_key or key}': {str(e).splitlines()[0]}") from None


def check_list_indices(node, key: str) -> None:
    """An override's path may index a list only within its length (OmegaConf would try to add an empty item)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = OmegaConf.select(node, ".".join(parts[:i + 1]), throw_on_missing=False)
        if isinstance(child, ListConfig) and parts[i + 1].isdigit() and int(parts[i + 1]) >= len(child):
            raise ConfigError(f"override '{key}': {'.'.join(parts[:i + 1])} has {len(child)} item(s), "
                              f"indices 0..{len(child) - 1}")


def writable(node) -> None:
    """Clear the read-only flag that frozen dataclasses (``ModelConfig``) put on their nodes (containers and, in
    OmegaConf 2.3, each value too), throughout ``node``: files and overrides are merged into the schema's tree before
    it becomes the (frozen) dataclasses again."""
    OmegaConf.set_readonly(node, False)
    if isinstance(node, (DictConfig, ListConfig)) and not node._is_none() and not node._is_missing():
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            writable(node._get_node(key))  # (the node itself: reading the value would resolve interpolations)


def save_config(cfg: Config, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), str(path))

def _suggest_key(full_key: str) -> str:
    """The closest valid key in the same section of the schema (list items like ``data.sources[0].x`` included)."""
    parts = re.sub(r"\[\d+\]", "", full_key).split(".")
    cls = Config
    for name in parts[:-1]:
        hint = typing.get_type_hints(cls).get(name)
        hint = (typing.get_args(hint) or (hint,))[0] if typing.get_origin(hint) is list else hint
        if not is_dataclass(hint):
            return ""
        cls = hint
    close = difflib.get_close_matches(parts[-1], [f.name for f in fields(cls)], n=1)
    prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def padded_vocab(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)
