-- One PostgreSQL server, one database each for Prefect and MLflow.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
