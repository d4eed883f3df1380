"""The teacher: outputs a strategy needs, produced once per batch without gradients.

`LocalTeacher` runs the frozen model. The training loop talks to a teacher
through a client with two calls, `request` (as early as possible) and
`collect` (when the step needs the outputs):
- `ColocatedTeacher`: the teacher inside the training worker (as in the paper);
- `ActorTeacher`: a pool of `TeacherActor`s in their own processes, with their
  own CPU/GPU share, working on batch k+1 while the student runs step k.
The teacher always runs in eval mode: dropout off, whatever its config says,
under `inference_mode` and in the training precision (`train.precision`):
bf16 autocast on CUDA by default.
"""
from __future__ import annotations

import os

import ray
import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from raykd.device import autocast, enable_tf32
from raykd import storage
from raykd.models import Captured, ForwardNeeds, encode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LocalTeacher:
    """A frozen masked LM answering `outputs(batch)` for one strategy's needs."""

    def __init__(self, model: BertForMaskedLM, needs: ForwardNeeds, dtype: torch.dtype = torch.float32,
                 precision: str = "auto"):
        self.model = model.eval().requires_grad_(False)
        self.needs = needs
        self.dtype = dtype  # what is sent back; `precision` is what the forward computes in
        self.precision = precision

    @torch.inference_mode()
    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                masked_positions: torch.Tensor | None) -> Captured:
        """Teacher outputs for one batch, cast to the transport dtype."""
        with autocast(self.precision, input_ids.device):
            captured = encode(self.model, input_ids, attention_mask, self.needs, masked_positions)
        return moved(captured, dtype=self.dtype)


def moved(captured: Captured, **to) -> Captured:
    """`captured` with `Tensor.to(**to)` applied to every tensor (dtype and/or device)."""
    return Captured(
        hidden={k: v.to(**to) for k, v in captured.hidden.items()},
        scores={k: v.to(**to) for k, v in captured.scores.items()},
        qkv={k: tuple(t.to(**to) for t in v) for k, v in captured.qkv.items()},
        masked_logits=None if captured.masked_logits is None else captured.masked_logits.to(**to),
    )


class Teacher:
    """How the loop gets teacher outputs: `request` a batch early, `collect` it when needed."""

    def request(self, batch: dict):
        raise NotImplementedError

    def collect(self, handle) -> Captured:
        raise NotImplementedError


class ColocatedTeacher(Teacher):
    """A teacher in the training process: computed at collect time, so nothing is wasted at the stop."""

    def __init__(self, local_teacher: LocalTeacher):
        self.local = local_teacher

    def request(self, batch):
        return batch

    def collect(self, batch):
        positions = batch["masked_positions"] if self.local.needs.masked_logits else None
        return self.local.outputs(batch["input_ids"], batch["attention_mask"], positions)


def model_folder(source: str) -> str:
    """What `from_pretrained` should load: a storage URI becomes a node-local copy; a path or hub name is kept."""
    return storage.local_copy(source) if "://" in source else source


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TeacherActor:
    """A teacher in its own process; if it dies Ray restarts it and retries the pending call."""

    def __init__(self, teacher_dir: str, needs: ForwardNeeds, dtype: str, num_threads: int, precision: str = "auto"):
        """`teacher_dir`: an HF model folder, a storage URI (copied to this node once) or a hub name."""
        torch.set_num_threads(num_threads)  # Ray sets OMP_NUM_THREADS=1 in actors
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            enable_tf32()
        model = AutoModelForMaskedLM.from_pretrained(model_folder(teacher_dir)).to(self.device)
        self.teacher = LocalTeacher(model, needs, DTYPES[dtype], precision)

    def outputs(self, input_ids, attention_mask, masked_positions) -> Captured:
        def to_device(t):
            return None if t is None else t.to(self.device)

        captured = self.teacher.outputs(to_device(input_ids), to_device(attention_mask), to_device(masked_positions))
        return moved(captured, device="cpu")

    def pid(self) -> int:
        return os.getpid()


class ActorTeacher(Teacher):
    """Client of a pool of `TeacherActor`s: requests go round-robin, starting at this worker's rank."""

    def __init__(self, actors: list, needs: ForwardNeeds, rank: int = 0, device: str = "cpu"):
        self.actors = actors
        self.needs = needs
        self.next_actor = rank % len(actors)
        self.device = device

    def request(self, batch):
        actor = self.actors[self.next_actor]
        self.next_actor = (self.next_actor + 1) % len(self.actors)
        positions = batch["masked_positions"] if self.needs.masked_logits else None
        return actor.outputs.remote(batch["input_ids"], batch["attention_mask"], positions)

    def collect(self, ref):
        return moved(ray.get(ref), device=self.device)


def start_teacher_actors(teacher_dir: str, needs: ForwardNeeds, *, count: int, cpus: float, gpus: float,
                         dtype: str, num_threads: int, precision: str = "auto") -> list:
    """Start `count` teacher actors and wait until each has loaded the model."""
    actors = [TeacherActor.options(num_cpus=cpus, num_gpus=gpus).remote(teacher_dir, needs, dtype, num_threads, precision)
              for _ in range(count)]
    ray.get([actor.pid.remote() for actor in actors])
    return actors
