"""`python cli.py ...` from a checkout: the same command as the installed `finetune-clip`."""
from finetune_clip.cli import cli

if __name__ == "__main__":
    cli()
