"""What a training run needs: its settings (config), its file (checkpoint), the processes and the step of the
loop in train_draem.py, progress display, the scripts' device choice and errors, and the demo dataset."""
