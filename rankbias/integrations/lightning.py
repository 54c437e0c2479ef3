"""`RankCallback` for PyTorch Lightning: the rank of every weight matrix, logged as you train.

    import lightning.pytorch as pl
    from rankbias.integrations.lightning import RankCallback

    trainer = pl.Trainer(max_epochs=30, callbacks=[RankCallback(every_n_epochs=1,
                                                                store="results.db")])
    trainer.fit(model, train_loader)   # logs rankbias/avg_rank, rankbias/<layer>/rank@0.001 ...

Measures the LightningModule's matrices (`rankbias.metrics.layers.weight_matrices`) with
`rankbias.RankTracker` at the start of training, every `every_n_epochs` epochs and at the
end, and sends the values to every logger of the trainer (`logger.log_metrics`, at the
trainer's global step). Only the global-zero process measures. See rankbias.integrations
for the names and the store. Install: pip install "rankbias[lightning]".
"""

from __future__ import annotations

import lightning.pytorch as pl

from rankbias.integrations import RankCallbackOptions, RunRecorder


class RankCallback(RankCallbackOptions, pl.Callback):
    """Logs average and per-layer rank, stable rank and weight change every N epochs.

    `config`: fields recorded with the run in the store (model, dataset, seed, ...); the
    batch size, learning rate, weight decay and momentum of the first parameter group, the
    LightningModule's class name and max_epochs are filled in when not given.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        config = {**_inferred_config(trainer, pl_module), **self.config}
        self.recorder = RunRecorder(pl_module, config=config, **self.options)
        self._track(trainer, trainer.current_epoch)  # the initialization (or the resumed point)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs done
        if self.recorder is not None and self.recorder.due(epoch):
            self._track(trainer, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None:
            return
        self._track(trainer, trainer.current_epoch)  # the final weights (skipped if just done)
        if not self.recorder.stopped:
            self.recorder.finish("done")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.recorder is not None and not self.recorder.stopped:
            self.recorder.finish("failed", f"{type(exception).__name__}: {exception}")

    def _track(self, trainer: pl.Trainer, epoch: int) -> None:
        metrics = self.recorder.track(trainer.global_step, epoch)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _inferred_config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    """What the trainer knows of the run: model class, batch size, lr, weight decay, epochs."""
    group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
    loader = trainer.train_dataloader
    config = {"model": type(pl_module).__name__, "framework": "lightning",
              "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
              "batch_size": getattr(loader, "batch_size", None), "lr": group.get("lr"),
              "weight_decay": group.get("weight_decay"), "momentum": group.get("momentum"),
              "epochs": trainer.max_epochs}
    return {k: v for k, v in config.items() if v is not None}


__all__ = ["RankCallback"]
