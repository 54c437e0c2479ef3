"""`RankCallback` for the Hugging Face `transformers.Trainer`: ranks logged as you train.

    from transformers import Trainer
    from rankbias.integrations.huggingface import RankCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    RankCallback(every_n_epochs=1, store="results.db").attach(trainer)
    trainer.train()          # logs rankbias/avg_rank, rankbias/<layer>/rank@0.001 ...

Measures the model's matrices (`rankbias.metrics.layers.weight_matrices`: Linear layers, attention
projections; embeddings are not matrices of this kind) with `rankbias.RankTracker` at the
start of training, every `every_n_epochs` epochs and at the end. `attach` registers the
callback and lets it log through `trainer.log`, so the values reach `trainer.state.
log_history` and every reporting integration (TensorBoard, W&B, ...). A callback passed
as `Trainer(callbacks=[RankCallback()])` without `attach` has no handle on the trainer:
its values go to `trainer.state.log_history` only. Only the main process measures. See
rankbias.integrations for the names and the store. Install: pip install
"rankbias[huggingface]". Note: the Trainer's default optimizer is AdamW, whose decoupled
weight decay is not the SGD weight decay of the paper; `optim="sgd"` is.
"""

from __future__ import annotations

from transformers import TrainerCallback

from rankbias.integrations import RankCallbackOptions, RunRecorder


class RankCallback(RankCallbackOptions, TrainerCallback):
    """Logs average and per-layer rank, stable rank and weight change every N epochs.

    `config`: fields recorded with the run in the store; the model type, effective batch
    size (per device x devices x accumulation), learning rate, weight decay, optimizer,
    seed and epochs of the TrainingArguments are filled in when not given.
    """

    def __init__(self, *args, **kwargs) -> None:  # see RankCallbackOptions
        super().__init__(*args, **kwargs)
        self.trainer = None

    def attach(self, trainer) -> RankCallback:
        """Log through `trainer.log` (and register this callback when it is not yet)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        config = {**_inferred_config(args, model), **self.config}
        self.recorder = RunRecorder(model, config=config, **self.options)
        self._track(state, round(state.epoch or 0))

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        epoch = round(state.epoch or 0)
        if self.recorder is not None and self.recorder.due(epoch):
            self._track(state, epoch)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.recorder is None:
            return
        self._track(state, round(state.epoch or 0))  # the final weights (skipped if just done)
        if not self.recorder.stopped:
            self.recorder.finish("done")

    def _track(self, state, epoch: int) -> None:
        metrics = self.recorder.track(state.global_step, epoch)
        if not metrics:
            return
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})


def _inferred_config(args, model) -> dict:
    """What the TrainingArguments and the model say of the run."""
    model_config = getattr(model, "config", None)
    config = {"model": getattr(model_config, "model_type", None) or type(model).__name__,
              "framework": "transformers", "optimizer": str(getattr(args.optim, "value",
                                                                    args.optim)),
              "batch_size": args.train_batch_size * args.gradient_accumulation_steps
              * max(1, args.world_size), "lr": args.learning_rate,
              "weight_decay": args.weight_decay, "seed": args.seed,
              "epochs": args.num_train_epochs}
    return {k: v for k, v in config.items() if v is not None}


__all__ = ["RankCallback"]
