"""What every training stage sets the same way: precision, logging-off trainer defaults, progress.

    args = SFTConfig(**trainer_defaults(out_dir, seed=0), max_steps=100, ...)
    trainer = SFTTrainer(..., callbacks=[ProgressCallback("sft")])
    ...
    metrics = {**progress.summary(), "eval_loss": ...}

TRL configs default to bf16=True, which made SFT ~8x slower on a CPU without bf16 units
(FIELD_NOTES); `trainer_defaults` turns bf16 on only where a GPU supports it. Checkpointing and
external reporting are off: the stage writes its final model itself and the flow logs to MLflow.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from posttrain import failpoints


def use_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trainer_defaults(out_dir: Path, seed: int) -> dict:
    """Keyword arguments shared by every TRL/transformers trainer config we build."""
    return {
        "output_dir": str(Path(out_dir) / "_trainer"),  # scratch: nothing is saved there (save_strategy=no)
        "seed": seed,
        "bf16": use_bf16(),
        "fp16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        # TRL turns this on by default; for small models it only costs time (recomputes activations).
        "gradient_checkpointing": False,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


CHECKPOINT_DIR_ENV = "POSTTRAIN_CHECKPOINT_DIR"  # set by posttrain.runner: <store_root>/checkpoints/<stage>/<fingerprint>


def checkpointing(every: int, logging_steps: int, max_steps: int, required: tuple[str, ...] = ()) -> tuple[dict, str | None]:
    """Trainer arguments that save a full checkpoint (weights, optimizer, scheduler, every RNG, the
    step and so the data position) every `every` optimizer steps, and the newest complete checkpoint
    to resume from (None: start fresh).

    The folder is the one posttrain.runner names for this stage's fingerprint, so only the same work
    ever resumes a checkpoint; the runner removes it once the stage is published. Without a runner
    (the stage called directly) or with `every` 0, nothing is saved. A checkpoint counts once its
    `trainer_state.json` exists: transformers writes that file last, so a save cut off by a crash
    leaves a folder without it, which is removed. No checkpoint is taken at the last step (the stage
    saves the model itself next; ProgressCallback), and one at or past `max_steps` is never resumed:
    transformers, resumed there, trains one step more than planned. Everything is loaded back through safetensors or
    `torch.load(weights_only=True)` (transformers' Trainer), never a full unpickle.

    Checkpoints fall on logging steps (`every` rounded up to a multiple of `logging_steps`), so the
    losses logged after a resume average the same windows as an uninterrupted run's: the setting is
    not in the cache key, and loss_history.json, like the weights, is the same bytes either way.
    `required`: files a stage writes into each checkpoint after transformers does (DPO's replay
    sampler state); a checkpoint without them is incomplete too."""
    folder = os.environ.get(CHECKPOINT_DIR_ENV)
    if not every or not folder:
        return {}, None
    import shutil

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    complete = []
    for candidate in root.glob("checkpoint-*"):
        step = int(candidate.name.rsplit("-", 1)[1])
        if all((candidate / name).is_file() for name in ("trainer_state.json", *required)) and step < max_steps:
            complete.append((step, candidate))
        else:
            shutil.rmtree(candidate, ignore_errors=True)
    latest = str(max(complete)[1]) if complete else None
    arguments = {
        "output_dir": str(root),
        "save_strategy": "steps",
        "save_steps": -(-every // logging_steps) * logging_steps,
        "save_total_limit": 1,
        "save_only_model": False,
    }
    return arguments, latest


class LoopCheckpoints:
    """Checkpoints for a stage's own training loop (distillation, PPO, GRPO; the Trainer-based stages
    use `checkpointing`): each model through safetensors; the optimizers' and schedulers' state, the
    torch RNG and the loop's own state (step, losses, samplers' positions) through `torch.save`,
    loaded back with `weights_only=True`, never a full unpickle.

        checkpoints = LoopCheckpoints(config.checkpoint_every, max_steps)
        step, loop = checkpoints.resume({"student": model}, {"optimizer": optimizer, "scheduler": scheduler})
        ... after each optimizer step (1-based):
        checkpoints.maybe_save(step, {"student": model}, {"optimizer": ..., "scheduler": ...}, {"history": ...})

    `resume` returns (0, None) when there is nothing to resume. The folder is the runner's, keyed by
    the stage's fingerprint, so only the same work resumes. A checkpoint is written to
    `checkpoint-N.tmp` and renamed when complete; only the newest is kept; none is taken at the last
    step, where the stage saves the model itself."""

    def __init__(self, every: int, max_steps: int):
        folder = os.environ.get(CHECKPOINT_DIR_ENV)
        self.root = Path(folder) if every and folder else None
        self.every, self.max_steps = every, max_steps

    def _complete(self) -> list[tuple[int, Path]]:
        import shutil

        found = []
        for candidate in self.root.glob("checkpoint-*"):
            step = candidate.name.removeprefix("checkpoint-")
            if step.isdigit() and (candidate / "loop_state.pt").is_file() and int(step) < self.max_steps:
                found.append((int(step), candidate))
            else:
                shutil.rmtree(candidate, ignore_errors=True)  # cut off mid-save, or past the plan
        return sorted(found)

    def resume(self, models: dict, stateful: dict) -> tuple[int, dict | None]:
        if self.root is None or not self.root.is_dir():
            return 0, None
        complete = self._complete()
        if not complete:
            return 0, None
        from safetensors.torch import load_model

        step, folder = complete[-1]
        for name, model in models.items():
            load_model(model, folder / f"{name}.safetensors", device=str(next(model.parameters()).device))
        saved = torch.load(folder / "loop_state.pt", weights_only=True)
        for name, thing in stateful.items():
            thing.load_state_dict(saved["state"][name])
        torch.set_rng_state(saved["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in saved:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return step, saved["loop"]

    def maybe_save(self, step: int, models: dict, stateful: dict, loop_state: dict) -> None:
        """After optimizer step `step` (1-based): save when it is a checkpoint step."""
        if self.root is None or step % self.every or step >= self.max_steps:
            return
        import shutil

        from safetensors.torch import save_model

        staging = self.root / f"checkpoint-{step}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, model in models.items():
            save_model(model, str(staging / f"{name}.safetensors"))  # handles tied embeddings
        state = {"state": {name: thing.state_dict() for name, thing in stateful.items()}, "torch_rng": torch.get_rng_state(), "loop": loop_state}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, staging / "loop_state.pt")
        for older in self.root.glob("checkpoint-*"):
            if older != staging:
                shutil.rmtree(older, ignore_errors=True)
        staging.rename(self.root / f"checkpoint-{step}")


def random_state(generator) -> list:
    """A `random.Random`'s state as plain lists (what `torch.load(weights_only=True)` reads back)."""
    version, internal, gauss = generator.getstate()
    return [version, list(internal), gauss]


