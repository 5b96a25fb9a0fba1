-- MLflow's tables in their own database, beside Dagster's.
CREATE DATABASE mlflow;
