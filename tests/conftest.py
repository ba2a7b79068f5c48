pytest_plugins = ["tests.fixtures.mosquitto"]
