"""fxcc.autotune: measurement, search spaces and Optuna studies."""
