"""The training loop of the main job: steps, timing, validation, checkpoints, progress bar and metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

FINAL_WINDOW = 10  # the "final train loss" is the mean over the last this many steps (one batch is noisy)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then a cosine down to ``floor`` at step ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def mean_over_ranks(value: torch.Tensor) -> float:
    summed = value.detach().float().clone()
    dist.all_reduce(summed)  # gloo has no AVG reduction
    return summed.item() / dist.get_world_size()


class Trainer:
    def __init__(self, model: nn.Module, optimizer, schedule, batches, device: torch.device, metrics, manager,
                 name: str, args):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.batches, self.device, self.metrics, self.manager = batches, device, metrics, manager
        self.name, self.args = name, args
        self.rank = dist.get_rank()
        self.tokens_per_step = args.batch_size * args.seq_len * dist.get_world_size()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def evaluate(self) -> float:
        losses = [self.model.loss(self.batches.batch(i, self.rank, "val").to(self.device))
                  for i in range(self.args.val_batches)]
        return mean_over_ranks(torch.stack(losses).mean())

    def run(self, start: int, steps: int) -> dict:
        """Train from step ``start`` to ``steps``."""
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=self.name, unit="step", disable=self.rank != 0,
                   dynamic_ncols=True, mininterval=1.0)
        losses, val_loss, step_seconds, optimizer_seconds = [], float("nan"), 0.0, 0.0
        for step in range(start + 1, steps + 1):
            began = time.perf_counter()
            loss = self.model.loss(self.batches.batch(step, self.rank).to(self.device))
            loss.backward()
            self._sync()
            backward_done = time.perf_counter()
            self.optimizer.step()
            self._sync()
            optimizer_time = time.perf_counter() - backward_done
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.schedule.get_last_lr()[0]
            self.schedule.step()
            step_time = time.perf_counter() - began
            step_seconds += step_time
            optimizer_seconds += optimizer_time
            losses.append(mean_over_ranks(loss))
            record = {"step": step, "loss": losses[-1], "lr": lr, "step_ms": 1e3 * step_time,
                      "optimizer_ms": 1e3 * optimizer_time, "tokens_per_s": self.tokens_per_step / step_time}
            if step % self.args.eval_every == 0 or step == steps:
                val_loss = record["val_loss"] = self.evaluate()
                if self.rank == 0:
                    bar.write(f"step {step}: train loss {losses[-1]:.4f}, val loss {val_loss:.4f}")
            if self.metrics is not None:
                self.metrics.write(record)
            if self.manager is not None:
                saved = self.manager.maybe_save(step)
                if step == steps and not saved:
                    self.manager.save(step)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            opt=f"{100 * optimizer_time / step_time:.0f}%", refresh=False)
        bar.close()
        window = losses[-FINAL_WINDOW:]
        return {"optimizer": self.name, "train_loss": sum(window) / len(window) if window else float("nan"),
                "val_loss": val_loss, "seconds": step_seconds,
                "optimizer_share": optimizer_seconds / step_seconds if step_seconds else 0.0}
