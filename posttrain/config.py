"""The pipeline configuration: one pydantic model per stage section, validated on load.

    cfg = load_config("configs/demo.yaml", overrides=["sft.max_steps=100"])

Unknown keys and bad values raise `ConfigError` with a one-line message naming the key
(`sft.lr: Input should be a valid number`). Nothing here imports torch or any stage code, so a
config can be checked in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the file and key."""


class Section(BaseModel):
    # extra="forbid": a typo such as `sft.learning_rte` must fail, not be silently ignored.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def outside_inputs(self) -> dict[str, "OutsideInput"]:
        """What the section's stage reads from outside the store (files, folders, hub ids), by a
        name for the key and for error messages. Sections that read nothing from outside: {}."""
        return {}


# A field whose value changes how a stage runs but not what it produces carries this marker; the
# cache key (posttrain.fingerprint) leaves it out, so e.g. switching the launcher is not a rebuild.
NOT_IN_KEY = {"cache_key": False}


class OutsideInput(NamedTuple):
    """A path (file or folder, hashed by content) or a hub id (entered by its resolved commit)."""

    kind: Literal["path", "hub_model", "hub_dataset"]
    name: str
    revision: str | None = None


# Suffixes that make a source path a local file even when it does not exist (then: "no such file").
LOCAL_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".gz")


# ----------------------------------------------------------------------------- runtime and tracking


class RuntimeConfig(Section):
    """Where and how stages execute. Not part of any fingerprint (see docs/reliability.md): the
    same work on another device or thread count is the same artifact; the manifest records where
    it was built."""

    threads: int = Field(1, ge=1, description="torch intra-op threads; 1 is fastest for tiny models on a busy 2-core box")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where stages put their models; auto: cuda when available")
    parallel_stages: int = Field(
        8, ge=1, description="stages in flight at once: cache hits (their logging) and stages on a pool's workers overlap; "
        "stages built here run one at a time (a stage waiting for its turn holds one of these places); 1: the plan's order, one by one",
    )


class TrackingConfig(Section):
    enabled: bool = True
    artifact_location: str | None = Field(
        None, description="where a new experiment keeps its artifacts, e.g. s3://bucket/mlflow; null: <store_root>/mlartifacts, or the server's default",
    )
    uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite file under the store root")
    experiment: str = "posttrain"
    log_models: bool = Field(True, description="upload model folders as MLflow artifacts (off: register references to the store folders)")
    registered_model: str | None = Field(None, description="registered model every model of the run is a version of; null: the run name")


class LauncherConfig(Section):
    """How a training stage is executed: inside the flow's process, as `python -m tasks.<stage>`, or
    as one process per device with DDP (posttrain.runner.launch_command)."""

    kind: Literal["auto", "inprocess", "subprocess", "distributed", "deployment"] = Field(
        "auto", description="auto: distributed over the visible CUDA devices when there are several (sft), else in-process; "
        "distributed: `accelerate launch --multi_gpu` on GPUs, torch.distributed.run with gloo on CPUs; "
        "deployment: a flow run on a worker of `pool` (flows/stage_flow.py), through shared_store",
    )
    pool: str | None = Field(None, description="deployment: the Prefect work pool whose worker runs the stage (posttrain worker --pool NAME)")
    # Prefix for the subprocess command, e.g. ["accelerate", "launch", "--num_processes", "8"].
    command: list[str] = Field(default_factory=lambda: ["python"])
    processes: int | None = Field(None, ge=1, description="distributed: how many processes; null: one per visible CUDA device")


def checkpoint_field() -> int:
    # Not in the key: a resumed run gives the same bytes as an uninterrupted one (tests/flows/test_resume.py).
    return Field(
        200, ge=0, json_schema_extra=NOT_IN_KEY,
        description="save weights, optimizer, scheduler, RNG and step every N optimizer steps under "
        "<store_root>/checkpoints/<stage>/<fingerprint>; a later run of the same work resumes from the newest; 0: off",
    )


def launcher_field() -> LauncherConfig:
    return Field(default_factory=LauncherConfig, json_schema_extra=NOT_IN_KEY)


# ----------------------------------------------------------------------------- base model


