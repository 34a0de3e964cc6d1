"""The stage cache of ablations.runner: which stages a trial trains, from what, and what it reuses."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import ablations.runner as runner
import lightning_modules.fit as fit_module
from ablations.config import UserError, load_config
from ablations.harness import RunOptions, TrialContext
from ablations.runner import trained_stage
from ablations.suite import load_suite, trial_config
from lightning_modules.train_config import LrSchedule


@pytest.fixture
def fits(monkeypatch):
    """Replace training by a record of each call; each 'trained' stage writes an empty checkpoint."""
    calls = []

    def fake_fit(model, data, train, resume=False, callbacks=(), loggers=()):
        calls.append(SimpleNamespace(type=model.recurrent.type.value, after=list(model.recurrent.after),
                                     init=train.init_checkpoint, steps=train.max_steps, clip=data.clip_length,
                                     callbacks=[type(c).__name__ for c in callbacks]))
        checkpoint = Path(train.out_dir) / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        return SimpleNamespace(checkpoint=checkpoint, metrics={})

    monkeypatch.setattr(fit_module, "fit", fake_fit)
    return calls


def _cfg(kind, control):
    after = "[]" if kind == "none" else "[conv13]"
    return load_config([f"model.recurrent.type={kind}", f"model.recurrent.after={after}", "train.max_steps=4",
                        "data.clip_length=10", "sweep.stage1_max_steps=6", "sweep.stage1_clip_length=2",
                        f"sweep.single_frame_stage2={control}"])


def test_single_frame_control_is_finetuned_like_a_stage2_from_the_shared_stage1(fits, tmp_path):
    control = trained_stage(_cfg("none", "true"), tmp_path, log=lambda s: None)
    lstm = trained_stage(_cfg("bottleneck_lstm", "true"), tmp_path, log=lambda s: None)
    stage1, finetune, lstm_stage = fits
    assert (stage1.type, stage1.init, stage1.steps, stage1.clip) == ("none", None, 6, 2)
    assert (finetune.type, finetune.steps, finetune.clip) == ("none", 4, 10)  # the recurrent trials' budget
    assert finetune.init == lstm_stage.init != None  # noqa: E711  both start from the one stage 1
    assert control != lstm and len(fits) == 3  # stage 1 trained once


def test_a_cached_stage_serves_runs_from_another_working_directory_and_after_a_move(fits, tmp_path, monkeypatch):
    """done.json names its checkpoint relative to the stage's directory; one written relative to the working
    directory of the run that trained it (older caches) is found in the stage's directory all the same."""
    monkeypatch.chdir(tmp_path)
    trained_stage(_cfg("none", "true"), Path("runs"), log=lambda s: None)  # a relative runs dir, as the default
    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    Path("runs").rename(moved)
    monkeypatch.chdir(moved.parent.parent.parent)
    found = trained_stage(_cfg("none", "true"), moved, log=lambda s: None)
    assert len(fits) == 2 and found.is_file() and found.parent.parent.parent == moved / runner.STAGES_DIR
    done = found.parent.parent / runner.DONE
    done.write_text(done.read_text().replace('"checkpoints/', f'"runs/{runner.STAGES_DIR}/{found.parent.parent.name}/checkpoints/'))
    assert trained_stage(_cfg("none", "true"), moved, log=lambda s: None) == found and len(fits) == 2  # older cache
    found.unlink()
    with pytest.raises(UserError, match=f"delete .*{found.parent.parent.name}"):  # stops the suite: not retried
        trained_stage(_cfg("none", "true"), moved, log=lambda s: None)


