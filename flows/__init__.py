"""Prefect flows: export the curated dataset, retrain, evaluate on the frozen test split, gate,
export ONNX and register the new model. Business logic lives in plain functions
(``flows/training``) that the flows wrap as thin tasks."""
