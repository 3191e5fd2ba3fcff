"""`python -m tinymed.cli` (used by `accelerate launch -m tinymed.cli finetune ...`)."""

from tinymed.cli import main

main()