def test_quicks_trials_are_handed_out_learnt_cells_first_and_the_short_rows_last():
    suite = load_suite("quick")
    delta = lambda point: suite.delta("synthetic", point.overrides)  # noqa: E731
    cost = {point.labels["model.recurrent.type"]: runner.expected_cost(trial_config([], delta(point)))
            for point in suite.points}
    assert sorted(cost, key=lambda kind: -cost[kind]) == ["bottleneck_lstm", "gru", "lstm", "none", "averaging"]
    table5 = load_suite("table5_comparison")
    costs = sorted(runner.expected_cost(trial_config([], table5.delta("synthetic", point.overrides)))
                   for point in table5.points)
    assert costs[0] > 0 and costs[-1] >= 5 * 300  # the 5-layer LSTM-SSD: five progressive stages of train.max_steps (>= 300)
    table3 = load_suite("table3_recurrent")
    order = sorted(table3.points, key=lambda p: -runner.expected_cost(trial_config([], table3.delta("synthetic", p.overrides))))
    assert [p.overrides["model.alpha"] for p in order] == [1.0] * 5 + [0.5] * 5  # the wider network's trials first


def test_the_same_network_at_another_width_scale_shares_its_stages():
    """Table 3's alpha 0.5 rows train at width_scale 0.5: the very network of quick's alpha 0.25 rows."""
    table3, quick = load_suite("table3_recurrent"), load_suite("quick")
    half = next(p for p in table3.points if p.overrides["model.alpha"] == 0.5
                and p.overrides["model.recurrent.type"] == "bottleneck_lstm")
    ours = trial_config([], table3.delta("synthetic", half.overrides))
    theirs = trial_config([], quick.delta("synthetic", {"model.recurrent.type": "bottleneck_lstm"}))
    assert (ours.model.alpha, ours.model.width_scale, theirs.model.alpha, theirs.model.width_scale) == (0.5, 0.5, 0.25, 1.0)
    assert runner.stage_hash(ours) == runner.stage_hash(theirs)
    assert runner.stage_hash(runner.stage1_config(ours)) == runner.stage_hash(runner.stage1_config(theirs))
    # the learning rate an unset train.lr resolves to follows model.alpha (paper Sec. 4.1): it is hashed as used
    paper_lr = [load_config(["train.lr=null", *widths]) for widths in
                (["model.alpha=1.0", "model.width_scale=0.5"], ["model.alpha=0.5", "model.width_scale=1.0"])]
    assert runner.stage_hash(paper_lr[0]) != runner.stage_hash(paper_lr[1])
    assert runner.stage_hash(load_config(["model.alpha=1.0", "model.width_scale=0.5", "train.lr=0.003"])) == \
        runner.stage_hash(load_config(["model.alpha=0.5", "train.lr=0.003"]))


def test_trial_work_names_the_shared_stage1_and_counts_cached_stages_as_nothing(fits, tmp_path):
    from ablations.harness import Work

    lstm, control = _cfg("bottleneck_lstm", "true"), _cfg("none", "true")
    before = runner.trial_work(lstm, tmp_path)
    assert before.own == runner.expected_cost(lstm) > 0
    assert before.shared == runner.trial_work(control, tmp_path).shared  # one stage 1, by its hash
    assert before.shared[1] == 6 * runner._size(runner.stage1_config(lstm))  # sweep.stage1_max_steps=6
    trained_stage(lstm, tmp_path, log=lambda s: None)
    assert runner.trial_work(lstm, tmp_path) == Work(0.0, None)  # its stage and stage 1 now cached
    assert runner.trial_work(control, tmp_path) == Work(runner.expected_cost(control), None)


def test_control_stages_give_the_control_the_progressive_rows_steps(fits, tmp_path):
    """Table 5's LSTM-SSD trains 5 progressive stages of train.max_steps; with sweep.control_stages=5 its
    control finetunes for as many steps, and the recurrent rows' stages are the ones they always were."""
    control = _cfg("none", "true")
    control.sweep.control_stages = 5
    trained_stage(control, tmp_path, log=lambda s: None)
    assert [(c.type, c.steps) for c in fits] == [("none", 6), ("none", 20)]  # stage 1, then 5 x 4 steps
    recurrent = _cfg("bottleneck_lstm", "true")
    assert runner.stage_hash(recurrent) == runner.stage_hash(runner.own_stage(recurrent))
    recurrent.sweep.control_stages = 5
    assert runner.stage_hash(recurrent) == runner.stage_hash(_cfg("bottleneck_lstm", "true"))


