pytest_plugins = [
    "tests.fixtures.mosquitto",
    "tests.fixtures.fiftyone_db",
    "tests.fixtures.ultralytics_offline",
    "tests.fixtures.synth_model",
    "tests.fixtures.small_volume",
    "tests.fixtures.prefect_server",
]