class TinyModelConfig(Section):
    """A Llama-architecture model built from a config (no download); ~0.1M params by default."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    # 192, not 176: bitsandbytes' CPU 4-bit kernels need in/out features divisible by 64/32.
    intermediate_size: int = 192
    max_position_embeddings: int = 256


class ModelConfig(Section):
    seed: int | None = Field(None, description="initialisation seed of the tiny model; null: the top-level seed")
    name_or_path: str | None = Field(None, description="HF model id or local folder; null builds the tiny demo model")
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def outside_inputs(self) -> dict[str, OutsideInput]:
        if self.name_or_path is None:
            return {}
        if Path(self.name_or_path).exists() or self.name_or_path.startswith((".", "/", "~")):
            return {"model.name_or_path": OutsideInput("path", self.name_or_path)}
        return {"model.name_or_path": OutsideInput("hub_model", self.name_or_path, self.revision)}

    def check_local_folder(self) -> None:
        """A local model folder holds what every stage loads: config.json, a tokenizer, and weights
        as safetensors (a pickle checkpoint is refused here, by name, never opened)."""
        folder = Path(self.name_or_path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder (a model is a folder with config.json, tokenizer and *.safetensors)")
        names = {path.name for path in folder.iterdir()}
        if "config.json" not in names:
            raise ValueError(f"{folder}: no config.json in the model folder")
        if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"}:
            raise ValueError(f"{folder}: no tokenizer in the model folder (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)")
        if not any(name.endswith(".safetensors") for name in names):
            pickles = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
            if pickles:
                raise ValueError(
                    f"{folder}: weights only as a pickle checkpoint ({pickles[0]}), refused unopened: "
                    "a pickle can run code when loaded; save the model with safetensors"
                )
            raise ValueError(f"{folder}: no weights in the model folder (*.safetensors)")


# ----------------------------------------------------------------------------- data


class GenerateConfig(Section):
    """The demo generator: verifiable skills with planted noise so cleaning and dedup have work."""

    kind: Literal["skills"] = "skills"
    rows: int = Field(20000, ge=1)
    seed: int = 0
    skills: list[str] | None = Field(None, description="subset of skills; null = all")
    exact_duplicates: float = Field(0.03, ge=0, le=1, description="fraction of rows planted as exact copies")
    near_duplicates: float = Field(0.03, ge=0, le=1, description="fraction planted as spacing/case/punctuation variants")
    empty: float = Field(0.005, ge=0, le=1)
    overlong: float = Field(0.005, ge=0, le=1)


# Record schemas a source can hold, and the role (output layout) each one becomes. `instruction`,
# `preference` and `prompt` are the pipeline's own layouts ({prompt, response} etc.).
SOURCE_FORMAT_ROLES = {
    "alpaca": "instruction",  # instruction, input, output
    "messages": "instruction",  # messages: [{role, content}, ...], the last assistant turn is the response
    "instruction": "instruction",  # prompt, response
    "preference": "preference",  # prompt, chosen, rejected
    "hh": "preference",  # chosen, rejected: full "\n\nHuman: … \n\nAssistant: …" transcripts
    "prompt": "prompt",  # prompt, answer
}
# The fields of each format that `fields:` may rename (format field -> the source's column name).
SOURCE_FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages", "role", "content"),
    "instruction": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "prompt": ("prompt", "answer"),
}


class SourceConfig(Section):
    """One input of the data stage: a file, a folder or a dataset id (`path`), or generated rows.

        - {path: ../shared/realdata/alpaca/alpaca_data.json.gz, format: alpaca}
        - {path: data/chats.parquet, format: messages, fields: {messages: conversation}}
        - {path: Anthropic/hh-rlhf, type: hub, split: test, format: hh}
        - {role: instruction, generate: {rows: 20000}}

    `format` is the record schema; `role` (the output layout) follows from it, or `format` from
    `role` when only the role is given (the pipeline's own layout). `type` is the container and is
    inferred from the path when left out: .jsonl/.ndjson (JSON lines), .json (a JSON array, or JSON
    lines when the file does not start with "["), .parquet, .csv — each optionally .gz — a folder
    written by `datasets.save_to_disk` (`disk`), and anything else (a dataset id or a folder of
    data files) goes to `datasets.load_dataset` (`hub`).
    """

    path: str | None = None
    format: Literal["alpaca", "messages", "instruction", "preference", "hh", "prompt"] | None = None
    role: Literal["instruction", "preference", "prompt"] | None = None
    type: Literal["jsonl", "json", "parquet", "csv", "disk", "hub"] | None = Field(
        None, description="container type; null: inferred from the path"
    )
    split: str | None = Field(None, description="split of a `disk` DatasetDict or a `hub` dataset; null: train")
    revision: str | None = Field(None, description="hub datasets: branch, tag or commit (resolved to a commit for the cache key)")
    fields: dict[str, str] = Field(default_factory=dict, description="format field -> column name in this source")
    generate: GenerateConfig | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.path is None) == (self.generate is None):
            raise ValueError("give exactly one of `path` or `generate`")
        if self.generate is not None:
            if self.role is None:
                raise ValueError("a generated source needs `role`")
            if self.format not in (None, self.role) or self.type or self.split or self.fields:
                raise ValueError("a generated source takes only `role` and `generate`")
        if self.format is None and self.role is None:
            raise ValueError("give `format` (alpaca, messages, instruction, preference, hh, prompt) or `role`")
        implied = SOURCE_FORMAT_ROLES[self.format] if self.format else self.role
        if self.role is not None and self.role != implied:
            raise ValueError(f"format {self.format!r} makes {implied} rows, not {self.role}")
        self.role = implied
        self.format = self.format or self.role
        unknown = sorted(set(self.fields) - set(SOURCE_FORMAT_FIELDS[self.format]))
        if unknown:
            raise ValueError(f"fields: {unknown[0]!r} is not a field of format {self.format} {SOURCE_FORMAT_FIELDS[self.format]}")
        return self

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"generated-{self.role}"

    def outside_input(self) -> OutsideInput | None:
        """None for generated rows (the config says everything); a local path by content; a
        dataset id by its commit."""
        if self.path is None:
            return None
        local = Path(self.path).exists() or self.type in ("jsonl", "json", "parquet", "csv", "disk")
        if local or self.path.lower().endswith(LOCAL_FILE_SUFFIXES) or self.path.startswith((".", "/", "~")):
            return OutsideInput("path", self.path)
        return OutsideInput("hub_dataset", self.path, self.revision)


class NearDupConfig(Section):
    """MinHash LSH over the lower-cased dedup key; candidate pairs are confirmed by exact Jaccard.

    Defaults measured on the demo's short skill rows (20k rows, 3 % planted variants such as
    "REVERSE  abc." of "reverse abc"): stripping punctuation is what catches the variants (char
    3-shingles at 0.8 on the raw lower-cased text caught 5 %); char 5-shingles at 0.85 then merge
    0.5 % of distinct rows ("max 2 2 8 0" vs "max 2 2 8"), char 3-shingles at 0.8 merged 4.4 %.
    """

    enabled: bool = True
    threshold: float = Field(0.85, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1, le=64)
    shingle_unit: Literal["char", "word"] = "char"
    strip_punctuation: bool = Field(True, description="replace punctuation by spaces before shingling")
    backend: Literal["numpy", "datasketch"] = Field(
        "numpy", description="numpy: vectorised, ≈ 25x datasketch end to end on Alpaca (bench/dedup.py); datasketch: the reference"
    )


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    max_tokens: int = Field(96, ge=8, description="rows longer than this (prompt+response, run tokenizer) are dropped")
    min_response_chars: int = Field(1, ge=0)
    scrub_pii: list[Literal["email", "phone", "ip"]] = Field(
        default_factory=list, description="replace these by <EMAIL>, <PHONE>, <IP> (counted per kind); [] = off"
    )
    dedup_key: list[str] = Field(
        default_factory=lambda: ["prompt", "response"],
        description="fields joined for exact and near dedup; `response` means chosen/answer for other roles",
    )
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    decontaminate: bool = True
    decontaminate_ngram: int = Field(13, ge=1, description="word n-gram shared with a benchmark prompt = contaminated")
    decontaminate_min_words: int = Field(
        8, ge=1, description="benchmark prompts shorter than ngram words match as a whole word sequence if at least this long; shorter ones only exactly"
    )
    eval_fraction: float = Field(0.02, gt=0, lt=1)
    seed: int = 0
    contract_suites: bool = True
    batch_rows: int = Field(
        4096, ge=1, description="rows read, cleaned and deduplicated at a time (memory only: the output is the same)", json_schema_extra=NOT_IN_KEY
    )
    workers: int = Field(
        0,
        ge=0,
        description="processes that clean, filter and sketch batches (0: one per CPU; 1: all in the stage's process); the output is the same",
        json_schema_extra=NOT_IN_KEY,
    )

    def outside_inputs(self) -> dict[str, OutsideInput]:
        found = {}
        for index, source in enumerate(self.sources):
            item = source.outside_input()
            if item is not None:
                found[f"data.sources[{index}]"] = item
        return found

    @field_validator("dedup_key")
    @classmethod
    def _known_dedup_fields(cls, fields: list[str]) -> list[str]:
        known = {"prompt", "response", "chosen", "rejected", "answer"}
        if not fields or len(set(fields)) != len(fields):
            raise ValueError("give one or more distinct field names")
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a row field ({', '.join(sorted(known))})")
        return fields


# ----------------------------------------------------------------------------- benchmarks


BENCHMARK_TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "benchmarks"
DEMO_SKILL_TASKS = ("copy", "reverse", "sort", "upper", "max", "add")


def benchmark_task_file(name_or_path: str) -> Path:
    """A task by name (configs/benchmarks/<name>.yaml) or by the path of its YAML file."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else BENCHMARK_TASKS_DIR / f"{name_or_path}.yaml"


