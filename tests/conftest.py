pytest_plugins = ["tests.fixtures.mosquitto", "tests.fixtures.fiftyone_db"]