def test_extra_stages_continue_the_same_model_from_the_one_layer_rows_stage(fits, tmp_path):
    """A one-layer row with sweep.extra_stages=2 is the one-layer row's stage, then two more stages of
    train.max_steps each from the last: the stage-2 steps of three stacked layers, on cached parents."""
    one = trained_stage(_cfg("bottleneck_lstm", "false"), tmp_path, log=lambda s: None)
    longer = _cfg("bottleneck_lstm", "false")
    longer.sweep.extra_stages = 2
    last = trained_stage(longer, tmp_path, log=lambda s: None)
    stage1, first, second, third = fits
    assert [(c.type, c.after, c.steps) for c in (first, second, third)] == [("bottleneck_lstm", ["conv13"], 4)] * 3
    assert stage1.init is None and first.init is not None  # the shared stage 1, then the one-layer row's stage
    assert second.init == str(one)  # each extra stage starts from the last one's checkpoint
    assert third.init not in (None, first.init, second.init, str(last))
    assert runner.stage_hash(_cfg("bottleneck_lstm", "false")) == runner.stage_hash(runner._parent(runner._parent(longer)))
    assert trained_stage(longer, tmp_path, log=lambda s: None) == last and len(fits) == 4  # cached


@pytest.mark.parametrize("override, message", [
    ("sweep.extra_stages=-1", "sweep.extra_stages must be >= 0"),
    ("sweep.control_stages=0", "sweep.control_stages must be >= 1"),
])
def test_bad_stage_counts_are_config_errors(override, message):
    from ablations.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config([override])
    with pytest.raises(ConfigError, match="a single-frame row has none"):
        load_config(["sweep.extra_stages=1", "model.recurrent.type=none", "model.recurrent.after=[]"])


@pytest.mark.parametrize("suite, point", [
    ("fig4_lstm_width", {"model.alpha_lstm": 0.25}),  # same_width false: the axis is the LSTM's width
    ("search_alpha_lstm", {"model.alpha_lstm": 0.1, "model.recurrent.after": ["conv13", "fm1"]}),  # + val every 100
    # any other cell setting a grid axis varies (it did train a second stage 1 of its own)
    ("table3_recurrent", {"model.recurrent.init": "random", "model.recurrent.forget_bias": 0.0,
                          "model.recurrent.fm_width_rule": "half", "model.recurrent.activation": "relu"}),
])
def test_suites_that_set_recurrent_or_pruning_keys_share_the_profiles_stage1(suite, point):
    """Stage 1 has no recurrent layer and is not pruned: Figure 4 and the search start from the stage 1 that
    Tables 2-5 train (one per seed), not from one of their own that would cost 3 x 2,400 steps more."""
    table2 = load_suite("table2_placement")
    theirs = trial_config([], {**table2.delta("synthetic", table2.points[2].overrides), "seed": 1})
    ours = trial_config([], {**load_suite(suite).delta("synthetic", point), "seed": 1})
    assert runner.stage_hash(runner.stage1_config(ours)) == runner.stage_hash(runner.stage1_config(theirs))
    assert runner.stage_hash(ours) != runner.stage_hash(theirs)
    assert ours.train.val_every_n_steps == (100 if suite.startswith("search") else None)  # the trial's own stage


def test_without_the_control_the_single_frame_row_is_stage1(fits, tmp_path):
    single = trained_stage(_cfg("none", "false"), tmp_path, log=lambda s: None)
    trained_stage(_cfg("bottleneck_lstm", "false"), tmp_path, log=lambda s: None)
    assert [c.type for c in fits] == ["none", "bottleneck_lstm"]
    assert fits[1].init == str(single)
    # the control and the plain suite share that stage 1: only the finetune is new
    trained_stage(_cfg("none", "true"), tmp_path, log=lambda s: None)
    assert len(fits) == 3 and fits[2].init == str(single) and fits[2].steps == 4