class BenchmarksConfig(Section):
    """Which benchmark tasks the run scores: each one a YAML file (posttrain.benchmarks)."""

    tasks: list[str] = Field(default_factory=lambda: list(DEMO_SKILL_TASKS), min_length=1)
    items: int | None = Field(None, ge=1, description="scored items per task; null: each task's own `items`")
    calibration_items: int = Field(50, ge=0, description="items per task, disjoint from the scored ones, for temperature scaling")

    def outside_inputs(self) -> dict[str, OutsideInput]:
        """Each task file by content, and the data file it reads (a path relative to the repository root)."""
        found = {}
        for index, name in enumerate(self.tasks):
            path = benchmark_task_file(name)
            found[f"benchmarks.tasks[{index}]"] = OutsideInput("path", str(path))
            try:
                source = (yaml.safe_load(path.read_text()) or {}).get("source", {}) if path.is_file() else {}
            except yaml.YAMLError:
                source = {}  # the benchmarks stage reports the file's error with its line
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                found[f"benchmarks.tasks[{index}].source"] = OutsideInput("path", source["path"])
        return found


# ----------------------------------------------------------------------------- training stages


class LoraConfig(Section):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class SftConfig(Section):
    seed: int | None = Field(None, description="null: the pipeline's top-level seed")
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="qlora: LoRA on a 4-bit NF4 copy of the base (bitsandbytes; needs a CUDA GPU), merged into the full-precision base"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    max_steps: int = Field(2500, ge=1, description="optimizer steps; ignored when `epochs` is given")
    epochs: float | None = Field(None, gt=0, description="passes over the training rows; the steps follow from the data size and the global batch")
    batch_size: int = Field(64, ge=1, description="rows per device per forward (the micro-batch; on several devices it shrinks to fit the global batch)")
    global_batch: int | None = Field(
        None, ge=1, description="rows per optimizer step, the same on any number of devices; null: batch_size x grad_accum. "
        "Gradient accumulation = global_batch / (micro-batch x devices)",
    )
    grad_accum: int = Field(1, ge=1, description="used when global_batch is not given")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = 0.0
    max_length: int = Field(96, ge=8)
    batching: Literal["padded", "padding_free", "packed"] = Field(
        "padded",
        description="padded: rows padded to the longest in the batch; padding_free: a batch's rows laid end to end, "
        "positions restarting per row, no attention across rows; packed: rows packed best-fit into max_length bins, then padding-free",
    )
    train_on: Literal["all", "last"] = Field("all", description="assistant turns the loss covers in a multi-turn chat")
    eval_rows: int = Field(512, ge=0, description="eval-split rows scored for eval loss at the end")
    checkpoint_every: int = checkpoint_field()
    launcher: LauncherConfig = launcher_field()