def set_random_state(generator, state: list) -> None:
    generator.setstate((state[0], tuple(state[1]), state[2]))


def resumed_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def logged_losses(trainer) -> list[tuple[int, float]]:
    """(step, loss) at every logging step of the whole training, those before a resume included
    (the trainer's state, restored from the checkpoint, carries them)."""
    return [(entry["step"], float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry and "step" in entry]


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Counts tokens and steps against wall time; used by our own loops and by ProgressCallback."""

    def __init__(self, stage: str, total_steps: int, print_every: float = 10.0):
        self.stage = stage
        self.total_steps = total_steps
        self.print_every = print_every
        self.started = time.perf_counter()
        self.last_print = self.started
        self.tokens = 0
        self.steps = 0
        self.last_loss: float | None = None
        self.printed_step = -1

    def update(self, steps: int, tokens: int, loss: float | None = None) -> None:
        self.steps, self.tokens = steps, tokens
        if loss is not None:
            self.last_loss = loss
        now = time.perf_counter()
        due = now - self.last_print >= self.print_every or steps == self.total_steps
        if due and steps != self.printed_step:
            self.last_print, self.printed_step = now, steps
            self._print()

    def _print(self) -> None:
        from rich.console import Console

        elapsed = time.perf_counter() - self.started
        loss = f" loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        Console(stderr=True).print(
            f"  [cyan]{self.stage}[/] step {self.steps}/{self.total_steps}{loss}"
            f"  {self.tokens / max(elapsed, 1e-9):,.0f} tok/s  {elapsed:.0f}s",
            highlight=False,
        )

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.started
        return {
            "train_seconds": round(elapsed, 2),
            "train_steps": self.steps,
            "train_tokens": self.tokens,
            "tokens_per_second": round(self.tokens / max(elapsed, 1e-9), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **({"final_train_loss": round(self.last_loss, 5)} if self.last_loss is not None else {}),
        }


class ProgressCallback(TrainerCallback):
    """Prints step, loss and tokens/s every few seconds; collects the figures for the manifest and,
    at every logging step, the loss, learning rate, gradient norm, tokens/s and peak memory (for
    MLflow's per-step series)."""

    def __init__(self, stage: str, print_every: float = 10.0):
        self.stage = stage
        self.print_every = print_every
        self.meter: Throughput | None = None
        self.loss_history: list[tuple[int, float]] = []
        self.history: list[dict] = []
        self._last = (0, 0.0)  # (tokens seen, perf_counter) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter = Throughput(self.stage, state.max_steps, self.print_every)
        self._last = (0, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        # transformers saves a checkpoint at the last step when saving by steps; the stage saves the
        # model itself right after, and resuming from that checkpoint would train a step too many.
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        failpoints.reach("train-step")  # gradients computed, weights not yet updated: mid step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss_history.append((state.global_step, float(logs["loss"])))
            self.meter.update(state.global_step, int(state.num_input_tokens_seen), float(logs["loss"]))
            now, tokens = time.perf_counter(), int(state.num_input_tokens_seen)
            entry = {"step": state.global_step, "tokens_per_second": (tokens - self._last[0]) / max(now - self._last[1], 1e-9), "peak_memory_mb": peak_memory_mb()}
            for key in ("learning_rate", "grad_norm"):
                if isinstance(logs.get(key), (int, float)):
                    entry[key] = float(logs[key])
            self.history.append(entry)
            self._last = (tokens, now)

    def on_train_end(self, args, state, control, **kwargs):
        self.meter.update(state.global_step, int(state.num_input_tokens_seen))

    def summary(self) -> dict:
        return self.meter.summary() if self.meter else {}


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch on a GPU; the process's peak resident memory otherwise."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(peak_rss_mb(), 1)


def quiet(trainer) -> None:
    """Drop transformers' own log printer: ProgressCallback already reports, one line per interval."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as TqdmCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(TqdmCallback)


def last_logged(log_history: list[dict], key: str) -> float | None:
    """The trainer's most recent value of a logged metric (TRL averages them over each logging window)."""
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None


def write_loss_history(out_dir: Path, history: list[tuple[int, float]]) -> None:
    """Per-step losses in loss_history.json and a loss-curve PNG (the flow logs the losses as an MLflow
    series). Figures that depend on the clock — tokens/s, memory — go in the manifest's `history`
    (ProgressCallback.history), never in a file: a file's bytes are the artifact's digest, and a
    rebuild must give the same digest."""
    out_dir = Path(out_dir)
    (out_dir / "loss_history.json").write_text(json.dumps([{"step": step, "loss": loss} for step, loss in history]))
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.0, 3.2))
    axis.plot([step for step, _ in history], [loss for _, loss in history])
    axis.set(xlabel="step", ylabel="training loss", title="training loss")  # no folder name: a staging name would change the bytes
    figure.tight_layout()
    figure.savefig(out_dir / "loss_curve.png", dpi=110)
    plt.close(figure)


def remove_scratch(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(Path(out_dir) / "_trainer", ignore_errors=True)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
