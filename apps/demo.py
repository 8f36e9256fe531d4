"""Launcher for the difffeat Gradio demo (the app lives in ``difffeat.demo``): ``python apps/demo.py --model shapes``."""
from difffeat.demo import main

if __name__ == "__main__":
    main()