class RewardConfig(Section):
    seed: int | None = Field(None, description="null: the pipeline's top-level seed")
    init_from: Literal["sft", "base"] = "sft"
    method: Literal["full", "lora"] = Field("full", description="lora: a LoRA adapter on the body (the score head trains fully), merged on save")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    head: Literal["classifier", "likelihood"] = Field(
        "classifier", description="classifier: a one-output score head on the last token; likelihood: the causal LM itself, r = a·Σ log p(sequence) + b (posttrain.models.LikelihoodRewardModel)"
    )
    reference: bool = Field(False, description="head likelihood only: subtract a frozen copy of the initial LM's log-likelihood (DPO's implicit reward)")
    # Defaults for the classifier head, measured on 1 CPU thread from the demo's 0.1M SFT model: ~50 s;
    # held-out pairwise accuracy 0.72-0.74 over seeds 0-2 on 1,000 fresh sort/add pairs; head: likelihood
    # with lr 3e-4 gives 0.94 in every seed (docs/benchmarks.md, "The reward model").
    max_steps: int = Field(800, ge=1)
    batch_size: int = Field(64, ge=1, description="preference pairs per step (2x sequences)")
    lr: float = Field(1e-3, gt=0)
    max_length: int = Field(96, ge=8, description="pairs longer than this (tokens) are dropped, not truncated")
    checkpoint_every: int = checkpoint_field()
    launcher: LauncherConfig = launcher_field()


