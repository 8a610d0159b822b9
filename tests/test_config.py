"""Device defaults: settings left unset take their device's values (a GPU's batch size and compute
type on cuda, a CPU's on cpu); settings given, by variable or flag, win on either device."""

from __future__ import annotations

import config


def test_a_cpu_worker_gets_cpu_sized_defaults():
    settings = config.load({})
    assert (settings["COMPUTE_TYPE"], settings["MAX_BATCH_SIZE"], settings["CONCURRENCY"]) == ("int8", 16, 16)


def test_a_cuda_worker_gets_gpu_sized_defaults_from_the_variable_or_the_flag():
    for settings in (config.load({"GENQUEUE_DEVICE": "cuda"}), config.load({}, device="cuda")):
        assert (settings["COMPUTE_TYPE"], settings["MAX_BATCH_SIZE"], settings["CONCURRENCY"]) == (
            "int8_float16",
            64,
            64,
        )


def test_explicit_settings_win_on_either_device():
    environ = {"GENQUEUE_DEVICE": "cuda", "GENQUEUE_MAX_BATCH_SIZE": "32", "GENQUEUE_COMPUTE_TYPE": "float16"}
    settings = config.load(environ, concurrency=40)
    assert (settings["COMPUTE_TYPE"], settings["MAX_BATCH_SIZE"], settings["CONCURRENCY"]) == ("float16", 32, 40)
    cpu = config.load({"GENQUEUE_MAX_BATCH_SIZE": "4"}, compute_type="float32")
    assert (cpu["COMPUTE_TYPE"], cpu["MAX_BATCH_SIZE"], cpu["CONCURRENCY"]) == ("float32", 4, 16)


def test_every_device_default_names_a_setting_left_unset_in_defaults():
    for values in config.DEVICE_DEFAULTS.values():
        assert all(config.DEFAULTS[name] is None for name in values)
