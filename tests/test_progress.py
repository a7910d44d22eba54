"""The run's schedule of due actions, its NaN watch, and the list of trainables each method asks for."""

from types import SimpleNamespace

import pytest
import torch

from helpers.config import TrainConfig
from helpers.train.errors import TrainingError
from helpers.train.methods import LoraLayers, NewTokens, WholeUNet, describe_methods, methods_for
from helpers.train.progress import MAX_NAN_SKIPS, Due, NanWatch, Schedule


def _schedule(**kw) -> Schedule:
    return Schedule(**{"max_steps": 12, "batches_per_epoch": 6, "log_every": 4, **kw})


def test_log_is_due_at_its_interval_at_validation_and_at_the_last_step():
    s = _schedule(validate_every=3)
    logged = [step for step in range(1, 13) if s.after_step(step, 1).log]
    assert logged == [3, 4, 6, 8, 9, 12]
    assert [step for step in range(1, 13) if s.after_step(step, 1).validate] == [3, 6, 9, 12]


def test_saves_and_states_are_not_due_at_the_last_step_the_final_save_covers_it():
    s = _schedule(save_every=4, state_every=4, sample_every=4)
    assert s.after_step(4, 4) == Due(log=True, sample=True, save=True, state=True)
    last = s.after_step(12, 6)
    assert last.log and last.sample and not last.save and not last.state


def test_a_state_due_on_an_epochs_last_batch_waits_for_the_epoch_end():
    s = _schedule(state_every=6, save_every_epochs=1)
    assert not s.after_step(6, 6).state             # the 6th batch of 6: not mid-epoch
    assert s.after_epoch(6, 6, 0) == Due(save=True, state=True)
    assert s.after_step(6, 5).state                 # with accumulation or resume the same step can fall mid-epoch
    assert not s.after_epoch(12, 6, 1)              # the run's end: the final save, no state


def test_nothing_due_is_false():
    assert not Due()
    assert not _schedule().after_step(1, 1)


def _acc(processes: int = 1):
    return SimpleNamespace(device=torch.device("cpu"), num_processes=processes, is_main_process=True)


ADVICE = dict(precision="no", learning_rate=1e-3, optimizer="adamw", family="sd1", vae=None)


def test_stop_policy_notes_the_first_bad_step_and_raises_only_when_checked():
    watch = NanWatch("stop", _acc(), advice=ADVICE)
    for step, value in [(1, 0.5), (2, float("nan")), (3, float("inf")), (4, 0.2)]:
        assert watch.finite(torch.tensor(value), step, None) is True  # never decides per step
    assert int(watch.first_bad) == 2
    with pytest.raises(TrainingError, match="The loss became NaN or infinite at step 2"):
        watch.check(None)


def test_stop_policy_check_passes_when_every_loss_was_finite():
    watch = NanWatch("stop", _acc(), advice=ADVICE)
    watch.finite(torch.tensor(0.1), 1, None)
    watch.check(None)
    assert int(watch.first_bad) == 0


def test_skip_policy_skips_bad_steps_and_stops_after_five_in_a_row(capsys):
    watch = NanWatch("skip", _acc(), advice=ADVICE)
    assert watch.finite(torch.tensor(float("nan")), 1, None) is False
    assert watch.finite(torch.tensor(0.3), 2, None) is True and watch.in_row == 0
    for step in range(3, 3 + MAX_NAN_SKIPS - 1):
        assert watch.finite(torch.tensor(float("nan")), step, None) is False
    assert "step 6: loss is NaN/inf, step skipped (4 in a row)" in capsys.readouterr().out
    with pytest.raises(TrainingError, match=r"\(5 bad steps in a row were skipped\)"):
        watch.finite(torch.tensor(float("nan")), 7, None)
    assert watch.skipped == MAX_NAN_SKIPS + 1


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(pretrained_model="x", train_data_dir="x", **kw)


def test_each_method_is_a_list_of_trainables_in_optimizer_group_order():
    assert [type(m) for m in methods_for(_cfg())] == [LoraLayers]
    assert [type(m) for m in methods_for(_cfg(method="dreambooth"))] == [WholeUNet]
    assert [type(m) for m in methods_for(_cfg(method="textual_inversion", token_string="<sks>",
                                              init_word="flower"))] == [NewTokens]
    pivotal = methods_for(_cfg(token_string="<sks>", init_word="flower"))
    assert [type(m) for m in pivotal] == [LoraLayers, NewTokens]
    assert pivotal[1].file_suffix == "_emb"  # its embedding is saved beside the LoRA of the same name


def test_method_descriptions_read_as_one_line():
    assert describe_methods(methods_for(_cfg(rank=8, alpha=4.0, target="attention"))) == \
        "LoRA rank 8 alpha 4.0 (attention)"
    assert describe_methods(methods_for(_cfg(token_string="<sks>", init_word="flower", num_vectors_per_token=2))) \
        == "LoRA rank 16 alpha 16.0 (attention) + new token '<sks>' x2 from 'flower'"
    assert describe_methods(methods_for(_cfg(method="textual_inversion", token_string="<sks>",
                                             init_word="flower"))) == \
        "Textual Inversion: new token '<sks>' x1 from 'flower'"
    assert describe_methods(methods_for(_cfg(method="dreambooth"))) == "DreamBooth: full UNet"