class DpoConfig(Section):
    seed: int | None = Field(None, description="null: the pipeline's top-level seed")
    # Demo defaults, measured on 1 CPU thread from a 0.1M SFT model: ~0.075 s/step. Plain DPO
    # (sft_weight 0) with them cut a 95 %-skilled SFT model to 49 % and a 22 % one to 10 % (greedy exact
    # match); with the NLL term: 92 % and 27 %.
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's log-sigmoid loss; ipo: IPO's squared loss (TRL)")
    sft_weight: float = Field(
        1.0, ge=0, description="weight of an NLL loss on the chosen answer added to DPO (RPO); 0 = plain DPO"
    )
    reference: Literal["auto", "precompute", "model"] = Field(
        "auto", description="precompute: score every pair with the frozen SFT model once; model: a reference forward per step; auto: precompute when training visits every pair"
    )
    pairs: Literal["data", "on_policy"] = Field(
        "data", description="data: the preference rows; on_policy: the SFT model's own wrong samples on the prompt rows against their correct answer"
    )
    on_policy_samples: int = Field(8, ge=1, description="samples per prompt row when pairs: on_policy")
    on_policy_temperature: float = Field(1.0, gt=0)
    replay_weight: float = Field(0.0, ge=0, description="weight of an NLL term on replayed SFT rows of every skill; 0: off")
    replay_rows: int = Field(32, ge=1, description="instruction rows per step for the replay term")
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1, description="preference pairs per step")
    lr: float = Field(2e-4, gt=0)
    max_length: int = Field(96, ge=8)
    checkpoint_every: int = checkpoint_field()
    launcher: LauncherConfig = launcher_field()


class RewardTerm(Section):
    """One term of an RL stage's training reward: a function of tasks/align/rewards.py by name."""

    name: str = Field(description="exact_match, partial_credit, format, reward_model, length, or one you register")
    weight: float = 1.0


class HackingConfig(Section):
    """The reward-hacking detector (tasks/align/hacking.py): the proxy reward rose while the gold fell."""

    window: int = Field(25, ge=1, description="steps averaged per window (smaller windows mistake noise for a fall)")
    min_gold_drop: float = Field(0.05, ge=0, description="gold must fall at least this much from its best window")


class RolloutSettings(Section):
    """What PPO and GRPO share: prompts, sampling, the reward, the KL to the SFT model, replay.
    Defaults are the demo's, measured on the 2-core box (docs/benchmarks.md, "Alignment")."""

    seed: int | None = Field(None, description="null: the pipeline's top-level seed")
    max_steps: int = Field(200, ge=1)
    prompts_per_step: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (log-probs use the same)")
    max_new_tokens: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0, description="peak learning rate: 10 warm-up steps, then cosine decay to 0")
    max_grad_norm: float = Field(1.0, gt=0)
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="exact_match")], min_length=1)
    gold: str | None = Field(
        "exact_match", description="verifiable reward scored on the same samples (rows need an `answer`); null: none"
    )
    replay_weight: float = Field(1.0, ge=0, description="weight of an NLL term on replayed SFT rows of every skill (PPO-ptx style); 0: off")
    replay_rows: int = Field(32, ge=1, description="instruction rows per step for the replay term")
    hacking: HackingConfig = Field(default_factory=HackingConfig)
    checkpoint_every: int = checkpoint_field()
    launcher: LauncherConfig = launcher_field()


