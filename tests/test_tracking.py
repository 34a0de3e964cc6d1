"""W&B runs are offline by default and their files hold the trial's config and summary; pruning stops a trial."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
import pytorch_lightning as pl

from ablations.pruning import OptunaPruning
from ablations.tracking import TrialRun, read_offline_run, resolve_mode, sync_command


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("online") == "online"
    with pytest.raises(ValueError, match="valid: offline, online, disabled"):
        resolve_mode("cloud")


def test_offline_run_files_hold_config_and_summary(tmp_path):
    config = {"model.alpha": 0.5, "model.recurrent.type": "gru"}
    with TrialRun("offline", "tafm", "table3_recurrent", "stage2", "k-s0", ["model.alpha=0.5", "type=gru"],
                  config, tmp_path) as run:
        run.log({"val/loss": 2.0}, step=1)
        run.summary({"val/vid_map50": 0.375, "params": 1234})
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    stored = read_offline_run(run_dirs[0])
    assert stored["group"] == "table3_recurrent" and stored["job_type"] == "stage2"
    assert set(stored["tags"]) == {"model.alpha=0.5", "type=gru"}
    assert json.loads(stored["config"]["model.alpha"]) == 0.5
    assert json.loads(stored["config"]["model.recurrent.type"]) == "gru"
    assert json.loads(stored["summary"]["val/vid_map50"]) == 0.375
    assert sync_command(tmp_path).startswith("wandb sync ")


def test_disabled_mode_writes_nothing(tmp_path):
    with TrialRun("disabled", "tafm", "g", "stage1", "n", [], {}, tmp_path) as run:
        run.log({"a": 1.0})
    assert not (tmp_path / "wandb").exists() and sync_command(tmp_path) is None


class _Constant(pl.LightningModule):
    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.value = value

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/vid_map50", self.value)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(trial, value, **limits):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    trainer = pl.Trainer(**(limits or {"max_epochs": 3}), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[OptunaPruning(trial, "val/vid_map50")])
    trainer.fit(_Constant(value), data, data)


def test_pruning_callback_stops_a_hopeless_trial():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.8, 0.9):
        trial = study.ask()
        _fit(trial, value)
        study.tell(trial, value)
    hopeless = study.ask()
    with pytest.raises(optuna.TrialPruned):
        _fit(hopeless, 0.1)
    assert hopeless.number in [t.number for t in study.trials]


@pytest.mark.parametrize("limits", [{"max_epochs": 1}, {"max_steps": 2, "val_check_interval": 2}])
def test_pruning_never_discards_a_trial_at_its_last_validation(limits):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.8, 0.9):
        trial = study.ask()
        _fit(trial, value, **limits)
        study.tell(trial, value)
    hopeless = study.ask()
    _fit(hopeless, 0.1, **limits)  # reported, not pruned: its training is over
    assert hopeless.should_prune()


def test_training_progress_reports_steps_rate_and_eta():
    from ablations.progress import TrainProgress

    lines = []
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=2)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         callbacks=[TrainProgress(every_s=0.0, log=lines.append)])
    trainer.fit(_Constant(0.5), data)
    assert lines[-1].startswith("    step 3/3:") and "steps/s" in lines[-1] and "ETA 0s" in lines[-1]
    assert len(lines) == 3


def test_report_tables_are_read_from_the_markdown_by_heading():
    from ablations.tracking import markdown_tables

    text = """# suite: description

| model | mAP | paper | delta | paper |
| --- | --- | --- | --- | --- |
| none | 26.6 | – | – | 1 |
| gru | 29.0 | 50 |

## Costs (paper Tables 3-5)

| component | params |
| --- | --- |
| base | 1.2 |
"""
    tables = markdown_tables(text)
    assert list(tables) == ["main", "costs_paper_tables_3_5"]
    header, rows = tables["main"]
    assert header == ["model", "mAP", "paper", "delta", "paper (2)"]  # W&B tables need unique columns
    assert rows == [["none", "26.6", "–", "–", "1"], ["gru", "29.0", "50", "", ""]]
    assert tables["costs_paper_tables_3_5"] == (["component", "params"], [["base", "1.2"]])


def test_the_report_run_holds_every_table_and_picture(tmp_path):
    import pandas as pd
    from PIL import Image

    from ablations.tracking import log_report

    report = tmp_path / "reports" / "s" / "README.md"
    report.parent.mkdir(parents=True)
    report.write_text("# s\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n## Latency (paper Table 7)\n\n| m | ms |\n| --- | --- |\n| x | 3 |\n")
    Image.new("RGB", (8, 8)).save(report.parent / "fig4.png")
    log_report("offline", "s", tmp_path / "runs", pd.DataFrame({"key": ["k"], "value": [0.5]}), report)
    stored = read_offline_run(next((tmp_path / "runs" / "wandb").glob("offline-run-*")))
    logged = {key: json.loads(value) for row in stored["history"] for key, value in row.items()}
    assert stored["job_type"] == "report" and stored["group"] == "s"
    assert logged["results/_type"] == logged["report/main/_type"] == logged["report/latency_paper_table_7/_type"] == "table-file"
    assert logged["pictures/fig4/_type"] == "image-file"
