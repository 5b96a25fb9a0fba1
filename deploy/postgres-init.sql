-- MLflow's tables in their own database, beside Dagster's.
CREATE DATABASE mlflow;
-- Served responses and users' feedback (the model server writes, Dagster reads).
CREATE DATABASE feedback;