class PpoConfig(RolloutSettings):
    """PPO (tasks/align/ppo.py): policy and frozen reference from SFT, a critic, GAE, clipped objectives."""

    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="reward_model")], min_length=1)
    critic_init: Literal["reward", "policy"] = Field("reward", description="the critic's body and head: the reward model's (OpenRLHF) or the policy's")
    critic_lr: float = Field(1e-3, gt=0)
    kl_beta: float = Field(0.05, ge=0, description="per-token KL penalty on the reward (start value when kl_target is set)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL controller's target (nats per sequence); null: fixed beta")
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    ppo_epochs: int = Field(2, ge=1)
    minibatches: int = Field(2, ge=1)
    whiten_advantages: bool = True


class GrpoConfig(RolloutSettings):
    """GRPO (tasks/align/grpo.py): G samples per prompt, group-relative advantages, no critic."""

    group_size: int = Field(16, ge=2)
    prompts_per_step: int = Field(8, ge=1)
    max_steps: int = Field(400, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate: 10 warm-up steps, then cosine decay to 0")
    rewards: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="exact_match"), RewardTerm(name="partial_credit", weight=0.5)], min_length=1
    )
    kl_beta: float = Field(0.02, ge=0, description="weight of the k3 KL estimate to the reference in the loss")
    scale_rewards: bool = Field(
        False, description="divide advantages by the group's reward std (GRPO); false: Dr. GRPO's r - mean, which learned more on the demo"
    )
    dynamic_sampling: bool = Field(True, description="replace groups whose rewards are all equal with fresh prompts (DAPO)")
    max_resample_rounds: int = Field(3, ge=0)


ALIGN_METHODS_AVAILABLE = ("dpo", "ppo", "grpo")