def test_extra_callbacks_join_only_the_trials_own_stage(fits, tmp_path):
    trained_stage(_cfg("bottleneck_lstm", "false"), tmp_path, log=lambda s: None, callbacks=[object()])
    assert [c.callbacks for c in fits] == [["TrainProgress", "LendIdleCores"],  # stage 1 is shared
                                           ["TrainProgress", "LendIdleCores", "object"]]


def test_workers_waiting_for_a_stage_lend_it_their_cores_unless_told_not_to(fits, tmp_path):
    cfg = _cfg("none", "false")
    cfg.sweep.lend_idle_cores = False
    trained_stage(cfg, tmp_path, log=lambda s: None)
    assert [c.callbacks for c in fits] == [["TrainProgress"]]
    assert runner.stage_hash(cfg) == runner.stage_hash(_cfg("none", "false"))  # same maths, same stage


@pytest.mark.parametrize("suite, pruned", [("search_alpha_lstm", True), ("smoke", False)])
def test_search_suites_prune_their_trials(monkeypatch, tmp_path, suite, pruned):
    seen = []

    def stop(cfg, runs_dir, log, callbacks=(), tracking=None):
        seen.extend(callbacks)
        raise StopIteration  # enough: the trial's training was about to start

    monkeypatch.setattr(runner, "trained_stage", stop)
    trial = SimpleNamespace(number=0)
    ctx = TrialContext(suite=load_suite(suite), key="k", point=None, seed=0, labels={}, run_dir=tmp_path / "run",
                       trial=trial, options=RunOptions(runs_dir=tmp_path))
    with pytest.raises(StopIteration):
        runner.run_trial(_cfg("bottleneck_lstm", "false"), ctx, "disabled", log=lambda s: None)
    assert [(type(c).__name__, c.trial, c.monitor) for c in seen] == (
        [("OptunaPruning", trial, "val/vid_map50")] if pruned else [])


@pytest.mark.parametrize("alpha_lstm, over", [(0.5, True), (0.03, False)])
def test_search_mac_budget_is_counted_at_the_papers_scale(alpha_lstm, over):
    """search_alpha_lstm's 1.15B budget is the paper's (alpha 1 @320): at the synthetic profile's width_scale
    0.5 @192 every point fits it, so the budget must be counted on the paper-scale network."""
    suite = load_suite("search_alpha_lstm")
    cfg = trial_config([], suite.delta("synthetic", {"model.alpha_lstm": alpha_lstm,
                                                     "model.recurrent.after": ["conv13"]}))
    assert (cfg.model.width_scale, cfg.model.input_size) == (0.5, 192)
    reason = runner.over_mac_budget(cfg, suite)
    assert (reason is not None) == over
    if over:
        assert "over the budget 1.150B" in reason and "width_scale 1, input 320" in reason
    assert runner.over_mac_budget(cfg, load_suite("table3_recurrent")) is None  # no search, no budget


def test_lstm_widths_share_one_stage1(fits, tmp_path):
    """Figure 4 varies alpha_lstm only: a width the single-frame SSD does not have must not retrain it."""
    for width in ("0.0625", "0.25"):
        cfg = _cfg("bottleneck_lstm", "false")
        cfg.model.alpha_lstm = float(width)
        trained_stage(cfg, tmp_path, log=lambda s: None)
    assert [c.type for c in fits] == ["none", "bottleneck_lstm", "bottleneck_lstm"]


def test_speed_settings_and_stage2_warm_start_do_not_split_the_stage_cache():
    base = _cfg("gru", True)
    fast = load_config(["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
                        "data.clip_length=10", "sweep.stage1_max_steps=6", "sweep.stage1_clip_length=2",
                        "sweep.single_frame_stage2=True", "train.threads=0", "train.fold_bn=false",
                        "train.compile=true", "train.distill_steps=50", "train.freeze=none",
                        "train.init_from_ema=true"])
    assert runner.stage_hash(runner.stage1_config(base)) == runner.stage_hash(runner.stage1_config(fast))
    assert runner.stage_hash(base) != runner.stage_hash(fast)  # the warm start does change stage 2
    nhwc = load_config(["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
                        "data.clip_length=10", "sweep.stage1_max_steps=6", "sweep.stage1_clip_length=2",
                        "sweep.single_frame_stage2=True", "train.channels_last=true"])
    # NHWC with exact BatchNorm sums keeps the maths: the stages cached in NCHW serve it
    assert runner.stage_hash(base) == runner.stage_hash(nhwc)
    assert runner.stage_hash(runner.stage1_config(base)) == runner.stage_hash(runner.stage1_config(nhwc))


