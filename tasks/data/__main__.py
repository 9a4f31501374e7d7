"""`python -m tasks.data --config … --inputs … --out …`: the data stage as its own process."""

from posttrain.config import DataConfig
from posttrain.stage_cli import main
from tasks.data import run

main(run, DataConfig)