class AlignConfig(Section):
    methods: list[str] = Field(default_factory=lambda: ["dpo"])
    target_skills: list[str] | None = Field(
        None, description="what alignment targets; evaluate reports the other tasks' change against sft as the alignment tax"
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    ppo: PpoConfig = Field(default_factory=PpoConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        for name in methods:
            if name not in ALIGN_METHODS_AVAILABLE:
                raise ValueError(f"method {name!r} is not implemented; available: {', '.join(ALIGN_METHODS_AVAILABLE)}")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods


class StudentConfig(Section):
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 88


class DistillConfig(Section):
    seed: int | None = Field(None, description="null: the pipeline's top-level seed")
    teacher: Literal["sft", "base", "align-dpo", "align-ppo", "align-grpo", "candidate"] = Field(
        "sft",
        description="which model of the run teaches: sft, base, an aligned branch of align.methods, or candidate "
        "(the gate's candidate: distill and evaluate-student then run after the per-model evaluations, and the "
        "student is not eligible as the candidate)",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    max_steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = 30
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss; 1-alpha on the teacher's logits")
    top_k: int = Field(16, ge=1, description="teacher logits kept per position (precomputed once)")
    max_length: int = Field(96, ge=8)
    eval_rows: int = Field(512, ge=1, description="eval-split rows scored for the teacher's and the student's loss and agreement")
    checkpoint_every: int = checkpoint_field()
    launcher: LauncherConfig = launcher_field()


class QuantizeConfig(Section):
    source: Literal["sft", "student", "base", "candidate"] = Field(
        "sft", description="which model of the run is quantized; candidate: the gate's candidate, after the per-model evaluations"
    )
    methods: list[Literal["nf4", "int8"]] = Field(default_factory=lambda: ["nf4", "int8"])
    eval_rows: int = Field(256, ge=1, description="eval-split rows used to measure the loss before/after")


class EvaluateConfig(Section):
    """How each model is scored (its own cached stage, evaluate-<model>); what is scored lives in `benchmarks`."""

    seed: int | None = Field(None, description="sampling seed; null: the pipeline's top-level seed")
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(128, ge=1)
    samples: int = Field(16, ge=1, description="samples per item for test-time scaling (self-consistency, best-of-N)")
    sample_items: int = Field(100, ge=0, description="scored items, spread over the tasks, that get the samples")
    temperature: float = Field(1.0, gt=0, description="sampling temperature for the test-time-scaling samples")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], description="k for the accuracy-vs-k curves (each <= samples)")
    ece_bins: int = Field(10, ge=2)
    top_logits: int = Field(64, ge=2, description="logits kept per generated token to refit its temperature (calibration)")
    loss_rows: int = Field(256, ge=0, description="SFT eval-split rows for completion loss / perplexity")
    variant: str | None = Field(None, description="set by the flow: the quantized variant (subfolder) to score")

    @model_validator(mode="after")
    def _ks_fit_samples(self) -> "EvaluateConfig":
        if any(k < 1 or k > self.samples for k in self.ks):
            raise ValueError(f"ks {self.ks}: each k must be between 1 and samples ({self.samples})")
        return self


class GateConfig(Section):
    """The promotion gate: the candidate becomes the registered model's `champion` only if it is better."""

    enabled: bool = True
    candidate: str = Field("best", description="best: the best eligible model by the primary metric; or a model name (sft, align-dpo, student)")
    eligible: list[str] | None = Field(None, description="models that may be the candidate; null: every trained model but the quantized variants")
    primary_metric: str = Field(
        "exact_match", description="a metric of the `mean` row; higher is better except for losses and ECE (posttrain.metrics.LOWER_IS_BETTER)"
    )
    margin: float = Field(0.0, ge=0, description="how much the candidate must beat the champion by")
    quantized_method: Literal["nf4", "int8"] = "nf4"
    quantized_budget: float = Field(0.02, ge=0, description="largest primary-metric drop of the candidate's quantized variant")


class ReportConfig(Section):
    """The report stage's section, filled by flows/plan.py from the pipeline config (not a config file section)."""

    aligned: list[str] = Field(default_factory=list)
    target_tasks: list[str] | None = None
    base_is_random: bool = False
    candidate: str = "best"
    eligible: list[str] | None = None
    primary_metric: str = "exact_match"
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])


# ----------------------------------------------------------------------------- the pipeline


