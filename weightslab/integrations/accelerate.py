"""Exact resume for loops written with Hugging Face Accelerate: register what ``accelerator.prepare`` returned.

::

    from weightslab.integrations import accelerate as wl_accelerate

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    accelerator.register_for_checkpointing(ema)            # optional: weightslab saves these too
    system = wl.get_checkpoint_system(root_log_dir="runs", checkpoint_frequency=100)
    model, optimizer, train_loader, scheduler = wl_accelerate.register(
        accelerator, model, optimizer, train_loader, scheduler)
    step = system.resume()                                  # 0 on a fresh run
    for epoch in range(train_loader.epoch, num_epochs):     # after a resume: the epoch it stopped in
        for batch in train_loader:                          # ... and the rest of its batches
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:                  # an optimizer step: a step boundary
                step += 1
                wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
    system.close()

:func:`register` takes the prepared objects in any order, as ``prepare`` returns them, and registers
what holds their state, not Accelerate's wrappers: the model ``accelerator.unwrap_model`` gives, the
optimizer inside ``AcceleratedOptimizer``, the scheduler inside ``AcceleratedScheduler``; with them
the accelerator's GradScaler (fp16), its micro-batch counter (``accelerator.step``, which
``save_state`` saves too) and every object given to ``accelerator.register_for_checkpointing``
(before ``register`` is called). It returns the same objects, except each data loader, which comes
back as a :class:`ResumableLoader`: iterate that one.

A prepared loader (Accelerate's ``DataLoaderShard``) has no position of its own, and it reads one
batch ahead of the loop, so weightslab's generic loader tracking would count one batch too many;
:class:`ResumableLoader` counts the batches it hands to the loop, and after a resume continues the
epoch with ``accelerate.skip_first_batches`` (indices skipped, no sample loaded). That lands on the
same batches when the epoch's order depends on the seed and the epoch alone: Accelerate's
``SeedableRandomSampler`` (``DataLoaderConfiguration(use_seedable_sampler=True)``), a
``SequentialSampler``, a ``DistributedSampler``; a plain shuffling ``RandomSampler`` (Accelerate's
default) draws its order from a generator at each epoch's start, so it is replaced by weightslab's
:class:`~weightslab.data.ResumableSampler` (seed + epoch; in a job, rank 0's seed on every rank). The
loader also gets a generator of its own for its workers' seeds, so that starting an epoch draws
nothing from the global generator (a resumed run would otherwise draw there at another moment).

Several processes (``accelerate launch``): every process calls the same functions; weightslab's
protocol for torch.distributed jobs (guides/distributed.md) takes each checkpoint at the same step on
every rank, with each process's own random generators and loader position.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import BatchSampler, RandomSampler

try:
    from accelerate import skip_first_batches
except ImportError as exc:  # the framework is an optional extra
    raise ImportError(f"weightslab.integrations.accelerate needs Hugging Face Accelerate ({exc}); install it with: "
                      "pip install 'weightslab[accelerate]'") from exc

from ..data import ResumableSampler, sampler_seed, set_sampler_seed
from ..distributed.world import World
from ..errors import RegistrationError
from ..registration import (register_dataloader, register_model, register_optimizer, register_scaler,
                            register_scheduler, register_state)

__all__ = ["register", "ResumableLoader"]

log = logging.getLogger(__name__)

#: Samplers whose order of an epoch depends on their seed and the epoch alone (class names).
_REPLAYABLE = {"SeedableRandomSampler", "SequentialSampler", "DistributedSampler", "ResumableSampler"}


def register(accelerator: Any, *objects: Any) -> Any:
    """Register the objects ``accelerator.prepare`` returned (and the accelerator's own state) with
    weightslab; return them as given, each data loader as a :class:`ResumableLoader`.

    Names follow ``accelerator.save_state``'s: ``model``, ``model_1``, ..., ``optimizer``, ...,
    ``scheduler``, ..., ``dataloader``, ..., ``scaler``, ``custom_0``, ... and ``accelerator``. One
    object comes back alone, several as a tuple (as from ``prepare``)."""
    counts: dict[str, int] = {}

    def name(kind: str) -> str:
        n = counts.get(kind, 0)
        counts[kind] = n + 1
        return kind if n == 0 else f"{kind}_{n}"

    out: list[Any] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            register_model(name("model"), accelerator.unwrap_model(obj))
            out.append(obj)
        elif hasattr(getattr(obj, "scheduler", obj), "last_epoch"):  # an LR scheduler (AcceleratedScheduler holds one)
            register_scheduler(name("scheduler"), getattr(obj, "scheduler", obj))
            out.append(obj)
        elif isinstance(getattr(obj, "optimizer", obj), torch.optim.Optimizer):  # (AcceleratedOptimizer holds one)
            register_optimizer(name("optimizer"), getattr(obj, "optimizer", obj))
            out.append(obj)
        elif isinstance(obj, ResumableLoader) or hasattr(obj, "dataset") and hasattr(obj, "__iter__"):
            loader = obj if isinstance(obj, ResumableLoader) else ResumableLoader(obj)
            register_dataloader(name("dataloader"), loader)
            out.append(loader)
        else:
            raise RegistrationError(
                f"wl_accelerate.register(accelerator, ...): cannot tell what a {type(obj).__name__} is; pass the "
                "models, optimizers, schedulers and data loaders accelerator.prepare returned (other objects: "
                "accelerator.register_for_checkpointing(obj) before register, or wl.register_state)")
    if getattr(accelerator, "scaler", None) is not None:
        register_scaler("scaler", accelerator.scaler)
    for i, obj in enumerate(getattr(accelerator, "_custom_objects", [])):
        register_state(f"custom_{i}", _plain_state_dict(obj), obj.load_state_dict)
    register_state("accelerator", lambda: {"step": int(accelerator.step)},
                   lambda saved: setattr(accelerator, "step", int(saved["step"])))
    return out[0] if len(out) == 1 else tuple(out)


def _plain_state_dict(obj: Any) -> Any:
    def get() -> Any:
        state = obj.state_dict()
        return dict(state) if isinstance(state, Mapping) else state  # (an nn.Module's is an OrderedDict)
    return get


class ResumableLoader:
    """An Accelerate-prepared data loader whose position is part of weightslab's checkpoints.

    Iterate it as the prepared loader; everything else (``len``, ``dataset``, ``batch_size``, ...) is
    the prepared loader's. ``epoch`` is the epoch its next iteration continues (after a resume) or
    starts. ``state_dict()`` / ``load_state_dict()`` carry its position (what weightslab saves)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self._epoch = int(getattr(loader, "iteration", 0))
        self._batches = 0
        self._complete = True  # no epoch under way
        self._resume: tuple[int, int, torch.Tensor | None] | None = None
        self._generator_at_start: torch.Tensor | None = None
        base = getattr(loader, "base_dataloader", loader)
        if getattr(base, "generator", None) is None:
            # Starting an epoch draws the workers' base seed from the loader's generator, or from the
            # global one without it: at another moment in a resumed run than in the original.
            base.generator = torch.Generator()
            base.generator.manual_seed(torch.initial_seed())
        self._generator: torch.Generator = base.generator
        self.sampler = _make_replayable(loader)

    # --- what the loop sees -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration continues (after a resume) or starts."""
        if self._resume is not None:
            return self._resume[0]
        return self._epoch + 1 if self._complete and self._batches else self._epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # (not set yet: being unpickled or copied)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at the next iteration (as a loop that counts epochs does)."""
        if self._resume is not None:
            if self._resume[0] == epoch:
                return  # the loop names the epoch the checkpoint is in: continue it
            log.warning("set_epoch(%d) on a loader resumed in epoch %d: the rest of epoch %d is skipped; start the "
                        "loop at loader.epoch", epoch, self._resume[0], self._resume[0])
            self._resume = None
        self._epoch, self._batches, self._complete = int(epoch), 0, True
        self._generator_at_start = None  # (that of the epoch before)
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._resume is not None:
            epoch, batches, generator = self._resume
            self._resume = None
            if generator is not None:
                self._generator.set_state(generator)
        else:
            epoch, batches = self.epoch, 0
        self.loader.set_epoch(epoch)
        self._epoch, self._batches, self._complete = epoch, batches, False
        self._generator_at_start = self._generator.get_state()
        source = skip_first_batches(self.loader, batches) if batches else self.loader
        for batch in source:
            self._batches += 1
            yield batch
        self._complete = True
        self.loader.set_epoch(epoch + 1)  # (a skipping loader counted the epoch as its own)

    # --- what weightslab saves ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # restored, not iterated yet: still where the checkpoint was
            epoch, batches, generator = self._resume
            complete = False
        else:
            epoch, batches, generator, complete = self._epoch, self._batches, self._generator_at_start, self._complete
        return {"kind": "weightslab.accelerate_loader", "epoch": epoch, "batches": batches,
                "complete": complete and batches > 0, "generator": generator,
                "generator_now": self._generator.get_state(), "seed": sampler_seed(self.sampler),
                "length": len(self.loader)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        seed = state.get("seed")
        if seed is not None and sampler_seed(self.sampler) not in (None, seed):
            set_sampler_seed(self.sampler, int(seed))  # the saved run's order of every epoch, whatever seeds this one
        if state.get("length") not in (None, len(self.loader)):
            log.warning("the resumed data loader gives %d batches per epoch, the saved one gave %s: the rest of the "
                        "epoch is not the one the saved run would have seen", len(self.loader), state["length"])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self._generator.set_state(state["generator_now"])
        self._resume = None
        if state["complete"] or batches >= len(self.loader):  # the next iteration starts the next epoch
            self._epoch, self._batches, self._complete = epoch, max(batches, 1), True
            self.loader.set_epoch(epoch + 1)
        elif batches == 0:  # saved before the epoch's first batch: the next iteration starts it
            self._epoch, self._batches, self._complete = epoch, 0, True
            self.loader.set_epoch(epoch)
        else:  # mid-epoch: the next iteration draws the epoch's worker seed again and skips what was consumed
            self._resume = (epoch, batches, state.get("generator"))


def _batch_sampler_holding_sampler(loader: Any) -> Any:
    holder = loader.sampler if isinstance(getattr(loader, "sampler", None), BatchSampler) else loader.batch_sampler
    while not hasattr(holder, "sampler") and hasattr(holder, "batch_sampler"):  # BatchSamplerShard
        holder = holder.batch_sampler
    inner = getattr(holder, "batch_sampler", None)  # BatchSamplerShard(batch_sampler=BatchSampler(sampler))
    return inner if isinstance(inner, BatchSampler) else holder


def _make_replayable(loader: Any) -> Any:
    """The loader's index sampler, made one whose epoch order depends on the seed and epoch alone."""
    holder = _batch_sampler_holding_sampler(loader)
    sampler = getattr(holder, "sampler", None)
    if sampler is None or type(sampler).__name__ in _REPLAYABLE:
        return sampler
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        seed = torch.initial_seed()
        world = World.current()
        if world is not None:  # every rank must draw the same order (BatchSamplerShard splits it)
            seed = int(world.broadcast_bytes(str(seed).encode() if world.rank == 0 else None).decode())
        replayable = ResumableSampler(len(sampler.data_source), shuffle=True, seed=seed, rank=0, world_size=1)
        if callable(getattr(loader, "set_sampler", None)):
            loader.set_sampler(replayable)  # Accelerate's own way (it also reaches a BatchSamplerShard's)
        else:
            holder.sampler = replayable
        return replayable
    log.warning("the prepared data loader's sampler is a %s, whose order of an epoch is not a function of the epoch "
                "alone: after a resume mid-epoch the rest of the epoch holds other samples. Use "
                "DataLoaderConfiguration(use_seedable_sampler=True) or shuffle=True with the default sampler",
                type(sampler).__name__)
    return sampler
