"""HF ``transformers.Trainer`` (one process, CPU) with distopt: 6 straight steps against 3 steps, a Trainer checkpoint
and a resume in a fresh Trainer to step 6. Both must agree bitwise for distopt.AdamW and distopt.Muon as they do for
torch.optim.AdamW, and distopt.AdamW must equal torch.optim.AdamW. Trainer saves ``optimizer.state_dict()`` with
``torch.save`` and loads it with ``weights_only=True``; a dropout layer makes the resume depend on the RNG that
Trainer restores too. (Without the optimizer file the resumed run differs: the check can fail.)

distopt.Muon goes through a factory so that it sees parameter names: Trainer's own groups
(``optimizer_cls_and_kwargs=(distopt.Muon, ...)``) carry none, so embeddings and heads would go to Muon.
"""

import os
import tempfile

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="transformers is a test dependency (scripts/setup.sh installs it)")
pytest.importorskip("accelerate", reason="Trainer needs accelerate (scripts/setup.sh installs it)")
from transformers import Trainer, TrainerCallback, TrainingArguments

import distopt

VOCAB, DIM, SEQ, BATCH, STEPS, SAVE = 50, 16, 8, 4, 6, 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(0.1)  # draws from the torch RNG, which Trainer must restore on resume
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.norm(self.drop(torch.relu(self.hidden(self.embed(input_ids))))))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def make_model():
    torch.manual_seed(0)
    return Tiny()


class Data(torch.utils.data.Dataset):
    x = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


MUON_KW = dict(lr=2e-2, adamw_lr=1e-2, owner_dtype=torch.float32)
# name -> (build(model) -> optimizer, for optimizers=(opt, sched)), (cls or factory, kwargs) for optimizer_cls_and_kwargs
OPTIMIZERS = {
    "torch.AdamW": (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))),
    "distopt.AdamW": (lambda m: distopt.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                      (distopt.AdamW, dict(lr=1e-2, weight_decay=0.1))),
    # a factory (not an Optimizer subclass) is called as factory()(model, **kwargs): keeps parameter names
    "distopt.Muon": (lambda m: distopt.Muon(m.named_parameters(), **MUON_KW),
                     (lambda: lambda model, **kw: distopt.Muon(model.named_parameters(), **kw), MUON_KW)),
}


class StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == SAVE:
            control.should_training_stop = True  # checkpoint-3 is still written (save_steps=3)


def train(name, out, cls_kwargs=False, stop=False, resume=None):
    build, cls_and_kwargs = OPTIMIZERS[name]
    model = make_model()
    args = TrainingArguments(output_dir=out, use_cpu=True, max_steps=STEPS, per_device_train_batch_size=BATCH,
                             save_steps=SAVE, seed=0, report_to=[], logging_steps=1, dataloader_num_workers=0,
                             disable_tqdm=True)
    kw = dict(model=model, args=args, train_dataset=Data(), callbacks=[StopAt()] if stop else None)
    if cls_kwargs:  # Trainer builds the optimizer (decay / no-decay groups) and its own linear scheduler
        trainer = Trainer(optimizer_cls_and_kwargs=cls_and_kwargs, **kw)
    else:
        opt = build(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / (STEPS + 1)))
        trainer = Trainer(optimizers=(opt, sched), **kw)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def straight_and_resumed(name, cls_kwargs=False, drop_optimizer_pt=False):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        params_a, losses_a = train(name, a, cls_kwargs)
        _, losses_b1 = train(name, b, cls_kwargs, stop=True)
        ckpt = os.path.join(b, f"checkpoint-{SAVE}")
        assert not os.path.exists(os.path.join(b, f"checkpoint-{STEPS}"))
        if drop_optimizer_pt:  # negative control: then Trainer loads neither optimizer nor scheduler
            os.remove(os.path.join(ckpt, "optimizer.pt"))
        params_b, losses_b = train(name, b, cls_kwargs, resume=ckpt)
    assert losses_b1 == losses_a[:SAVE]
    return params_a, losses_a, params_b, losses_b  # losses_b: the resumed log_history starts with checkpoint-3's


@pytest.mark.parametrize("cls_kwargs", [False, True], ids=["optimizers", "cls_and_kwargs"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trainer_resume_bitwise(name, cls_kwargs):
    params_a, losses_a, params_b, losses_b = straight_and_resumed(name, cls_kwargs)
    assert losses_b == losses_a
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    if name == "distopt.AdamW":
        reference, _, _, _ = straight_and_resumed("torch.AdamW", cls_kwargs)
        for k in params_a:
            assert torch.equal(params_a[k], reference[k]), k