def local_copy_of(url: str, cache: Path | None = None) -> Path:
    """This machine's working copy of a store whose root is a URI: <cache> ($POSTTRAIN_CACHE, default
    ~/.cache/posttrain)/stores/<the URL, readable, plus a short hash so distinct URLs never share one>."""
    cache = Path(cache or os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-")[:80]
    return cache / "stores" / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class PipelineConfig(Section):
    run_name: str | None = Field(None, description="default: the config file's stem")
    seed: int = 0
    store_root: str = Field(
        "artifacts", description="holds store/, runs/, logs/ and the default MLflow database; an object-store URI "
        "(s3://bucket/prefix) is the shared_store, with this machine's working copy under $POSTTRAIN_CACHE",
    )
    shared_store: str | None = Field(
        None, description="an fsspec URL (s3://bucket/prefix) where published artifacts are shared with other machines: "
        "uploaded on publish (manifest last), downloaded and checked on a local miss (posttrain/remote.py). "
        "Credentials from the environment",
    )
    shared_store_options: dict[str, str] = Field(
        default_factory=dict, description="fsspec storage options without secrets, e.g. {endpoint_url: http://127.0.0.1:9000}",
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="before")
    @classmethod
    def _store_root_uri_is_the_shared_store(cls, values):
        """`store_root: s3://bucket/prefix` (any fsspec URL): the artifacts live there, published as
        shared_store publishes them (files first, manifest.json last; posttrain/remote.py), and
        this machine works in a local copy keyed by the URL — stages read local folders, and run
        records, logs, locks, checkpoints and the default MLflow file are this machine's own."""
        if not isinstance(values, dict) or "://" not in str(values.get("store_root", "")):
            return values
        url = str(values["store_root"]).rstrip("/")
        shared = values.get("shared_store")
        if shared and str(shared).rstrip("/") != url:
            raise ValueError(f"store_root is the URI {url} and shared_store names another ({shared}): give one of them")
        return {**values, "shared_store": url, "store_root": str(local_copy_of(url))}

    @model_validator(mode="after")
    def _every_stage_has_its_rows(self):
        """Each stage reads one role of the data stage's output; a role no source gives is found
        here, not as a missing file after the data stage and SFT have run."""
        given = {source.role for source in self.data.sources}
        readers = {
            "instruction": ["sft", "distill"],
            "preference": ["reward"] + (["align.dpo (pairs: data)"] if "dpo" in self.align.methods and self.align.dpo.pairs == "data" else []),
            "prompt": [f"align.{method}" for method in self.align.methods if method in ("ppo", "grpo")]
            + (["align.dpo (pairs: on_policy)"] if "dpo" in self.align.methods and self.align.dpo.pairs == "on_policy" else []),
        }
        formats = {role: [name for name, made in SOURCE_FORMAT_ROLES.items() if made == role] for role in readers}
        for role, stages in readers.items():
            if stages and role not in given:
                raise ValueError(
                    f"data.sources: no source gives {role} rows, which {', '.join(stages)} read "
                    f"(add a source with format {' or '.join(formats[role])}, or `generate`)"
                )
        return self

    @model_validator(mode="after")
    def _distill_teacher_is_a_model_of_the_run(self):
        """An aligned teacher must be a branch this run trains; a candidate teacher is chosen before
        the student exists, so the student (or a quantized variant, made later) cannot be it."""
        teacher = self.distill.teacher
        if teacher.startswith("align-") and teacher.removeprefix("align-") not in self.align.methods:
            raise ValueError(f"distill.teacher: {teacher} is not a model of this run (align.methods: {', '.join(self.align.methods) or 'none'})")
        if teacher == "candidate":
            key, named = ("gate.candidate", [self.gate.candidate]) if self.gate.candidate != "best" else ("gate.eligible", self.gate.eligible or [])
            late = [name for name in named if name == "student" or name.startswith("quantize-")]
            if late:
                raise ValueError(f"distill.teacher: candidate is chosen before {late[0]} exists, but {key} names it")
        return self

    @model_validator(mode="after")
    def _remote_stages_have_a_pool_and_a_shared_store(self):
        """A stage that runs on another machine's worker reads its inputs from, and publishes to,
        the shared store, and needs a pool to go to."""
        sections = {"sft": self.sft, "reward": self.reward, "align.dpo": self.align.dpo, "align.ppo": self.align.ppo,
                    "align.grpo": self.align.grpo, "distill": self.distill}
        for name, section in sections.items():
            if section.launcher.kind != "deployment":
                continue
            if not section.launcher.pool:
                raise ValueError(f"{name}.launcher.pool: kind deployment needs the work pool whose worker runs it")
            if not self.shared_store:
                raise ValueError(f"{name}.launcher.kind: deployment needs shared_store (the worker reads inputs from it and publishes to it)")
        return self

    def check_outside_paths(self, origin: str = "config") -> None:
        """Every local file or folder a stage will read exists: found now, not after earlier stages ran."""
        for section in (self.model, self.data, self.benchmarks):
            for key, item in section.outside_inputs().items():
                if item.kind == "path" and not Path(item.name).expanduser().exists():
                    raise ConfigError(f"{origin}: {key}: {item.name}: no such file or folder")
        model_input = self.model.outside_inputs().get("model.name_or_path")
        if model_input is not None and model_input.kind == "path":
            try:
                self.model.check_local_folder()
            except ValueError as exc:
                raise ConfigError(f"{origin}: model.name_or_path: {exc}") from None


# ----------------------------------------------------------------------------- loading


def _parse_scalar(text: str):
    """`--set` values are YAML scalars/flow collections: 1e-4, true, null, [dpo], {a: 1}."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, assignment: str, source: str = "--set") -> None:
    if "=" not in assignment:
        raise ConfigError(f"{source} {assignment!r}: expected key=value, e.g. sft.lr=1e-4")
    dotted, _, raw = assignment.partition("=")
    keys = dotted.strip().split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source} {dotted}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = _parse_scalar(raw.strip())


def _format_error(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{location}: {message}" if location else message


def validate_config(tree: dict, origin: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more)" if more else ""
        raise ConfigError(f"{origin}: {_format_error(first)}{suffix}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    tree.setdefault("run_name", path.stem)
    return validate_config(tree, origin=str(path))