def test_recurrent_lr_factor_splits_only_the_stages_with_a_cell():
    keys = ["model.recurrent.after=[conv13]", "train.max_steps=4", "sweep.stage1_max_steps=6",
            "sweep.single_frame_stage2=True"]
    gru, faster = load_config(keys + ["model.recurrent.type=gru"]), load_config(
        keys + ["model.recurrent.type=gru", "train.recurrent_lr_factor=3.0"])
    assert runner.stage_hash(gru) != runner.stage_hash(faster)
    assert runner.stage_hash(gru) == runner.stage_hash(
        load_config(keys + ["model.recurrent.type=gru", "train.recurrent_lr_factor=1.0"]))  # stages cached before it
    assert runner.stage_hash(runner.stage1_config(gru)) == runner.stage_hash(runner.stage1_config(faster))
    control = ["model.recurrent.type=none", "model.recurrent.after=[]", "train.max_steps=4"]
    assert runner.stage_hash(load_config(control)) == runner.stage_hash(
        load_config(control + ["train.recurrent_lr_factor=3.0"]))  # no cell: the control's stage is shared


def test_stage1_ema_decay_sets_stage1s_ema_only():
    keys = ["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
            "sweep.stage1_max_steps=6", "train.ema_decay=0.98"]
    plain, smooth = load_config(keys), load_config(keys + ["sweep.stage1_ema_decay=0.995"])
    assert runner.stage1_config(smooth).train.ema_decay == 0.995 and smooth.train.ema_decay == 0.98
    assert runner.stage1_config(plain).train.ema_decay == 0.98
    assert runner.stage_hash(runner.stage1_config(plain)) != runner.stage_hash(runner.stage1_config(smooth))
    assert runner.stage_hash(plain) != runner.stage_hash(smooth)  # its stage 2 starts from another stage 1
    assert runner.stage_hash(plain) == runner.stage_hash(load_config(keys + ["sweep.stage1_ema_decay=null"]))
    with pytest.raises(ValueError, match="sweep.stage1_ema_decay must be in"):
        load_config(keys + ["sweep.stage1_ema_decay=1.0"])
    # stage 2's own EMA varied over one stage 1: stage 1 is hashed by the EMA it trains with, not by the key
    fast = load_config(keys[:-1] + ["train.ema_decay=0.9", "sweep.stage1_ema_decay=0.98"])
    assert runner.stage_hash(runner.stage1_config(fast)) == runner.stage_hash(runner.stage1_config(plain))
    assert runner.stage_hash(fast) != runner.stage_hash(plain)


def test_stage1_rms_init_keeps_stage1_while_stage2_starts_at_full_steps():
    keys = ["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
            "sweep.stage1_max_steps=6"]
    plain = load_config(keys)
    quick_start = load_config(keys + ["train.rms_init=0.0", "sweep.stage1_rms_init=1.0"])
    assert quick_start.train.rms_init == 0.0 and runner.stage1_config(quick_start).train.rms_init == 1.0
    assert runner.stage_hash(runner.stage1_config(quick_start)) == runner.stage_hash(runner.stage1_config(plain))
    assert runner.stage_hash(quick_start) != runner.stage_hash(plain)
    assert runner.stage_hash(plain) == runner.stage_hash(load_config(keys + ["train.rms_init=1.0"]))  # cached stages
    with pytest.raises(ValueError, match="sweep.stage1_rms_init must be >= 0"):
        load_config(keys + ["sweep.stage1_rms_init=-1.0"])
    with pytest.raises(ValueError, match="train.rms_init must be >= 0"):
        load_config(keys + ["train.rms_init=-1.0"])


