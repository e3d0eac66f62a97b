import math

import numpy as np
import pytest

from ssl_distill.engine.schedules import cosine_schedule, frozen_last_layer, linear_scaled_lr, teacher_temp_schedule


def test_cosine_with_warmup_hand_values():
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=5, warmup_epochs=1)
    assert len(s) == 10
    np.testing.assert_allclose(s[:5], np.linspace(0, 1, 5))
    # cosine part: iters 0..4 of 5 -> 0.5 * (1 + cos(pi * i / 5))
    np.testing.assert_allclose(s[5:], [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)])


def test_weight_decay_and_momentum_go_to_final():
    wd = cosine_schedule(0.04, 0.4, 10, 100)
    assert abs(wd[0] - 0.04) < 1e-12 and abs(wd[-1] - 0.4) < 1e-4 and np.all(np.diff(wd) >= 0)
    m = cosine_schedule(0.996, 1.0, 10, 100)
    assert abs(m[0] - 0.996) < 1e-12 and m[-1] > 0.99999


def test_teacher_temperature_warmup_per_iteration():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=2, epochs=4, iters_per_epoch=10)
    assert len(t) == 40 and t[0] == 0.04 and np.all(t[20:] == 0.07)
    assert np.all(np.diff(t[:21]) > 0)


def test_linear_scaling_and_last_layer_freeze():
    assert linear_scaled_lr(0.0005, 1024) == 0.002
    assert frozen_last_layer(9, 10, 1) and not frozen_last_layer(10, 10, 1)


def test_fractional_epochs_end_mid_epoch_with_the_schedule_annealed():
    """optim.epochs=2.5 at 10 iterations per epoch: 25 iterations, the cosine reaching its final value
    on the last one, the warmup counted in iterations as before."""
    from ssl_distill.engine.schedules import cosine_schedule, teacher_temp_schedule, total_iterations

    assert total_iterations(2.5, 10) == 25 and total_iterations(3, 7) == 21 and total_iterations(0.5, 3) == 2
    lr = cosine_schedule(1.0, 0.1, 2.5, 10, warmup_epochs=0.5)
    assert len(lr) == 25 and lr[4] == 1.0 and lr[0] == 0.0
    assert lr[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 19 / 20)))
    temp = teacher_temp_schedule(0.04, 0.07, 1.0, 2.5, 10)
    assert len(temp) == 25 and temp[10] == 0.07 and temp[9] < 0.07
