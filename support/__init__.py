"""Support code that is not the method: the built-in checkpoints and their tokenizers (tiny.py), training of the
demo model (train_vqa.py) and plots of the scripts' results (plot.py). The method is in the top-level files."""