def test_stage1_cue_prob_trains_stage1_on_the_synthetic_twin(tmp_path):
    """sweep.stage1_cue_prob: stage 1 is the very stage 1 of a suite run on the twin (data.synthetic_cue_prob);
    stage 2 stays on the benchmark; a real dataset (no generator manifest) trains stage 1 on itself."""
    keys = ["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
            "sweep.stage1_max_steps=6"]
    own = load_config(keys + ["sweep.stage1_cue_prob=1.0"])
    twin = load_config(keys + ["data.synthetic_cue_prob=1.0"])
    plain = load_config(keys)
    stage1 = runner.stage1_config(own)
    assert stage1.data.synthetic_cue_prob == 1.0 and stage1.sweep.stage1_cue_prob is None
    assert own.data.synthetic_cue_prob is None  # stage 2 and the rows: the benchmark itself
    assert runner.stage_hash(stage1) == runner.stage_hash(runner.stage1_config(twin))
    assert runner.stage_hash(stage1) != runner.stage_hash(runner.stage1_config(plain))
    real = load_config(keys + ["sweep.stage1_cue_prob=1.0", f"data.root={tmp_path}"])
    assert runner.stage1_config(real).data.synthetic_cue_prob is None
    (tmp_path / "tafm_synth.json").write_text("{}")  # written by `tafm data synth`: it has a twin
    assert runner.stage1_config(real).data.synthetic_cue_prob == 1.0


def test_stage1_data_root_trains_stage1_there_and_stage2_on_data_root():
    """sweep.stage1_data_root: stage 1 is the very stage 1 of a suite whose data.root is that dataset."""
    own = load_config(["model.recurrent.type=bottleneck_lstm", "model.recurrent.after=[conv13]", "train.max_steps=4",
                       "sweep.stage1_max_steps=6", "data.root=/data/default", "sweep.stage1_data_root=/data/cue1"])
    there = load_config(["model.recurrent.type=bottleneck_lstm", "model.recurrent.after=[conv13]",
                         "train.max_steps=4", "sweep.stage1_max_steps=6", "data.root=/data/cue1"])
    assert runner.stage1_config(own).data.root == "/data/cue1" and own.data.root == "/data/default"
    assert runner.stage_hash(runner.stage1_config(own)) == runner.stage_hash(runner.stage1_config(there))
    assert runner.stage_hash(own) != runner.stage_hash(there)  # stage 2 trains on its own data.root



def test_stage1_lr_schedule_sets_stage1s_schedule_only_and_keeps_cached_hashes():
    keys = ["model.recurrent.type=gru", "model.recurrent.after=[conv13]", "train.max_steps=4",
            "sweep.stage1_max_steps=6"]
    plain, cosine = load_config(keys), load_config(keys + ["sweep.stage1_lr_schedule=cosine"])
    assert runner.stage1_config(cosine).train.lr_schedule == LrSchedule.cosine
    assert cosine.train.lr_schedule == LrSchedule.step  # stage 2 keeps its own
    assert runner.stage_hash(runner.stage1_config(cosine)) != runner.stage_hash(runner.stage1_config(plain))
    assert runner.stage_hash(cosine) != runner.stage_hash(plain)  # its stage 2 starts from another stage 1
    # one stage 1 whether its schedule comes from the sweep key or from train's own
    everywhere = load_config(keys + ["train.lr_schedule=cosine"])
    assert runner.stage_hash(runner.stage1_config(cosine)) == runner.stage_hash(runner.stage1_config(everywhere))
    # the default is not hashed: every stage cached before the key existed keeps its hash
    assert runner.stage_hash(plain) == runner.stage_hash(load_config(keys + ["train.lr_schedule=step"]))
    assert runner.stage_hash(plain) == runner.stage_hash(load_config(keys + ["sweep.stage1_lr_schedule=null"]))
    with pytest.raises(ValueError, match="lr_schedule"):
        load_config(keys + ["train.lr_schedule=linear"])
